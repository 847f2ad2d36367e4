"""The EAGLE-3 reduced draft vocabulary: top-Vd target tokens by supervised frequency (DESIGN.md §6).

The draft's `lm_head` predicts over Vd << V tokens: the Vd target tokens seen most often inside the
loss mask of the training data (ties to the lower id; unseen ids pad the list from the lowest id
up). The selected target ids are sorted ascending and stored the way EAGLE-3, SGLang and vLLM read
them: `d2t[i] = target_id(i) - i`, an int64 *offset* (target id = draft id + d2t[draft id]), and
`t2d`, a bool mask over the target vocabulary. A missing or all-zero `d2t` maps draft ids to target
ids 0..Vd-1 and silently collapses acceptance (EAGLE#222, NeMo Automodel PR#2447), and storing
target ids instead of offsets gives `d2t == arange`; `validate_vocab` refuses both, and
`load_vocab` validates every file it reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from confu_lightning.errors import ConfuError

VOCAB_FORMAT = "confu-draft-vocab/1"
"""`format` metadata of a saved vocabulary file."""


@dataclass
class DraftVocab:
    """A draft vocabulary in EAGLE-3's `d2t` / `t2d` convention.

    Shapes:
        d2t: (Vd,) int64 offsets. t2d: (V,) bool. counts: (V,) int64 supervised token counts, or None.
    """

    d2t: Tensor
    t2d: Tensor
    counts: Tensor | None = None
    warning: str | None = None
    """Set when the requested size was clipped to the target vocabulary (the only adjustment made)."""

    @property
    def draft_size(self) -> int:
        return self.d2t.numel()

    @property
    def target_size(self) -> int:
        return self.t2d.numel()

    @property
    def draft_to_target(self) -> Tensor:
        """(Vd,) int64 target id of every draft id, ascending."""
        return torch.arange(self.draft_size, dtype=torch.int64) + self.d2t

    def target_to_draft(self) -> Tensor:
        """(V,) int64 draft id of every target id, -1 where the token is outside the draft vocabulary."""
        out = torch.full((self.target_size,), -1, dtype=torch.int64)
        out[self.draft_to_target] = torch.arange(self.draft_size, dtype=torch.int64)
        return out


def count_tokens(
    input_ids_chunks: Iterable[Tensor | Sequence[int]], loss_masks: Iterable[Tensor | Sequence[int]], vocab_size: int
) -> Tensor:
    """Count target tokens inside the loss mask, chunk by chunk (a chunk may be one sample or a shard).

    Shapes:
        each chunk: input_ids (N,) ints, loss_mask (N,) 0/1 or bool. returns: (V,) int64.
    """
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    chunks = zip(input_ids_chunks, loss_masks, strict=True)
    try:
        for i, (ids, mask) in enumerate(chunks):
            ids = torch.as_tensor(ids).reshape(-1).long()  # (N,)
            mask = torch.as_tensor(mask).reshape(-1) != 0  # (N,)
            if ids.shape != mask.shape:
                raise ConfuError(f"token chunk {i} has {ids.numel()} ids but {mask.numel()} loss-mask entries")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ConfuError(f"token chunk {i} holds ids outside [0, {vocab_size}); the tokenizer does not "
                                 "match the target vocabulary")
            counts += torch.bincount(ids[mask], minlength=vocab_size)
    except ValueError as err:  # zip(strict=True): the two iterables have different lengths
        raise ConfuError(f"count_tokens got a different number of id chunks and loss masks ({err})") from None
    return counts


def build_draft_vocab(counts: Tensor, draft_vocab_size: int) -> DraftVocab:
    """Keep the `draft_vocab_size` most frequent target tokens (ties and padding: lowest ids first).

    A size above the target vocabulary is clipped to it and recorded in `DraftVocab.warning`
    (`draft.vocab_size` is documented as clipped); the mapping is then the identity.

    Shapes:
        counts: (V,) non-negative ints. returns: d2t (Vd,), t2d (V,) with Vd = min(draft_vocab_size, V).
    """
    counts = counts.reshape(-1).long()
    n_target = counts.numel()
    if draft_vocab_size < 1 or n_target < 1:
        raise ConfuError(f"draft.vocab_size must be >= 1 and the target vocabulary non-empty, got "
                         f"{draft_vocab_size} and {n_target}")
    if int(counts.sum()) == 0:
        raise ConfuError("no supervised tokens were counted (every loss mask is empty?); cannot choose a draft "
                         "vocabulary")
    size = min(draft_vocab_size, n_target)
    warning = None
    if size < draft_vocab_size:
        warning = f"draft.vocab_size {draft_vocab_size} clipped to the target vocabulary size {n_target}"
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    selected = order[:size].sort().values  # (Vd,) ascending target ids
    t2d = torch.zeros(n_target, dtype=torch.bool)
    t2d[selected] = True
    d2t = selected - torch.arange(size, dtype=torch.int64)  # (Vd,) offsets
    return DraftVocab(d2t=d2t, t2d=t2d, counts=counts.clone(), warning=warning)


def vocab_problem(vocab: DraftVocab, target_vocab_size: int, *, allow_trivial: bool = False) -> str | None:
    """The first thing wrong with `vocab`, or None; see `validate_vocab`."""
    d2t, t2d, size = vocab.d2t, vocab.t2d, vocab.d2t.numel()
    if d2t.dtype != torch.int64 or d2t.ndim != 1 or t2d.dtype != torch.bool or t2d.ndim != 1:
        return (f"d2t must be 1-D int64 and t2d 1-D bool, got {d2t.dtype}{list(d2t.shape)} and "
                f"{t2d.dtype}{list(t2d.shape)}")
    if t2d.numel() != target_vocab_size or not 1 <= size <= target_vocab_size:
        return f"t2d covers {t2d.numel()} ids and d2t {size}, for a target vocabulary of {target_vocab_size}"
    if size < target_vocab_size and not allow_trivial:
        hint = ("; a broken d2t silently ruins acceptance (the draft predicts the wrong tokens), so rebuild the "
                "vocabulary from token counts")
        if not d2t.any():
            return f"d2t is all zeros, mapping draft ids to target ids 0..{size - 1}{hint}"
        if size > 1 and torch.equal(d2t, torch.arange(size)):
            return f"d2t equals arange (target ids stored instead of offsets target_id - draft_id){hint}"
    targets = vocab.draft_to_target
    steps = targets.diff()
    if (steps < 0).any():
        return "selected target ids (draft id + d2t) are not sorted ascending"
    if (steps == 0).any():
        return "selected target ids (draft id + d2t) contain duplicates"
    if int(targets[0]) < 0 or int(targets[-1]) >= target_vocab_size:
        return f"selected target ids span {int(targets[0])}..{int(targets[-1])}, outside [0, {target_vocab_size})"
    if int(t2d.sum()) != size or not bool(t2d[targets].all()):
        return f"t2d marks {int(t2d.sum())} ids but does not equal the {size} ids selected by d2t"
    return None


def validate_vocab(vocab: DraftVocab, target_vocab_size: int, *, allow_trivial: bool = False) -> None:
    """Check sizes, dtypes, sorted unique in-range target ids, `t2d` == the ids of `d2t`, and no trivial mapping.

    `allow_trivial` accepts an all-zero / arange `d2t` for the rare corpus whose top tokens really
    are ids 0..Vd-1 (or the even ids); a full-size vocabulary (Vd == V) is always the identity.

    Raises:
        ConfuError: naming the first problem found.
    """
    problem = vocab_problem(vocab, target_vocab_size, allow_trivial=allow_trivial)
    if problem:
        raise ConfuError(f"invalid draft vocabulary: {problem}")


def save_vocab(vocab: DraftVocab, path: str | Path, *, allow_trivial: bool = False) -> Path:
    """Validate `vocab` and write it to a safetensors file (`d2t`, `t2d`, `counts`) atomically."""
    from safetensors.torch import save_file

    validate_vocab(vocab, vocab.target_size, allow_trivial=allow_trivial)
    path = Path(path)
    tensors = {"d2t": vocab.d2t.contiguous(), "t2d": vocab.t2d.contiguous()}
    if vocab.counts is not None:
        tensors["counts"] = vocab.counts.long().contiguous()
    meta = {"format": VOCAB_FORMAT, "draft_vocab_size": str(vocab.draft_size),
            "target_vocab_size": str(vocab.target_size), "warning": vocab.warning or ""}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_vocab(path: str | Path, target_vocab_size: int | None = None, *, allow_trivial: bool = False) -> DraftVocab:
    """Read and validate a vocabulary written by `save_vocab` (against `target_vocab_size` if given).

    Raises:
        ConfuError: missing or unreadable file, missing tensors, or an invalid mapping.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfuError(f"draft vocabulary {path} not found; build it from token counts first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            if not {"d2t", "t2d"} <= names:
                raise ConfuError(f"{path} is not a draft vocabulary (tensors {sorted(names)}, need d2t and t2d)")
            tensors = {name: f.get_tensor(name) for name in names}
    except SafetensorError as err:
        raise ConfuError(f"{path} is not a readable safetensors file ({err}); rebuild the draft vocabulary") from None
    vocab = DraftVocab(tensors["d2t"], tensors["t2d"], tensors.get("counts"), meta.get("warning") or None)
    expected = vocab.target_size if target_vocab_size is None else target_vocab_size
    problem = vocab_problem(vocab, expected, allow_trivial=allow_trivial)
    if problem:
        raise ConfuError(f"{path}: invalid draft vocabulary: {problem}")
    return vocab
