"""Token-budget batching: coverage, budget, rank split, exact mid-epoch resume, collation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from confu_lightning.data.batching import TokenBudgetBatchSampler, collate, padding_fraction, plan_batches

LENGTHS = [int(x) for x in torch.randint(3, 60, (97,), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_every_sample_once_within_budget(mode: str) -> None:
    batches = plan_batches(LENGTHS, 128, mode, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    for batch in batches:
        cost = len(batch) * max(LENGTHS[i] for i in batch) if mode == "bucket" else sum(LENGTHS[i] for i in batch)
        assert cost <= 128 or len(batch) == 1
    assert plan_batches(LENGTHS, 128, mode, seed=0) == batches
    assert plan_batches(LENGTHS, 128, mode, seed=1) != batches
    # sorting into buckets beats random batches of the same sizes by a wide margin
    assert padding_fraction(LENGTHS, batches, mode) < 0.15


def test_oversized_sample_gets_its_own_batch() -> None:
    batches = plan_batches([10, 500, 10], 64, "bucket", seed=0)
    assert [1] in batches


def test_ranks_are_disjoint_and_equal_length() -> None:
    samplers = [TokenBudgetBatchSampler(LENGTHS, 128, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = [[i for b in s for i in b] for s in samplers]
    assert len(list(samplers[0])) == len(list(samplers[1]))
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) >= len(LENGTHS) - 10  # at most one cut batch


def test_resume_mid_epoch_continues_exactly() -> None:
    reference = TokenBudgetBatchSampler(LENGTHS, 100, seed=5)
    full = list(reference) + list(reference)  # two epochs
    run = TokenBudgetBatchSampler(LENGTHS, 100, seed=5)
    it = iter(run)
    first = [next(it) for _ in range(4)]
    state = run.state_dict()
    resumed = TokenBudgetBatchSampler(LENGTHS, 100, seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert first + rest[: len(full) - 4] == full


@dataclass
class _Sample:
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    aux_hidden: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None


def _samples() -> list[_Sample]:
    out = []
    for n in (3, 5):
        out.append(_Sample(torch.arange(1, n + 1), torch.tensor([0] + [1] * (n - 1)),
                           torch.full((n, 6), float(n)), torch.full((n, 2), -float(n))))
    return out


def test_collate_bucket_pads_right() -> None:
    batch = collate(_samples(), "bucket", pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, -1, -1], [0] * 5]
    assert batch.position_ids[0, :3].tolist() == [0, 1, 2]
    assert batch.loss_mask.sum() == 6 and batch.num_tokens == 8
    assert batch.aux_hidden.shape == (2, 5, 6) and batch.aux_hidden[0, 3].abs().sum() == 0
    assert torch.equal(batch.last_hidden[1], torch.full((5, 2), -5.0))


def test_collate_pack_restarts_positions() -> None:
    batch = collate(_samples(), "pack")
    assert batch.input_ids.shape == (1, 8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert batch.to("cpu").input_ids.tolist() == batch.input_ids.tolist()


def test_abandoned_iteration_still_starts_a_full_next_epoch() -> None:
    """Lightning stops calling next() after len() batches: the generator never finishes."""
    sampler = TokenBudgetBatchSampler(LENGTHS, 100, shuffle=False)
    n = len(sampler)
    for _ in range(3):  # e.g. three validations inside one training epoch
        it = iter(sampler)
        got = [next(it) for _ in range(n)]
        assert len(got) == n
    sampler.set_epoch(0)  # Lightning's set_epoch with an older epoch must not rewind
    assert len(list(sampler)) == n
