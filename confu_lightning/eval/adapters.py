"""Adapters from the real models onto the engine's protocols (`spec/protocols.py`).

`spec` never imports `target` or `draft` (DESIGN.md §4), so evaluation wraps them here:
`TargetAdapter` puts a `TargetModel` behind `TargetLike` (batch 1, bool masks → the wrapper's
4D masks, contemplate-style `ExtraInputs` appended after the tree tokens), and `DraftAdapter`
puts an `Eagle3Draft` behind `DraftLike`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from confu_lightning.spec.protocols import DraftStep, ExtraInputs, TargetStep
from confu_lightning.target.wrapper import cache_length, crop_cache, select_cache


class TargetAdapter:
    """`TargetLike` over a `TargetModel` (batch size 1)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def new_cache(self) -> Any:
        return self.target.new_cache()

    def cache_length(self, cache: Any) -> int:
        return cache_length(cache)

    def select_cache(self, cache: Any, keep: Tensor) -> None:
        select_cache(cache, keep)

    def crop_cache(self, cache: Any, n_keep: int) -> None:
        crop_cache(cache, n_keep)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, cache: Any,
                extra: ExtraInputs | None = None) -> TargetStep:
        device = self.target.device
        n = input_ids.shape[0]
        if extra is None:
            out = self.target(input_ids[None].to(device), position_ids=positions[None].to(device),
                              attention_mask=None if mask is None else mask[None, None].to(device), cache=cache)
            return TargetStep(out.logits[0].float(), out.aux_hidden[0])
        embeds = self.target.embed_tokens(input_ids.to(device))  # (N, H)
        extra_embeds = extra.embeds if extra.embeds is not None else self.target.embed_tokens(extra.input_ids.to(device))
        past = cache_length(cache)
        if mask is None:
            mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
        c = extra_embeds.shape[0]
        rows = torch.cat([torch.cat([mask, torch.zeros(n, c, dtype=torch.bool)], 1), extra.mask.bool()], 0)
        out = self.target(inputs_embeds=torch.cat([embeds, extra_embeds.to(embeds)], 0)[None],
                          position_ids=torch.cat([positions, extra.positions])[None].to(device),
                          attention_mask=rows[None, None].to(device), cache=cache)
        logits, features = out.logits[0].float(), out.aux_hidden[0]
        return TargetStep(logits[:n], features[:n], logits[n:], features[n:])


class DraftAdapter:
    """`DraftLike` over an `Eagle3Draft` (batch size 1)."""

    def __init__(self, draft: Any) -> None:
        self.draft = draft

    def new_cache(self) -> Any:
        return self.draft.new_cache()

    def cache_length(self, cache: Any) -> int:
        return cache.length

    def crop_cache(self, cache: Any, n_keep: int) -> None:
        cache.crop(n_keep)

    @torch.no_grad()
    def encode_target(self, features: Tensor) -> Tensor:
        return self.draft.fuse(features[None])[0]

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return self.draft.draft_to_target_ids(draft_ids)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, features: Tensor, positions: Tensor, mask: Tensor | None, cache: Any,
                conditioning: Any = None) -> DraftStep:
        out = self.draft(input_ids[None], features[None], positions[None],
                         mask=None if mask is None else mask[None], cache=cache)
        return DraftStep(out.logits[0], out.hidden[0])
