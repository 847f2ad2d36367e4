"""TTT loss and accuracy: restricted teacher, masking, normalisation, step weights, metrics across batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from confu_lightning.train.losses import (
    StepCounts,
    Teacher,
    simulated_tau,
    step_accuracy,
    supervised_masks,
    teacher_targets,
    ttt_loss,
    ttt_step_counts,
)
from confu_lightning.train.metrics import TTTAccuracy
from confu_lightning.train.ttt import TTTOutput, ttt_unroll
from tests.train.test_ttt import tiny_draft


def draft_vocab_mask(v: int = 320, vd: int = 64, seed: int = 0) -> torch.Tensor:
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[torch.randperm(v, generator=torch.Generator().manual_seed(seed))[:vd]] = True
    return t2d


def test_teacher_is_restricted_renormalised_and_chunking_free() -> None:
    torch.manual_seed(0)
    hidden, weight, t2d = torch.randn(2, 7, 64), torch.randn(320, 64), draft_vocab_mask()
    teacher = teacher_targets(hidden, weight, t2d)
    full = hidden @ weight.T  # (B, T, V)
    torch.testing.assert_close(teacher.probs.sum(-1), torch.ones(2, 7))
    torch.testing.assert_close(teacher.probs, torch.softmax(full[..., t2d], -1))
    argmax = full.argmax(-1)
    to_draft = torch.full((320,), -1)
    to_draft[t2d] = torch.arange(64)
    assert torch.equal(teacher.target_ids, to_draft[argmax])
    inside = teacher.target_ids >= 0
    assert torch.equal(inside, t2d[argmax])
    assert torch.equal(teacher.probs.argmax(-1)[inside], teacher.target_ids[inside])
    assert torch.equal(teacher_targets(hidden, weight, t2d, chunk_rows=3).target_ids, teacher.target_ids)


def test_supervised_masks_shift_the_loss_mask_by_k_plus_one() -> None:
    valid = torch.ones(3, 1, 6, dtype=torch.bool)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 1]])
    sup = supervised_masks(valid, loss_mask)
    assert sup[0, 0].tolist() == [False, True, True, False, True, False]  # loss_mask[t+1]
    assert sup[2, 0].tolist() == [True, False, True, False, False, False]  # loss_mask[t+3]


def hand_output(vd: int = 4) -> tuple[TTTOutput, Teacher, torch.Tensor]:
    """B=1, T=5, K=2; teacher argmax per row [1, 2, 3, outside, 0]."""
    target_ids = torch.tensor([[1, 2, 3, -1, 0]])
    probs = torch.softmax(torch.randn(1, 5, vd, generator=torch.Generator().manual_seed(0)), -1)
    valid = torch.tensor([[[False, True, True, True, False]], [[False, True, True, False, False]]])

    def logits_for(preds: list[int]) -> torch.Tensor:
        return 10.0 * F.one_hot(torch.tensor([preds]), vd).float()

    step0 = logits_for([0, 2, 0, 1, 0])  # rows 1..3 vs targets [2, 3, outside]: right, wrong, wrong
    step1 = logits_for([0, 3, 1, 0, 0])  # rows 1..2 vs targets [3, outside]: right, wrong
    out = TTTOutput(logits=[step0, step1], valid=valid, positions=torch.arange(5)[None])
    return out, Teacher(probs=probs, target_ids=target_ids), torch.ones(1, 5, dtype=torch.long)


def test_step_counts_on_hand_made_tensors() -> None:
    out, teacher, loss_mask = hand_output()
    counts = ttt_step_counts(out, teacher, loss_mask)
    assert counts.correct.tolist() == [1, 1] and counts.cond_correct.tolist() == [1, 1]
    assert counts.total.tolist() == [3, 2]
    loss_mask[0, 2] = 0  # token 2 unsupervised: step 0 row 1 and step 1 row 0 (invalid anyway) drop out
    counts = ttt_step_counts(out, teacher, loss_mask)
    assert counts.correct.tolist() == [0, 1] and counts.total.tolist() == [2, 2]
    assert counts.cond_correct.tolist() == [0, 1]  # row 1 was right at step 0 even if unsupervised there


def test_conditional_accuracy_needs_every_earlier_step() -> None:
    out, teacher, loss_mask = hand_output()
    out.logits[0] = 10.0 * F.one_hot(torch.tensor([[0, 0, 3, 1, 0]]), 4).float()  # row 1 now wrong, row 2 right
    out.logits[1] = 10.0 * F.one_hot(torch.tensor([[0, 3, 1, 0, 0]]), 4).float()
    counts = ttt_step_counts(out, teacher, loss_mask)
    acc, cond = step_accuracy(counts)
    torch.testing.assert_close(acc, torch.tensor([1 / 3, 1 / 2]))
    torch.testing.assert_close(cond, torch.tensor([1 / 3, 0.0]))


def test_simulated_tau() -> None:
    assert float(simulated_tau(torch.tensor([1.0, 1.0, 0.5]))) == pytest.approx(3.5)
    assert float(simulated_tau(torch.tensor([0.5, 0.5]))) == pytest.approx(1 + 0.5 + 0.25)
    assert float(simulated_tau(torch.zeros(7))) == 1.0
    acc, cond = step_accuracy(StepCounts(torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([4, 0])))
    assert acc.tolist() == [0.5, 0.0] and cond.tolist() == [0.25, 0.0]


def test_loss_ignores_masked_positions_and_weights_steps() -> None:
    out, teacher, loss_mask = hand_output()
    loss = ttt_loss(out, teacher, loss_mask, step_weight=0.5)
    # step 0: rows 1, 2 (row 3's target argmax is outside the draft vocab); step 1: row 1 only
    ce = lambda k, t: -(teacher.probs[0, t + k] * torch.log_softmax(out.logits[k][0, t], -1)).sum()  # noqa: E731
    expected = torch.stack([(ce(0, 1) + ce(0, 2)) / 2, ce(1, 1)])
    torch.testing.assert_close(loss.step_losses, expected)
    torch.testing.assert_close(loss.loss, expected[0] + 0.5 * expected[1])
    assert loss.counts.tolist() == [2, 1]
    for k, t in [(0, 0), (0, 3), (0, 4), (1, 2), (1, 3)]:  # invalid, outside-vocab or beyond the row
        out.logits[k][0, t] = torch.randn(4) * 100
    torch.testing.assert_close(ttt_loss(out, teacher, loss_mask, step_weight=0.5).loss, loss.loss)


def test_loss_of_a_step_without_supervision_is_zero_with_a_graph() -> None:
    out, teacher, loss_mask = hand_output()
    out.logits = [x.requires_grad_() for x in out.logits]
    loss = ttt_loss(out, teacher, torch.zeros_like(loss_mask))
    assert float(loss.loss.detach()) == 0.0 and loss.counts.tolist() == [0, 0]
    loss.loss.backward()


def test_padding_does_not_change_the_loss_or_counts() -> None:
    draft = tiny_draft()
    g = torch.Generator().manual_seed(5)
    ids, aux = torch.randint(0, 320, (1, 8), generator=g), torch.randn(1, 8, 192, generator=g)
    last, weight = torch.randn(1, 8, 64, generator=g), torch.randn(320, 64, generator=g)
    argmax = (last @ weight.T).argmax(-1).unique()
    t2d = torch.zeros(320, dtype=torch.bool)
    t2d[argmax[:-1]] = True  # all but one teacher argmax inside the draft vocab
    t2d[[i for i in range(320) if i not in argmax.tolist()][: 64 - int(t2d.sum())]] = True
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]])

    def run(ids, aux, last, loss_mask, segment_ids):
        out = ttt_unroll(draft, ids, aux, segment_ids=segment_ids, steps=3)
        teacher = teacher_targets(last, weight, t2d)
        return ttt_loss(out, teacher, loss_mask), ttt_step_counts(out, teacher, loss_mask)

    plain, plain_counts = run(ids, aux, last, loss_mask, torch.zeros(1, 8, dtype=torch.long))
    pad = lambda x, n: torch.cat((x, torch.randn(1, n, *x.shape[2:], generator=g).to(x.dtype)), 1)  # noqa: E731
    padded, padded_counts = run(torch.cat((ids, torch.randint(0, 320, (1, 4), generator=g)), 1), pad(aux, 4),
                                pad(last, 4), torch.cat((loss_mask, torch.ones(1, 4, dtype=torch.long)), 1),
                                torch.tensor([[0] * 8 + [-1] * 4]))
    torch.testing.assert_close(padded.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert plain.counts.tolist() == padded.counts.tolist() and plain.counts[0] > 0
    assert padded_counts.total.tolist() == plain_counts.total.tolist()


def test_metric_accumulates_like_the_concatenated_batch() -> None:
    batches = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        logits = [torch.randn(2, 6, 4, generator=g) for _ in range(3)]
        valid = torch.rand(3, 2, 6, generator=g) > 0.2
        target = torch.randint(-1, 4, (2, 6), generator=g)
        batches.append((TTTOutput(logits, valid, torch.zeros(2, 6)), Teacher(torch.zeros(2, 6, 4), target),
                        torch.rand(2, 6, generator=g) > 0.3))
    metric = TTTAccuracy(steps=3)
    for out, teacher, mask in batches:
        metric.update(ttt_step_counts(out, teacher, mask))
    cat_out = TTTOutput([torch.cat([b[0].logits[k] for b in batches]) for k in range(3)],
                        torch.cat([b[0].valid for b in batches], 1), torch.zeros(6, 6))
    cat_teacher = Teacher(torch.zeros(6, 6, 4), torch.cat([b[1].target_ids for b in batches]))
    counts = ttt_step_counts(cat_out, cat_teacher, torch.cat([b[2] for b in batches]))
    acc, cond = step_accuracy(counts)
    result = metric.compute()
    torch.testing.assert_close(result["acc"], acc)
    torch.testing.assert_close(result["cond_acc"], cond)
    torch.testing.assert_close(result["tau"], simulated_tau(acc))
    logged = metric.as_log_dict("val")
    assert set(logged) == {f"val/{n}_k{i}" for n in ("acc", "cond_acc") for i in range(3)} | {"val/tau",
                                                                                               "val/tau_cond"}
    with pytest.raises(ValueError, match="3 steps"):
        metric.update(StepCounts(torch.zeros(2), torch.zeros(2), torch.zeros(2)))
