"""`attend`: the SDPA path equals the eager reference for every key layout; GQAttention equals LlamaAttention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from confu_lightning.errors import DraftError
from confu_lightning.nn.attention import KV, GQAttention, KVCache, additive_mask, attend
from confu_lightning.nn.layers import RotaryEmbedding, rope_from_hf_config

B, HQ, HKV, TQ, TK, D, J = 2, 4, 2, 5, 7, 8, 3


def random_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, TQ, D, generator=g)
    k, v = torch.randn(B, HKV, TK, D, generator=g), torch.randn(B, HKV, TK, D, generator=g)
    extra = KV(torch.randn(B, HKV, TQ, J, D, generator=g), torch.randn(B, HKV, TQ, J, D, generator=g))
    mask = torch.rand(B, TQ, TK, generator=g) > 0.4
    extra_mask = torch.rand(B, TQ, J, generator=g) > 0.3
    return q, k, v, extra, mask, extra_mask


@pytest.mark.parametrize("layout", ["none", "bool", "float", "per_head", "extra", "extra_masked", "extra_only"])
def test_sdpa_equals_eager(layout: str) -> None:
    q, k, v, extra, mask, extra_mask = random_inputs()
    kwargs: dict = {}
    if layout == "bool":
        kwargs["mask"] = mask
    elif layout == "float":
        kwargs["mask"] = additive_mask(mask, torch.float32) + 0.1 * torch.randn(B, TQ, TK)
    elif layout == "per_head":
        kwargs["mask"] = torch.rand(B, HQ, TQ, TK) > 0.5
    elif layout in ("extra", "extra_masked"):
        kwargs.update(mask=mask, extra=extra, extra_mask=extra_mask if layout == "extra_masked" else None)
    elif layout == "extra_only":
        k, v = k[:, :, :0], v[:, :, :0]
        kwargs.update(extra=extra)
    out_sdpa = attend(q, k, v, impl="sdpa", **kwargs)
    out_eager = attend(q, k, v, impl="eager", **kwargs)
    assert out_sdpa.shape == (B, HQ, TQ, D) and torch.isfinite(out_eager).all()
    torch.testing.assert_close(out_sdpa, out_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, k, v, **kwargs), out_eager, rtol=1e-5, atol=1e-5)  # impl="auto"


def test_per_query_keys_equal_a_block_diagonal_mask() -> None:
    """Per-query keys are exactly 'shared keys that only their own query may see'."""
    q, k, v, extra, mask, extra_mask = random_inputs(1)
    flat_k = torch.cat((k, extra.key.reshape(B, HKV, TQ * J, D)), 2)
    flat_v = torch.cat((v, extra.value.reshape(B, HKV, TQ * J, D)), 2)
    own = torch.eye(TQ, dtype=torch.bool).repeat_interleave(J, 1) & extra_mask.reshape(B, 1, TQ * J)
    full = attend(q, flat_k, flat_v, torch.cat((mask, own), -1), impl="eager")
    torch.testing.assert_close(attend(q, k, v, mask, extra, extra_mask, impl="eager"), full)


def test_fully_masked_rows_stay_finite() -> None:
    q, k, v, *_ = random_inputs()
    mask = torch.zeros(B, TQ, TK, dtype=torch.bool)
    for impl in ("sdpa", "eager"):
        assert torch.isfinite(attend(q, k, v, mask, impl=impl)).all()


def test_bad_inputs_raise() -> None:
    q, k, v, *_ = random_inputs()
    with pytest.raises(DraftError, match="Tk=7"):
        attend(q, k, v, torch.ones(B, TQ, TK + 1, dtype=torch.bool))
    with pytest.raises(DraftError, match="bool"):
        attend(q, k, v, torch.ones(B, TQ, TK, dtype=torch.long))
    with pytest.raises(DraftError, match="implementation"):
        attend(q, k, v, impl="flash")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_matches_llama_attention_with_causal_mask(impl: str) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      vocab_size=320, num_hidden_layers=1, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg._attn_implementation = "eager"
    ref = LlamaAttention(cfg, layer_idx=0).eval()
    ours = GQAttention(64, 64, 4, 2, 16, impl=impl)
    ours.load_state_dict(ref.state_dict())
    x, positions = torch.randn(2, 6, 64), torch.arange(6).expand(2, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    cos, sin = RotaryEmbedding(16, rope_from_hf_config(cfg.to_dict()))(positions)
    ref_rope = LlamaRotaryEmbedding(cfg)(x, positions)
    expected, _ = ref(x, position_embeddings=ref_rope, attention_mask=additive_mask(causal, x.dtype)[None, None])
    got, kv = ours(x, cos, sin, mask=causal[None])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kv.key.shape == (2, 2, 6, 16)


def test_diagonal_mode_equals_explicit_keys() -> None:
    """diagonal=True puts each query's own key after `past`, visible only to that query."""
    torch.manual_seed(0)
    attn = GQAttention(32, 64, 4, 2, 8, impl="eager")
    x, positions = torch.randn(2, 5, 32), torch.arange(5).expand(2, 5)
    cos, sin = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 10000.0})(positions)
    past = KV(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    got, new = attn(x, cos, sin, mask=mask, past=past, diagonal=True)
    q, _ = attn.project(x, cos, sin)
    own = KV(new.key.unsqueeze(3), new.value.unsqueeze(3))
    expected = attend(q, past.key, past.value, mask, own, impl="eager")
    torch.testing.assert_close(got, attn.o_proj(expected.transpose(1, 2).reshape(2, 5, -1)))


def test_kv_cache_update_crop_select() -> None:
    cache = KVCache(2)
    assert cache.length == 0
    for layer in range(2):
        cache.update(layer, KV(torch.arange(3.0).view(1, 1, 3, 1), torch.zeros(1, 1, 3, 1)))
    full = cache.update(0, KV(torch.tensor([[[[3.0]]]]), torch.zeros(1, 1, 1, 1)))
    assert full.length == 4 and cache.layers[1].length == 3
    cache.crop(2)
    assert cache.length == 2 and cache.layers[1].key.flatten().tolist() == [0.0, 1.0]
    cache.select(torch.tensor([1]))
    assert cache.layers[0].key.flatten().tolist() == [1.0]
    with pytest.raises(DraftError):
        cache.crop(5)
