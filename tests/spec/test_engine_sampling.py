"""Engine sampling is lossless end to end: Markov stub target/draft, chi-square on two emitted tokens."""

from __future__ import annotations

import pytest
import torch

from confu_lightning.spec.engine import SpeculativeEngine, autoregressive
from tests.spec.adapters import MarkovDraft, MarkovTarget
from tests.spec.test_verify import chi_square_p, dirichlet

V, RUNS = 4, 3000


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return dirichlet(gen, V, V).clamp(min=1e-4), dirichlet(gen, V, V).clamp(min=1e-4)


def expected_joint(p: torch.Tensor) -> torch.Tensor:
    """Distribution of the 2nd and 3rd generated tokens after prompt [0]."""
    second = p[0] @ p  # (V,)
    return second[:, None] * p


@pytest.mark.parametrize("tree", ["chain", "dynamic", "ar"])
def test_engine_sampling_matches_target(tree: str) -> None:
    p, q = tables()
    p = p / p.sum(-1, keepdim=True)
    target, draft = MarkovTarget(p), MarkovDraft(q / q.sum(-1, keepdim=True))
    counts = torch.zeros(V * V, dtype=torch.long)
    for seed in range(RUNS):
        if tree == "ar":
            out = autoregressive(target, torch.tensor([0]), max_new_tokens=3, temperature=1.0, seed=seed)
        else:
            engine = SpeculativeEngine(target, draft, tree=tree, depth=2, top_k=2, total_tokens=5,
                                       temperature=1.0, max_new_tokens=3, seed=seed)
            out = engine.generate(torch.tensor([0]))
        counts[out.tokens[1] * V + out.tokens[2]] += 1
    assert chi_square_p(counts, expected_joint(p)) > 1e-3


def test_engine_sampling_test_rejects_a_broken_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Power check: an engine whose chain verifier always accepts fails the same chi-square test."""
    import confu_lightning.spec.engine as engine_module

    def always_accept(draft_tokens, q, p, generator=None):
        k = draft_tokens.shape[1]
        return torch.full((draft_tokens.shape[0],), k), torch.multinomial(p[:, k], 1, generator=generator)[:, 0]

    monkeypatch.setattr(engine_module, "verify_chain_sampling", always_accept)
    p, q = tables()
    p = p / p.sum(-1, keepdim=True)
    target, draft = MarkovTarget(p), MarkovDraft(q / q.sum(-1, keepdim=True))
    counts = torch.zeros(V * V, dtype=torch.long)
    for seed in range(RUNS):
        engine = SpeculativeEngine(target, draft, tree="chain", depth=2, temperature=1.0, max_new_tokens=3, seed=seed)
        out = engine.generate(torch.tensor([0]))
        counts[out.tokens[1] * V + out.tokens[2]] += 1
    assert chi_square_p(counts, expected_joint(p)) < 1e-3
