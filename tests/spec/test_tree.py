"""Tree invariants: node count, closure under parent, mask = ancestors, positions = base + depth."""

from __future__ import annotations

import pytest
import torch

from confu_lightning.spec.protocols import SpecError
from confu_lightning.spec.tree import DraftTree, chain_tree, dynamic_tree, expand_level


def ancestors(tree: DraftTree, i: int) -> set[int]:
    out = {i}
    while i > 0:
        i = int(tree.parents[i])
        out.add(i)
    return out


def check_invariants(tree: DraftTree) -> None:
    n = tree.num_nodes
    for i in range(n):
        row = {int(j) for j in torch.nonzero(tree.tree_mask[i]).flatten()}
        assert row == ancestors(tree, i)
        assert int(tree.depth[i]) == len(row) - 1
    assert torch.equal(tree.positions(7), 7 + tree.depth)
    leaves = [i for i in range(n) if not tree.children[i]]
    paths = tree.retrieve_indices
    assert paths.shape[0] == len(leaves)
    for row, leaf in zip(paths, leaves):
        nodes = [int(x) for x in row if x >= 0]
        assert nodes[0] == 0 and nodes[-1] == leaf
        assert all(int(tree.parents[b]) == a for a, b in zip(nodes, nodes[1:]))


def test_chain_tree() -> None:
    tree = chain_tree(5, torch.tensor([1, 2, 3]))
    check_invariants(tree)
    assert tree.tokens.tolist() == [5, 1, 2, 3]
    assert tree.tree_mask.equal(torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert tree.retrieve_indices.tolist() == [[0, 1, 2, 3]]


def grow_random_pool(top_k: int, depth: int, vocab: int, seed: int):
    """EAGLE-2 pool from random log-probs: k level-1 children, then k*k per level from the best k."""
    gen = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(1, vocab, generator=gen), -1)
    tok, score, _ = expand_level(torch.zeros(1), lp, top_k)
    toks, scores, parents = [tok], [score], [torch.full((top_k,), -1)]
    frontier = torch.arange(top_k)
    for _ in range(depth - 1):
        lp = torch.log_softmax(torch.randn(top_k, vocab, generator=gen), -1)
        fscores = torch.cat(scores)[frontier]
        tok, score, owner = expand_level(fscores, lp, top_k)
        start = sum(t.numel() for t in toks)
        toks.append(tok), scores.append(score), parents.append(frontier[owner])
        frontier = start + torch.topk(score, top_k).indices
    return torch.cat(toks), torch.cat(scores), torch.cat(parents)


@pytest.mark.parametrize("top_k,depth,total", [(4, 3, 10), (10, 6, 60), (3, 5, 200)])
def test_dynamic_tree_invariants(top_k: int, depth: int, total: int) -> None:
    tokens, scores, parents = grow_random_pool(top_k, depth, 50, seed=top_k * depth)
    tree = dynamic_tree(9, tokens, scores, parents, total)
    assert tree.num_nodes == min(total, tokens.numel() + 1)
    assert int(tree.depth.max()) <= depth
    check_invariants(tree)
    # the kept nodes are the best-scoring candidates
    kept = torch.sort(tree.scores[1:], descending=True).values
    best = torch.sort(scores, descending=True).values[: tree.num_nodes - 1]
    assert torch.allclose(kept, best)


def test_dynamic_tree_refuses_unclosed_selection() -> None:
    tokens = torch.tensor([1, 2, 3])
    scores = torch.tensor([-5.0, -1.0, -0.5])  # child 2 outscores its parent 0 (impossible for log-probs)
    parents = torch.tensor([-1, -1, 0])
    with pytest.raises(SpecError, match="closed"):
        dynamic_tree(0, tokens, scores, parents, total_tokens=3)


def test_bad_parents_rejected() -> None:
    with pytest.raises(SpecError):
        DraftTree(torch.tensor([0, 1]), torch.tensor([-1, 1]), torch.zeros(2))
