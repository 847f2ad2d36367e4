"""Engine: greedy speculative output equals greedy AR output, a perfect draft reaches τ = depth + 1,
and the compacted KV cache gives the same logits as a full recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from confu_lightning.config.schema import TargetConfig
from confu_lightning.draft.eagle3 import Eagle3Draft, draft_config_from_target
from confu_lightning.spec.engine import SpeculativeEngine, autoregressive
from confu_lightning.spec.protocols import DraftLike, ExtraInputs, TargetLike
from confu_lightning.target.wrapper import TargetModel
from tests.spec.adapters import DraftAdapter, PerfectDraft, TargetAdapter

NEW = 24


@pytest.fixture(scope="module")
def target(tiny_target_dir: Path) -> TargetAdapter:
    model = TargetModel.from_pretrained(tiny_target_dir, TargetConfig(name=str(tiny_target_dir)))
    return TargetAdapter(model)


@pytest.fixture(scope="module")
def draft(target: TargetAdapter) -> DraftAdapter:
    model = target.target
    cfg = draft_config_from_target(model.model.config.to_dict(), draft_vocab_size=model.vocab_size)
    torch.manual_seed(0)
    net = Eagle3Draft(cfg).eval()
    net.load_embedding(model.embed_tokens.weight.detach())
    return DraftAdapter(net)


def prompt() -> torch.Tensor:
    return torch.tensor([1, 40, 41, 42, 100, 7, 9, 33])


def test_adapters_satisfy_protocols(target: TargetAdapter, draft: DraftAdapter) -> None:
    assert isinstance(target, TargetLike) and isinstance(draft, DraftLike)


@pytest.mark.parametrize("tree,depth,top_k,total", [("chain", 4, 1, 2), ("dynamic", 4, 3, 12), ("dynamic", 3, 4, 20)])
def test_greedy_speculative_equals_autoregressive(target, draft, tree, depth, top_k, total) -> None:
    ar = autoregressive(target, prompt(), max_new_tokens=NEW)
    spec = SpeculativeEngine(target, draft, tree=tree, depth=depth, top_k=top_k, total_tokens=total,
                             max_new_tokens=NEW).generate(prompt())
    assert spec.tokens == ar.tokens
    assert len(spec.tokens) == NEW and ar.tau == 1.0
    assert sum(spec.accept_lengths) >= NEW - 1  # the prefill token belongs to no round
    assert spec.verify_forwards == len(spec.accept_lengths)


@pytest.mark.parametrize("tree", ["chain", "dynamic"])
def test_perfect_draft_reaches_max_tau(target, tree) -> None:
    depth = 4
    ar = autoregressive(target, prompt(), max_new_tokens=60)
    sequence = prompt().tolist() + ar.tokens
    stub = PerfectDraft(sequence, vocab=target.target.vocab_size)
    spec = SpeculativeEngine(target, stub, tree=tree, depth=depth, top_k=2, total_tokens=10,
                             max_new_tokens=21).generate(prompt())
    assert spec.tokens == ar.tokens[:21]
    assert spec.accept_lengths == [depth + 1] * 4  # 1 prefill token + 4 rounds of 5
    assert spec.tau == depth + 1


def test_compacted_cache_matches_full_recompute(target, draft) -> None:
    """After a tree round and KV selection, the next logits equal a fresh forward over the sequence."""
    engine = SpeculativeEngine(target, draft, tree="dynamic", depth=3, top_k=3, total_tokens=10, max_new_tokens=64)
    captured = {}
    original = target.forward

    def spy(input_ids, positions, mask, cache, extra=None):
        out = original(input_ids, positions, mask, cache, extra)
        captured["cache"] = cache
        return out

    target.forward = spy
    try:
        engine.max_new_tokens = 10
        result = engine.generate(prompt())
    finally:
        del target.forward
    seq = prompt().tolist() + result.tokens
    cache = captured["cache"]
    n = target.cache_length(cache)
    nxt = torch.tensor([seq[n]])
    inc = target.forward(nxt, torch.tensor([n]), None, cache).logits[-1]
    full = target.forward(torch.tensor(seq[: n + 1]), torch.arange(n + 1), None, target.new_cache()).logits[-1]
    assert torch.allclose(inc, full, atol=1e-4)


class ContemplateHooks:
    """Appends two extra tokens per round (visible: prefix + root) and records their outputs."""

    def __init__(self) -> None:
        self.seen = 0

    def verify_extra(self, tree, prefix_len):
        c, n = 2, tree.num_nodes
        mask = torch.zeros(c, prefix_len + n + c, dtype=torch.bool)
        mask[:, : prefix_len + 1] = True
        mask[:, prefix_len + n:] = torch.ones(c, c, dtype=torch.bool).tril()
        return ExtraInputs(positions=torch.tensor([prefix_len + 1, prefix_len + 2]), mask=mask,
                           input_ids=torch.tensor([5, 6]))

    def conditioning(self, step, path):
        assert step.extra_logits is not None and step.extra_logits.shape[0] == 2
        self.seen += 1
        return None


def test_extra_tokens_pass_through_and_stay_lossless(target, draft) -> None:
    hooks = ContemplateHooks()
    ar = autoregressive(target, prompt(), max_new_tokens=NEW)
    spec = SpeculativeEngine(target, draft, tree="dynamic", depth=3, top_k=3, total_tokens=10,
                             max_new_tokens=NEW, hooks=hooks).generate(prompt())
    assert spec.tokens == ar.tokens and hooks.seen == spec.verify_forwards


@pytest.mark.parametrize("tree", ["chain", "dynamic"])
def test_partially_right_draft_stays_lossless(target, tree) -> None:
    from tests.spec.adapters import NoisyDraft

    ar = autoregressive(target, prompt(), max_new_tokens=60)
    stub = NoisyDraft(prompt().tolist() + ar.tokens, vocab=target.target.vocab_size)
    spec = SpeculativeEngine(target, stub, tree=tree, depth=4, top_k=2, total_tokens=12,
                             max_new_tokens=40).generate(prompt())
    assert spec.tokens == ar.tokens[:40]
    if tree == "dynamic":  # the second-best branch holds the right token: every round accepts the full depth
        assert spec.tau == 5
    else:
        assert 1 < spec.tau < 5
