"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat batch of tokens.

Module and parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`,
...), so checkpoint names map onto this model one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import PagedAttention
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.layers import RMSNorm, linear, make_linear, silu_and_mul
from engine.rope import RotaryEmbedding


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = make_linear(config.hidden_size, q_size, config.attention_bias)
        self.k_proj = make_linear(config.hidden_size, kv_size, config.attention_bias)
        self.v_proj = make_linear(config.hidden_size, kv_size, config.attention_bias)
        self.o_proj = make_linear(q_size, config.hidden_size, config.output_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(
            config.num_heads, config.num_kv_heads, config.head_dim, sliding_window
        )

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = make_linear(config.hidden_size, config.intermediate_size, bias)
        self.up_proj = make_linear(config.hidden_size, config.intermediate_size, bias)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config, sliding_window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """hidden is the residual stream, updated in place."""
        attended = self.self_attn(self.input_layernorm(hidden), positions, rotary, meta)
        return hidden.add_(self.mlp(self.post_attention_layernorm(hidden, add=attended)))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, rope_device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, window) for window in config.sliding_windows
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Built on the real device even when the weights are created on "meta" for loading.
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope, config.max_position_embeddings, rope_device
        )


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, rope_device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, rope_device)
        # Not through make_linear: the output head stays in full precision (GPTQ checkpoints
        # leave lm_head unquantized) and may share its weight with the embedding.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T] over all sequences of the step -> float32 logits
        [len(logits_rows), vocab] for the rows that are sampled."""
        return self.compute_logits(
            self.hidden_states(input_ids, positions, attn_metadata, logits_rows))

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """The final hidden states [len(rows), hidden] of the given rows of the step."""
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, positions, self.model.rotary_emb, attn_metadata)
        # The final norm is per row, so only the rows asked for need it.
        return self.model.norm(hidden[rows])

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] of final hidden states."""
        return linear(hidden, self.lm_head.weight).float()
