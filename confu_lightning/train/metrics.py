"""Per-step TTT accuracy accumulated across batches and DDP ranks (EAGLE-3 §3.3 metrics; DESIGN.md §6).

Averaging per-batch accuracies would weight a batch with 10 supervised tokens like one with
10,000, so `TTTAccuracy` keeps summed counts (`train/losses.py::ttt_step_counts`) and reduces them
with a sum across ranks; accuracy, conditional (full-prefix) accuracy and simulated τ are computed
from the totals only at `compute()`. Equal to the pure functions on the concatenated batches.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from confu_lightning.train.losses import StepCounts, simulated_tau, step_accuracy


class TTTAccuracy(Metric):
    """Summed per-step correct / conditionally correct / supervised counts for K unroll steps."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        for name in ("correct", "cond_correct", "total"):
            self.add_state(name, default=torch.zeros(steps, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, counts: StepCounts) -> None:  # type: ignore[override]
        """Add one batch's `ttt_step_counts`."""
        if counts.total.numel() != self.steps:
            raise ValueError(f"TTTAccuracy was built for {self.steps} steps, got counts for {counts.total.numel()}")
        self.correct += counts.correct.to(self.correct)
        self.cond_correct += counts.cond_correct.to(self.cond_correct)
        self.total += counts.total.to(self.total)

    def compute(self) -> dict[str, Tensor]:
        """`acc` (K,), `cond_acc` (K,), `tau` (from acc) and `tau_cond` (1 + sum of cond_acc)."""
        acc, cond = step_accuracy(StepCounts(self.correct, self.cond_correct, self.total))
        return {"acc": acc, "cond_acc": cond, "tau": simulated_tau(acc), "tau_cond": 1 + cond.sum()}

    def as_log_dict(self, stage: str) -> dict[str, Tensor]:
        """Flat `{stage}/acc_k{i}`, `{stage}/cond_acc_k{i}`, `{stage}/tau`, `{stage}/tau_cond` scalars."""
        values = self.compute()
        out = {f"{stage}/{name}_k{i}": values[name][i] for name in ("acc", "cond_acc") for i in range(self.steps)}
        out[f"{stage}/tau"], out[f"{stage}/tau_cond"] = values["tau"], values["tau_cond"]
        return out
