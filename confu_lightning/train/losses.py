"""The EAGLE-3 TTT loss and its accuracy / simulated-acceptance metrics, as pure tensor functions.

EAGLE-3 §3.3 (research/anchors.md §0, §1.1; DESIGN.md §6): the teacher is the target's
next-token distribution, recomputed from the cached post-norm `last_hidden` through the frozen
target `lm_head` and restricted to the draft vocabulary (softmax over the `t2d` columns only, so
it is renormalised); the loss is the soft cross-entropy (forward KL up to a constant) of each step,
over positions whose predicted token is supervised and whose target argmax lies inside the draft
vocabulary, normalised by the number of such positions (EAGLE divides by all positions, EAGLE#340),
weighted gamma^k. Shifts follow train/ttt.py: row t of step k predicts token t+k+1, its teacher is
row t+k and its loss mask entry is loss_mask[t+k+1]. Accuracy counts a position as right when the
draft argmax equals the target argmax (a target argmax outside the draft vocabulary is always
wrong); conditional accuracy also needs every earlier step right; simulated acceptance length
tau = 1 + sum_k prod_{i<=k} acc_i (SpecForge's `simulated_acc_len` plus the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from confu_lightning.errors import DraftError
from confu_lightning.train.ttt import TTTOutput, shift_left


@dataclass
class Teacher:
    """The target's next-token signal per position.

    Shapes:
        probs: (B, T, Vd) float32, softmax of the target logits over the draft-vocabulary columns.
        target_ids: (B, T) int64 draft id of the full-vocabulary argmax, -1 when outside the draft vocab.
    """

    probs: Tensor
    target_ids: Tensor


@torch.no_grad()
def teacher_targets(last_hidden: Tensor, lm_head_weight: Tensor, t2d: Tensor, chunk_rows: int = 512) -> Teacher:
    """Teacher probabilities over the draft vocabulary and the full-vocabulary argmax.

    Only the Vd selected rows of `lm_head_weight` are used for the probabilities; the argmax over
    all V tokens (needed to mask positions the draft cannot predict) runs `chunk_rows` positions
    at a time, so at most (chunk_rows, V) logits exist at once.

    Shapes:
        last_hidden: (B, T, H) post-final-norm. lm_head_weight: (V, H). t2d: (V,) bool.
    """
    if lm_head_weight.shape[0] != t2d.numel():
        raise DraftError(f"lm_head has {lm_head_weight.shape[0]} rows but t2d covers {t2d.numel()} tokens")
    t2d = t2d.to(lm_head_weight.device)
    hidden = last_hidden.to(lm_head_weight.dtype)
    restricted = hidden @ lm_head_weight[t2d].T  # (B, T, Vd)
    probs = torch.softmax(restricted.float(), dim=-1)
    to_draft = torch.full((t2d.numel(),), -1, dtype=torch.int64, device=t2d.device)
    to_draft[t2d] = torch.arange(int(t2d.sum()), device=t2d.device)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    argmax = torch.cat([(rows @ lm_head_weight.T).argmax(-1) for rows in flat.split(chunk_rows)]) \
        if flat.shape[0] else torch.zeros(0, dtype=torch.int64, device=flat.device)
    return Teacher(probs=probs, target_ids=to_draft[argmax].view(last_hidden.shape[:2]))


def supervised_masks(valid: Tensor, loss_mask: Tensor) -> Tensor:
    """Rows whose step-k prediction (token t+k+1) is valid and inside the loss mask.

    Shapes: valid (K, B, T) bool, loss_mask (B, T) -> (K, B, T) bool.
    """
    mask = loss_mask.bool()
    return torch.stack([valid[k] & shift_left(mask, k + 1, False) for k in range(valid.shape[0])])


@dataclass
class TTTLoss:
    """Weighted loss and its per-step parts.

    Shapes: loss () ; step_losses (K,) detached ; counts (K,) supervised in-vocab positions.
    """

    loss: Tensor
    step_losses: Tensor
    counts: Tensor


def ttt_loss(out: TTTOutput, teacher: Teacher, loss_mask: Tensor, step_weight: float = 0.8) -> TTTLoss:
    """Sum over steps of gamma^k x soft cross-entropy averaged over supervised in-vocabulary positions.

    Only the supervised rows are gathered before the log-softmax, so padding and prompt tokens cost
    nothing; a step with no such row contributes an exact zero (still attached to the graph).
    """
    if out.logits[0].shape[-1] != teacher.probs.shape[-1]:
        raise DraftError(f"draft logits cover {out.logits[0].shape[-1]} tokens but the teacher covers "
                         f"{teacher.probs.shape[-1]}; the draft and the teacher use different t2d vocabularies")
    supervised = supervised_masks(out.valid, loss_mask)
    losses, counts = [], []
    for k, logits in enumerate(out.logits):
        keep = supervised[k] & (shift_left(teacher.target_ids, k, -1) >= 0)  # (B, T)
        rows, cols = keep.nonzero(as_tuple=True)
        probs = teacher.probs[rows, cols + k]  # (N, Vd) teacher rows t+k, gathered without a shifted copy
        n = rows.numel()
        ce = F.cross_entropy(logits[keep].float(), probs, reduction="sum") if n else logits.sum() * 0.0
        losses.append(ce / max(n, 1))
        counts.append(n)
    steps = torch.stack(losses)
    weights = step_weight ** torch.arange(len(losses), dtype=steps.dtype, device=steps.device)
    return TTTLoss(loss=(weights * steps).sum(), step_losses=steps.detach(),
                   counts=torch.tensor(counts, device=steps.device))


@dataclass
class StepCounts:
    """Per-step counts over supervised positions (sum across batches and ranks to aggregate).

    Shapes: correct, cond_correct, total: (K,) int64.
    """

    correct: Tensor
    cond_correct: Tensor
    total: Tensor


@torch.no_grad()
def ttt_step_counts(out: TTTOutput, teacher: Teacher, loss_mask: Tensor) -> StepCounts:
    """Count right (draft argmax == target argmax) and all-steps-so-far-right predictions per step."""
    supervised = supervised_masks(out.valid, loss_mask)
    correct, cond, total = [], [], []
    prefix = torch.ones_like(supervised[0])
    for k, logits in enumerate(out.logits):
        target = shift_left(teacher.target_ids, k, -1)  # (B, T)
        right = out.valid[k] & (target >= 0) & (logits.argmax(-1) == target)
        prefix = prefix & right
        correct.append((right & supervised[k]).sum())
        cond.append((prefix & supervised[k]).sum())
        total.append(supervised[k].sum())
    return StepCounts(torch.stack(correct), torch.stack(cond), torch.stack(total))


def step_accuracy(counts: StepCounts) -> tuple[Tensor, Tensor]:
    """(accuracy, conditional accuracy) per step, float (K,); 0 where a step had no position."""
    total = counts.total.clamp_min(1).double()
    return (counts.correct / total).float(), (counts.cond_correct / total).float()


def simulated_tau(acc: Tensor) -> Tensor:
    """1 + sum_k prod_{i<=k} acc_i: expected tokens per round of a K-chain with per-step acceptance acc.

    Shapes: acc (K,) -> ().
    """
    return 1 + torch.cumprod(acc.double(), dim=0).sum().float()
