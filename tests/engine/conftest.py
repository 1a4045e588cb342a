"""Engine test helpers: the Hugging Face transformers oracle and model variants.

The shared fixtures (make_model, tiny_llama, stories260k) come from tests/conftest.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# At the first differing step, a mismatch is forgiven when Hugging Face's own top-2
# logits are closer than this: the reference itself is undecided there, and rounding
# differences between two correct implementations may pick either token.
TIE_TOLERANCE = 1e-4


@dataclass
class Greedy:
    token_ids: list[int]
    logits: list[torch.Tensor]  # logits[i]: the distribution token_ids[i] was chosen from


class HFOracle:
    """Hugging Face float32 models, loaded once per folder, and their greedy outputs."""

    def __init__(self) -> None:
        self._models: dict[Path, torch.nn.Module] = {}

    def model(self, model_dir: Path) -> torch.nn.Module:
        if model_dir not in self._models:
            self._models[model_dir] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32
            ).eval()
        return self._models[model_dir]

    def greedy(
        self,
        model_dir: Path,
        prompt_ids: list[int],
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
    ) -> Greedy:
        """Batch-1, unpadded greedy generate; EOS does not stop it unless eos_token_id is given."""
        out = self.model(model_dir).generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=0, output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt_ids) :].tolist()
        return Greedy(tokens, [step[0] for step in out.logits])

    def next_token_logits(self, model_dir: Path, prompt_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(model_dir)(torch.tensor([prompt_ids])).logits[0, -1].float()

    def assert_greedy_matches(
        self, model_dir: Path, prompt_ids: list[int], ours: list[int], max_new_tokens: int
    ) -> None:
        assert_same_greedy(ours, self.greedy(model_dir, prompt_ids, max_new_tokens))


def assert_same_greedy(ours: list[int], reference: Greedy) -> None:
    """Token-for-token equality, forgiving a mismatch only where the reference is a tie."""
    for step, (our_token, ref_token) in enumerate(zip(ours, reference.token_ids, strict=False)):
        if our_token == ref_token:
            continue
        logits = reference.logits[step]
        margin = float(logits.max() - logits[our_token])
        assert margin < TIE_TOLERANCE, (
            f"step {step}: ours {our_token}, Hugging Face {ref_token} "
            f"(logit gap {margin:.3g})\nours: {ours}\nhf:   {reference.token_ids}"
        )
        return  # a tie was broken the other way: the continuations may differ from here
    assert len(ours) == len(reference.token_ids), (ours, reference.token_ids)


@pytest.fixture(scope="session")
def hf() -> HFOracle:
    return HFOracle()


@pytest.fixture(scope="session")
def perturb(tmp_path_factory):
    """Factory: a copy of a model folder whose 1-D weights are random.

    make_tiny_model leaves norms at 1 and biases at 0, which would hide a mistake in
    how they are applied; this gives every norm and bias distinct values.
    """
    done: dict[Path, Path] = {}

    def build(model_dir: Path) -> Path:
        if model_dir not in done:
            out = tmp_path_factory.mktemp(f"{model_dir.name}-perturbed")
            shutil.copytree(model_dir, out, dirs_exist_ok=True)
            weights = load_file(out / "model.safetensors")
            generator = torch.Generator().manual_seed(1)
            for name, tensor in weights.items():
                noise = torch.randn(tensor.shape, generator=generator)
                if name.endswith("norm.weight"):
                    weights[name] = 1 + 0.2 * noise
                elif name.endswith(".bias"):
                    weights[name] = 0.1 * noise
            save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
            done[model_dir] = out
        return done[model_dir]

    return build


def random_prompt(length: int, seed: int, vocab: int = 300) -> list[int]:
    """Token ids 3.. (past <pad>, <s>, </s>) of the tiny models' vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


@pytest.fixture(scope="session")
def make_prompt():
    """Factory: make_prompt(length, seed) -> random token ids."""
    return random_prompt
