"""The paged attention paths against a plain reference on random inputs.

Ragged contexts (one token, exact block multiples, partial blocks), grouped-query heads,
sliding windows, decode rows and prefill chunks (with and without a cached prefix) in
one flat batch, random block tables.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import (
    PagedAttention,
    Workspace,
    build_attention_metadata,
    padded_block_tables,
)

BLOCK_SIZE = 4


def reference(q, keys, values, query_positions, window, scale):
    """q: [n, heads, d] at query_positions; keys/values: [context, kv_heads, d] (float64)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    values = values.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,khd->hnk", q, keys) * scale
    key_positions = torch.arange(keys.shape[0])[None, :]
    allowed = key_positions <= query_positions[:, None]
    if window is not None:
        allowed &= key_positions > query_positions[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnk,khd->nhd", torch.softmax(scores, -1), values)


def run_case(seed, heads, kv_heads, window, dtype, query_lens, context_lens):
    """Sequence i has context_lens[i] tokens once its query_lens[i] new ones are written."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    head_dim = 8
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_per_seq]

    attn = PagedAttention(heads, kv_heads, head_dim, window)
    attn.k_cache = torch.randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim).to(dtype)
    attn.v_cache = torch.randn(num_blocks, kv_heads, BLOCK_SIZE, head_dim).to(dtype)
    full_k = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in context_lens]
    full_v = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in context_lens]
    positions, new_k, new_v = [], [], []
    for table, c, n, k, v in zip(tables, context_lens, query_lens, full_k, full_v, strict=True):
        for p in range(c - n):  # the cached tokens: already in the pool
            block, offset = table[p // BLOCK_SIZE], p % BLOCK_SIZE
            attn.k_cache[block, :, offset] = k[p]
            attn.v_cache[block, :, offset] = v[p]
        positions.extend(range(c - n, c))
        new_k.append(k[c - n :])
        new_v.append(v[c - n :])
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype)
    meta = build_attention_metadata(
        torch.tensor(positions), query_lens, tables, BLOCK_SIZE, {window},
        torch.device("cpu"), Workspace(),
    )
    out = attn(q, torch.cat(new_k), torch.cat(new_v), meta)

    start = 0
    for c, n, k, v in zip(context_lens, query_lens, full_k, full_v, strict=True):
        expected = reference(
            q[start : start + n].double(), k.double(), v.double(),
            torch.arange(c - n, c), window, attn.scale,
        )
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(
            out[start : start + n].double(), expected, atol=tolerance, rtol=tolerance
        )
        start += n
    # New tokens' K/V landed in their slots.
    for table, c, k in zip(tables, context_lens, full_k, strict=True):
        p = c - 1
        assert torch.equal(attn.k_cache[table[p // BLOCK_SIZE], :, p % BLOCK_SIZE], k[p])


@pytest.mark.parametrize("window", [None, 5, 9])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)])
def test_decode_rows_match_the_reference(heads, kv_heads, window):
    context_lens = [1, 2, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 17, 30, 7]
    run_case(
        seed=heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, window=window,
        dtype=torch.float32, query_lens=[1] * len(context_lens), context_lens=context_lens,
    )


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decodes_and_prefill_chunks_in_one_batch(window, dtype):
    # Decodes; a fresh prompt; a chunk after a cached prefix (partial and whole blocks);
    # a one-token prompt (a "decode" row with nothing cached).
    query_lens = [1, 11, 1, 5, 8, 1, 1]
    context_lens = [9, 11, 23, 13, 8 + 2 * BLOCK_SIZE, 1, 40]
    run_case(
        seed=7, heads=6, kv_heads=3, window=window, dtype=dtype,
        query_lens=query_lens, context_lens=context_lens,
    )


def test_workspace_is_reused_and_grows():
    workspace = Workspace()
    pool = torch.zeros(10, 2, BLOCK_SIZE, 8)
    k, _ = workspace.buffers(pool, 8)
    k_again, _ = workspace.buffers(pool, 5)
    assert k_again.data_ptr() == k.data_ptr() and k_again.shape[0] == 5
    bigger, _ = workspace.buffers(pool, 100)
    assert bigger.shape == (100, 2, BLOCK_SIZE, 8)


def test_padded_block_tables():
    tables = padded_block_tables([[3, 1], [], [4, 5, 6]])
    assert tables.tolist() == [[3, 1, 0], [0, 0, 0], [4, 5, 6]]
