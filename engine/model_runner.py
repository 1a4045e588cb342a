"""Turns a scheduled batch into tensors, runs the model over it, samples and scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import kernels
from engine.attention_metadata import Workspace, build_attention_metadata
from engine.cuda_graphs import DecodeGraphs
from engine.engine_config import EngineConfig
from engine.logprobs import TokenText, logprob_dicts
from engine.model import CausalLM
from engine.outputs import Logprob
from engine.penalties import apply_penalties
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.structured.decoding import ConstrainedDecoding

# Prompt rows' logits computed at a time (rows x vocabulary, 64 MiB in float32): a
# prompt_logprobs request's chunk of thousands of rows never holds them all at once.
PROMPT_LOGITS_ELEMENTS = 1 << 24


def kv_cache_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    config = model.config
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * dtype.itemsize


class ModelRunner:
    def __init__(
        self, model: CausalLM, config: EngineConfig, num_blocks: int, *, decode_graphs: bool
    ) -> None:
        """config: the engine's resolved settings; num_blocks: the KV pool's size.

        decode_graphs: run decode-only steps (up to max_num_seqs sequences) through
        engine.cuda_graphs where the decode kernel applies: captured on CUDA; on CPUs the
        same padded steps run eagerly, for tests."""
        self.model = model
        self.block_size = config.block_size
        self.device = config.device
        self.sampler = Sampler(config.device, config.seed)
        shape = model.config
        self.windows = set(shape.sliding_windows)
        self.decode_kernel = kernels.paged_decode_supported(
            config.device, config.dtype, shape.num_heads, shape.num_kv_heads, shape.head_dim,
            config.block_size,
        )
        use_graphs = decode_graphs and self.decode_kernel
        # Zero-filled: padded reads of never-written slots must be finite (they are masked).
        # Layout [layer, K/V, block, kv_head, offset, head_dim]: see engine/attention.py.
        # With graphs, one more block than the block manager hands out: padding rows' K/V.
        self.kv_cache = torch.zeros(
            shape.num_layers, 2, num_blocks + use_graphs, shape.num_kv_heads, config.block_size,
            shape.head_dim, dtype=config.dtype, device=config.device,
        )
        self.workspace = Workspace()  # attention's gather buffers, shared by all layers
        for layer, cache in zip(model.model.layers, self.kv_cache, strict=True):
            layer.self_attn.attn.k_cache = cache[0]
            layer.self_attn.attn.v_cache = cache[1]
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            # Block table entries of the longest sequence: its context, or the whole pool.
            table_width = min(-(-config.max_model_len // config.block_size), num_blocks)
            graphs = DecodeGraphs(
                model, config.max_num_seqs, table_width, num_blocks, config.device
            )
            if config.device.type != "cuda" or graphs.capture():
                self.graphs = graphs

    def run(self, batch: ScheduledBatch, token_text: TokenText,
            constrained: ConstrainedDecoding) -> StepOutput:
        """Compute the batch's tokens; sample the next token of every sequence whose
        known tokens are all computed after this step (partial prompt chunks sample
        nothing), and score what the sequences ask logprobs of (token_text spells the
        reported tokens)."""
        inputs = _StepInputs(batch)
        replays = self._replays(batch)
        # A replayed step copies its metadata into the graphs' buffers: built on the CPU.
        meta = build_attention_metadata(
            inputs.positions, batch.num_new_tokens, [seq.block_table for seq in batch.seqs],
            self.block_size, self.windows, torch.device("cpu") if replays else self.device,
            self.workspace, self.decode_kernel,
        )
        # Rows of the sampled sequences' last tokens, then of scored prompt positions.
        rows = torch.tensor(inputs.sample_rows + inputs.prompt_rows, dtype=torch.int64)
        sampled = inputs.sampled
        if replays:
            assert self.graphs is not None
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta)[
                rows.to(self.device)
            ]
            sample_logits = logits[: len(sampled)]

            def prompt_logits(start: int, end: int) -> torch.Tensor:
                return logits[len(sampled) + start : len(sampled) + end]
        else:
            hidden = self.model.hidden_states(
                inputs.input_ids.to(self.device), inputs.positions.to(self.device), meta,
                rows.to(self.device),
            )
            sample_logits = self.model.compute_logits(hidden[: len(sampled)])

            def prompt_logits(start: int, end: int) -> torch.Tensor:
                # A slice at a time: a whole prompt chunk's logits (4096 x a 150k
                # vocabulary, 2.5 GB) never exist at once.
                return self.model.compute_logits(hidden[len(sampled) + start :
                                                        len(sampled) + end])
        output = StepOutput({}, {}, {})
        if inputs.prompt_rows:
            output.prompt_logprobs = inputs.score_prompts(
                prompt_logits, self.model.config.vocab_size, token_text)
        if not sampled:
            return output
        logits_to_sample = constrained.mask(sample_logits, apply_penalties(sample_logits, sampled),
                                            [seq.structured for seq in sampled])
        tokens = self.sampler.sample(
            logits_to_sample, [seq.params for seq in sampled],
            [seq.generator for seq in sampled],
        )
        asking = [i for i, seq in enumerate(sampled) if seq.params.logprobs is not None]
        if asking:
            scored_logits, scored_tokens = sample_logits, tokens
            if len(asking) < len(sampled):  # (a whole job's rows all ask: no copy of them)
                index = torch.tensor(asking, device=self.device)
                scored_logits, scored_tokens = sample_logits[index], tokens[index]
            dicts = logprob_dicts(scored_logits, scored_tokens,
                                  [sampled[i].params.logprobs for i in asking], token_text)
            output.logprobs = {sampled[i]: entry for i, entry in zip(asking, dicts, strict=True)}
        output.tokens = dict(zip(sampled, tokens.tolist(), strict=True))
        return output

    def _replays(self, batch: ScheduledBatch) -> bool:
        """Whether this step goes through the decode graphs: every sequence decodes."""
        return (
            self.graphs is not None
            and len(batch.seqs) <= self.graphs.max_batch
            and all(num_new == 1 for num_new in batch.num_new_tokens)
        )


@dataclass
class StepOutput:
    tokens: dict[Sequence, int]  # the next token of each sequence that sampled one
    logprobs: dict[Sequence, dict[int, Logprob]]  # that token's, for sequences that ask
    # The prompt tokens scored in this step, in order, for sequences that ask.
    prompt_logprobs: dict[Sequence, list[dict[int, Logprob]]]


class _StepInputs:
    """A batch as flat token rows: ids and positions, which rows are sampled, and which
    prompt positions are scored for prompt logprobs (only those of requests that ask
    and not scored before: a preempted prompt is recomputed, not scored again)."""

    def __init__(self, batch: ScheduledBatch) -> None:
        input_ids: list[int] = []
        positions: list[int] = []
        self.sample_rows: list[int] = []
        self.sampled: list[Sequence] = []
        self.prompt_rows: list[int] = []
        self.prompt_targets: list[int] = []  # the prompt token each of those rows scores
        self.prompt_spans: list[tuple[Sequence, int]] = []  # whose, how many rows each
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            if seq.prompt_logprobs_pending:
                # Position p's logits score token p + 1, up to the prompt's last token.
                assert seq.prompt_logprobs is not None
                first = max(start, len(seq.prompt_logprobs) - 1)
                end = min(start + num_new, seq.num_prompt_tokens - 1)
                if first < end:
                    row = len(input_ids) - start
                    self.prompt_rows.extend(range(row + first, row + end))
                    self.prompt_targets.extend(seq.token_ids[first + 1 : end + 1])
                    self.prompt_spans.append((seq, end - first))
            input_ids.extend(seq.token_ids[start : start + num_new])
            positions.extend(range(start, start + num_new))
            if start + num_new == seq.num_tokens:
                self.sample_rows.append(len(input_ids) - 1)
                self.sampled.append(seq)
        self.input_ids = torch.tensor(input_ids, dtype=torch.int64)
        self.positions = torch.tensor(positions, dtype=torch.int64)

    def score_prompts(
        self, logits: Callable[[int, int], torch.Tensor], vocab_size: int,
        token_text: TokenText,
    ) -> dict[Sequence, list[dict[int, Logprob]]]:
        """logits(start, end): the raw logits [end - start, vocab_size] of prompt rows
        start..end-1, asked for PROMPT_LOGITS_ELEMENTS at a time."""
        num_top = [seq.params.prompt_logprobs for seq, n in self.prompt_spans for _ in range(n)]
        targets = torch.tensor(self.prompt_targets, dtype=torch.int64)
        rows_per_pass = max(1, PROMPT_LOGITS_ELEMENTS // vocab_size)
        dicts: list[dict[int, Logprob]] = []
        for first in range(0, len(num_top), rows_per_pass):
            last = min(first + rows_per_pass, len(num_top))
            chunk = logits(first, last)
            dicts += logprob_dicts(chunk, targets[first:last].to(chunk.device),
                                   num_top[first:last], token_text)
        scored, start = {}, 0
        for seq, count in self.prompt_spans:
            scored[seq] = dicts[start : start + count]
            start += count
        return scored
