"""Write the hidden-state cache: batched frozen-target forwards into safetensors shards (DESIGN.md §5).

`write_cache` plans the shards from the sample lengths (`format.plan_shards`), runs the target over
the shards this rank owns (length-sorted batches to cut padding, written back in plan order) and
streams each shard into a pre-sized temp file with positioned writes, so memory stays at one batch
however large a shard is. A finished shard is fsynced and `os.replace`d to its final name: a killed
writer leaves only whole shards, and a rerun skips every shard that validates against the plan and
rewrites the rest. Only rank 0 writes `manifest.json`; `finalize_manifest` rescans the shards once
every rank is done. Nothing here knows about Lightning or the data package: the caller passes
samples (`SampleLike`) and a `forward_fn` wired to the frozen target.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from confu_lightning.cache.format import (
    STORAGE_DTYPES, CacheIdentity, CacheManifest, NewerFormatError, ShardEntry, ShardLayout, content_hash,
    plan_hash, plan_shards, shard_layout, shard_owner, temp_name, validate_shard,
)
from confu_lightning.errors import CacheError

ForwardFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""`(input_ids (B, T) long, attention_mask (B, T) long) -> (aux_hidden (B, T, A*H), last_hidden (B, T, H))`."""

_TEMP_SHARD = re.compile(r"^\.shard-(\d+)\.safetensors\.tmp-\d+$")
_SHARD = re.compile(r"^shard-(\d+)\.safetensors$")


class SampleLike(Protocol):
    """A tokenized sample: token ids and the assistant loss mask (1 = supervised), same length."""

    input_ids: Sequence[int]
    loss_mask: Sequence[int]


def write_cache(
    samples: Sequence[SampleLike],
    forward_fn: ForwardFn,
    out_dir: str | Path,
    identity: CacheIdentity,
    *,
    shard_tokens: int,
    batch_size: int,
    dtype: torch.dtype = torch.bfloat16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> CacheManifest:
    """Cache the target features of `samples` in `out_dir`, writing the shards this rank owns.

    Every rank must pass the same samples (the plan is derived from them). With `world_size > 1`
    call `finalize_manifest(out_dir)` on one process after all ranks return; a single process
    finalizes itself. `forward_fn` receives CPU tensors (right-padded; padded positions are
    dropped) and may return tensors on any device and in any float dtype.

    Returns:
        The manifest as this rank sees it (rank 0: as saved, statuses from validated files).

    Raises:
        CacheError: no samples, a malformed sample, a cache of another target in `out_dir`, or a
            `forward_fn` output of the wrong shape.
    """
    if not 0 <= rank < world_size or batch_size < 1:
        raise CacheError(f"write_cache needs 0 <= rank < world_size and batch_size >= 1, got rank {rank}, "
                         f"world_size {world_size}, batch_size {batch_size}")
    out = Path(out_dir)
    plan = plan_cache(samples, identity, shard_tokens=shard_tokens, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_other_identity(out, identity)
    _clean_temp_files(out, len(plan.shards), rank, world_size)
    if rank == 0:
        _remove_stale_shards(out, len(plan.shards))
        scan_shards(out, plan).save(out)
    mine = [e for e in plan.shards if shard_owner(e.index, world_size) == rank]
    todo = [e for e in mine if validate_shard(out / e.file, e, plan) is not None]
    total = sum(e.n_tokens for e in todo)
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc=f"cache rank {rank}") as bar:
        for entry in todo:
            _write_shard(out, entry, plan, samples, forward_fn, batch_size, bar)
    return finalize_manifest(out) if rank == 0 else scan_shards(out, plan)


def plan_cache(
    samples: Sequence[SampleLike], identity: CacheIdentity, *, shard_tokens: int, dtype: torch.dtype
) -> CacheManifest:
    """The manifest `write_cache` aims for: every shard pending, content hashes from the samples."""
    names = {v: k for k, v in STORAGE_DTYPES.items()}
    if dtype not in names:
        raise CacheError(f"cache.dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype}")
    if len(samples) == 0:
        raise CacheError("no samples to cache: the tokenized data set is empty (check data.* and the skipped counts)")
    lengths = [_sample_length(s, i) for i, s in enumerate(samples)]
    entries = []
    for index, (first, n) in enumerate(plan_shards(lengths, shard_tokens)):
        ids, mask, offsets = _shard_tokens(samples, first, n)
        entries.append(ShardEntry(index, first, n, int(offsets[-1]), content_hash(ids, mask, offsets)))
    return CacheManifest(identity, names[dtype], shard_tokens, plan_hash(shard_tokens, entries), tuple(entries))


def scan_shards(directory: Path, manifest: CacheManifest) -> CacheManifest:
    """`manifest` with each shard marked complete iff its file validates against its entry."""
    statuses = {e.index: "complete" if validate_shard(directory / e.file, e, manifest) is None else "pending"
                for e in manifest.shards}
    return manifest.with_statuses(statuses)  # type: ignore[arg-type]


def finalize_manifest(out_dir: str | Path) -> CacheManifest:
    """Rescan every shard of the saved plan, record which are complete and save the manifest."""
    manifest = scan_shards(Path(out_dir), CacheManifest.load(out_dir))
    manifest.save(out_dir)
    return manifest


def _sample_length(sample: SampleLike, index: int) -> int:
    n, m = len(sample.input_ids), len(sample.loss_mask)
    if n != m:
        raise CacheError(f"sample {index} has {n} input_ids but {m} loss_mask entries; fix the tokenized data")
    if n == 0:
        raise CacheError(f"sample {index} has no tokens; drop empty samples before caching")
    return n


def _shard_tokens(samples: Sequence[SampleLike], first: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated ids, mask and boundaries of samples `first .. first+n-1`.

    Shapes:
        returns: input_ids (N,) int32, loss_mask (N,) uint8, offsets (S+1,) int64.
    """
    chunk = [samples[i] for i in range(first, first + n)]
    ids = torch.cat([torch.as_tensor(s.input_ids, dtype=torch.int64).reshape(-1) for s in chunk])  # (N,)
    mask = torch.cat([torch.as_tensor(s.loss_mask).reshape(-1) != 0 for s in chunk]).to(torch.uint8)  # (N,)
    lengths = torch.tensor([len(s.input_ids) for s in chunk], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # (S+1,)
    if int(ids.min()) < 0 or int(ids.max()) >= 2**31:
        raise CacheError(f"samples {first}..{first + n - 1} hold token ids outside [0, 2^31); fix the tokenized data")
    return ids.to(torch.int32), mask, offsets


def _refuse_other_identity(out: Path, identity: CacheIdentity) -> None:
    """Raise if `out` holds a manifest for another target; an unreadable one is simply replaced."""
    try:
        existing = CacheManifest.load(out)
    except NewerFormatError:
        raise
    except CacheError:
        return  # absent or unreadable: shards carry the identity fingerprint, so none is reused wrongly
    diffs = existing.identity.mismatches(identity)
    if diffs:
        raise CacheError(f"cache in {out} was built for {existing.identity.describe()} (cache vs now: "
                         f"{'; '.join(diffs)}); remove it or choose another cache.dir")


def _clean_temp_files(out: Path, n_shards: int, rank: int, world_size: int) -> None:
    """Delete temp files a killed writer of this rank left (rank 0 also clears orphans and manifest temps)."""
    for path in out.iterdir():
        match = _TEMP_SHARD.match(path.name)
        if match:
            index = int(match.group(1))
            mine = shard_owner(index, world_size) == rank or (rank == 0 and index >= n_shards)
            if mine:
                path.unlink(missing_ok=True)
        elif rank == 0 and path.name.startswith(".manifest.json.tmp-"):
            path.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, n_shards: int) -> None:
    """Delete shards beyond the plan (left by an earlier, longer plan); no rank writes those."""
    for path in out.iterdir():
        match = _SHARD.match(path.name)
        if match and int(match.group(1)) >= n_shards:
            path.unlink()


class _ShardFile:
    """A pre-sized shard file filled by positioned writes (any order, no whole-shard buffer)."""

    def __init__(self, fd: int, layout: ShardLayout) -> None:
        self.fd, self.layout = fd, layout

    def put(self, name: str, rows: Tensor, first_row: int) -> None:
        """Write `rows` of tensor `name` starting at row `first_row` (rows must already have its dtype)."""
        spec = self.layout.tensors[name]
        row_bytes = (spec.end - spec.begin) // max(spec.shape[0], 1)
        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
        view, offset = memoryview(data), self.layout.data_start + spec.begin + first_row * row_bytes
        while view.nbytes:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written


def _write_shard(out: Path, entry: ShardEntry, manifest: CacheManifest, samples: Sequence[SampleLike],
                 forward_fn: ForwardFn, batch_size: int, bar: tqdm) -> None:
    """Run the target over one shard's samples into a temp file, then atomically publish it."""
    ids, mask, offsets = _shard_tokens(samples, entry.first_sample, entry.n_samples)
    prefix, layout = shard_layout(entry, manifest)
    tmp = out / temp_name(entry.index, os.getpid())
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, layout.file_size)
        os.pwrite(fd, prefix, 0)
        shard = _ShardFile(fd, layout)
        shard.put("offsets", offsets, 0)
        shard.put("input_ids", ids, 0)
        shard.put("loss_mask", mask, 0)
        _fill_hidden(shard, ids, offsets.tolist(), forward_fn, batch_size, manifest, bar)
        os.fsync(fd)  # the rename must never publish a shard whose bytes are not on disk
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, out / entry.file)


def _fill_hidden(shard: _ShardFile, ids: Tensor, offsets: list[int], forward_fn: ForwardFn, batch_size: int,
                 manifest: CacheManifest, bar: tqdm) -> None:
    """Forward length-sorted batches and write each sample's rows at its plan position."""
    n = len(offsets) - 1
    order = sorted(range(n), key=lambda j: (offsets[j] - offsets[j + 1], j))  # longest first
    start_time, done = time.perf_counter(), 0
    for b in range(0, n, batch_size):
        batch = order[b:b + batch_size]
        lengths = [offsets[j + 1] - offsets[j] for j in batch]
        input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # (B, T), right-padded
        attention = torch.zeros_like(input_ids)  # (B, T)
        for r, j in enumerate(batch):
            input_ids[r, :lengths[r]] = ids[offsets[j]:offsets[j + 1]]
            attention[r, :lengths[r]] = 1
        with torch.inference_mode():
            aux, last = _checked(forward_fn(input_ids, attention), input_ids.shape, manifest)
        for r, j in enumerate(batch):
            shard.put("aux_hidden", aux[r, :lengths[r]], offsets[j])  # (T_j, A*H)
            shard.put("last_hidden", last[r, :lengths[r]], offsets[j])  # (T_j, H)
        done += sum(lengths)
        bar.update(sum(lengths))
        bar.set_postfix(tok_per_s=f"{done / max(time.perf_counter() - start_time, 1e-9):.0f}", refresh=False)


def _checked(outputs: tuple[Tensor, Tensor], batch_shape: torch.Size, manifest: CacheManifest) -> tuple[Tensor, Tensor]:
    """Check forward output shapes against the identity; return both on CPU in the storage dtype."""
    aux, last = outputs
    batch, length = batch_shape
    hidden, n_aux = manifest.identity.hidden_size, len(manifest.identity.aux_layers)
    want_aux, want_last = (batch, length, n_aux * hidden), (batch, length, hidden)
    if tuple(aux.shape) != want_aux or tuple(last.shape) != want_last:
        raise CacheError(f"forward_fn returned aux_hidden {tuple(aux.shape)} and last_hidden {tuple(last.shape)} for "
                         f"input (B, T) = {tuple(batch_shape)}; the cache identity expects {want_aux} and {want_last}")
    dtype = manifest.torch_dtype
    return aux.to("cpu", dtype).contiguous(), last.to("cpu", dtype).contiguous()
