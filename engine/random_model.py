"""Random-weight Hugging Face model folders (config, safetensors, tokenizer) of every
architecture the engine loads, for the demo, the benchmark and the tests: no download.

The engine only needs the shapes and the file format to be real. The tokenizer is a
byte-level BPE trained here on a fixed built-in corpus, so every build is identical and
needs no network. `python scripts/make_tiny_model.py OUT_DIR` writes one from a shell.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # A few layers and heads is enough to exercise every code path (GQA, RoPE, norms).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=384),
    # About 110M parameters: the shape the throughput benchmark uses on CPUs.
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    # The Llama-3-8B shape, for GPUs.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

_WORDS = (
    "the a one little big red blue green cat dog bird tree house river sun moon star "
    "ran jumped saw found played said walked looked happy sad quick slow day night "
    "friend garden ball box park school story time once upon there was named lily tom "
    "batch prompt token model answer question data row shard worker queue result"
).split()


def _corpus() -> list[str]:
    """A fixed, varied text so the BPE trainer learns the same merges every time."""
    lines = []
    for i, (a, b, c) in enumerate(itertools.product(_WORDS[:24], _WORDS[24:48], _WORDS[48:])):
        if i % 7 == 0:
            lines.append(f"{a} {b} {c}, {i}. {c.capitalize()} {a}? {b}!")
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of at most vocab_size tokens that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    shape: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Write a random-weight model folder and return its path.

    config_overrides go straight into the transformers config (e.g. rope_scaling,
    tie_word_embeddings, head_dim, max_position_embeddings).
    """
    import torch
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHITECTURES)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(SHAPES[shape])
    tokenizer = build_tokenizer(params["vocab_size"])
    # The model must not emit ids the tokenizer cannot decode.
    params["vocab_size"] = len(tokenizer)
    params.update(
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    params.update(config_overrides)
    config_cls_name, model_cls_name = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls_name)(**params)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config)
    # Wider than the default init so random models do not emit near-uniform logits,
    # which would make greedy decoding ties common.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "batchinfer-tiny.json").write_text(json.dumps({"arch": arch, "shape": shape, "seed": seed}))
    return out
