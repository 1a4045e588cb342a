"""Next-token choice for a batch of sequences: greedy, temperature, min-p, top-k, top-p.

All probability math is in float32. A sampled row draws one uniform variate u and takes
the token where the running sum of probabilities passes u times their total (inverse
CDF, chunked: see _inverse_cdf). A request with a seed draws from its own generator, so
its tokens do not depend on which other requests share the batch.

Top-k and top-p need the most likely tokens in descending order. Rather than sorting the
whole vocabulary, the top CANDIDATES tokens (or the largest top_k) are taken with topk:
they hold the whole top-k set and, for top-p, the whole nucleus whenever their mass
reaches top_p, as a trained model's next-token distribution usually does. Rows whose
nucleus reaches past them (flat distributions, high temperatures) are redone over the
whole vocabulary, with the same result either way.

Min-p (vLLM's order: after temperature, before top-k and top-p) zeroes the probabilities
below min_p times the row's largest; the rest need no renormalising, as both the inverse
CDF and the nucleus are taken relative to the mass that is left.

Both choices keep sampling cheap at hundreds of rows over a large vocabulary: one variate
per row (an exponential race, argmax of p / E, would draw one per vocabulary entry), and a
topk of CANDIDATES tokens (a nucleus found by sorting would sort the whole vocabulary).
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

CANDIDATES = 256
_CHUNK = 1024  # entries per chunk of the inverse-CDF search over a whole vocabulary


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
        return self.sample(logits, params, generators).tolist()

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """As calling the sampler, the token ids left on the logits' device ([N] int64)."""
        tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            tokens[greedy_rows] = _rows(logits, greedy_rows).argmax(dim=-1)
        if sampled_rows:
            tokens[sampled_rows] = self._sample(
                _rows(logits, sampled_rows),
                [params[i] for i in sampled_rows],
                self._uniforms([generators[i] for i in sampled_rows]),
            )
        return tokens

    def _uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One variate in [0, 1) per row, from the row's own generator where it has one."""
        uniforms = torch.empty(len(generators), device=self.device)
        shared_rows = [i for i, g in enumerate(generators) if g is None]
        if shared_rows:
            uniforms[shared_rows] = torch.rand(
                len(shared_rows), generator=self.generator, device=self.device
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                uniforms[i] = torch.rand(1, generator=generator, device=self.device)[0]
        return uniforms

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
    ) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([p.temperature for p in params], device=device)
        probs = torch.softmax(logits / temperatures[:, None], dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        vocab = probs.shape[-1]
        tokens = torch.empty(len(params), dtype=torch.int64, device=device)

        top_k_list = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        truncated = [i for i, p in enumerate(params) if top_k_list[i] < vocab or p.top_p < 1]
        whole = sorted(set(range(len(params))) - set(truncated))
        if whole:
            tokens[whole] = _inverse_cdf(_rows(probs, whole), uniforms[whole])
        if not truncated:
            return tokens

        pending = torch.tensor(truncated, device=device)
        top_k = torch.tensor(top_k_list, device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        top_ks_on = [top_k_list[i] for i in truncated if top_k_list[i] < vocab]
        width = min(vocab, max([CANDIDATES, *top_ks_on]))
        for attempt_width in (width, vocab):
            chosen, covered = _sample_top(
                probs[pending], top_k[pending], top_p[pending], uniforms[pending], attempt_width
            )
            tokens[pending[covered]] = chosen[covered]
            pending = pending[~covered]
            if pending.numel() == 0:
                break
        return tokens


def _sample_top(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample among each row's `width` most likely tokens after top-k and top-p.

    Returns the tokens and whether each row's choice is exact: its top-k set lies within
    the candidates, or (top-k off) the candidates hold its whole nucleus. Always true when
    width is the vocabulary size.
    """
    candidates, ids = probs.topk(width, dim=-1)  # sorted, most likely first
    ranks = torch.arange(width, device=probs.device)
    candidates = candidates.masked_fill(ranks >= top_k[:, None], 0.0)
    k_within = top_k <= width
    # Top-p applies to the distribution renormalised over the top-k set (all tokens
    # when top-k is off): the nucleus is the shortest prefix reaching top_p of its mass.
    kept_mass = torch.where(k_within, candidates.sum(dim=-1), probs.sum(dim=-1))
    threshold = top_p * kept_mass
    cumulative = candidates.cumsum(dim=-1)
    in_nucleus = cumulative - candidates < threshold[:, None]  # the first token always
    covered = k_within | (cumulative[:, -1] >= threshold)
    index = _inverse_cdf(candidates * in_nucleus, uniforms)
    return ids.gather(1, index[:, None]).squeeze(1), covered


def _rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without a copy when rows are all of them in order."""
    if len(rows) == tensor.shape[0]:
        return tensor
    return tensor[torch.tensor(rows, device=tensor.device)]


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of non-negative weights, the index where the running sum first exceeds
    u times the row's total: index i with probability weights[i] / total.

    Over a whole vocabulary a running sum is a slow sequential pass, so the row is cut
    into chunks: chunk sums (a vectorized reduction) pick the chunk, a running sum inside
    that chunk alone picks the index. Zero-weight entries are never chosen, whatever the
    rounding: the target is clamped into the chosen chunk's range, and the index to the
    chunk's last positive weight.
    """
    num_rows, width = weights.shape
    if width <= _CHUNK:
        return _first_exceeding(weights, uniforms[:, None] * weights.sum(-1, keepdim=True))
    whole_chunks = width // _CHUNK
    chunk_sums = weights[:, : whole_chunks * _CHUNK].view(num_rows, whole_chunks, _CHUNK).sum(-1)
    if width > whole_chunks * _CHUNK:
        tail = weights[:, whole_chunks * _CHUNK :].sum(-1, keepdim=True)
        chunk_sums = torch.cat([chunk_sums, tail], dim=-1)
    chunk_ends = chunk_sums.cumsum(dim=-1)
    chunk = _first_exceeding(chunk_sums, uniforms[:, None] * chunk_ends[:, -1:])
    # Within the chunk: the target less the mass of the chunks before it.
    before = (chunk_ends - chunk_sums).gather(1, chunk[:, None])
    target = uniforms[:, None] * chunk_ends[:, -1:] - before
    positions = chunk[:, None] * _CHUNK + torch.arange(_CHUNK, device=weights.device)
    inside = positions < width
    positions = positions.clamp(max=width - 1)
    in_chunk = weights.gather(1, positions) * inside
    offset = _first_exceeding(in_chunk, target.clamp(min=0))
    return positions.gather(1, offset[:, None]).squeeze(1)


def _first_exceeding(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum of weights exceeds target ([N, 1]),
    never one of zero weight: the last positive one where rounding overshoots."""
    cumulative = weights.cumsum(dim=-1)
    index = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    positions = torch.arange(weights.shape[-1], device=weights.device)
    last_positive = torch.where(weights > 0, positions, 0).amax(dim=-1)
    return torch.minimum(index, last_positive)
