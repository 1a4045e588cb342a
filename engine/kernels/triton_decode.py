"""Paged decode attention for CUDA in Triton: the contract of engine.kernels.paged_decode.

One program per (sequence, KV head): the query heads sharing that KV head form one
[group, head_dim] tile (padded to 16 rows, the smallest `tl.dot` tile), so each key and
value row is loaded once per group and a tile of keys costs two matrix products. A tile
spans several pool blocks; the block table turns each key position into its slot. K and V
are widened to float32 in registers: the products run as tf32, which holds bf16 and fp16
values exactly, and float32 pools use full float32 products (the exactness contract).
Decode attention is bound by reading K/V, not by these products.

Batch jobs decode hundreds of sequences at once, so (sequences x KV heads) programs fill
the GPU without splitting a context across programs (flash-decoding's split-K), which
pays only for a few long sequences.

Tested on CPUs through Triton's interpreter (TRITON_INTERPRET=1, set before this module
is imported) against the plain reference, and on CUDA by the same tests where a GPU is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_KEYS_PER_TILE = 64


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_pool_ptr,
    v_pool_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    table_width,
    window,
    scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KEYS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(lens_ptr + seq)
    first_key = tl.where(window > 0, tl.maximum(context - window, 0), 0)

    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = heads < GROUP
    dim_ok = dims < HEAD_DIM
    # q and out are [batch, KV_HEADS * GROUP, HEAD_DIM], contiguous.
    rows = (seq * KV_HEADS * GROUP + kv_head * GROUP + heads) * HEAD_DIM
    q = tl.load(
        q_ptr + rows[:, None] + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :], other=0.0,
    ).to(tl.float32)

    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    denom = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
    table = tables_ptr + seq.to(tl.int64) * table_width
    tile_start = (first_key // KEYS) * KEYS
    for start in range(tile_start, context, KEYS):
        positions = start + tl.arange(0, KEYS)
        key_ok = (positions >= first_key) & (positions < context)
        blocks = tl.load(table + positions // BLOCK_SIZE, mask=key_ok, other=0)
        # Pool layout [block, kv_head, offset, head_dim].
        slots = ((blocks * KV_HEADS + kv_head) * BLOCK_SIZE + positions % BLOCK_SIZE) * HEAD_DIM
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        keys = tl.load(k_pool_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(keys.to(tl.float32)), input_precision=PRECISION)
        scores = tl.where(key_ok[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        denom = denom * rescale + tl.sum(weights, 1)
        values = tl.load(v_pool_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(
            weights, values.to(tl.float32), input_precision=PRECISION
        )
        running_max = new_max

    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & dim_ok[None, :],
    )


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    window: int,
) -> None:
    """engine.kernels.paged_decode's work on the tensors' device (CUDA, or the CPU under
    Triton's interpreter), written into out (all contiguous; window 0: none)."""
    batch, num_heads, head_dim = q.shape
    _, kv_heads, block_size, _ = k_pool.shape
    group = num_heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_pool, v_pool, block_tables, context_lens, out,
        block_tables.shape[1], window, scale,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        KEYS=_KEYS_PER_TILE,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
