"""Build the model and fill it with weights from a Hugging Face safetensors folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.config import ModelConfig
from engine.model import CausalLM

# Checkpoint entries that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    config: ModelConfig, model_dir: str | Path, dtype: torch.dtype, device: torch.device
) -> CausalLM:
    """Create the model without allocating weights, then load every weight once."""
    with torch.device("meta"):
        model = CausalLM(config, rope_device=device)
    load_weights(model, model_dir, dtype, device)
    return model.eval()


def load_weights(
    model: CausalLM, model_dir: str | Path, dtype: torch.dtype, device: torch.device
) -> None:
    """Map checkpoint tensors onto the model's parameters by name.

    This is the one place where checkpoint names meet modules: the model's parameter
    names equal Hugging Face's, so each tensor goes to the parameter of the same name.
    """
    # Parameters and persistent buffers (which packed quantized weights may use), by name.
    expected = model.state_dict(keep_vars=True)
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    loaded: set[str] = set()
    for name, tensor in iter_checkpoint(model_dir):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
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
    if missing:
        raise ValueError(f"checkpoint {str(model_dir)!r} lacks weights: {', '.join(missing[:5])}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from model.safetensors or the shards its index names."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no safetensors weights in model folder {str(model_dir)!r}")
    for file in files:
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
