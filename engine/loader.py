"""Build the model and fill it with weights from a Hugging Face safetensors folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ModelConfig
from engine.layers import Projection
from engine.model import CausalLM
from engine.quant.loading import QuantizedProjections
from engine.quant.scheme import QuantScheme

# Checkpoint entries that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    config: ModelConfig,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantScheme | None = None,
) -> CausalLM:
    """Create the model without allocating weights, then load every weight once.

    With a QuantScheme every projection becomes a packed QuantLinear (see load_weights).
    """
    with torch.device("meta"):
        model = CausalLM(config, rope_device=device)
    load_weights(model, model_dir, dtype, device, quant)
    return model.eval()


def load_weights(
    model: CausalLM,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    quant: QuantScheme | None = None,
) -> None:
    """Map checkpoint tensors onto the model's parameters by name.

    This is the one place where checkpoint names meet modules: the model's parameter
    names equal Hugging Face's, so each tensor goes to the parameter of the same name.
    With a QuantScheme, the tensors of each projection (`<prefix>.weight`, or GPTQ's
    `<prefix>.qweight` / `qzeros` / `scales` / `g_idx`, and `<prefix>.bias`) go to
    engine.quant.loading instead, and the QuantLinear it builds replaces the projection.
    """
    # Parameters and persistent buffers, by name.
    expected = model.state_dict(keep_vars=True)
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    projections = None
    if quant is not None:
        projections = _quantized_projections(model, model_dir, quant, dtype, device)
        for prefix in projections.shapes:
            expected.pop(f"{prefix}.weight")
            expected.pop(f"{prefix}.bias", None)
    loaded: set[str] = set()
    for name, tensor in iter_checkpoint(model_dir):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        prefix, _, part = name.rpartition(".")
        if projections is not None and prefix in projections.shapes:
            layer = projections.add(prefix, part, tensor)
            if layer is not None:
                parent, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
            continue
        if name not in expected:
            raise ValueError(f"unexpected weight {name!r} in checkpoint {str(model_dir)!r}")
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
        tensor = tensor.to(device)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _assign(model, name, tensor)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if projections is not None:
        missing = sorted(missing + projections.missing())
    if missing:
        raise ValueError(f"checkpoint {str(model_dir)!r} lacks weights: {', '.join(missing[:5])}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _quantized_projections(
    model: CausalLM,
    model_dir: str | Path,
    quant: QuantScheme,
    dtype: torch.dtype,
    device: torch.device,
) -> QuantizedProjections:
    shapes = {
        name: (module.in_features, module.out_features, module.bias is not None)
        for name, module in model.named_modules()
        if isinstance(module, Projection)
    }
    parts: dict[str, set[str]] = {}
    for name in checkpoint_names(model_dir):
        prefix, _, part = name.rpartition(".")
        if prefix in shapes:
            parts.setdefault(prefix, set()).add(part)
    return QuantizedProjections(quant, shapes, parts, dtype, device, str(model_dir))


def _checkpoint_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"no safetensors weights in model folder {str(model_dir)!r}")


def checkpoint_names(model_dir: str | Path) -> list[str]:
    """Every tensor name in the checkpoint (read from the file headers only)."""
    model_dir = Path(model_dir)
    names = []
    for file in _checkpoint_files(model_dir):
        with safe_open(model_dir / file, framework="pt", device="cpu") as shard:
            names.extend(shard.keys())
    return names


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from model.safetensors or the shards its index names."""
    model_dir = Path(model_dir)
    for file in _checkpoint_files(model_dir):
        with safe_open(model_dir / file, framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, shard.get_tensor(name)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
