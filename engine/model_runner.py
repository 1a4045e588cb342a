"""Turns a scheduled batch into tensors, runs the model over it and samples."""

from __future__ import annotations

import torch

from engine import kernels
from engine.attention_metadata import Workspace, build_attention_metadata
from engine.cuda_graphs import DecodeGraphs
from engine.engine_config import EngineConfig
from engine.model import CausalLM
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


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

    def run(self, batch: ScheduledBatch) -> dict[Sequence, int]:
        """Compute the batch's tokens; sample the next token of every sequence whose
        known tokens are all computed after this step (partial prompt chunks sample nothing)."""
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + num_new])
            positions.extend(range(start, start + num_new))
            if start + num_new == seq.num_tokens:
                logits_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        positions_cpu = torch.tensor(positions, dtype=torch.int64)
        ids_cpu = torch.tensor(input_ids, dtype=torch.int64)
        rows_cpu = torch.tensor(logits_rows, dtype=torch.int64)
        replays = self._replays(batch)
        # A replayed step copies its metadata into the graphs' buffers: built on the CPU.
        meta = build_attention_metadata(
            positions_cpu, batch.num_new_tokens, [seq.block_table for seq in batch.seqs],
            self.block_size, self.windows, torch.device("cpu") if replays else self.device,
            self.workspace, self.decode_kernel,
        )
        if replays:
            assert self.graphs is not None
            logits = self.graphs.run(ids_cpu, positions_cpu, meta)[rows_cpu.to(self.device)]
        else:
            logits = self.model(
                ids_cpu.to(self.device), positions_cpu.to(self.device), meta,
                rows_cpu.to(self.device),
            )
        if not sampled:
            return {}
        tokens = self.sampler(
            logits, [seq.params for seq in sampled], [seq.generator for seq in sampled]
        )
        return dict(zip(sampled, tokens, strict=True))

    def _replays(self, batch: ScheduledBatch) -> bool:
        """Whether this step goes through the decode graphs: every sequence decodes."""
        return (
            self.graphs is not None
            and len(batch.seqs) <= self.graphs.max_batch
            and all(num_new == 1 for num_new in batch.num_new_tokens)
        )
