"""The hidden-state cache contract shared by `writer` and `reader` (DESIGN.md §5).

A cache directory holds `manifest.json` and shards `shard-00000.safetensors`, `shard-00001...`.
Every shard stores a run of consecutive samples: `input_ids` int32 (N,), `loss_mask` uint8 (N,),
`aux_hidden` (N, A*H) with A aux layers (A = 3 for EAGLE-3), `last_hidden` (N, H) post-final-norm,
and `offsets` int64 (S+1,) sample boundaries. The shard plan is a pure function of the per-sample
token lengths and `shard_tokens`, so every rank and every rerun derives the same plan; shard k
belongs to rank `k % world_size`, so ranks write disjoint files. Shards are plain safetensors files
(the `safetensors` library reads them) whose `__metadata__` repeats the plan entry, the content
hash of the token ids and the identity fingerprint; `validate_shard` reads only the header and the
small `offsets` tensor, so checking every shard on open stays cheap even for terabyte caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from confu_lightning.errors import CacheError

CACHE_FORMAT_VERSION = 1
"""Bumped on any change a reader of the previous version would misread."""

MANIFEST_NAME = "manifest.json"
LAYER_CONVENTION = "hf_output_hidden_states"
"""aux layer indices count like HF `output_hidden_states` (0 = embeddings, i = output of layer i)."""
LAST_HIDDEN = "post_norm"
"""`last_hidden` is the final-norm output, so teacher logits = target `lm_head(last_hidden)`."""
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ShardStatus = Literal["complete", "pending"]


def hash_text(text: str | bytes | None) -> str:
    """Short stable hash of a tokenizer dump or chat template (`"none"` when there is none)."""
    if text is None:
        return "none"
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_model_dir(path: str | Path) -> str:
    """Identity of a local checkpoint: its config.json, weight index files and weight file sizes."""
    root, digest = Path(path), hashlib.sha256()
    for file in sorted(root.glob("*.json")):
        if file.name == "config.json" or file.name.endswith(".index.json"):
            digest.update(file.name.encode() + file.read_bytes())
    for file in sorted([*root.glob("*.safetensors"), *root.glob("*.bin"), *root.glob("*.gguf")]):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return "local:" + digest.hexdigest()[:16]


_IDENTITY_LABELS = {
    "target": "target", "target_revision": "target revision", "tokenizer_hash": "tokenizer",
    "chat_template_hash": "chat template", "aux_layers": "layers", "hidden_size": "hidden size",
    "layer_convention": "layer convention", "last_hidden": "last hidden",
}


@dataclass(frozen=True)
class CacheIdentity:
    """What the cached features depend on; a cache is only valid for an identical identity."""

    target: str
    """Target id as configured (hub id, built-in name or local path)."""
    target_revision: str
    """Hub revision, or `fingerprint_model_dir` of a local checkpoint."""
    tokenizer_hash: str
    """`hash_text` of the serialised tokenizer."""
    chat_template_hash: str
    """`hash_text` of the chat template."""
    aux_layers: tuple[int, ...]
    """Captured layers in `layer_convention` indices, in concatenation order."""
    hidden_size: int
    """Target hidden size H; `aux_hidden` is (N, len(aux_layers) * H)."""
    layer_convention: str = LAYER_CONVENTION
    last_hidden: str = LAST_HIDDEN

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layers", tuple(int(i) for i in self.aux_layers))
        if not self.aux_layers or self.hidden_size < 1:
            raise CacheError(f"cache identity needs aux layers and hidden_size >= 1, got {self}")

    def mismatches(self, other: CacheIdentity) -> list[str]:
        """One `"<field> <mine> vs <other's>"` entry per differing field, in field order."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{_IDENTITY_LABELS[f.name]} {_show(mine)} vs {_show(theirs)}")
        return out

    def describe(self) -> str:
        """`target 'x' layers [2, 15, 27]`, for messages."""
        return f"target {self.target!r} layers {list(self.aux_layers)}"

    def fingerprint(self) -> str:
        """Short hash of every field; shards carry it so a shard of another target never validates."""
        return hash_text(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "aux_layers": list(self.aux_layers)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CacheIdentity:
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _show(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the plan: which samples it holds, what they hash to, whether it is written."""

    index: int
    first_sample: int
    n_samples: int
    n_tokens: int
    content_hash: str
    status: ShardStatus = "pending"

    @property
    def file(self) -> str:
        return shard_name(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShardEntry:
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


class NewerFormatError(CacheError):
    """The manifest was written by a newer confu_lightning (never overwrite it)."""


@dataclass(frozen=True)
class CacheManifest:
    """`manifest.json`: identity, storage dtype, the shard plan and each shard's completion state."""

    identity: CacheIdentity
    dtype: str
    shard_tokens: int
    plan_hash: str
    shards: tuple[ShardEntry, ...]
    format_version: int = CACHE_FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    @property
    def n_samples(self) -> int:
        return sum(e.n_samples for e in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.shards)

    @property
    def pending(self) -> list[ShardEntry]:
        return [e for e in self.shards if e.status != "complete"]

    def with_statuses(self, statuses: dict[int, ShardStatus]) -> CacheManifest:
        """A copy whose shard `i` has status `statuses[i]` (others unchanged)."""
        shards = tuple(replace(e, status=statuses.get(e.index, e.status)) for e in self.shards)
        return replace(self, shards=shards)

    def to_dict(self) -> dict[str, Any]:
        totals = {"n_shards": len(self.shards), "n_samples": self.n_samples, "n_tokens": self.n_tokens}
        return {"format_version": self.format_version, "identity": self.identity.to_dict(), "dtype": self.dtype,
                "shard_tokens": self.shard_tokens, "plan_hash": self.plan_hash, "totals": totals,
                "shards": [e.to_dict() for e in self.shards]}

    def save(self, directory: str | Path) -> Path:
        """Write `manifest.json` atomically (temp file + `os.replace`)."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CacheManifest:
        """Read `manifest.json` of a cache directory.

        Raises:
            CacheError: missing, unreadable or malformed manifest. NewerFormatError: newer version.
        """
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheError(f"{path} not found: build the cache with `confu cache` or set cache.dir") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheError(f"{path} is unreadable ({err}); remove it and rerun `confu cache`") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > CACHE_FORMAT_VERSION:
            raise NewerFormatError(f"{path} has cache format version {version}, newer than the {CACHE_FORMAT_VERSION} "
                                   "this confu_lightning reads; upgrade confu_lightning or rebuild the cache")
        try:
            shards = tuple(ShardEntry.from_dict(e) for e in raw["shards"])
            manifest = cls(CacheIdentity.from_dict(raw["identity"]), raw["dtype"], int(raw["shard_tokens"]),
                           raw["plan_hash"], shards, int(version))  # type: ignore[arg-type]
            manifest.torch_dtype  # noqa: B018 - rejects an unknown dtype name
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CacheError(f"{path} is malformed ({type(err).__name__}: {err}); remove it and rerun "
                             "`confu cache`") from None
        return manifest


SHARD_FORMAT = "confu-hidden-cache"
"""`format` entry of every shard's safetensors metadata."""

DTYPE_CODES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
}
"""torch dtype → safetensors dtype string (only what a shard uses)."""

CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEM_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def shard_name(index: int) -> str:
    """File name of shard `index` (`shard-00000.safetensors`)."""
    return f"shard-{index:05d}.safetensors"


def temp_name(index: int, pid: int) -> str:
    """Hidden temp name a writer fills before `os.replace` makes the shard visible."""
    return f".{shard_name(index)}.tmp-{pid}"


def shard_owner(index: int, world_size: int) -> int:
    """The rank that writes shard `index`."""
    return index % world_size


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Cut samples, in order, into shards of at most `shard_tokens` tokens.

    Greedy and deterministic: a shard takes consecutive samples while they fit; a sample longer
    than `shard_tokens` gets a shard of its own. Depends only on `lengths`, so a rerun or another
    rank knows exactly which samples belong to which shard.

    Returns:
        `(first_sample, n_samples)` per shard.
    """
    if shard_tokens < 1:
        raise CacheError(f"cache.shard_tokens must be >= 1, got {shard_tokens}")
    plan: list[tuple[int, int]] = []
    first, tokens = 0, 0
    for i, length in enumerate(lengths):
        if i > first and tokens + length > shard_tokens:
            plan.append((first, i - first))
            first, tokens = i, 0
        tokens += length
    if len(lengths) > first:
        plan.append((first, len(lengths) - first))
    return plan


def content_hash(input_ids: Tensor, loss_mask: Tensor, offsets: Tensor) -> str:
    """Hash of what a shard's samples are (ids, mask, boundaries), independent of the target.

    Shapes:
        input_ids: (N,) int32. loss_mask: (N,) uint8. offsets: (S+1,) int64.
    """
    digest = hashlib.blake2b(digest_size=16)
    for tensor, dtype in ((offsets, torch.int64), (input_ids, torch.int32), (loss_mask, torch.uint8)):
        digest.update(tensor.to(dtype).contiguous().numpy().tobytes())
    return digest.hexdigest()


def plan_hash(shard_tokens: int, shards: Sequence[ShardEntry]) -> str:
    """Hash of the whole plan: `shard_tokens` plus every shard's samples and content."""
    rows = [[e.first_sample, e.n_samples, e.n_tokens, e.content_hash] for e in shards]
    text = json.dumps({"shard_tokens": shard_tokens, "shards": rows}, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors header; `begin`/`end` are byte offsets into the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ShardLayout:
    """Where every tensor of a shard lies; `data_start` is the absolute offset of the data buffer."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int

    @property
    def file_size(self) -> int:
        """Exact size of a complete shard file."""
        return self.data_start + max((s.end for s in self.tensors.values()), default=0)


@dataclass(frozen=True)
class ShardInfo:
    """A validated shard: its layout and sample boundaries (read without touching hidden states)."""

    path: Path
    layout: ShardLayout
    offsets: tuple[int, ...]


class ShardInvalidError(CacheError):
    """A shard file does not match its plan entry; `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def shard_metadata(entry: ShardEntry, manifest: CacheManifest) -> dict[str, str]:
    """The `__metadata__` a shard carries: enough to recognise it without the manifest."""
    return {
        "format": SHARD_FORMAT, "format_version": str(CACHE_FORMAT_VERSION),
        "shard_index": str(entry.index), "first_sample": str(entry.first_sample),
        "n_samples": str(entry.n_samples), "n_tokens": str(entry.n_tokens),
        "content_hash": entry.content_hash, "plan_hash": manifest.plan_hash,
        "identity": manifest.identity.fingerprint(), "target": manifest.identity.target,
    }


def expected_tensors(entry: ShardEntry, manifest: CacheManifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (safetensors dtype, shape) of every tensor in the shard, in file order."""
    n, hidden = entry.n_tokens, manifest.identity.hidden_size
    code = DTYPE_CODES[manifest.torch_dtype]
    return {
        "offsets": ("I64", (entry.n_samples + 1,)),
        "aux_hidden": (code, (n, len(manifest.identity.aux_layers) * hidden)),
        "last_hidden": (code, (n, hidden)),
        "input_ids": ("I32", (n,)),
        "loss_mask": ("U8", (n,)),
    }


def shard_layout(entry: ShardEntry, manifest: CacheManifest) -> tuple[bytes, ShardLayout]:
    """Encode the safetensors header of a shard and return it with the resulting layout.

    Tensors are laid out largest-alignment first so every tensor starts on a multiple of its
    item size; the header is space-padded to 8 bytes as the safetensors format recommends.
    """
    tensors, header, cursor = {}, {}, 0
    for name, (code, shape) in expected_tensors(entry, manifest).items():
        size = ITEM_SIZES[code] * _numel(shape)
        tensors[name] = TensorSpec(code, shape, cursor, cursor + size)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        cursor += size
    metadata = shard_metadata(entry, manifest)
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, ShardLayout(tensors, metadata, len(prefix))


def read_layout(path: Path) -> ShardLayout:
    """Parse and bounds-check a safetensors header (no tensor data is read).

    Raises:
        ShardInvalidError: missing file, truncated file, bad JSON, overlapping or out-of-file tensors.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ShardInvalidError(path, f"header length {n} does not fit a {size}-byte file")
            raw = json.loads(f.read(n))
    except FileNotFoundError:
        raise ShardInvalidError(path, "file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardInvalidError(path, f"unreadable header ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise ShardInvalidError(path, "header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {name: _tensor_spec(path, name, spec) for name, spec in raw.items()}
    layout = ShardLayout(tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)
    cursor = 0
    for spec in sorted(tensors.values(), key=lambda s: s.begin):
        if spec.begin != cursor:
            raise ShardInvalidError(path, "tensor data overlaps or leaves a gap")
        cursor = spec.end
    if layout.file_size != size:
        raise ShardInvalidError(path, f"file has {size} bytes, header declares {layout.file_size} (truncated?)")
    return layout


def check_shard(path: Path, entry: ShardEntry, manifest: CacheManifest) -> ShardInfo:
    """Validate a shard against its plan entry and return its layout and offsets.

    Cheap: reads the header and the (S+1) offsets only. Detects truncation, corrupt headers,
    wrong dtype/shape, a shard of another plan, target or sample set, and inconsistent offsets.

    Raises:
        ShardInvalidError: with a short `reason`.
    """
    layout = read_layout(path)
    expected = expected_tensors(entry, manifest)
    if set(layout.tensors) != set(expected):
        raise ShardInvalidError(path, f"holds tensors {sorted(layout.tensors)}, expected {sorted(expected)}")
    for name, (code, shape) in expected.items():
        spec = layout.tensors[name]
        if (spec.dtype, spec.shape) != (code, shape):
            raise ShardInvalidError(path, f"{name} is {spec.dtype}{list(spec.shape)}, expected {code}{list(shape)}")
        if (layout.data_start + spec.begin) % ITEM_SIZES[code]:
            raise ShardInvalidError(path, f"{name} data is not aligned to its item size")
    for key, value in shard_metadata(entry, manifest).items():
        if key not in ("plan_hash", "target") and layout.metadata.get(key) != value:
            raise ShardInvalidError(path, f"metadata {key}={layout.metadata.get(key)!r}, expected {value!r}")
    offsets = _read_offsets(path, layout)
    steps_ok = all(b > a for a, b in zip(offsets, offsets[1:]))
    if offsets[0] != 0 or offsets[-1] != entry.n_tokens or not steps_ok:
        raise ShardInvalidError(path, "offsets are not increasing from 0 to the token count")
    return ShardInfo(path, layout, offsets)


def validate_shard(path: Path, entry: ShardEntry, manifest: CacheManifest) -> str | None:
    """None if `path` is a complete shard for `entry` of `manifest`, else the reason it is not."""
    try:
        check_shard(path, entry, manifest)
    except ShardInvalidError as err:
        return err.reason
    return None


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _tensor_spec(path: Path, name: str, spec: object) -> TensorSpec:
    try:
        code, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]  # type: ignore[index]
        ok = code in ITEM_SIZES and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(begin, int) and end - begin == ITEM_SIZES[code] * _numel(shape) and begin >= 0
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ShardInvalidError(path, f"header entry for {name!r} is malformed")
    return TensorSpec(code, shape, begin, end)


def _read_offsets(path: Path, layout: ShardLayout) -> tuple[int, ...]:
    spec = layout.tensors["offsets"]
    with open(path, "rb") as f:
        f.seek(layout.data_start + spec.begin)
        raw = f.read(spec.end - spec.begin)
    return struct.unpack(f"<{len(raw) // 8}q", raw)
