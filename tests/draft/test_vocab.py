"""Draft vocabulary: masked counting, top-N with tie-breaks, d2t/t2d invariants, validation, file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from confu_lightning.draft.vocab import (
    DraftVocab, build_draft_vocab, count_tokens, load_vocab, save_vocab, validate_vocab,
)
from confu_lightning.errors import ConfuError


def test_counts_only_inside_the_loss_mask() -> None:
    ids = [torch.tensor([1, 2, 2, 3]), [3, 3, 0]]
    masks = [torch.tensor([0, 1, 1, 0]), [True, False, True]]
    assert count_tokens(ids, masks, 5).tolist() == [1, 0, 2, 1, 0]
    with pytest.raises(ConfuError, match="outside"):
        count_tokens([[5]], [[1]], 5)
    with pytest.raises(ConfuError, match="2 ids but 1"):
        count_tokens([[1, 2]], [[1]], 5)
    with pytest.raises(ConfuError, match="different number"):
        count_tokens([[1], [2]], [[1]], 5)


def test_top_n_with_ties_to_the_lower_id() -> None:
    counts = torch.tensor([0, 5, 3, 5, 3, 9, 3, 0])
    vocab = build_draft_vocab(counts, 4)
    assert vocab.draft_to_target.tolist() == [1, 2, 3, 5]  # 5, 1 and 3 (5 each), then 2 wins the 3-way tie
    assert vocab.d2t.tolist() == [1, 1, 1, 2]
    assert vocab.t2d.nonzero().flatten().tolist() == [1, 2, 3, 5]
    assert vocab.target_to_draft().tolist() == [-1, 0, 1, 2, -1, 3, -1, -1]
    assert vocab.warning is None
    validate_vocab(vocab, 8)


def test_few_seen_tokens_are_padded_with_the_lowest_unseen_ids() -> None:
    counts = torch.zeros(10, dtype=torch.long)
    counts[[7, 9]] = torch.tensor([4, 2])
    vocab = build_draft_vocab(counts, 5)
    assert vocab.draft_to_target.tolist() == [0, 1, 2, 7, 9]
    validate_vocab(vocab, 10)
    with pytest.raises(ConfuError, match="no supervised tokens"):
        build_draft_vocab(torch.zeros(10), 5)


def test_oversized_draft_vocab_is_clipped_with_a_warning() -> None:
    vocab = build_draft_vocab(torch.arange(6), 100)
    assert vocab.draft_size == 6 and vocab.warning and "clipped" in vocab.warning
    assert not vocab.d2t.any()  # full vocabulary: the identity mapping is the right answer
    validate_vocab(vocab, 6)


def test_d2t_maps_every_draft_id_to_its_target_id() -> None:
    counts = torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(0))
    vocab = build_draft_vocab(counts, 64)
    draft_ids = torch.arange(64)
    targets = draft_ids + vocab.d2t[draft_ids]
    assert torch.equal(targets, vocab.draft_to_target)
    assert torch.equal(targets, vocab.t2d.nonzero().flatten())
    assert counts[targets].min() >= counts[~vocab.t2d].max()
    assert torch.equal(vocab.target_to_draft()[targets], draft_ids)


def _vocab_from_targets(targets: list[int], size: int) -> DraftVocab:
    t2d = torch.zeros(size, dtype=torch.bool)
    t2d[targets] = True
    return DraftVocab(torch.tensor(targets) - torch.arange(len(targets)), t2d)


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        (DraftVocab(torch.zeros(4, dtype=torch.long), torch.arange(10) < 4), "all zeros.*silently ruins acceptance"),
        (DraftVocab(torch.arange(4), torch.arange(10) % 2 == 0), "equals arange.*silently ruins acceptance"),
        (_vocab_from_targets([1, 5, 3], 10), "not sorted"),
        (DraftVocab(torch.tensor([1, 0, 0]), torch.arange(10) < 3), "duplicates"),
        (DraftVocab(torch.tensor([1, 4, 8]), torch.zeros(10, dtype=torch.bool)), r"outside \[0, 10\)"),
        (_vocab_from_targets([1, 2, 5], 9), "t2d covers 9"),
        (DraftVocab(torch.tensor([1, 1, 1]), torch.arange(10) < 3), "t2d marks 3 ids but does not equal"),
        (DraftVocab(torch.tensor([1, 1, 1], dtype=torch.int32), torch.arange(10) < 3), "int64"),
    ],
)
def test_validation_rejects_broken_mappings(vocab: DraftVocab, message: str) -> None:
    with pytest.raises(ConfuError, match=message):
        validate_vocab(vocab, 10)


def test_trivial_mapping_can_be_allowed_explicitly() -> None:
    vocab = DraftVocab(torch.zeros(4, dtype=torch.long), torch.arange(10) < 4)
    validate_vocab(vocab, 10, allow_trivial=True)


def test_save_load_round_trip(tmp_path: Path) -> None:
    counts = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(3))
    vocab = build_draft_vocab(counts, 32)
    path = save_vocab(vocab, tmp_path / "sub" / "vocab.safetensors")
    loaded = load_vocab(path, 300)
    assert torch.equal(loaded.d2t, vocab.d2t) and torch.equal(loaded.t2d, vocab.t2d)
    assert torch.equal(loaded.counts, counts) and loaded.warning is None
    assert [p.name for p in path.parent.iterdir()] == ["vocab.safetensors"]
    with pytest.raises(ConfuError, match="t2d covers 300"):
        load_vocab(path, 301)


def test_load_refuses_missing_broken_and_trivial_files(tmp_path: Path) -> None:
    with pytest.raises(ConfuError, match="not found"):
        load_vocab(tmp_path / "none.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    with pytest.raises(ConfuError, match="garbage.safetensors"):
        load_vocab(garbage)
    zeros = tmp_path / "zeros.safetensors"
    save_file({"d2t": torch.zeros(8, dtype=torch.long), "t2d": torch.arange(100) < 8}, str(zeros))
    with pytest.raises(ConfuError, match=r"zeros\.safetensors: invalid draft vocabulary: d2t is all zeros"):
        load_vocab(zeros)
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2)}, str(other))
    with pytest.raises(ConfuError, match="not a draft vocabulary"):
        load_vocab(other)
