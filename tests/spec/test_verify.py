"""Verification: greedy picks the longest matching path; sampling rules are lossless (chi-square).

research/eval-anchors.md §3.7: fixed seeds, V <= 8, 10^5 draws, fail when p < 1e-3, and the same
tests must reject a deliberately broken verifier.
"""

from __future__ import annotations

import torch

from confu_lightning.spec.tree import DraftTree, chain_tree
from confu_lightning.spec.verify import (
    process_logits,
    sample,
    verify_chain_sampling,
    verify_greedy,
    verify_tree_sampling,
)

V, DRAWS = 6, 100_000


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value of `counts` against `probs` (cells with zero probability must be empty)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    live = probs > 0
    if bool((counts[~live] > 0).any()):
        return 0.0
    expected = counts.sum() * probs[live]
    stat = ((counts[live] - expected) ** 2 / expected).sum()
    dof = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def dirichlet(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Dirichlet(0.7) rows, deterministic given `gen` (Gamma sampling only reads the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        x = torch.distributions.Gamma(torch.full(shape, 0.7), 1.0).sample()
    return x / x.sum(-1, keepdim=True)


def test_greedy_chain_and_tree() -> None:
    logits = torch.full((4, 8), -1.0)
    for row, tok in enumerate([1, 2, 7, 4]):
        logits[row, tok] = 1.0
    path, bonus = verify_greedy(chain_tree(0, torch.tensor([1, 2, 3])), logits)
    assert path.tolist() == [0, 1, 2] and bonus == 7
    # tree: root -> {5, 1}; 1 -> {2}; best path is the second branch
    tree = DraftTree(torch.tensor([0, 5, 1, 2]), torch.tensor([-1, 0, 0, 2]), torch.zeros(4))
    logits = torch.zeros(4, 8)
    logits[0, 1] = logits[2, 2] = logits[3, 6] = 1.0
    path, bonus = verify_greedy(tree, logits)
    assert path.tolist() == [0, 2, 3] and bonus == 6


def test_top_p_and_temperature() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(process_logits(logits, 1.0, 0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert process_logits(logits, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(process_logits(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def run_chain(k: int, broken: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-position chain; returns emitted first-two-token counts and the target joint."""
    gen = torch.Generator().manual_seed(1)
    p1, p2 = dirichlet(gen, V), dirichlet(gen, V, V)  # p2[a] = target after a
    q1, q2 = dirichlet(gen, V), dirichlet(gen, V, V)
    d1 = sample(q1.expand(DRAWS, V), gen)
    d2 = sample(q2[d1], gen)
    q = torch.stack([q1.expand(DRAWS, V), q2[d1]], 1)  # (B, 2, V)
    p = torch.stack([p1.expand(DRAWS, V), p2[d1], p1.expand(DRAWS, V)], 1)  # third row unused unless all accepted
    p[:, 2] = 1.0 / V  # third token distribution: irrelevant to the joint of the first two
    drafts = torch.stack([d1, d2], 1)
    if broken:  # always accept: emits the draft's own tokens
        n, nxt = torch.full((DRAWS,), 2), sample(p[:, 2], gen)
    else:
        n, nxt = verify_chain_sampling(drafts, q, p, gen)
    first = torch.where(n >= 1, d1, nxt)
    # second token: d2 if both accepted, the residual/bonus if exactly one accepted, else a fresh
    # target draw after `first` (the next round; simulated directly from the target table)
    fresh = sample(p2[first], gen)
    second = torch.where(n >= 2, d2, torch.where(n == 1, nxt, fresh))
    counts = torch.bincount(first * V + second, minlength=V * V)
    return counts, p1[:, None] * p2, n


def test_chain_sampling_is_lossless_and_broken_variant_fails() -> None:
    counts, joint, n = run_chain(2, broken=False)
    assert chi_square_p(counts, joint) > 1e-3
    broken_counts, _, _ = run_chain(2, broken=True)
    assert chi_square_p(broken_counts, joint) < 1e-3


def test_chain_acceptance_rate_matches_overlap() -> None:
    gen = torch.Generator().manual_seed(3)
    p, q = dirichlet(gen, V), dirichlet(gen, V)
    d = sample(q.expand(DRAWS, V), gen)[:, None]
    n, _ = verify_chain_sampling(d, q.expand(DRAWS, 1, V), torch.stack([p, p]).expand(DRAWS, 2, V), gen)
    alpha = float(torch.minimum(p, q).sum())
    assert abs(float(n.float().mean()) - alpha) < 4 * (alpha * (1 - alpha) / DRAWS) ** 0.5


def tree_setup():
    """Root -> {a0, a1, a2}; a0 -> {b0, b1}; a1 -> {b2}: fixed candidates, tokens chosen arbitrarily."""
    tokens = torch.tensor([0, 2, 0, 5, 1, 3, 4])
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2])
    return DraftTree(tokens, parents, torch.zeros(7))


def test_tree_sampling_is_lossless_and_broken_variant_fails() -> None:
    gen = torch.Generator().manual_seed(2)
    p1, p2 = dirichlet(gen, V), dirichlet(gen, V, V)
    tree = tree_setup()
    # p[:, i] = target distribution after node i: root -> p1, depth-1 node with token a -> p2[a]
    per_node = torch.stack([p1] + [p2[int(t)] for t in tree.tokens[1:4]] + [torch.full((V,), 1.0 / V)] * 3)
    probs = per_node.expand(DRAWS, -1, -1)
    joint = p1[:, None] * p2

    def emitted(paths, n, bonus):
        first = torch.where(n >= 1, tree.tokens[paths[:, 1].clamp(min=0)], bonus)
        second = torch.where(n >= 2, tree.tokens[paths[:, 2].clamp(min=0)],
                             torch.where(n == 1, bonus, sample(p2[first], gen)))
        return torch.bincount(first * V + second, minlength=V * V)

    assert chi_square_p(emitted(*verify_tree_sampling(tree, probs, gen)), joint) > 1e-3

    # negative control (§3.7): after all siblings are rejected, resample from p instead of the residual
    paths, n, bonus = verify_tree_sampling(tree, probs, gen)
    last = paths.gather(1, n[:, None]).squeeze(1)  # node the bonus was sampled after
    rejected_here = torch.tensor([bool(tree.children[int(i)]) for i in range(tree.num_nodes)])[last]
    resampled = sample(per_node[last], gen)
    broken_bonus = torch.where(rejected_here, resampled, bonus)
    assert chi_square_p(emitted(paths, n, broken_bonus), joint) < 1e-3
