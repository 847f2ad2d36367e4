"""The parallel TTT unroll equals drafting chains one token at a time with a KV cache (masks and shifts)."""

from __future__ import annotations

import pytest
import torch

from confu_lightning.draft.eagle3 import Eagle3Draft, Eagle3DraftConfig
from confu_lightning.errors import DraftError
from confu_lightning.nn.attention import KV, KVCache
from confu_lightning.train.ttt import positions_in_runs, segment_runs, shift_left, ttt_unroll

STEPS = 4
# row 0: two packed samples (5 and 4 tokens) and 3 padding; row 1: one 12-token sample
SEGMENTS = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 12])


def tiny_draft(n_layers: int = 1, impl: str = "sdpa", seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                            target_vocab_size=320, draft_vocab_size=64, n_layers=n_layers,
                            rope={"rope_type": "default", "rope_theta": 10000.0})
    draft = Eagle3Draft(cfg, attn_impl=impl).eval()
    draft.load_embedding(torch.randn(320, 64))
    return draft


def random_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (2, 12), generator=g), torch.randn(2, 12, 192, generator=g)


def segments(seg_row: torch.Tensor) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for t in range(1, len(seg_row) + 1):
        if t == len(seg_row) or seg_row[t] != seg_row[start]:
            if seg_row[start] >= 0:
                bounds.append((start, t))
            start = t
    return bounds


def cache_prefix(cache: KVCache, n: int) -> KVCache:
    out = KVCache(len(cache.layers))
    out.layers = [KV(kv.key[:, :, :n], kv.value[:, :, :n]) for kv in cache.layers]
    return out


@torch.no_grad()
def sequential_reference(draft, ids, aux, steps, shift=True, context=None):
    """{(b, t, k): logits} by plain incremental decoding: accept x[..t], then draft a k+1-token chain."""
    ref = {}
    for b in range(ids.shape[0]):
        for s0, s1 in segments(SEGMENTS[b]):
            x, fused = ids[b:b + 1, s0:s1], draft.fuse(aux[b:b + 1, s0:s1])
            cache, n_ctx = draft.new_cache(), 0
            if context is not None:
                for i, kv in enumerate(context):
                    cache.update(i, KV(kv.key[b:b + 1], kv.value[b:b + 1]))
                n_ctx = context[0].length
            step0 = {}
            for r in range(1, s1 - s0):  # row r reads token x[r] and feature g[r-1], one position at a time
                step0[r] = draft(x[:, r:r + 1], fused[:, r - 1:r], torch.tensor([[r]]), cache=cache)
            for r, out in step0.items():
                if r + 1 >= s1 - s0:  # the predicted token x[r+1] lies outside the sample
                    continue
                ref[(b, s0 + r, 0)] = out.logits[0, 0]
                chain, hidden = cache_prefix(cache, n_ctx + r), out.hidden
                for k in range(1, steps):
                    if r + k + 1 >= s1 - s0:
                        break
                    pos = torch.tensor([[r + k if shift else r]])
                    out_k = draft(x[:, r + k:r + k + 1], hidden, pos, cache=chain)
                    ref[(b, s0 + r, k)], hidden = out_k.logits[0, 0], out_k.hidden
    return ref


@pytest.mark.parametrize("n_layers,impl,shift", [(1, "sdpa", True), (2, "eager", True), (1, "auto", False)])
def test_parallel_unroll_equals_sequential_chains(n_layers: int, impl: str, shift: bool) -> None:
    draft = tiny_draft(n_layers, impl)
    ids, aux = random_inputs()
    with torch.no_grad():
        out = ttt_unroll(draft, ids, aux, segment_ids=SEGMENTS, steps=STEPS, shift_positions=shift)
    ref = sequential_reference(draft, ids, aux, STEPS, shift)
    assert len(out.logits) == STEPS and out.logits[0].shape == (2, 12, 64)
    expected_valid = torch.zeros(STEPS, 2, 12, dtype=torch.bool)
    for (b, t, k), logits in ref.items():
        expected_valid[k, b, t] = True
        torch.testing.assert_close(out.logits[k][b, t], logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.valid, expected_valid)
    assert out.valid[:, 0, 9:].sum() == 0 and not out.valid[:, :, 0].any() and not out.valid[:, 0, 5].any()
    assert len(ref) == 3 + 2 + 1 + 0 + 2 + 1 + 0 + 0 + 10 + 9 + 8 + 7  # valid (row, step) pairs


def test_context_keys_are_visible_like_a_cache_prefix() -> None:
    """ConFu hook: extra context entries seen by every step equal entries already in the cache."""
    draft = tiny_draft(2)
    ids, aux = random_inputs()
    g = torch.Generator().manual_seed(3)
    context = [KV(torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)) for _ in range(2)]
    with torch.no_grad():
        seen = ttt_unroll(draft, ids, aux, segment_ids=SEGMENTS, steps=STEPS, context=context,
                          context_mask=torch.ones(2, 12, 2, dtype=torch.bool))
        hidden = ttt_unroll(draft, ids, aux, segment_ids=SEGMENTS, steps=STEPS, context=context,
                            context_mask=torch.zeros(2, 12, 2, dtype=torch.bool))
        plain = ttt_unroll(draft, ids, aux, segment_ids=SEGMENTS, steps=STEPS)
    for k in range(STEPS):
        v = plain.valid[k]
        torch.testing.assert_close(hidden.logits[k][v], plain.logits[k][v], rtol=1e-5, atol=1e-5)
    for (b, t, k), logits in sequential_reference(draft, ids, aux, STEPS, context=context).items():
        torch.testing.assert_close(seen.logits[k][b, t], logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(DraftError, match="context_mask"):
        ttt_unroll(draft, ids, aux, steps=2, context=context)


def test_attention_mask_path_equals_segment_ids() -> None:
    draft = tiny_draft()
    ids, aux = random_inputs()
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[0, 7:] = 0
    segment_ids = torch.where(attention_mask.bool(), 0, -1)
    with torch.no_grad():
        a = ttt_unroll(draft, ids, aux, attention_mask=attention_mask, steps=3)
        b = ttt_unroll(draft, ids, aux, segment_ids=segment_ids, steps=3)
    assert torch.equal(a.valid, b.valid) and a.valid[:, 0, 6:].sum() == 0
    for k in range(3):
        torch.testing.assert_close(a.logits[k], b.logits[k])


def test_helpers() -> None:
    runs = segment_runs(torch.tensor([[0, 0, 1, 1, 1, -1], [3, 3, 3, 0, 0, 0]]))
    assert runs.tolist() == [[1, 1, 2, 2, 2, -1], [1, 1, 1, 2, 2, 2]]
    assert positions_in_runs(runs).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2]]
    assert shift_left(torch.tensor([[1, 2, 3]]), 2, -1).tolist() == [[3, -1, -1]]
    assert shift_left(torch.tensor([[1, 2, 3]]), 5, -1).tolist() == [[-1, -1, -1]]
    with pytest.raises(DraftError, match=">= 1"):
        ttt_unroll(tiny_draft(), *random_inputs(), steps=0)
