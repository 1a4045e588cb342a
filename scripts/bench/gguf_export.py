"""Our Hugging Face model folders as GGUF files llama.cpp loads: a float file written here
with the `gguf` package, and Q8_0 / Q4_0 made from it by llama.cpp's own quantizer.

Only the plain Llama layout (LlamaForCausalLM, or MistralForCausalLM without a sliding
window): no biases, no q/k norms, default RoPE. That is every --random-model llama the
bench builds; anything else raises ValueError, which the llama.cpp system reports as
skipped.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ModelConfig, load_model_config

# Bump when the written files change, so cached exports from older code are not reused.
EXPORT_VERSION = 1
FLOAT_FORMATS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
QUANT_FORMATS = ("q8_0", "q4_0")
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
# llama.cpp's tensor names for the Hugging Face names of one decoder layer.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def cache_dir_for(cache_root: str | Path, model_dir: Path) -> Path:
    """Where a model's GGUF files are kept: under the bench's cache dir, keyed by the model
    folder and its weight files' sizes and times, so an edited --model is exported anew."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for p in model_dir.glob("*.safetensors"))
    key = json.dumps([EXPORT_VERSION, str(model_dir.resolve()), weights])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(cache_root).resolve() / "gguf" / f"{model_dir.name}-{digest}"


def ensure_gguf(model_dir: Path, out_dir: Path, fmt: str, threads: int) -> Path:
    """The cached GGUF of model_dir in fmt ("f32", "bf16", "f16", "q8_0", "q4_0"), made when
    missing; quantized files start from the model's own float format."""
    path = out_dir / f"{fmt}.gguf"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt in QUANT_FORMATS:
        source = ensure_gguf(model_dir, out_dir, float_format_of(model_dir), threads)
        atomic_write(path, lambda tmp: quantize(source, tmp, fmt, threads))
    else:
        atomic_write(path, lambda tmp: export(model_dir, tmp, fmt))
    return path


def float_format_of(model_dir: Path) -> str:
    """The GGUF float format matching the checkpoint's stored dtype (bf16 when unknown)."""
    dtype = json.loads((model_dir / "config.json").read_text()).get("dtype")
    return FLOAT_FORMATS.get(str(dtype), "bf16")


def atomic_write(path: Path, write: Any) -> None:
    """write(tmp) then rename: a run cut short, or two runs at once, never leave half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def quantize(source: Path, out: Path, fmt: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama-quantize's defaults: e.g. for Q4_0 it keeps the
    output head at Q6_K where the shape allows), so the files are what its users run."""
    import llama_cpp

    from scripts.bench.llama_cpp_runner import quiet_logs

    quiet_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[fmt]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                      ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {fmt} failed")


def check_supported(model_dir: Path) -> ModelConfig:
    config = load_model_config(model_dir)
    unsupported = [
        what for what, bad in (
            (f"architecture {config.architecture}", config.architecture not in SUPPORTED),
            ("biases", config.attention_bias or config.output_bias or config.mlp_bias),
            ("q/k norms", config.qk_norm),
            (f"rope_type {config.rope.get('rope_type')}", config.rope.get("rope_type") != "default"),
            ("sliding windows", any(w is not None for w in config.sliding_windows)),
        ) if bad
    ]
    if unsupported:
        raise ValueError(f"GGUF export supports plain Llama only, not: {', '.join(unsupported)}")
    return config


def export(model_dir: Path, out: Path, fmt: str) -> None:
    """Write model_dir as a GGUF file of llama architecture, matmul weights in fmt."""
    import gguf

    config = check_supported(model_dir)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "f16": gguf.GGMLQuantizationType.F16}[fmt]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "f16": gguf.LlamaFileType.MOSTLY_F16}[fmt]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, model_dir, config.vocab_size)
    for name, tensor in gguf_tensors(model_dir, config):
        if tensor.dim() == 1:  # norms stay float32, as llama.cpp's own converter keeps them
            writer.add_tensor(name, tensor.float().numpy())
        elif qtype == gguf.GGMLQuantizationType.BF16:
            # numpy has no bfloat16: the raw bytes, which the writer reads back as BF16 rows.
            raw = tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.float().numpy().astype(
                np.float16 if fmt == "f16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(model_dir: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight, Q and K permuted for llama.cpp's RoPE."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weights.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    yield "token_embd.weight", weights["model.embed_tokens.weight"]
    yield "output_norm.weight", weights["model.norm.weight"]
    if not config.tie_word_embeddings:  # tied: llama.cpp reuses token_embd as the head
        yield "output.weight", weights["lm_head.weight"]
    for layer in range(config.num_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensor = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = interleave_rope_halves(tensor, config.num_heads)
            elif gguf_name == "attn_k":
                tensor = interleave_rope_halves(tensor, config.num_kv_heads)
            yield f"blk.{layer}.{gguf_name}.weight", tensor


def interleave_rope_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from Hugging Face's RoPE layout to llama.cpp's.

    Hugging Face rotates dimension i of a head together with i + head_dim/2 ("rotate
    half"); llama.cpp's llama architecture rotates 2i with 2i+1. Moving row i to 2i and
    row i + head_dim/2 to 2i+1 makes llama.cpp rotate the same pairs by the same angles.
    Q and K are permuted alike, so their dot products, and the attention, are unchanged.
    """
    out_features, in_features = weight.shape
    half = out_features // heads // 2
    return (weight.reshape(heads, 2, half, in_features).transpose(1, 2)
            .reshape(out_features, in_features))


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE of tokenizer.json as llama.cpp's "gpt2" tokenizer. Ids the
    tokenizer lacks (our random models' vocab is larger than it) get unused placeholders,
    so the token list is as long as the embedding table, which llama.cpp requires."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer.json in {model_dir}: GGUF export needs a BPE tokenizer")
    spec = json.loads(path.read_text())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer is {spec['model']['type']}, GGUF export supports BPE")
    names = {i: tok for tok, i in spec["model"]["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    names.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(names.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in names else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    raw = json.loads((model_dir / "config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = raw.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(int(value))
