"""Token-budget batching: length-bucketed or packed batches, seeded, resumable, split across ranks.

Variable-length conversations waste compute when padded to the longest of a random batch. The
`TokenBudgetBatchSampler` sorts samples into length buckets and forms batches whose padded size
(rows × longest row, or the packed row length) stays within `batch_tokens`; batch order is
shuffled with `seed + epoch`. Under DDP every rank takes every `world_size`-th batch of the same
list (the list is cut to a multiple of `world_size`, so all ranks run the same number of steps
and see disjoint samples). `state_dict` records the epoch and the batches already served, so a
resumed run continues with the next unseen batch. Collation builds plain dataclasses
(`TokenBatch`) that Lightning can move between devices. `seek(consumed)` repositions the sampler
from a batch count alone (epochs are deterministic), which is how a resumed run finds its place
without trusting a prefetching loader's own position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

Batching = Literal["bucket", "pack"]


@dataclass
class TokenBatch:
    """A padded or packed batch of token sequences with optional cached target features.

    Shapes:
        input_ids, loss_mask, attention_mask, position_ids, segment_ids: (B, T)
        aux_hidden: (B, T, 3H) or None; last_hidden: (B, T, H) or None

    `segment_ids` numbers the samples inside a row (0, 1, ... in packed rows; 0 in bucketed rows)
    and is -1 on padding; attention must stay inside one segment. `position_ids` restart at 0
    at every segment start.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    aux_hidden: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def plan_batches(lengths: Sequence[int], batch_tokens: int, mode: Batching, seed: int) -> list[list[int]]:
    """Group sample indices into batches within the token budget; deterministic for a given seed.

    Samples longer than `batch_tokens` form a batch of their own (callers truncate upstream).
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep the random order
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        cost = (len(current) + 1) * n if mode == "bucket" else used + n  # sorted: n is the row max
        if current and cost > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in shuffle]


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's batches of sample indices for the current epoch; resumable mid-epoch."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_tokens: int,
        *,
        mode: Batching = "bucket",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be > 0, got {batch_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.lengths = list(lengths)
        self.batch_tokens = batch_tokens
        self.mode: Batching = mode
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.served = 0  # batches of the current epoch already yielded on this rank

    def _epoch_batches(self) -> list[list[int]]:
        batches = plan_batches(self.lengths, self.batch_tokens, self.mode, self.seed + self.epoch)
        if not self.shuffle:
            batches.sort(key=min)
        usable = len(batches) - len(batches) % self.world_size if len(batches) >= self.world_size else len(batches)
        return batches[:usable][self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self) -> Iterator[list[int]]:
        # Lightning stops pulling after len(self) batches, so the generator may never run to its
        # end; a new iteration over a finished epoch (no `set_epoch` in between, e.g. the next
        # validation) therefore starts the next epoch here instead.
        if self.served >= len(self):
            self.epoch, self.served = self.epoch + 1, 0
        for batch in self._epoch_batches()[self.served :]:
            self.served += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; never moves back (a resumed run may be ahead)."""
        if epoch > self.epoch:
            self.epoch, self.served = epoch, 0

    def seek(self, consumed: int) -> None:
        """Position after `consumed` batches in total since epoch 0 (how a resumed run catches up)."""
        epoch = 0
        while True:
            self.epoch, self.served = epoch, 0
            n = len(self)
            if consumed < n or n == 0:
                self.served = consumed
                return
            consumed -= n
            epoch += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.served, self.seed = int(state["epoch"]), int(state["served"]), int(state["seed"])


def collate(samples: Sequence[Any], mode: Batching = "bucket", pad_id: int = 0) -> TokenBatch:
    """Pad (bucket) or concatenate (pack) samples with `input_ids`, `loss_mask` and optional features."""
    lengths = [int(s.input_ids.shape[0]) for s in samples]
    has_features = getattr(samples[0], "aux_hidden", None) is not None
    rows = [[i] for i in range(len(samples))] if mode == "bucket" else [list(range(len(samples)))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    b = len(rows)
    out = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((b, width), dtype=torch.bool),
        "attention_mask": torch.zeros((b, width), dtype=torch.bool),
        "position_ids": torch.zeros((b, width), dtype=torch.long),
        "segment_ids": torch.full((b, width), -1, dtype=torch.long),
    }
    if has_features:
        first = samples[0]
        out["aux_hidden"] = first.aux_hidden.new_zeros((b, width, first.aux_hidden.shape[-1]))
        out["last_hidden"] = first.last_hidden.new_zeros((b, width, first.last_hidden.shape[-1]))
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            s, n = samples[i], lengths[i]
            span = slice(at, at + n)
            out["input_ids"][r, span] = s.input_ids.long()
            out["loss_mask"][r, span] = s.loss_mask.bool()
            out["attention_mask"][r, span] = True
            out["position_ids"][r, span] = torch.arange(n)
            out["segment_ids"][r, span] = seg
            if has_features:
                out["aux_hidden"][r, span] = s.aux_hidden
                out["last_hidden"][r, span] = s.last_hidden
            at += n
    return TokenBatch(**out)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]], mode: Batching) -> float:
    """Share of padded slots over all batches: a quick measure of batching efficiency."""
    real = sum(lengths[i] for batch in batches for i in batch)
    if mode == "pack":
        total = sum(sum(lengths[i] for i in batch) for batch in batches)
    else:
        total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - real / total if total else 0.0
