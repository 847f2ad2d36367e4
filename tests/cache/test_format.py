"""The cache contract: shard plan, identity comparison, manifest I/O and cheap shard validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from confu_lightning.cache.format import (
    CACHE_FORMAT_VERSION, MANIFEST_NAME, CacheIdentity, CacheManifest, NewerFormatError, ShardEntry, content_hash,
    plan_hash, plan_shards, shard_layout, shard_name, shard_owner, temp_name, validate_shard,
)
from confu_lightning.errors import CacheError

IDENTITY = CacheIdentity("tiny-random-llama", "rev1", "tok1", "tpl1", (2, 4, 5), 8)


def make_manifest(lengths: list[int], shard_tokens: int = 10, dtype: str = "bfloat16") -> CacheManifest:
    entries = []
    for index, (first, n) in enumerate(plan_shards(lengths, shard_tokens)):
        n_tokens = sum(lengths[first:first + n])
        entries.append(ShardEntry(index, first, n, n_tokens, f"hash{index}"))
    return CacheManifest(IDENTITY, dtype, shard_tokens, plan_hash(shard_tokens, entries), tuple(entries))


def write_shard(path: Path, entry: ShardEntry, manifest: CacheManifest, lengths: list[int]) -> None:
    """A valid shard built from `shard_layout` alone (zero features, proper offsets)."""
    prefix, layout = shard_layout(entry, manifest)
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    data = bytearray(layout.file_size)
    data[:len(prefix)] = prefix
    start = layout.data_start + layout.tensors["offsets"].begin
    data[start:start + 8 * len(offsets)] = offsets.numpy().tobytes()
    path.write_bytes(bytes(data))


def test_plan_is_greedy_and_gives_long_samples_their_own_shard() -> None:
    assert plan_shards([3, 3, 10, 2, 2, 2, 7], 6) == [(0, 2), (2, 1), (3, 3), (6, 1)]
    assert plan_shards([4, 4, 4], 8) == [(0, 2), (2, 1)]
    assert plan_shards([1] * 5, 100) == [(0, 5)]
    assert plan_shards([], 10) == []
    with pytest.raises(CacheError, match="shard_tokens"):
        plan_shards([1], 0)


def test_plan_prefix_is_stable_when_samples_are_appended() -> None:
    lengths = torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    base, extended = plan_shards(lengths, 300), plan_shards(lengths + [5, 9, 400], 300)
    assert extended[: len(base) - 1] == base[:-1]
    assert sum(n for _, n in extended) == 203
    assert all(first == sum(n for _, n in extended[:k]) for k, (first, _) in enumerate(extended))


def test_owner_and_names() -> None:
    assert [shard_owner(k, 3) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert shard_name(3) == "shard-00003.safetensors"
    assert temp_name(3, 42) == ".shard-00003.safetensors.tmp-42"


def test_content_hash_depends_on_ids_mask_and_boundaries() -> None:
    ids, mask, offsets = torch.arange(6, dtype=torch.int32), torch.ones(6, dtype=torch.uint8), torch.tensor([0, 2, 6])
    base = content_hash(ids, mask, offsets)
    assert base == content_hash(ids.long(), mask.bool(), offsets)
    assert base != content_hash(ids.flip(0), mask, offsets)
    assert base != content_hash(ids, 1 - mask, offsets)
    assert base != content_hash(ids, mask, torch.tensor([0, 3, 6]))


@pytest.mark.parametrize(
    ("change", "label"),
    [({"target": "other"}, "target"), ({"aux_layers": (1, 2, 3)}, "layers"), ({"tokenizer_hash": "x"}, "tokenizer"),
     ({"chat_template_hash": "x"}, "chat template"), ({"target_revision": "x"}, "target revision"),
     ({"hidden_size": 16}, "hidden size"), ({"last_hidden": "pre_norm"}, "last hidden")],
)
def test_identity_mismatches_name_each_field(change: dict, label: str) -> None:
    other = CacheIdentity(**{**IDENTITY.to_dict(), **change})
    diffs = IDENTITY.mismatches(other)
    assert len(diffs) == 1 and diffs[0].startswith(label + " ")
    assert IDENTITY.fingerprint() != other.fingerprint()
    assert IDENTITY.mismatches(IDENTITY) == []


def test_identity_lists_all_differences_and_normalises_layers() -> None:
    other = CacheIdentity("x", "rev1", "t", "c", [2, 4, 5], 8)
    assert other.aux_layers == (2, 4, 5)
    assert [d.split(" ")[0] for d in IDENTITY.mismatches(other)] == ["target", "tokenizer", "chat"]
    assert "layers [2, 4, 5]" in IDENTITY.describe()


def test_manifest_round_trip_is_atomic(tmp_path: Path) -> None:
    manifest = make_manifest([3, 4, 5, 6]).with_statuses({1: "complete"})
    manifest.save(tmp_path)
    assert os.listdir(tmp_path) == [MANIFEST_NAME]
    loaded = CacheManifest.load(tmp_path)
    assert loaded == manifest
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["totals"] == {"n_shards": 3, "n_samples": 4, "n_tokens": 18}
    assert raw["shards"][1]["file"] == "shard-00001.safetensors" and raw["shards"][1]["status"] == "complete"
    assert [e.file for e in loaded.pending] == ["shard-00000.safetensors", "shard-00002.safetensors"]


def test_manifest_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not found.*confu cache"):
        CacheManifest.load(tmp_path)
    path = tmp_path / MANIFEST_NAME
    path.write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"):
        CacheManifest.load(tmp_path)
    make_manifest([3]).save(tmp_path)
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "format_version": CACHE_FORMAT_VERSION + 1}))
    with pytest.raises(NewerFormatError, match="newer"):
        CacheManifest.load(tmp_path)
    del raw["identity"]
    path.write_text(json.dumps(raw))
    with pytest.raises(CacheError, match="malformed"):
        CacheManifest.load(tmp_path)


def test_layout_shard_validates_and_loads_with_safetensors(tmp_path: Path) -> None:
    lengths = [3, 4, 2]
    manifest = make_manifest(lengths, shard_tokens=100)
    entry, path = manifest.shards[0], tmp_path / manifest.shards[0].file
    write_shard(path, entry, manifest, lengths)
    assert validate_shard(path, entry, manifest) is None
    tensors = load_file(path)
    assert tensors["aux_hidden"].shape == (9, 24) and tensors["aux_hidden"].dtype == torch.bfloat16
    assert tensors["last_hidden"].shape == (9, 8) and tensors["input_ids"].dtype == torch.int32
    assert tensors["offsets"].tolist() == [0, 3, 7, 9]


def test_validate_shard_detects_damage(tmp_path: Path) -> None:
    lengths = [3, 4, 2]
    manifest = make_manifest(lengths, shard_tokens=100)
    entry, path = manifest.shards[0], tmp_path / "s.safetensors"
    assert "missing" in validate_shard(path, entry, manifest)
    write_shard(path, entry, manifest, lengths)
    good = path.read_bytes()
    damaged = {
        "truncated": good[:-5], "appended": good + b"\0", "tiny": good[:5],
        "header length": b"\xff" + good[1:], "header json": good[:8] + b"[" + good[9:],
    }
    for what, data in damaged.items():
        path.write_bytes(data)
        assert validate_shard(path, entry, manifest) is not None, what
    path.write_bytes(good)
    other = ShardEntry(entry.index, entry.first_sample, entry.n_samples, entry.n_tokens, "other-hash")
    assert "content_hash" in validate_shard(path, other, manifest)
    assert "aux_hidden" in validate_shard(path, entry, make_manifest(lengths, 100, dtype="float32"))
    write_shard(path, entry, manifest, [3, 4, 3])  # offsets end past the token count
    assert "offsets" in validate_shard(path, entry, manifest)
