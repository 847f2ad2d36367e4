"""Cache writer and reader: bit-exact round trips, resume, a killed writer, identity checks and two ranks."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from confu_lightning.cache.format import MANIFEST_NAME, CacheIdentity, CacheManifest, validate_shard
from confu_lightning.cache.reader import open_cache
from confu_lightning.cache.writer import finalize_manifest, write_cache
from confu_lightning.errors import CacheError

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 8
IDENTITY = CacheIdentity("tiny-random-llama", "rev1", "tok1", "tpl1", (2, 4, 5), HIDDEN)
TABLE = torch.randn(64, 4 * HIDDEN, generator=torch.Generator().manual_seed(1))


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]


def make_samples(n: int = 40, seed: int = 0, max_len: int = 30) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [Sample(torch.randint(0, 64, (t,), generator=g).tolist(), torch.randint(0, 2, (t,), generator=g).tolist())
            for t in lengths]


class FakeTarget:
    """Causal, position-dependent, elementwise-exact features of the ids; counts its calls."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls, self.rows, self.delay_s = 0, 0, delay_s

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        self.calls, self.rows = self.calls + 1, self.rows + input_ids.shape[0]
        time.sleep(self.delay_s)
        prefix = (input_ids.cumsum(1) % 7 + 1).float()[..., None]  # (B, T, 1), depends on the prefix only
        x = TABLE[input_ids] * prefix  # (B, T, 4H)
        return x[..., : 3 * HIDDEN], x[..., 3 * HIDDEN:]


def expected(sample: Sample, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    ids = torch.tensor(sample.input_ids)[None]
    aux, last = FakeTarget()(ids, torch.ones_like(ids))
    return aux[0].to(dtype), last[0].to(dtype)


def write(samples: list[Sample], out: Path, target: FakeTarget | None = None, **kw: object) -> CacheManifest:
    kw = {"shard_tokens": 100, "batch_size": 4, "progress": False, **kw}
    return write_cache(samples, target or FakeTarget(), out, IDENTITY, **kw)  # type: ignore[arg-type]


def assert_cache_equals(out: Path, samples: list[Sample], dtype: torch.dtype = torch.bfloat16) -> None:
    cache = open_cache(out, IDENTITY)
    assert len(cache) == len(samples)
    assert cache.lengths.tolist() == [len(s.input_ids) for s in samples]
    for i, sample in enumerate(samples):
        got, (aux, last) = cache[i], expected(sample, dtype)
        assert torch.equal(got.input_ids, torch.tensor(sample.input_ids))
        assert torch.equal(got.loss_mask, torch.tensor(sample.loss_mask).bool())
        assert got.aux_hidden.dtype == dtype and torch.equal(got.aux_hidden, aux)
        assert torch.equal(got.last_hidden, last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    samples = make_samples()
    manifest = write(samples, tmp_path, dtype=dtype)
    assert len(manifest.shards) > 3 and not manifest.pending
    assert manifest.n_samples == len(samples) and manifest.n_tokens == sum(len(s.input_ids) for s in samples)
    assert_cache_equals(tmp_path, samples, dtype)
    cache = open_cache(tmp_path)
    assert torch.equal(cache[-1].input_ids, cache[len(samples) - 1].input_ids)
    with pytest.raises(IndexError):
        cache[len(samples)]
    ids = torch.cat([ids for ids, _ in cache.token_chunks()])
    assert ids.tolist() == [t for s in samples for t in s.input_ids]


def test_dataset_survives_pickling(tmp_path: Path) -> None:
    samples = make_samples(10)
    write(samples, tmp_path)
    cache = open_cache(tmp_path)
    cache[0]
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[7].aux_hidden, cache[7].aux_hidden)


def test_rerun_skips_finished_shards(tmp_path: Path) -> None:
    samples = make_samples()
    write(samples, tmp_path)
    again = FakeTarget()
    assert not write(samples, tmp_path, again).pending
    assert again.calls == 0


def test_corrupt_shard_is_refused_then_rewritten(tmp_path: Path) -> None:
    samples = make_samples()
    manifest = write(samples, tmp_path)
    victim, flipped = tmp_path / manifest.shards[1].file, tmp_path / manifest.shards[2].file
    victim.write_bytes(victim.read_bytes()[:-7])  # truncated
    data = bytearray(flipped.read_bytes())
    data[20] ^= 0xFF  # a flipped header byte
    flipped.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors.*rerunning `confu cache` rewrites it"):
        open_cache(tmp_path, IDENTITY)
    stale = tmp_path / ".shard-00000.safetensors.tmp-999999"
    stale.write_bytes(b"partial")
    rerun = FakeTarget()
    write(samples, tmp_path, rerun)
    assert rerun.rows == manifest.shards[1].n_samples + manifest.shards[2].n_samples
    assert not stale.exists()
    assert_cache_equals(tmp_path, samples)


KILLED_WRITER = """
import sys
from pathlib import Path
from tests.cache.test_writer_reader import FakeTarget, make_samples, write
write(make_samples(), Path(sys.argv[1]), FakeTarget(delay_s=0.15))
"""


def test_killed_writer_leaves_whole_shards_and_resumes(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(killed)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (killed / "shard-00000.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "writer ended before its first shard"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = CacheManifest.load(killed)
    visible = sorted(p.name for p in killed.glob("shard-*.safetensors"))
    assert 1 <= len(visible) < len(manifest.shards), "the kill should land mid-run"
    entries = {e.file: e for e in manifest.shards}
    assert all(validate_shard(killed / name, entries[name], manifest) is None for name in visible)
    with pytest.raises(CacheError, match="incomplete.*rerun `confu cache`"):
        open_cache(killed)
    samples = make_samples()
    write(samples, killed)
    write(samples, clean)
    assert not list(killed.glob(".*tmp*"))
    for name in [MANIFEST_NAME, *(e.file for e in manifest.shards)]:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    assert_cache_equals(killed, samples)


@pytest.mark.parametrize(
    ("change", "label"),
    [({"target": "other-model"}, "target"), ({"aux_layers": (1, 2, 3)}, "layers"),
     ({"tokenizer_hash": "tok2"}, "tokenizer"), ({"chat_template_hash": "tpl2"}, "chat template")],
)
def test_identity_mismatch_is_refused(tmp_path: Path, change: dict, label: str) -> None:
    samples = make_samples(8)
    write(samples, tmp_path)
    other = CacheIdentity(**{**IDENTITY.to_dict(), **change})
    with pytest.raises(CacheError, match=f"does not match.*{label} ") as err:
        open_cache(tmp_path, other)
    assert "\n" not in str(err.value)
    with pytest.raises(CacheError, match=f"built for target 'tiny-random-llama'.*{label} .*another cache.dir"):
        write_cache(samples, FakeTarget(), tmp_path, other, shard_tokens=100, batch_size=4, progress=False)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no samples"):
        write([], tmp_path)
    with pytest.raises(CacheError, match="sample 1 has 2 input_ids but 1"):
        write([Sample([1], [0]), Sample([1, 2], [1])], tmp_path)
    with pytest.raises(CacheError, match="sample 0 has no tokens"):
        write([Sample([], [])], tmp_path)
    bad = lambda ids, mask: (torch.zeros(*ids.shape, 5), torch.zeros(*ids.shape, HIDDEN))  # noqa: E731
    with pytest.raises(CacheError, match="forward_fn returned aux_hidden"):
        write_cache(make_samples(3), bad, tmp_path, IDENTITY, shard_tokens=100, batch_size=2, progress=False)
    assert not list(tmp_path.glob("*.safetensors*")) and not list(tmp_path.glob(".shard*"))


def test_two_ranks_write_disjoint_shards(tmp_path: Path) -> None:
    samples = make_samples()
    targets = [FakeTarget(), FakeTarget()]
    seen: list[set[str]] = []
    for rank in (1, 0):
        before = set(os.listdir(tmp_path))
        write(samples, tmp_path, targets[rank], rank=rank, world_size=2)
        seen.append({n for n in set(os.listdir(tmp_path)) - before if n.startswith("shard-")})
    manifest = finalize_manifest(tmp_path)
    assert seen[0] == {e.file for e in manifest.shards if e.index % 2 == 1}
    assert seen[1] == {e.file for e in manifest.shards if e.index % 2 == 0}
    assert targets[0].rows + targets[1].rows == len(samples)
    assert not manifest.pending
    assert_cache_equals(tmp_path, samples)


def test_concurrent_ranks_then_finalize(tmp_path: Path) -> None:
    samples = make_samples()
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(write, samples, tmp_path, FakeTarget(delay_s=0.002), rank=r, world_size=3) for r in range(3)]
        [job.result() for job in jobs]
    assert not finalize_manifest(tmp_path).pending
    assert_cache_equals(tmp_path, samples)
    loader = DataLoader(open_cache(tmp_path), batch_size=None, shuffle=True, num_workers=1)
    assert sorted(len(x.input_ids) for x in loader) == sorted(len(s.input_ids) for s in samples)


def test_incomplete_cache_names_pending_shards(tmp_path: Path) -> None:
    write(make_samples(), tmp_path, rank=0, world_size=2)
    with pytest.raises(CacheError, match=r"incomplete: \d+ of \d+ shards pending \(shard-00001\.safetensors"):
        open_cache(tmp_path, IDENTITY)


def test_changed_samples_reuse_matching_shards_and_drop_stale_ones(tmp_path: Path) -> None:
    samples = make_samples()
    first = write(samples, tmp_path)
    extended, target = samples + make_samples(5, seed=9), FakeTarget()
    second = write(extended, tmp_path, target)
    assert target.rows < len(extended) - len(samples) + first.shards[-1].n_samples + 1
    assert_cache_equals(tmp_path, extended)
    third = write(samples[:10], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [e.file for e in third.shards]
    assert len(third.shards) < len(second.shards)
    assert_cache_equals(tmp_path, samples[:10])
