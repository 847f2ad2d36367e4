"""Drafting one round: a chain (greedy or sampled) or an EAGLE-2 dynamic tree from a `DraftLike`.

research/eval-anchors.md §3.2–3.3. Both start from the draft's output at the root row (the row
holding the token the target produced last round) and leave the draft cache as they found it
(tree entries are cropped: next round the accepted tokens are re-fed with *target* features, the
EAGLE-3 inference rule of `train/ttt.py`). Depth-d nodes sit at position `root_pos + d`; a node fed
at depth d >= 1 carries its parent's draft hidden state as feature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from confu_lightning.spec.protocols import DraftLike
from confu_lightning.spec.tree import DraftTree, chain_tree, dynamic_tree, expand_level
from confu_lightning.spec.verify import process_logits, sample


def draft_chain(draft: DraftLike, cache: Any, root: int, root_pos: int, logits: Tensor, hidden: Tensor, depth: int,
                *, temperature: float = 0.0, vocab_size: int | None = None,
                generator: torch.Generator | None = None, conditioning: Any = None) -> tuple[DraftTree, Tensor | None]:
    """Draft `depth` tokens one at a time; argmax at temperature 0, else sample softmax(logits / T).

    Returns:
        the chain tree and, when sampling, q: (depth, V) the distributions the tokens were drawn
        from, scattered into the target vocabulary (`vocab_size`).

    Shapes:
        logits: (Vd,) draft logits at the root row. hidden: (H,) its hidden state.
    """
    start = draft.cache_length(cache)
    tokens, scores, qs = [], [], []
    for j in range(depth):
        logp = torch.log_softmax(logits.float(), -1)
        if temperature > 0:
            q_draft = process_logits(logits, temperature)
            did = sample(q_draft[None], generator)[0]
            all_ids = draft.to_target_ids(torch.arange(q_draft.numel(), device=q_draft.device)).cpu()
            qs.append(torch.zeros(int(vocab_size)).index_add_(0, all_ids, q_draft.cpu()))
        else:
            did = logits.argmax(-1)
        tok = draft.to_target_ids(did.reshape(1)).cpu()
        tokens.append(tok)
        scores.append(logp[did].cpu().reshape(1) + (scores[-1] if scores else 0.0))
        if j + 1 < depth:
            step = draft.forward(tok, hidden[None], torch.tensor([root_pos + j + 1]), None, cache, conditioning)
            logits, hidden = step.logits[-1], step.hidden[-1]
    draft.crop_cache(cache, start)
    tree = chain_tree(root, torch.cat(tokens), torch.cat(scores))
    return tree, (torch.stack(qs) if qs else None)


def draft_dynamic(draft: DraftLike, cache: Any, root: int, root_pos: int, logits: Tensor, hidden: Tensor, *,
                  depth: int, top_k: int, total_tokens: int, conditioning: Any = None) -> DraftTree:
    """EAGLE-2 tree: top-k children per frontier node, best k expanded per level, rerank the pool.

    One batched draft call per level 2..depth over the k frontier nodes; each frontier node attends
    to the whole prefix (root row included), its fed ancestors and itself.

    Shapes:
        logits: (Vd,) draft logits at the root row. hidden: (H,) its hidden state.
    """
    start = draft.cache_length(cache)
    did, score, _ = expand_level(torch.zeros(1), torch.log_softmax(logits.float().cpu(), -1)[None], top_k)
    pool_tok, pool_score = [draft.to_target_ids(did.to(logits.device)).cpu()], [score]
    pool_parent = [torch.full((did.numel(),), -1, dtype=torch.long)]
    frontier = torch.arange(did.numel())  # pool indices
    feats = hidden[None].expand(did.numel(), -1)  # (F, H)
    anc = torch.zeros(did.numel(), 0, dtype=torch.bool)  # frontier rows over fed tree entries
    for level in range(2, depth + 1):
        f = frontier.numel()
        mask = torch.cat([torch.ones(f, start, dtype=torch.bool), anc, torch.eye(f, dtype=torch.bool)], 1)
        tokens = torch.cat(pool_tok)[frontier]
        positions = torch.full((f,), root_pos + level - 1, dtype=torch.long)
        step = draft.forward(tokens, feats, positions, mask.to(hidden.device), cache, conditioning)
        logp = torch.log_softmax(step.logits.float().cpu(), -1)  # (F, Vd)
        did, score, owner = expand_level(torch.cat(pool_score)[frontier], logp, top_k)
        base = sum(t.numel() for t in pool_tok)
        pool_tok.append(draft.to_target_ids(did.to(logits.device)).cpu())
        pool_score.append(score)
        pool_parent.append(frontier[owner])
        fed_rows = torch.cat([anc, torch.eye(f, dtype=torch.bool)], 1)  # (F, n_fed + F) incl. self
        best = torch.topk(score, min(top_k, score.numel())).indices
        frontier, feats = base + best, step.hidden[owner[best]]
        anc = fed_rows[owner[best]]
    draft.crop_cache(cache, start)
    return dynamic_tree(root, torch.cat(pool_tok), torch.cat(pool_score), torch.cat(pool_parent), total_tokens)
