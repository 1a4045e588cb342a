"""Paged attention in portable PyTorch (CPU and CUDA).

KV cache layout, per layer: K and V pools of shape [num_blocks, kv_heads, block_size,
head_dim]. Token position p of a sequence lives in block `block_table[p // block_size]`
at offset `p % block_size`. A block is one contiguous run of memory, so a batch of blocks
gathered by id is a batch of [block_size, head_dim] matrices per KV head.

Each step first writes the new tokens' K/V into their slots, then attends from the cache.
What the step's rows are (slots, decode batch and pairs, prefill chunks, reused buffers)
comes from engine/attention_metadata.py, built once per step for every layer.

Decode tokens (one query each) are attended to together, without padding every context to
the longest: the step lists the (sequence, block) pairs that decode tokens read (only the
blocks inside a sliding window), gathers exactly those blocks into a reused buffer, and
computes scores and weighted values per pair with batched matmuls (grouped-query heads
share their KV head's block: no widening). The softmax runs over each sequence's pairs
(segment max and sum with scatter/index_add). This beats gathering the contexts padded to
the longest and calling scaled_dot_product_attention, whose CPU kernel is slow for one
query row and strided K/V; and fresh allocations of the gathered KV (page faults on every
step) would cost more than the copy itself, hence the reused buffer.

Where a kernel exists (engine/kernels: C on CPUs, Triton on CUDA), decode tokens go to it
instead: it reads each sequence's blocks in place from the pool with an online softmax in
float32, moving only the KV bytes themselves, which is faster again than the gather above.
The portable path stays for machines without a C compiler or Triton.

Prefill chunks (several queries of one sequence) go to scaled_dot_product_attention, one
call per chunk: over the chunk's own K/V when nothing is cached before it (no gather),
else over its gathered context. A fused paged kernel can replace `PagedAttention` later
and keep the block tables, slot mapping and positions as its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.attention_metadata import AttentionMetadata, DecodePairs, PrefillChunk, Workspace


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    pairs: DecodePairs,
    scale: float,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """One query per sequence against its paged context.

    q: [B, heads, head_dim]; pools: [num_blocks, kv_heads, block_size, head_dim].
    Returns [B, heads, head_dim] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    num_pairs = pairs.block_ids.shape[0]
    kv_heads = k_pool.shape[1]
    group = num_heads // kv_heads
    if workspace is None:
        workspace = Workspace()
    keys, values = workspace.buffers(k_pool, num_pairs)
    torch.index_select(k_pool, 0, pairs.block_ids, out=keys)
    torch.index_select(v_pool, 0, pairs.block_ids, out=values)
    # Query heads h*group .. h*group+group-1 share KV head h (as repeat_kv).
    q_pairs = q.view(batch, kv_heads, group, head_dim).index_select(0, pairs.seq_index)
    scores = torch.matmul(q_pairs, keys.transpose(-1, -2)).float()  # [P, kv, group, bs]
    scores.mul_(scale).add_(pairs.bias)
    # Softmax over each sequence's pairs: subtract the sequence's max, normalise by its sum.
    block_max = scores.amax(-1)
    seq_max = torch.full(
        (batch, kv_heads, group), float("-inf"), dtype=torch.float32, device=q.device
    ).scatter_reduce_(0, pairs.seq_index[:, None, None].expand_as(block_max), block_max, "amax")
    weights = scores.sub_(seq_max.index_select(0, pairs.seq_index)[..., None]).exp_()
    # index_add_ over 2-D rows: on CPU the N-D form falls back to a slow scatter.
    denom = torch.zeros(batch, num_heads, 1, dtype=torch.float32, device=q.device)
    denom.view(batch, num_heads).index_add_(
        0, pairs.seq_index, weights.sum(-1).view(num_pairs, num_heads)
    )
    partial = torch.matmul(weights.to(q.dtype), values)  # [P, kv, group, head_dim]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    out.view(batch, -1).index_add_(
        0, pairs.seq_index, partial.view(num_pairs, -1).to(torch.float32)
    )
    return out.div_(denom).to(q.dtype)


class PagedAttention(nn.Module):
    """Attention of one layer over its paged KV cache (bound by the model runner)."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, kv_heads, block_size, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache is not allocated")
        # Pool[block, :, offset] = new K/V (the advanced indices' dim comes first: [T, kv, d]).
        self.k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
        self.v_cache[meta.slot_blocks, :, meta.slot_offsets] = v

        out = torch.empty_like(q)
        if meta.decode is not None:
            batch = meta.decode
            queries = q.index_select(0, batch.rows)
            if batch.pairs is None:
                attended = kernels.paged_decode(
                    queries, self.k_cache, self.v_cache, batch.block_tables,
                    batch.context_lens, self.scale, self.sliding_window,
                )
            else:
                attended = paged_decode_attention(
                    queries, self.k_cache, self.v_cache,
                    batch.pairs[self.sliding_window], self.scale, meta.workspace,
                )
            out.index_copy_(0, batch.rows, attended)
        for chunk in meta.prefills:
            if chunk.block_table is None:
                keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
                values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            else:
                keys = self._context(self.k_cache, chunk)
                values = self._context(self.v_cache, chunk)
            attended = self._attend(
                q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0), keys, values,
                chunk.masks[self.sliding_window],
            )
            out[chunk.start : chunk.end] = attended[0].transpose(0, 1)
        return out

    def _context(self, pool: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        """The chunk's whole context from the pool: [1, kv_heads, context_len, head_dim]."""
        assert chunk.block_table is not None
        blocks = pool.index_select(0, chunk.block_table)  # [n, kv_heads, block_size, d]
        context = blocks.transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)
        return context[None, :, : chunk.context_len]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
