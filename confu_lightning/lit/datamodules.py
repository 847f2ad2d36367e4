"""Lightning DataModules: cached target features (offline EAGLE-3) and tokenised conversations
(online training with the target in the loop, which ConFu needs; DESIGN.md §6).

Both split samples into train / validation with a seeded permutation, batch them under a token
budget (`data/batching.py`: length buckets or packing), give each DDP rank a disjoint share of
every epoch's batches, and a resumed run continues with the next unseen batch: the train sampler
is positioned from the restored `trainer.global_step` (× gradient accumulation), because the
loader prefetches and its own position runs ahead of the optimizer. Because the batch sampler
shards by rank itself, build the Trainer with `use_distributed_sampler=False`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from confu_lightning.data.batching import Batching, TokenBudgetBatchSampler, collate
from confu_lightning.errors import DataError


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / validation split of `n` samples (validation gets >= 1 sample when asked for)."""
    if n == 0:
        raise DataError("no samples to split into train / validation")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else max(1, round(n * val_fraction))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class _TokenBudgetDataModule(L.LightningDataModule):
    """Shared split / sampler / loader logic; subclasses provide `_load() -> (dataset, lengths)`."""

    def __init__(self, *, batch_tokens: int = 4096, batching: Batching = "bucket", val_fraction: float = 0.05,
                 seed: int = 0, num_workers: int = 0, pad_id: int = 0) -> None:
        super().__init__()
        self.batch_tokens = batch_tokens
        self.batching: Batching = batching
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pad_id = pad_id
        self.dataset: Dataset | None = None
        self.lengths: list[int] = []
        self.train_idx: list[int] = []
        self.val_idx: list[int] = []

    def _load(self) -> tuple[Dataset, list[int]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset, self.lengths = self._load()
            self.train_idx, self.val_idx = split_indices(len(self.lengths), self.val_fraction, self.seed)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, indices: list[int], shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        sampler = TokenBudgetBatchSampler(
            [self.lengths[i] for i in indices], self.batch_tokens,
            mode=self.batching, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world,
        )
        return DataLoader(
            Subset(self.dataset, indices),
            batch_sampler=sampler,
            collate_fn=functools.partial(collate, mode=self.batching, pad_id=self.pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        loader = self._loader(self.train_idx, shuffle=True)
        sampler: TokenBudgetBatchSampler = loader.batch_sampler  # type: ignore[assignment]
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "global_step", 0):
            sampler.seek(trainer.global_step * getattr(trainer, "accumulate_grad_batches", 1))
        return loader

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader(self.val_idx, shuffle=False) if self.val_idx else []  # [] = no validation


class HiddenStateCacheDataModule(_TokenBudgetDataModule):
    """Batches of cached target features (`TokenBatch` with `aux_hidden` and `last_hidden`)."""

    def __init__(self, cache_dir: str | Path, *, expected_identity: Any = None, **batching: Any) -> None:
        """`batching`: batch_tokens, batching, val_fraction, seed, num_workers, pad_id (see the base class)."""
        super().__init__(**batching)
        self.cache_dir = Path(cache_dir)
        self.expected_identity = expected_identity

    def _load(self) -> tuple[Dataset, list[int]]:
        from confu_lightning.cache.reader import open_cache

        cache = open_cache(self.cache_dir, self.expected_identity)
        return cache, list(cache.lengths)


@dataclass
class TokenSample:
    """One tokenised conversation as tensors. Shapes: input_ids, loss_mask: (T,)"""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor


class TokenizedDataset(Dataset):
    """Tokenised samples (objects with `input_ids` and `loss_mask` lists) served as tensors."""

    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> TokenSample:
        s = self.samples[i]
        return TokenSample(torch.tensor(s.input_ids, dtype=torch.long), torch.tensor(s.loss_mask, dtype=torch.bool))


class ConversationDataModule(_TokenBudgetDataModule):
    """Batches of tokenised, loss-masked conversations for training with the target in the loop."""

    def __init__(self, samples: Sequence[Any], **batching: Any) -> None:
        """`batching`: batch_tokens, batching, val_fraction, seed, num_workers, pad_id (see the base class)."""
        super().__init__(**batching)
        if not samples:
            raise DataError("ConversationDataModule got no tokenised samples")
        self.samples = list(samples)

    def _load(self) -> tuple[Dataset, list[int]]:
        return TokenizedDataset(self.samples), [len(s.input_ids) for s in self.samples]
