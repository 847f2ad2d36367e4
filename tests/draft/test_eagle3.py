"""EAGLE-3 draft: config from a target config, shapes, frozen embedding, vocabulary mapping, KV-cache parity."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from confu_lightning.draft.eagle3 import (
    EMBEDDING_KEY,
    Eagle3Draft,
    Eagle3DraftConfig,
    causal_after_past,
    draft_config_from_target,
    draft_flops_per_token,
)
from confu_lightning.draft.vocab import build_draft_vocab
from confu_lightning.errors import DraftError

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_config(n_layers: int = 1) -> Eagle3DraftConfig:
    return Eagle3DraftConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                             target_vocab_size=320, draft_vocab_size=64, rms_norm_eps=1e-5, rope=ROPE,
                             n_layers=n_layers, aux_layers=(2, 4, 5))


def random_batch(batch: int = 2, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (batch, length), generator=g)
    feature = torch.randn(batch, length, 64, generator=g)
    return ids, feature, torch.arange(length).expand(batch, length)


def test_config_from_target_dict_records_rope() -> None:
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     vocab_size=320, num_hidden_layers=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling={k: v for k, v in ROPE.items() if k != "rope_theta"})
    cfg = draft_config_from_target(hf.to_dict(), draft_vocab_size=1000)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert cfg.draft_vocab_size == 320  # clipped to the target vocabulary
    assert cfg.aux_layers == (2, 4, 5) and cfg.feature_size == 192
    assert cfg.rope == ROPE
    again = Eagle3DraftConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(DraftError, match="hidden_size"):
        draft_config_from_target({"num_attention_heads": 4}, 64)
    with pytest.raises(DraftError, match="unknown"):
        Eagle3DraftConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(DraftError, match="num_kv_heads"):
        Eagle3DraftConfig(**{**cfg.to_dict(), "num_kv_heads": 3, "aux_layers": ()})


def test_forward_shapes_and_parameter_names() -> None:
    draft = Eagle3Draft(tiny_config(n_layers=2))
    ids, feature, positions = random_batch()
    out = draft(ids, feature, positions)
    assert out.hidden.shape == (2, 9, 64) and out.logits.shape == (2, 9, 64)
    assert len(out.kv) == 2 and out.kv[0].key.shape == (2, 2, 9, 16)
    names = set(draft.state_dict())
    assert {"fc.weight", "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "norm.weight",
            "lm_head.weight", "d2t", "t2d", EMBEDDING_KEY} <= names
    assert draft.layers[0].self_attn.q_proj.weight.shape == (64, 128)  # 2H input in the first layer
    assert draft.layers[1].self_attn.q_proj.weight.shape == (64, 64)
    assert EMBEDDING_KEY not in draft.trainable_state_dict()
    assert draft.fuse(torch.randn(2, 9, 192)).shape == (2, 9, 64)


def test_embedding_is_frozen_and_the_rest_trains() -> None:
    draft = Eagle3Draft(tiny_config())
    weight = torch.randn(320, 64)
    draft.load_embedding(weight)
    assert torch.equal(draft.embed_tokens.weight, weight)
    ids, _, positions = random_batch()
    out = draft(ids, draft.fuse(torch.randn(2, 9, 192)), positions)
    out.logits.square().mean().backward()
    assert draft.embed_tokens.weight.grad is None and not draft.embed_tokens.weight.requires_grad
    for name in ("fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
                 "layers.0.hidden_norm.weight", "norm.weight", "lm_head.weight"):
        grad = draft.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(DraftError, match="target embedding"):
        draft.load_embedding(torch.randn(321, 64))


def test_draft_to_target_ids_uses_d2t_offsets() -> None:
    draft = Eagle3Draft(tiny_config())
    counts = torch.zeros(320, dtype=torch.long)
    counts[torch.arange(100, 320, 3)[:64]] = 5  # 64 frequent tokens, none in 0..63
    vocab = build_draft_vocab(counts, 64)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    draft_ids = torch.tensor([[0, 1, 63]])
    assert draft.draft_to_target_ids(draft_ids).tolist() == [[100, 103, 289]]
    assert torch.equal(draft.draft_to_target_ids(torch.arange(64)), vocab.draft_to_target)
    assert draft.t2d.sum() == 64
    with pytest.raises(DraftError, match="does not fit"):
        draft.set_vocab(vocab.d2t[:10], vocab.t2d)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_incremental_cache_equals_full_forward(impl: str) -> None:
    torch.manual_seed(0)
    draft = Eagle3Draft(tiny_config(n_layers=2), attn_impl=impl).eval()
    ids, feature, positions = random_batch(length=8)
    full = draft(ids, feature, positions)
    cache = draft.new_cache()
    parts = [draft(ids[:, :5], feature[:, :5], positions[:, :5], cache=cache)]  # prefill
    for t in range(5, 8):  # then one token at a time
        parts.append(draft(ids[:, t:t + 1], feature[:, t:t + 1], positions[:, t:t + 1], cache=cache))
    assert cache.length == 8
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.hidden for p in parts], 1), full.hidden, rtol=1e-5, atol=1e-5)


def test_tree_mask_through_the_cache_equals_separate_chains() -> None:
    """Two sibling candidates drafted in one call (tree mask) equal drafting each after the prefix."""
    torch.manual_seed(0)
    draft = Eagle3Draft(tiny_config()).eval()
    ids, feature, positions = random_batch(batch=1, length=6)
    cache = draft.new_cache()
    draft(ids[:, :4], feature[:, :4], positions[:, :4], cache=cache)
    tree = causal_after_past(2, 4).clone()
    tree[0, 1, 4] = False  # node 5 is a sibling of node 4, not its child
    both = draft(ids[:, 4:6], feature[:, 4:6], torch.tensor([[4, 4]]), tree, cache=cache)
    cache.crop(4)
    second = draft(ids[:, 5:6], feature[:, 5:6], torch.tensor([[4]]), cache=cache)
    torch.testing.assert_close(both.logits[:, 1:], second.logits, rtol=1e-5, atol=1e-5)


def test_cache_and_past_are_exclusive() -> None:
    draft = Eagle3Draft(tiny_config())
    ids, feature, positions = random_batch()
    with pytest.raises(DraftError, match="not both"):
        draft(ids, feature, positions, cache=draft.new_cache(), diagonal=True)


def test_flops_formula_matches_counted_forward() -> None:
    """At T=1, K=1 the analytic count equals torch's FLOP counter on the matmuls plus 4·Hq·D per layer of attention."""
    cfg = tiny_config(n_layers=2)
    draft = Eagle3Draft(cfg)
    ids, _, positions = random_batch(batch=1, length=1)
    with FlopCounterMode(display=False) as counter:
        draft(ids, draft.fuse(torch.randn(1, 1, cfg.feature_size)), positions)
    linear = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    attention = cfg.n_layers * 4 * cfg.num_heads * cfg.head_dim  # one visible key
    assert draft_flops_per_token(cfg, ttt_steps=1, seq_len=1) == 3 * (linear + attention)
    fc = 2 * cfg.feature_size * cfg.hidden_size  # fused once per token, not per step
    per_step = (draft_flops_per_token(cfg, 1, 2048) / 3 - fc)
    extra_keys = sum(k for k in range(7)) * cfg.n_layers * 4 * cfg.num_heads * cfg.head_dim
    assert draft_flops_per_token(cfg, 7, 2048) / 3 == pytest.approx(fc + 7 * per_step + extra_keys)
