"""Turns a scheduled batch into tensors, runs the model over it and samples."""

from __future__ import annotations

import torch

from engine import kernels
from engine.attention import Workspace, build_attention_metadata
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
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device, seed)
        self.windows = set(model.config.sliding_windows)
        config = model.config
        # Zero-filled: padded reads of never-written slots must be finite (they are masked).
        # Layout [layer, K/V, block, kv_head, offset, head_dim]: see engine/attention.py.
        self.kv_cache = torch.zeros(
            config.num_layers, 2, num_blocks, config.num_kv_heads, block_size, config.head_dim,
            dtype=dtype, device=device,
        )
        self.workspace = Workspace()  # attention's gather buffers, shared by all layers
        self.cpu_kernel = device.type == "cpu" and kernels.paged_decode_supported(
            dtype, config.num_heads, config.num_kv_heads, config.head_dim, block_size
        )
        for layer, cache in zip(model.model.layers, self.kv_cache, strict=True):
            layer.self_attn.attn.k_cache = cache[0]
            layer.self_attn.attn.v_cache = cache[1]

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
        meta = build_attention_metadata(
            positions_cpu, batch.num_new_tokens, [seq.block_table for seq in batch.seqs],
            self.block_size, self.windows, self.device, self.workspace, self.cpu_kernel,
        )
        logits = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            positions_cpu.to(self.device),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=self.device),
        )
        if not sampled:
            return {}
        tokens = self.sampler(
            logits, [seq.params for seq in sampled], [seq.generator for seq in sampled]
        )
        return dict(zip(sampled, tokens, strict=True))
