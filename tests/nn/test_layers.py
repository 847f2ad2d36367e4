"""RMSNorm, RoPE and SwiGLU match the Hugging Face Llama modules they reimplement."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from confu_lightning.errors import DraftError
from confu_lightning.nn.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary, rope_from_hf_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama_config(**kwargs) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                       vocab_size=320, num_hidden_layers=2, **kwargs)


def test_rmsnorm_matches_llama() -> None:
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 64).to(dtype)
        torch.testing.assert_close(ours.to(dtype)(x), ref.to(dtype)(x))


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 2.0}])
def test_rotary_matches_llama(scaling) -> None:
    cfg = llama_config(rope_theta=500000.0, rope_scaling=scaling)
    rope = rope_from_hf_config(cfg.to_dict())
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == (scaling or {}).get("rope_type", "default")
    ours, ref = RotaryEmbedding(16, rope), LlamaRotaryEmbedding(cfg)
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq)
    positions = torch.tensor([[0, 5, 17, 300, 4000], [3, 3, 2, 1, 0]])
    cos, sin = ours(positions)
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    plain = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 500000.0}).inv_freq
    scaled = RotaryEmbedding(16, {**LLAMA3, "rope_theta": 500000.0}).inv_freq
    assert torch.equal(plain[0], scaled[0])  # shortest wavelength untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8.0)  # longest divided by factor


def test_rope_from_legacy_and_new_configs() -> None:
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items()
                                                                            if k != "rope_type"}}}
    new = {"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}
    assert rope_from_hf_config(legacy) == rope_from_hf_config(new)
    assert rope_from_hf_config({}) == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(DraftError, match="yarn"):
        rope_from_hf_config({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(DraftError, match="low_freq_factor"):
        rope_from_hf_config({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0}})


def test_rotary_is_relative() -> None:
    """q·k after RoPE depends only on the position difference (why per-step position shifts are safe)."""
    torch.manual_seed(0)
    rot = RotaryEmbedding(16, {**LLAMA3, "rope_theta": 500000.0})
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rot(torch.tensor([[pq]]))
        ck, sk = rot(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-4)


def test_swiglu_matches_llama_mlp() -> None:
    torch.manual_seed(0)
    ours, ref = SwiGLU(64, 96), LlamaMLP(llama_config())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(ours(x), ref(x))
