"""Verification of drafted tokens against one target forward: greedy and lossless sampling.

research/eval-anchors.md §3.1 (greedy chain), §3.2 (chain speculative sampling, Leviathan et al.
2023 / Chen et al. 2023), §3.5 (greedy tree) and §3.6 (EAGLE's fixed-candidate rule for top-k trees,
`utils.evaluate_posterior`). Pure tensor functions; the sampling ones are batched over a leading B
so the chi-square tests can draw 10^5 outcomes at once (the engine uses B = 1). `process_logits`
is the one logits processor shared with the autoregressive baseline, so "lossless" compares like
with like.
"""

from __future__ import annotations

import torch
from torch import Tensor

from confu_lightning.spec.protocols import SpecError
from confu_lightning.spec.tree import DraftTree


def process_logits(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """Target (or draft) logits -> sampling probabilities; temperature <= 0 gives the argmax one-hot.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token
    crossing the threshold is kept, as in Hugging Face `TopPLogitsWarper`).

    Shapes:
        logits: (..., V) -> probs (..., V) float32.
    """
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row. Shapes: probs (B, V) -> (B,) int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def verify_greedy(tree: DraftTree, logits: Tensor) -> tuple[Tensor, int]:
    """Longest root-to-leaf prefix whose tokens equal the target argmax (§3.5; ties: first leaf).

    Returns:
        path: (A+1,) node indices, root first then the A accepted nodes; bonus: argmax after path[-1].

    Shapes:
        logits: (N, V), row i = target logits after node i.
    """
    if logits.shape[0] != tree.num_nodes:
        raise SpecError(f"verify_greedy needs one logits row per tree node ({tree.num_nodes}), got {logits.shape[0]}")
    paths = tree.retrieve_indices  # (L, W)
    pred = logits.argmax(-1).cpu()  # (N,)
    child = paths[:, 1:]
    match = (child >= 0) & (tree.tokens[child.clamp(min=0)] == pred[paths[:, :-1].clamp(min=0)])
    accepted = match.long().cumprod(1).sum(1)  # (L,)
    best = int(torch.argmax(accepted))  # first maximum
    path = paths[best, : int(accepted[best]) + 1]
    return path, int(pred[path[-1]])


def verify_chain_sampling(draft_tokens: Tensor, q: Tensor, p: Tensor,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Chain speculative sampling: accept d[j] with prob min(1, p/q), else sample norm(max(p - q, 0)).

    `q` must be the exact distribution each drafted token was sampled from (§3.2).

    Returns:
        n_accepted: (B,) in 0..K; next_token: (B,) the residual sample, or the bonus from p[K].

    Shapes:
        draft_tokens: (B, K). q: (B, K, V). p: (B, K+1, V) processed target probabilities.
    """
    batch, k = draft_tokens.shape
    u = torch.rand(batch, k, generator=generator)
    d = draft_tokens.long()[..., None]
    px = p[:, :k].gather(-1, d).squeeze(-1)
    qx = q.gather(-1, d).squeeze(-1).clamp(min=1e-30)
    n = (u < px / qx).long().cumprod(1).sum(1)  # (B,)
    rows = torch.arange(batch)
    p_n = p[rows, n]  # (B, V)
    q_n = torch.where((n < k)[:, None], q[rows, n.clamp(max=k - 1)], torch.zeros_like(p_n))
    residual = (p_n - q_n).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 1e-12, residual / mass.clamp(min=1e-30), p_n)
    return n, sample(residual, generator)


def children_matrix(tree: DraftTree) -> Tensor:
    """(N, max_children) int64 child indices in node order, padded with -1 (at least one column)."""
    width = max(1, max(len(k) for k in tree.children))
    out = torch.full((tree.num_nodes, width), -1, dtype=torch.long)
    for i, kids in enumerate(tree.children):
        out[i, : len(kids)] = torch.tensor(kids, dtype=torch.long)
    return out


def verify_tree_sampling(tree: DraftTree, p: Tensor,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """EAGLE fixed-candidate rule (§3.6): try children in node order with prob g(x), zero and renormalise.

    Lossless for any candidate set chosen without the target's randomness (top-k drafts).

    Returns:
        paths: (B, max_depth+1) accepted node indices from the root, padded with -1;
        n_accepted: (B,); bonus: (B,) sampled after the last accepted node.

    Shapes:
        p: (B, N, V) processed target probabilities, p[:, i] = next-token distribution after node i.
    """
    batch = p.shape[0]
    kids_of = children_matrix(tree)
    width = int(tree.depth.max()) + 1
    rows = torch.arange(batch)
    paths = torch.full((batch, width), -1, dtype=torch.long)
    paths[:, 0] = 0
    cur = torch.zeros(batch, dtype=torch.long)
    n_acc = torch.zeros(batch, dtype=torch.long)
    bonus = torch.zeros(batch, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(width):
        g = p[rows, cur].clone()  # (B, V)
        picked = torch.full((batch,), -1, dtype=torch.long)
        for kid in kids_of[cur].unbind(1):  # (B,) each
            active = ~done & (picked < 0) & (kid >= 0)
            tok = tree.tokens[kid.clamp(min=0)]
            gx = g[rows, tok]
            hit = active & (torch.rand(batch, generator=generator) < gx)
            picked = torch.where(hit, kid, picked)
            miss = active & ~hit
            g[rows[miss], tok[miss]] = 0.0
            g[miss] = g[miss] / g[miss].sum(-1, keepdim=True).clamp(min=1e-30)
        finish = ~done & (picked < 0)
        if bool(finish.any()):
            bonus[finish] = sample(g[finish], generator)
        done |= finish
        go = picked >= 0
        cur = torch.where(go, picked, cur)
        n_acc += go.long()
        if step + 1 < width:
            paths[go, step + 1] = picked[go]
    return paths, n_acc, bonus
