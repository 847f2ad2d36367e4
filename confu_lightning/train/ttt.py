"""Training-time test (TTT): K draft steps unrolled over the whole sequence in parallel.

EAGLE-3 §3.3 (research/anchors.md §0; DESIGN.md §6): step 0 reads the target's fused features;
step k > 0 reads the draft's *own* step-(k-1) output with teacher-forced tokens, so the draft
trains on the inputs it will see when drafting k tokens ahead. Indexing here is token-aligned,
"row t acts like the language model at position t" (x = input_ids, g = aux_hidden, p = teacher):

    row t, step k:  token x[t+k]  feature  k=0: fc(g[t-1])   k>0: h_k-1[t]   position pos[t]+k
                    predicts x[t+k+1]; teacher p[t+k]; supervised iff loss_mask[t+k+1]
    keys:           step-0 keys of rows s <= t of the same segment that have a feature
                    + row t's own keys of steps 1..k  (the "diagonal" extension)
    valid:          rows t-1, t and t+k+1 lie in the same (contiguous) segment

    one segment x0..x5, K = 3        row 1     row 2     row 3     row 4     row 5
      step 0 (feature, token)       g0,x1     g1,x2     g2,x3     g3,x4     g4,x5
             predicts               x2        x3        x4        x5        -
      step 1                        h0[1],x2  h0[2],x3  h0[3],x4  h0[4],x5  -
             predicts               x3        x4        x5        -         -
      step 2                        h1[1],x3  h1[2],x4  h1[3],x5  -         -
             predicts               x4        x5        -         -         -
    Row 0 (and every segment's first row) has no feature and is never valid.

EAGLE's trainer indexes rows by feature instead (its row t reads g[t], x[t+1] and predicts x[t+2]);
ours is the same computation moved one row right. Step k's position is pos[t]+k, as at inference
where the k-th drafted token sits k places after the last accepted one (EAGLE main `position_ids +
lck`, SpecForge PR#244); `shift_positions=False` keeps pos[t] for ablation. Row t at step k equals
drafting a chain of k+1 tokens with a KV cache after accepting x[..t] (tests/train/test_ttt.py).
ConFu adds per-round context keys (future tokens): `context` KVs + `context_mask` are visible
to every step, in front of the step-0 keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from confu_lightning.draft.eagle3 import Eagle3Draft
from confu_lightning.errors import DraftError
from confu_lightning.nn.attention import KV


@dataclass
class TTTOutput:
    """Per-step draft logits and structural validity (same segment, not padding, inside the row).

    Shapes:
        logits: K x (B, T, Vd); row t of step k predicts token t+k+1. valid: (K, B, T) bool.
        positions: (B, T) step-0 position ids used.
    """

    logits: list[Tensor]
    valid: Tensor
    positions: Tensor


def shift_left(x: Tensor, k: int, fill: float | int | bool = 0) -> Tensor:
    """x[:, t+k] at column t along dim 1, `fill` past the end. Shapes: (B, T, ...) -> same."""
    if k == 0:
        return x
    pad = torch.full((x.shape[0], min(k, x.shape[1]), *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat((x[:, k:], pad), dim=1)


def segment_runs(segment_ids: Tensor) -> Tensor:
    """Number contiguous runs of equal segment id; padding (id < 0) gets -1. Shapes: (B, T) -> (B, T)."""
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    runs = change.long().cumsum(dim=1)
    return runs.masked_fill(segment_ids < 0, -1)


def positions_in_runs(runs: Tensor) -> Tensor:
    """Index of every token inside its run (0 at each run start; padding 0). Shapes: (B, T) -> (B, T)."""
    idx = torch.arange(runs.shape[1], device=runs.device).expand_as(runs)
    change = torch.ones_like(runs, dtype=torch.bool)
    change[:, 1:] = runs[:, 1:] != runs[:, :-1]
    starts = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return (idx - starts).masked_fill(runs < 0, 0)


def ttt_masks(runs: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which rows have a feature, which (step, row) pairs are valid, and the step-0 key mask.

    Shapes:
        runs: (B, T) from `segment_runs`. returns: has_feature (B, T) bool, valid (K, B, T) bool,
        key_mask (B, T, T) bool (query row, key row).
    """
    real = runs >= 0
    previous = torch.cat((torch.full_like(runs[:, :1], -2), runs[:, :-1]), dim=1)
    has_feature = real & (runs == previous)  # row t-1 (its feature source) is in the same run
    valid = torch.stack([has_feature & (shift_left(runs, k + 1, -2) == runs) for k in range(steps)])
    length = runs.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=runs.device).tril()
    same = runs[:, :, None] == runs[:, None, :]  # (B, T, T)
    key_mask = same & causal & has_feature[:, None, :] & real[:, :, None]
    key_mask = key_mask | torch.eye(length, dtype=torch.bool, device=runs.device)  # no empty rows
    return has_feature, valid, key_mask


def ttt_unroll(
    draft: Eagle3Draft,
    input_ids: Tensor,
    aux_hidden: Tensor,
    *,
    segment_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    steps: int = 7,
    shift_positions: bool = True,
    context: Sequence[KV] | None = None,
    context_mask: Tensor | None = None,
) -> TTTOutput:
    """Run K TTT steps over token-aligned tensors (no pre-shifting by the caller).

    Args:
        segment_ids: packed-sample ids, -1 on padding (takes precedence over `attention_mask`).
        attention_mask: 1 on real tokens; used when `segment_ids` is None (one sample per row).
        position_ids: defaults to the index inside each segment.
        context: per draft layer, extra keys visible to all steps (ConFu future tokens), with
            `context_mask` (B, T, A) bool saying which row may see which entry.

    Shapes:
        input_ids: (B, T). aux_hidden: (B, T, 3H). returns: `TTTOutput`.
    """
    if steps < 1:
        raise DraftError(f"ttt steps must be >= 1, got {steps}")
    if segment_ids is None:
        segment_ids = torch.zeros_like(input_ids) if attention_mask is None else \
            torch.where(attention_mask.bool(), 0, -1).to(input_ids.device)
    runs = segment_runs(segment_ids)
    positions = positions_in_runs(runs) if position_ids is None else position_ids.long()
    has_feature, valid, key_mask = ttt_masks(runs, steps)
    if context is not None:
        if context_mask is None:
            raise DraftError("ttt_unroll got `context` keys without a `context_mask`")
        key_mask = torch.cat((context_mask.bool(), key_mask), dim=-1)  # (B, T, A + T)
    fused = draft.fuse(aux_hidden)  # (B, T, H)
    feature = torch.cat((torch.zeros_like(fused[:, :1]), fused[:, :-1]), dim=1)  # row t reads fc(g[t-1])
    feature = feature * has_feature[..., None].to(feature.dtype)
    out = draft(input_ids, feature, positions, key_mask, past=context)
    logits = [out.logits]
    shared = out.kv if context is None else [c.cat(kv) for c, kv in zip(context, out.kv, strict=True)]
    diag: list[KV] | None = None
    hidden = out.hidden
    for k in range(1, steps):
        ids_k = shift_left(input_ids, k)  # (B, T) token x[t+k]
        pos_k = positions + k if shift_positions else positions
        out = draft(ids_k, hidden, pos_k, key_mask, past=shared, extra=diag, diagonal=True)
        new = [KV(kv.key.unsqueeze(3), kv.value.unsqueeze(3)) for kv in out.kv]  # (B, Hkv, T, 1, D)
        diag = new if diag is None else [d.cat(n) for d, n in zip(diag, new, strict=True)]
        logits.append(out.logits)
        hidden = out.hidden
    return TTTOutput(logits=logits, valid=valid, positions=positions)
