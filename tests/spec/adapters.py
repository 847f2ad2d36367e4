"""Stub models for the spec tests (perfect, noisy and Markov drafts/targets); the real-model adapters
are the package's own (`confu_lightning.eval.adapters`), re-exported here for the tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from confu_lightning.spec.protocols import DraftStep, ExtraInputs, TargetStep
from confu_lightning.eval.adapters import DraftAdapter, TargetAdapter  # noqa: F401  (re-exported for the tests)


class PerfectDraft:
    """Proposes `sequence[pos + 1]` at position `pos` (the target's own greedy continuation)."""

    def __init__(self, sequence: list[int], vocab: int, hidden: int = 4) -> None:
        self.sequence, self.vocab, self.hidden = sequence, vocab, hidden

    def new_cache(self) -> list[int]:
        return []

    def cache_length(self, cache: list[int]) -> int:
        return len(cache)

    def crop_cache(self, cache: list[int], n_keep: int) -> None:
        del cache[n_keep:]

    def encode_target(self, features: Tensor) -> Tensor:
        return torch.zeros(features.shape[0], self.hidden)

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids

    def forward(self, input_ids: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache: list[int],
                conditioning: Any = None) -> DraftStep:
        cache.extend(input_ids.tolist())
        logits = torch.zeros(input_ids.numel(), self.vocab)
        for row, pos in enumerate(positions.tolist()):
            if pos + 1 < len(self.sequence):
                logits[row, self.sequence[pos + 1]] = 30.0
        return DraftStep(logits, torch.zeros(input_ids.numel(), self.hidden))


class NoisyDraft(PerfectDraft):
    """Like `PerfectDraft`, but at every `period`-th position the right token is only second best."""

    def __init__(self, sequence: list[int], vocab: int, period: int = 3) -> None:
        super().__init__(sequence, vocab)
        self.period = period

    def forward(self, input_ids: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache: list[int],
                conditioning: Any = None) -> DraftStep:
        step = super().forward(input_ids, features, positions, mask, cache, conditioning)
        for row, pos in enumerate(positions.tolist()):
            if pos % self.period == 0 and pos + 1 < len(self.sequence):
                wrong = (self.sequence[pos + 1] + 1) % self.vocab
                step.logits[row, wrong] = 31.0
        return step


class MarkovTarget:
    """`TargetLike` whose next-token distribution depends only on the current token: P[token]."""

    def __init__(self, table: Tensor) -> None:
        self.table = table

    def new_cache(self) -> list[int]:
        return []

    def cache_length(self, cache: list[int]) -> int:
        return len(cache)

    def select_cache(self, cache: list[int], keep: Tensor) -> None:
        cache[:] = [cache[i] for i in keep.tolist()]

    def crop_cache(self, cache: list[int], n_keep: int) -> None:
        del cache[n_keep:]

    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, cache: list[int],
                extra: ExtraInputs | None = None) -> TargetStep:
        cache.extend(input_ids.tolist())
        return TargetStep(self.table[input_ids].log(), torch.zeros(input_ids.numel(), 1))


class MarkovDraft(PerfectDraft):
    """`DraftLike` proposing from its own Markov table Q[token]."""

    def __init__(self, table: Tensor) -> None:
        super().__init__([], table.shape[0])
        self.table = table

    def forward(self, input_ids: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache: list[int],
                conditioning: Any = None) -> DraftStep:
        cache.extend(input_ids.tolist())
        return DraftStep(self.table[input_ids].log(), torch.zeros(input_ids.numel(), self.hidden))
