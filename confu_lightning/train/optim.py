"""Optimiser and learning-rate schedule: AdamW with linear warm-up then cosine decay to `min_lr_ratio`.

EAGLE-3 / SpecForge train drafts with AdamW, a short warm-up and cosine decay, clipping gradients
at 0.5. Parameter groups let ConFu give its new parameters (soft prompts, MoE) a larger learning
rate than the EAGLE-3 draft it starts from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step `step`: linear 0→1 over `warmup_steps`, then cosine to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    groups: Sequence[tuple[Iterable[torch.nn.Parameter], float]],
    *,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    warmup_steps: int,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `(params, lr_scale)` groups (frozen parameters skipped) and its per-step scheduler."""
    param_groups = []
    for params, scale in groups:
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            param_groups.append({"params": trainable, "lr": lr * scale})
    if not param_groups:
        raise ValueError("no trainable parameters to optimise")
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
    return optimizer, scheduler
