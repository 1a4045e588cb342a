"""Next-token choice for a batch of sequences: greedy, temperature, top-k, top-p.

All probability math is in float32. Sampling draws one exponential variate per vocabulary
entry and takes argmax(p / E), which picks token i with probability p_i. A request with a
seed draws its variates from its own generator, so its tokens do not depend on which
other requests share the batch.
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        # For requests without a seed: reproducible per engine, not per request.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        """logits: [N, vocab] float32, one row per sequence -> N token ids."""
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = self._probabilities(logits[rows], [params[i] for i in sampled_rows])
            tokens[rows] = self._draw(probs, [generators[i] for i in sampled_rows])
        return tokens.tolist()

    def _probabilities(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperatures[:, None]
        vocab = logits.shape[-1]
        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return torch.softmax(logits, dim=-1)

        # Stable sort: among equal logits the lower id ranks first, as argmax picks it.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=logits.device)
        k = torch.tensor(top_k, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
        # Nucleus: keep the highest-probability tokens until their mass reaches top_p
        # (the first token always stays).
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        p = torch.tensor(top_p, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(mass_before >= p[:, None], float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return torch.softmax(logits, dim=-1)

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        shared_rows = [i for i, g in enumerate(generators) if g is None]
        if shared_rows:
            rows = torch.tensor(shared_rows, device=probs.device)
            noise[rows] = torch.empty(
                len(shared_rows), probs.shape[-1], device=probs.device
            ).exponential_(generator=self.generator)
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)
