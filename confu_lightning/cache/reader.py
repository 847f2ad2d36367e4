"""Read the hidden-state cache as a memory-mapped `Dataset` of samples (DESIGN.md §5).

`open_cache` refuses what would silently train a wrong draft: a cache built for another target,
layer set, tokenizer or chat template, an unfinished cache, and any shard whose header does not
match the manifest (truncated, corrupt, from another plan). `HiddenStateCache` maps each shard file
once per process (`torch.UntypedStorage.from_file`, a private mmap) and slices samples out of it, so
random access to one sample pages in only that sample's rows; the maps are reopened lazily after a
fork or unpickling, which keeps the dataset safe for DataLoader workers. Sample lengths come from
the small `offsets` tensors read at open time, for length-bucketed batching.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from confu_lightning.cache.format import (
    CODE_DTYPES, CacheIdentity, CacheManifest, ShardInfo, ShardInvalidError, check_shard,
)
from confu_lightning.errors import CacheError


@dataclass
class CachedSample:
    """One cached sample, tensors in the stored dtype.

    Shapes:
        input_ids: (T,) int64. loss_mask: (T,) bool. aux_hidden: (T, A*H). last_hidden: (T, H) post-norm.
    """

    input_ids: Tensor
    loss_mask: Tensor
    aux_hidden: Tensor
    last_hidden: Tensor


def open_cache(directory: str | Path, expected: CacheIdentity | None = None) -> HiddenStateCache:
    """Open a finished cache, checking its identity and every shard header.

    Args:
        directory: the cache directory (`cache.dir`).
        expected: the identity of the configured target; None skips the identity check.

    Raises:
        CacheError: missing/unreadable manifest, identity mismatch, pending shards, or a corrupt shard.
    """
    path = Path(directory)
    manifest = CacheManifest.load(path)
    if expected is not None:
        diffs = manifest.identity.mismatches(expected)
        if diffs:
            raise CacheError(f"cache in {path} does not match the configured target (cache vs config: "
                             f"{'; '.join(diffs)}); point cache.dir elsewhere or rebuild it with `confu cache`")
    if not manifest.shards:
        raise CacheError(f"cache in {path} holds no shards; rerun `confu cache`")
    pending = manifest.pending
    if pending:
        names = ", ".join(e.file for e in pending[:4]) + (f" and {len(pending) - 4} more" if len(pending) > 4 else "")
        raise CacheError(f"cache in {path} is incomplete: {len(pending)} of {len(manifest.shards)} shards pending "
                         f"({names}); rerun `confu cache` to finish it")
    infos = []
    for entry in manifest.shards:
        try:
            infos.append(check_shard(path / entry.file, entry, manifest))
        except ShardInvalidError as err:
            raise CacheError(f"cache shard {err.path} is corrupt or incomplete ({err.reason}); rerunning "
                             "`confu cache` rewrites it") from None
    return HiddenStateCache(path, manifest, infos)


class HiddenStateCache(Dataset):
    """Samples of a cache in plan order; global sample index → shard + rows of that shard."""

    def __init__(self, directory: Path, manifest: CacheManifest, shards: list[ShardInfo]) -> None:
        self.directory = directory
        self.manifest = manifest
        self._shards = shards
        self._first = [e.first_sample for e in manifest.shards]
        self._lengths = torch.cat([torch.tensor(s.offsets).diff() for s in shards])  # (S_total,)
        self._maps: dict[int, dict[str, Tensor]] = {}
        self._pid = os.getpid()

    @property
    def identity(self) -> CacheIdentity:
        return self.manifest.identity

    @property
    def lengths(self) -> Tensor:
        """Token count per sample, (S_total,) int64, without reading any hidden state."""
        return self._lengths

    @property
    def dtype(self) -> torch.dtype:
        return self.manifest.torch_dtype

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, index: int) -> CachedSample:
        n = len(self._lengths)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for a cache of {n} samples")
        index %= n
        k = bisect.bisect_right(self._first, index) - 1
        local = index - self._first[k]
        start, end = self._shards[k].offsets[local], self._shards[k].offsets[local + 1]
        t = self._tensors(k)
        return CachedSample(
            input_ids=t["input_ids"][start:end].long(),  # (T,)
            loss_mask=t["loss_mask"][start:end].bool(),  # (T,)
            aux_hidden=t["aux_hidden"][start:end].clone(),  # (T, A*H), copied out of the map
            last_hidden=t["last_hidden"][start:end].clone(),  # (T, H)
        )

    def token_chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Per shard, all token ids (N,) int64 and loss mask (N,) bool, reading no hidden state.

        Feeds `draft.vocab.count_tokens` without paging in the features.
        """
        for k in range(len(self._shards)):
            t = self._tensors(k)
            yield t["input_ids"].long(), t["loss_mask"].bool()

    def _tensors(self, k: int) -> dict[str, Tensor]:
        """Tensor views over shard `k`'s private mmap, created on first use in this process."""
        if self._pid != os.getpid():  # forked DataLoader worker: do not share the parent's views
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            info = self._shards[k]
            storage = torch.UntypedStorage.from_file(str(info.path), shared=False, nbytes=info.layout.file_size)
            views = {}
            for name, spec in info.layout.tensors.items():
                dtype = CODE_DTYPES[spec.dtype]
                start = (info.layout.data_start + spec.begin) // dtype.itemsize  # aligned: checked by check_shard
                views[name] = torch.empty(0, dtype=dtype).set_(storage, start, spec.shape)
            self._maps[k] = views
        return self._maps[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # maps are per process; reopened lazily after unpickling
        return state
