"""The model description the engine needs, read from a Hugging Face model folder.

We read config.json ourselves rather than through transformers' config classes so the
engine sees exactly one normalised form, whichever transformers version wrote the file
(rope settings moved from `rope_scaling` + `rope_theta` to `rope_parameters` in v5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# "dynamic" (NTK) RoPE equals plain RoPE up to max_position_embeddings and only rescales
# beyond it; the engine never runs past max_position_embeddings, so it is plain RoPE here.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool  # bias on q/k/v projections
    output_bias: bool  # bias on o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool
    rope: dict[str, Any]  # normalised: always has rope_type and rope_theta
    # One entry per layer: the sliding attention window, or None for full attention.
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    quantization_config: dict[str, Any] | None = None


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` for extra EOS ids) of a model folder."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in model folder {str(model_dir)!r}")
    raw = json.loads(config_path.read_text())
    return model_config_from_dict(raw, _generation_eos_ids(model_dir))


def model_config_from_dict(raw: dict[str, Any], extra_eos_ids: tuple[int, ...] = ()) -> ModelConfig:
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}; only 'silu' is supported")

    num_heads = raw["num_attention_heads"]
    num_kv_heads = raw.get("num_key_value_heads") or num_heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    attention_bias = bool(raw.get("attention_bias", False))
    max_positions = raw.get("max_position_embeddings", 2048)
    return ModelConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_positions,
        # Qwen2 always has q/k/v biases (and never an o_proj bias), whatever the config says.
        attention_bias=is_qwen2 or attention_bias,
        output_bias=not is_qwen2 and attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=architecture == "Qwen3ForCausalLM",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=_normalise_rope(raw, max_positions),
        sliding_windows=_sliding_windows(raw, architecture, max_positions),
        eos_token_ids=_merge_ids(_as_id_tuple(raw.get("eos_token_id")), extra_eos_ids),
        quantization_config=raw.get("quantization_config"),
    )


def _normalise_rope(raw: dict[str, Any], max_positions: int) -> dict[str, Any]:
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = rope.pop("type", None)
    rope.setdefault("rope_type", rope_type or "default")
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope['rope_type']!r}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


def _sliding_windows(
    raw: dict[str, Any], architecture: str, max_positions: int
) -> tuple[int | None, ...]:
    num_layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window")
    if window is not None and window >= max_positions:
        window = None  # a window as long as the context masks nothing
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (None,) * num_layers


def _generation_eos_ids(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    return _as_id_tuple(json.loads(path.read_text()).get("eos_token_id"))


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def _merge_ids(*groups: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for group in groups for i in group))
