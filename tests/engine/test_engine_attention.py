"""The paged attention paths against a plain reference on random inputs.

Ragged contexts (one token, exact block multiples, partial blocks), grouped-query heads,
sliding windows, decode rows and prefill chunks (with and without a cached prefix) in
one flat batch, random block tables. Decode rows run through the portable PyTorch path,
the CPU kernel and the Triton kernel (engine/kernels; Triton's interpreter on CPUs).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from engine import kernels
from engine.attention import PagedAttention
from engine.attention_metadata import Workspace, build_attention_metadata, padded_block_tables

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


DECODE_PATHS = ["portable", "kernel", "triton"]


def run_case(seed, heads, kv_heads, window, dtype, query_lens, context_lens,
             decode_path="portable", head_dim=8, block_size=BLOCK_SIZE):
    """Sequence i has context_lens[i] tokens once its query_lens[i] new ones are written."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_per_seq]

    attn = PagedAttention(heads, kv_heads, head_dim, window)
    attn.k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim).to(dtype)
    attn.v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim).to(dtype)
    full_k = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in context_lens]
    full_v = [torch.randn(c, kv_heads, head_dim).to(dtype) for c in context_lens]
    positions, new_k, new_v = [], [], []
    for table, c, n, k, v in zip(tables, context_lens, query_lens, full_k, full_v, strict=True):
        for p in range(c - n):  # the cached tokens: already in the pool
            block, offset = table[p // block_size], p % block_size
            attn.k_cache[block, :, offset] = k[p]
            attn.v_cache[block, :, offset] = v[p]
        positions.extend(range(c - n, c))
        new_k.append(k[c - n :])
        new_v.append(v[c - n :])
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype)
    meta = build_attention_metadata(
        torch.tensor(positions), query_lens, tables, block_size, {window},
        torch.device("cpu"), Workspace(), decode_kernel=decode_path != "portable",
    )
    out = attn(q, torch.cat(new_k), torch.cat(new_v), meta)

    start = 0
    for c, n, k, v in zip(context_lens, query_lens, full_k, full_v, strict=True):
        expected = reference(
            q[start : start + n].double(), k.double(), v.double(),
            torch.arange(c - n, c), window, attn.scale,
        )
        tolerance = {torch.float32: 1e-5, torch.float16: 4e-3}.get(dtype, 3e-2)
        torch.testing.assert_close(
            out[start : start + n].double(), expected, atol=tolerance, rtol=tolerance
        )
        start += n
    # New tokens' K/V landed in their slots.
    for table, c, k in zip(tables, context_lens, full_k, strict=True):
        p = c - 1
        assert torch.equal(attn.k_cache[table[p // block_size], :, p % block_size], k[p])


def require_cpu_kernel() -> None:
    if not kernels.cpu.supported(torch.float32, 4, 1, 128, 16):
        pytest.skip("no C compiler: the CPU kernel is not built here")


@pytest.fixture
def triton_on_test_tensors(monkeypatch):
    """engine.kernels.triton_decode in place of the CPU kernel behind
    engine.kernels.paged_decode, on the CPU test tensors: in Triton's interpreter
    (tests/conftest.py), or compiled on the GPU."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from engine.kernels import triton_decode

    if torch.cuda.is_available():
        def run(*args):
            moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            triton_decode.paged_decode(*moved)
            args[5].copy_(moved[5])  # out
    elif os.environ.get("TRITON_INTERPRET") == "1":
        run = triton_decode.paged_decode
    else:
        pytest.skip("no GPU and Triton's interpreter is off")
    monkeypatch.setattr(kernels.cpu, "paged_decode", run)


@pytest.fixture(params=DECODE_PATHS)
def decode_path(request):
    if request.param == "kernel":
        require_cpu_kernel()
    if request.param == "triton":
        request.getfixturevalue("triton_on_test_tensors")
    return request.param


def test_the_kernel_builds_where_a_c_compiler_exists():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kernels.paged_decode_supported(cpu, dtype, 32, 8, 128, 16)
    assert not kernels.paged_decode_supported(cpu, torch.float32, 64, 1, 128, 16)  # group > 16


@pytest.mark.parametrize("window", [None, 5, 9])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)])
def test_decode_rows_match_the_reference(heads, kv_heads, window, decode_path):
    context_lens = [1, 2, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 17, 30, 7]
    run_case(
        seed=heads * 10 + kv_heads, heads=heads, kv_heads=kv_heads, window=window,
        dtype=torch.float32, query_lens=[1] * len(context_lens), context_lens=context_lens,
        decode_path=decode_path,
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("heads", "kv_heads", "batch"), [(12, 12, 1), (12, 12, 3), (64, 4, 2),
                                                          (40, 40, 9)])
def test_decode_work_split_over_heads_and_sequences(heads, kv_heads, batch, threads,
                                                    decode_path):
    # The C kernel's items are a sequence and a run of its KV heads: all of them for a
    # big batch, fewer where the batch is small or the group is wide (64 heads / 4).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        context_lens = [3 * BLOCK_SIZE + 1 + 5 * i for i in range(batch)]
        run_case(seed=batch, heads=heads, kv_heads=kv_heads, window=None, dtype=torch.float32,
                 query_lens=[1] * batch, context_lens=context_lens, decode_path=decode_path)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decodes_and_prefill_chunks_in_one_batch(window, dtype, decode_path):
    # Decodes; a fresh prompt; a chunk after a cached prefix (partial and whole blocks);
    # a one-token prompt (a "decode" row with nothing cached).
    query_lens = [1, 11, 1, 5, 8, 1, 1]
    context_lens = [9, 11, 23, 13, 8 + 2 * BLOCK_SIZE, 1, 40]
    run_case(
        seed=7, heads=6, kv_heads=3, window=window, dtype=dtype,
        query_lens=query_lens, context_lens=context_lens, decode_path=decode_path,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 32), (80, 16)])
def test_kernel_at_model_shapes(dtype, head_dim, block_size, decode_path):
    # Vector widths of real models, block sizes other than the default, contexts that
    # stop anywhere in a block, a sliding window spanning several blocks.
    context_lens = [1, block_size, block_size + 3, 5 * block_size - 1, 200]
    for window in (None, 2 * block_size + 5):
        run_case(
            seed=head_dim + block_size, heads=8, kv_heads=2, window=window, dtype=dtype,
            query_lens=[1] * len(context_lens), context_lens=context_lens,
            decode_path=decode_path, head_dim=head_dim, block_size=block_size,
        )


@pytest.fixture
def fresh_self_checks():
    """Self-check verdicts are cached per shape: start and leave these tests with none, so
    a kernel broken on purpose here is never remembered as broken elsewhere."""
    kernels.self_check.cache_clear()
    yield
    kernels.self_check.cache_clear()


@pytest.mark.parametrize("backend", ["kernel", "triton"])
def test_self_check_accepts_the_kernels(backend, request, fresh_self_checks):
    if backend == "kernel":
        require_cpu_kernel()
    if backend == "triton":
        request.getfixturevalue("triton_on_test_tensors")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for heads, kv_heads, head_dim, block_size in ((8, 2, 64, 16), (6, 6, 80, 32)):
            assert kernels.self_check(torch.device("cpu"), dtype, heads, kv_heads, head_dim,
                                      block_size), (dtype, heads, kv_heads, head_dim)


def test_a_kernel_that_fails_or_disagrees_is_not_used(monkeypatch, caplog, fresh_self_checks,
                                                      tiny_llama):
    require_cpu_kernel()
    from engine import LLM, SamplingParams

    working = kernels.cpu.paged_decode
    prompts = [[5, 9, 13], [7] * 20, [3, 4]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with_kernel = LLM(str(tiny_llama), dtype="float32")
    assert with_kernel.runner.decode_kernel
    expected = [out.token_ids for out in with_kernel.generate(prompts, params)]

    def wrong_window(q, k_pool, v_pool, tables, lens, out, scale, window):
        working(q, k_pool, v_pool, tables, lens, out, scale, window + 1 if window else 0)

    def not_built(*args):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120")

    for broken, message in ((wrong_window, "disagrees with the plain computation"),
                            (not_built, "failed its self-check")):
        kernels.self_check.cache_clear()
        monkeypatch.setattr(kernels.cpu, "paged_decode", broken)
        caplog.clear()
        assert not kernels.paged_decode_supported(torch.device("cpu"), torch.float32, 8, 2, 64,
                                                  16)
        assert message in caplog.text and "portable path" in caplog.text
    # An engine on such a machine decodes on the portable path: the same tokens.
    without_kernel = LLM(str(tiny_llama), dtype="float32")
    assert not without_kernel.runner.decode_kernel
    assert [out.token_ids for out in without_kernel.generate(prompts, params)] == expected


def test_kernel_results_do_not_depend_on_the_thread_count():
    require_cpu_kernel()
    torch.manual_seed(0)
    q = torch.randn(64, 8, 64)
    k_pool, v_pool = torch.randn(2, 300, 4, 16, 64).unbind(0)
    tables = torch.randperm(300)[:64 * 4].view(64, 4)
    lens = torch.randint(1, 64, (64,))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.paged_decode(q, k_pool, v_pool, tables, lens, 0.125, None)
        torch.set_num_threads(3)
        three = kernels.paged_decode(q, k_pool, v_pool, tables, lens, 0.125, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_without_a_compiler_attention_falls_back(tmp_path):
    # A fresh process with no usable compiler and an empty kernel cache.
    env = {**os.environ, "CC": "/nonexistent/cc", "BATCHINFER_KERNEL_CACHE": str(tmp_path)}
    probe = (
        "import torch; from engine import kernels; "
        "print(kernels.paged_decode_supported(torch.device('cpu'), torch.float32, 4, 4, 64, 16))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert "portable path" in result.stderr
    assert list(tmp_path.iterdir()) == []


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
