"""The rotary embedding's CPU pass equals Hugging Face's bfloat16 expression bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.kernels import row_passes
from engine.rope import RotaryEmbedding


@pytest.mark.skipif(not row_passes.available(), reason="no C compiler builds the kernels")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "head_dim", "rope"), [
    (1, 4, 2, 64, {"rope_type": "default", "rope_theta": 10000.0}),
    (300, 12, 12, 64, {"rope_type": "default", "rope_theta": 10000.0}),
    (97, 8, 2, 128, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 512}),
])
def test_cpu_pass_equals_hugging_face(tokens, heads, kv_heads, head_dim, rope, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rotary = RotaryEmbedding(head_dim, rope, 4096, "cpu")
        generator = torch.Generator().manual_seed(tokens)
        positions = torch.randint(0, 4096, (tokens,), generator=generator)
        q = (torch.randn(tokens, heads, head_dim, generator=generator) * 4).to(torch.bfloat16)
        k = (torch.randn(tokens, kv_heads, head_dim, generator=generator) * 4).to(torch.bfloat16)
        cos = rotary.cos[positions].to(torch.bfloat16)
        sin = rotary.sin[positions].to(torch.bfloat16)
        # Hugging Face's layout is [batch, heads, tokens, head_dim].
        expected_q, expected_k = apply_rotary_pos_emb(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        assert row_passes.rope_fits(q, positions, rotary.cos)
        got_q, got_k = rotary(positions, q.clone(), k.clone())
        assert torch.equal(got_q, expected_q[0].transpose(0, 1))
        assert torch.equal(got_k, expected_k[0].transpose(0, 1))
    finally:
        torch.set_num_threads(before)
