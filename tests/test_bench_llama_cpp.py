"""The bench's llama.cpp system: the GGUF export (checked against our engine's greedy
tokens, which proves the tensor names, metadata and the Q/K RoPE permutation) and a --quick
run end to end. Those need the optional extra bench-llama-cpp and skip without it; the
permutation and the system list are checked everywhere."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from scripts.bench import llama_cpp_system
from scripts.bench.gguf_export import ensure_gguf, interleave_rope_halves
from tests.test_bench import run_quick_bench

HAVE_LLAMA_CPP = all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf"))
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP,
    reason="llama-cpp-python and gguf not installed (pip install -e '.[bench-llama-cpp]')")
PROMPTS = [[5, 17, 33, 90, 12], [100, 7, 8, 9, 250, 3, 44, 61, 19, 20], [11, 11, 11]]
MAX_TOKENS = [12, 12, 5]


def rotate_half_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's RoPE on one head: dimension i turns with i + d/2."""
    half = x.shape[-1] // 2
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def interleaved_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE for the llama architecture: dimension 2i turns with 2i+1."""
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def test_permutation_turns_rope_layouts_into_each_other():
    heads, head_dim, hidden = 3, 8, 16
    torch.manual_seed(0)
    weight, x = torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    angles = torch.rand(head_dim // 2) * 3
    hf = rotate_half_rope((weight @ x).reshape(heads, head_dim), angles)
    ours = interleaved_rope((interleave_rope_halves(weight, heads) @ x).reshape(heads, head_dim),
                            angles)
    # The same rotated values, each head's rows reordered alike: q.k per head is unchanged.
    torch.testing.assert_close(ours[:, 0::2], hf[:, : head_dim // 2])
    torch.testing.assert_close(ours[:, 1::2], hf[:, head_dim // 2:])


def test_llama_cpp_expands_to_formats():
    assert llama_cpp_system.expand(["engine", "llama.cpp"], "bfloat16", ["int8"]) == [
        "engine", "llama.cpp bf16", "llama.cpp q8_0"]
    assert llama_cpp_system.expand(["llama.cpp"], "float32", ["int4-g32"]) == [
        "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"]
    assert llama_cpp_system.expand(["naive"], "float32", ["int4"]) == ["naive"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from engine.random_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", dtype="float32")


@needs_llama_cpp
def test_gguf_greedy_tokens_match_engine(tiny_model, tmp_path):
    from engine import LLM, SamplingParams
    from scripts.bench.llama_cpp_runner import LlamaCppRunner

    llm = LLM(model=str(tiny_model), dtype="float32", device="cpu")
    outputs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, temperature=0.0,
                                                    ignore_eos=True) for n in MAX_TOKENS])
    expected = [list(o.token_ids) for o in outputs]
    path = ensure_gguf(tiny_model, tmp_path, "f32", threads=1)
    # Two sequences for three rows, prompts cut into chunks of 4: continuous batching,
    # chunked prefill and freed KV are all on the path.
    with LlamaCppRunner(path, n_seq_max=2, n_ctx_seq=32, n_batch=4, threads=1) as runner:
        got = runner.generate(PROMPTS, MAX_TOKENS)
    assert [len(t) for t in got] == MAX_TOKENS
    # float32 on both sides: the first tokens must agree (later ones could split on a
    # near tie of summation orders; on the tiny model all of them agree).
    assert [t[:5] for t in got] == [t[:5] for t in expected]


@needs_llama_cpp
def test_quantized_gguf_files_load_and_generate(tiny_model, tmp_path):
    from scripts.bench.llama_cpp_runner import LlamaCppRunner

    for fmt in ("bf16", "q8_0", "q4_0"):
        path = ensure_gguf(tiny_model, tmp_path, fmt, threads=1)
        with LlamaCppRunner(path, n_seq_max=3, n_ctx_seq=32, n_batch=64, threads=1) as runner:
            assert [len(t) for t in runner.generate(PROMPTS, MAX_TOKENS)] == MAX_TOKENS, fmt


@needs_llama_cpp
@pytest.mark.skipif(sys.platform != "linux", reason="the bench's child processes: Linux")
def test_bench_runs_llama_cpp_end_to_end(tmp_path):
    report, stderr = run_quick_bench(tmp_path, "--systems", "engine,llama.cpp",
                                     "--quant", "int4")
    systems = report["systems"]
    assert set(systems) == {"engine", "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"}
    for name in ("llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"):
        entry = systems[name]
        assert entry["status"] == "ok", entry
        assert entry["useful_tokens"] == report["expected_useful_tokens"], name
        assert entry["total_tok_s"] > entry["useful_tok_s"] > 0
        assert entry["steps"] > 0 and entry["matmul_weight_bytes"] > 0
    assert report["useful_tokens_match"] is True
    assert "llama.cpp q8_0" in stderr
