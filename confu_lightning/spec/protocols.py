"""The only view the speculative engine has of models: small `TargetLike` / `DraftLike` protocols.

DESIGN.md §4: `spec` never imports `draft` or `target`; adapters (in `eval/`, and a test copy in
`tests/spec/adapters.py`) wrap `TargetModel` and `Eagle3Draft` onto these protocols, and stub
models implement them directly. Everything is batch size 1 and masks are plain bool matrices
(True = may attend) without batch/head dims; adapters add those.

Cache contract. The target cache holds exactly the tokens the engine has committed, at absolute
positions 0..len-1, plus whatever the last verification forward appended (tree nodes, then any
`ExtraInputs`), which the engine removes with `select_cache`. The draft cache holds one entry per
"row" (EAGLE-3 alignment, `train/ttt.py`: row t = token x[t] with the fused target feature of
position t-1, at position t); the engine only ever crops it.

ConFu hooks (DESIGN.md §6), passed through untouched, no ConFu logic here: the verification forward
may carry `ExtraInputs` (contemplate tokens) placed after the tree tokens, whose outputs come back
in `TargetStep.extra_*` and whose KV the engine drops; every draft call of a round may receive an
opaque per-round `conditioning` (the future token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from confu_lightning.errors import ConfuError


class SpecError(ConfuError):
    """Speculative decoding was configured or fed inconsistently (tree shapes, masks, caches)."""


@dataclass
class ExtraInputs:
    """Extra tokens appended after the tree tokens of one verification forward (ConFu contemplate).

    Shapes:
        input_ids: (C,) or None. embeds: (C, H) or None (one of the two).
        positions: (C,). mask: (C, past + N + C) bool rows for the extra tokens; the tree rows never
        see the extra tokens (the adapter pads them with False).
    """

    positions: Tensor
    mask: Tensor
    input_ids: Tensor | None = None
    embeds: Tensor | None = None


@dataclass
class TargetStep:
    """One target forward.

    Shapes:
        logits: (T, V) fp32-able target logits, row i = next-token logits after token i.
        features: (T, F) what the draft fuses (EAGLE-3: the concatenated aux hidden states, F = 3H).
        extra_logits / extra_features: (C, V) / (C, F) for `ExtraInputs`, else None.
    """

    logits: Tensor
    features: Tensor
    extra_logits: Tensor | None = None
    extra_features: Tensor | None = None


@dataclass
class DraftStep:
    """One draft forward.

    Shapes:
        logits: (T, Vd) over the draft vocabulary. hidden: (T, H) the next depth's feature.
    """

    logits: Tensor
    hidden: Tensor


@runtime_checkable
class TargetLike(Protocol):
    """The verifier as the engine calls it (batch size 1)."""

    def new_cache(self) -> Any:
        """An empty KV cache."""

    def cache_length(self, cache: Any) -> int:
        """Entries held by `cache`."""

    def select_cache(self, cache: Any, keep: Tensor) -> None:
        """Keep only entries `keep` (K,) int64, in order, in place (drops the rest)."""

    def crop_cache(self, cache: Any, n_keep: int) -> None:
        """Keep the first `n_keep` entries in place."""

    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, cache: Any,
                extra: ExtraInputs | None = None) -> TargetStep:
        """Run T new tokens after the cache, appending their KV.

        Shapes:
            input_ids, positions: (T,). mask: (T, past + T) bool, None = causal after the cache.
        """


@runtime_checkable
class DraftLike(Protocol):
    """The drafter as the engine calls it (batch size 1)."""

    def new_cache(self) -> Any:
        """An empty KV cache."""

    def cache_length(self, cache: Any) -> int:
        """Entries held by `cache`."""

    def crop_cache(self, cache: Any, n_keep: int) -> None:
        """Keep the first `n_keep` entries in place."""

    def encode_target(self, features: Tensor) -> Tensor:
        """Target features (T, F) -> draft input features (T, H) (EAGLE-3 `fc`)."""

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Draft-vocabulary ids -> target ids (EAGLE-3 `id + d2t[id]`), any shape."""

    def forward(self, input_ids: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache: Any,
                conditioning: Any = None) -> DraftStep:
        """Run T new rows after the cache, appending their KV.

        Shapes:
            input_ids (target ids), positions: (T,). features: (T, H). mask: (T, past + T) bool,
            None = causal after the cache.
        """
