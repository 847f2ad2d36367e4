"""Draft trees: chains and EAGLE-2 dynamic trees, with the tensors one verification forward needs.

research/eval-anchors.md §3.3–3.4. Node 0 is the *root*: the token the target produced last
round, not yet in the target cache; nodes 1..N-1 are drafted tokens, each with a parent of lower
index (so parents precede children and a single pass builds the ancestor mask). `tree_mask[i, j]`
is True iff j is an ancestor of i or i itself; a node's position is `base + depth`. Our `depth`
parameter is the longest drafted path (the paper's depth; EAGLE code's `depth` is ours minus one)
and `total_tokens` counts the root, as in the EAGLE code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from confu_lightning.spec.protocols import SpecError


@dataclass(frozen=True)
class DraftTree:
    """A rooted token tree.

    Shapes:
        tokens: (N,) int64 target ids, tokens[0] = root. parents: (N,) int64, parents[0] = -1,
        parents[i] < i. scores: (N,) cumulative draft log-prob of the path to each node (root 0).
    """

    tokens: Tensor
    parents: Tensor
    scores: Tensor

    def __post_init__(self) -> None:
        n = self.tokens.numel()
        if n < 1 or self.parents.shape != (n,) or self.scores.shape != (n,):
            raise SpecError(f"tree tensors must all be (N,) with N >= 1; got tokens {tuple(self.tokens.shape)}, "
                            f"parents {tuple(self.parents.shape)}, scores {tuple(self.scores.shape)}")
        if int(self.parents[0]) != -1:
            raise SpecError("tree node 0 is the root and must have parent -1")
        if n > 1:
            idx = torch.arange(1, n)
            bad = (self.parents[1:] < 0) | (self.parents[1:] >= idx)
            if bool(bad.any()):
                raise SpecError("every tree node i >= 1 needs a parent in 0..i-1 (parents precede children)")

    @property
    def num_nodes(self) -> int:
        """N, root included."""
        return self.tokens.numel()

    @cached_property
    def tree_mask(self) -> Tensor:
        """(N, N) bool: row i = ancestors of i plus i itself."""
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[int(self.parents[i])]
        return mask

    @cached_property
    def depth(self) -> Tensor:
        """(N,) int64 distance from the root."""
        return self.tree_mask.sum(1) - 1

    def positions(self, base: int) -> Tensor:
        """(N,) position ids `base + depth` (`base` = position of the root = target cache length)."""
        return base + self.depth

    @cached_property
    def children(self) -> list[list[int]]:
        """Child node indices of every node, in node order."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            kids[int(self.parents[i])].append(i)
        return kids

    @cached_property
    def retrieve_indices(self) -> Tensor:
        """(L, max_depth + 1) int64 root-to-leaf node paths, one per leaf in node order, padded with -1."""
        leaves = [i for i, kids in enumerate(self.children) if not kids]
        width = int(self.depth.max()) + 1
        out = torch.full((len(leaves), width), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            path = torch.nonzero(self.tree_mask[leaf]).flatten()  # ancestors ascend in index = in depth
            out[row, : path.numel()] = path
        return out


def chain_tree(root: int, tokens: Tensor, scores: Tensor | None = None) -> DraftTree:
    """A chain root -> tokens[0] -> tokens[1] ...

    Shapes:
        tokens: (K,) drafted target ids. scores: (K,) cumulative log-probs or None (zeros).
    """
    k = tokens.numel()
    all_tokens = torch.cat([torch.tensor([root], dtype=torch.long), tokens.long().flatten()])
    parents = torch.arange(-1, k, dtype=torch.long)
    cum = torch.zeros(k + 1) if scores is None else torch.cat([torch.zeros(1), scores.float().flatten()])
    return DraftTree(all_tokens, parents, cum)


def expand_level(frontier_scores: Tensor, logprobs: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k children of every frontier node with cumulative scores (EAGLE-2 one expansion).

    Shapes:
        frontier_scores: (F,). logprobs: (F, Vd) draft log-probs after each frontier node.
        returns: draft ids (F*k,), cumulative scores (F*k,), frontier index of the parent (F*k,),
        frontier-major order.
    """
    top = torch.topk(logprobs.float(), top_k, dim=-1)
    scores = frontier_scores.float()[:, None] + top.values  # (F, k)
    owner = torch.arange(frontier_scores.numel())[:, None].expand(-1, top_k)
    return top.indices.reshape(-1), scores.reshape(-1), owner.reshape(-1)


def dynamic_tree(root: int, tokens: Tensor, scores: Tensor, parents: Tensor, total_tokens: int) -> DraftTree:
    """EAGLE-2 rerank: keep the `total_tokens - 1` best pool candidates, in pool (level-major) order.

    Args:
        root: the root token id.
        tokens, scores, parents: the candidate pool in insertion order; `parents[i]` is the pool
            index of i's parent, or -1 for the root (parents precede children).
        total_tokens: nodes of the returned tree, root included.

    Shapes:
        tokens, scores, parents: (M,).
    """
    m = tokens.numel()
    keep_n = min(total_tokens - 1, m)
    if keep_n < 0:
        raise SpecError(f"total_tokens must be >= 1, got {total_tokens}")
    # stable sort: ties go to the earlier candidate, so a child tied with its parent (log-prob 0 in
    # fp32) never displaces it and the selection stays closed under "parent of"
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    kept = order[:keep_n].sort().values  # (m',) pool indices in pool order
    new_index = torch.full((m,), -2, dtype=torch.long)
    new_index[kept] = torch.arange(1, keep_n + 1)
    pool_parent = parents.long()[kept]
    tree_parent = torch.where(pool_parent < 0, torch.zeros_like(pool_parent), new_index[pool_parent.clamp(min=0)])
    if bool((tree_parent == -2).any()):
        raise SpecError("dynamic tree is not closed under 'parent of': a kept node scores higher than its "
                        "dropped parent (scores must be cumulative log-probs)")
    all_tokens = torch.cat([torch.tensor([root], dtype=torch.long), tokens.long()[kept]])
    all_parents = torch.cat([torch.tensor([-1], dtype=torch.long), tree_parent])
    all_scores = torch.cat([torch.zeros(1), scores.float()[kept]])
    return DraftTree(all_tokens, all_parents, all_scores)
