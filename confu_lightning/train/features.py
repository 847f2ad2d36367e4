"""Online feature source: run the frozen target on a batch to get what the cache would hold.

The target sees the batch with a 4D mask that keeps attention inside each packed segment and the
batch's own position ids, so online features equal cached ones (same `aux_hidden`, post-norm
`last_hidden`). The target is any callable with the `TargetModel.forward` signature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from confu_lightning.data.batching import TokenBatch


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T): causal and inside one segment; padding (-1) rows see only themselves.

    Shapes: segment_ids (B, T) -> (B, 1, T, T).
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    eye = torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal) | eye)[:, None]


def target_features(target: Any):
    """A `FeatureSource` that fills `aux_hidden` and `last_hidden` from `target` (no gradients)."""

    def fill(batch: TokenBatch) -> TokenBatch:
        out = target(batch.input_ids, position_ids=batch.position_ids,
                     attention_mask=segment_causal_mask(batch.segment_ids), logits_to_keep=1)
        return dataclasses.replace(batch, aux_hidden=out.aux_hidden, last_hidden=out.last_hidden)

    return fill
