"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches a few hundred small kernels (per layer: norms, projections, rotary
embedding, the KV write, attention, the MLP). With a large model on a GPU each runs for
microseconds, and launching them from Python becomes the step's cost: the GPU waits on
the host. A CUDA graph records one step's launches once and replays them with one call.

Graphs are captured for batch sizes 1, 2, 4, 8 and multiples of 16 up to the engine's
`max_num_seqs`. A step of n decodes replays the smallest bucket that holds n; the rows
past n are padding: context length 0 (the decode kernel writes zeros for them) and their
K/V written to a scratch block that no sequence owns. Every graph reads its inputs from
the same static buffers, which each step fills, and writes its logits into one shared
output buffer (a buffer per graph would cost ~1 GiB at a 128k vocabulary).
Steps with prompt chunks run eagerly: their shapes vary from step to step.

On CPUs nothing is captured: `run` computes the same padded step eagerly, so the padding
and the buffers are tested on machines without a GPU.
"""

from __future__ import annotations

import logging

import torch

from engine.attention_metadata import AttentionMetadata, DecodeBatch, Workspace
from engine.model import CausalLM

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes that get a graph: 1, 2, 4, 8, 16, 32, 48, ... up to max_batch."""
    buckets = [size for size in (1, 2, 4, 8) if size < max_batch]
    buckets += range(16, max_batch, 16)
    return [*buckets, max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        max_batch: int,
        table_width: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        """table_width: block table entries of the longest possible sequence;
        scratch_block: a KV pool block that no sequence owns (padding rows write there)."""
        self.model = model
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch

        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int64, device=device)

        self.input_ids = buffer(max_batch)
        self.positions = buffer(max_batch)
        self.slot_blocks = buffer(max_batch).fill_(scratch_block)
        self.slot_offsets = buffer(max_batch)
        self.block_tables = buffer(max_batch, table_width)
        self.context_lens = buffer(max_batch)  # all 0: every row starts as padding
        self.rows = torch.arange(max_batch, device=device)
        self.logits = torch.zeros(
            max_batch, model.config.vocab_size, dtype=torch.float32, device=device
        )
        self.captured: dict[int, torch.cuda.CUDAGraph] = {}

    def capture(self) -> bool:
        """Record one graph per bucket (CUDA only). False, with a warning, where capture
        fails: the engine then runs every step eagerly."""
        pool = None
        try:
            # Largest first: the smaller graphs reuse its memory pool.
            for size in reversed(self.buckets):
                self._forward(size)  # compiles Triton kernels, sets up cuBLAS, outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(size)
                pool = graph.pool()
                self.captured[size] = graph
            torch.cuda.synchronize()
        except Exception as exc:  # torch's and Triton's errors alike: graphs are optional
            log.warning("CUDA graph capture failed, decode steps run eagerly: %r", exc)
            self.captured.clear()
            return False
        return True

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Logits [n, vocab] of a decode-only step of n <= max_batch sequences.

        input_ids, positions and meta describe the step as built on the CPU, with
        `meta.decode` holding every row in order (no pairs, no prefill chunks)."""
        decode = meta.decode
        assert decode is not None and not meta.prefills and decode.pairs is None
        num_seqs = input_ids.shape[0]
        size = next(bucket for bucket in self.buckets if bucket >= num_seqs)
        width = decode.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(positions)
        self.slot_blocks[:num_seqs].copy_(meta.slot_blocks)
        self.slot_offsets[:num_seqs].copy_(meta.slot_offsets)
        self.block_tables[:num_seqs, :width].copy_(decode.block_tables)
        self.context_lens[:num_seqs].copy_(decode.context_lens)
        # Rows a larger step used before are padding again.
        self.context_lens[num_seqs:size] = 0
        self.slot_blocks[num_seqs:size] = self.scratch_block
        graph = self.captured.get(size)
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
        return self.logits[:num_seqs]

    def _forward(self, size: int) -> None:
        """One decode step over the first `size` rows of the static buffers, its logits
        into the first `size` rows of the output buffer."""
        meta = AttentionMetadata(
            self.slot_blocks[:size],
            self.slot_offsets[:size],
            DecodeBatch(
                self.rows[:size], self.block_tables[:size], self.context_lens[:size], None
            ),
            [],
            Workspace(),
        )
        logits = self.model(self.input_ids[:size], self.positions[:size], meta, self.rows[:size])
        self.logits[:size].copy_(logits)
