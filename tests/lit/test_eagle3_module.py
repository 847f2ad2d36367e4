"""Eagle3LitModule through a real Trainer: overfits one batch; a NaN loss stops with the last checkpoint intact."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from confu_lightning.config.schema import OptimConfig
from confu_lightning.data.batching import TokenBatch
from confu_lightning.lit.eagle3_module import Eagle3LitModule, TrainingDiverged
from confu_lightning.train.losses import step_accuracy, teacher_targets, ttt_step_counts
from confu_lightning.train.ttt import ttt_unroll
from tests.train.test_overfit import tiny_draft_and_batch


def _setup(tiny_target_dir: Path):
    _, draft, head, ids, aux, last = tiny_draft_and_batch(tiny_target_dir)
    mask = torch.ones_like(ids, dtype=torch.bool)
    b, t = ids.shape
    batch = TokenBatch(input_ids=ids, loss_mask=mask, attention_mask=mask,
                       position_ids=torch.arange(t).expand(b, t), segment_ids=torch.zeros(b, t, dtype=torch.long),
                       aux_hidden=aux, last_hidden=last)
    return draft, head, batch


def _loader(batches: list[TokenBatch]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None)  # yields the prepared batches as they are


def _trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                     gradient_clip_val=0.5, **kwargs)


def test_module_overfits_one_batch(tiny_target_dir: Path, tmp_path: Path) -> None:
    draft, head, batch = _setup(tiny_target_dir)
    module = Eagle3LitModule(draft, head, optim=OptimConfig(lr=1e-2, warmup_steps=0), ttt_steps=3, max_steps=10_000)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *_):
            losses.append(float(outputs["loss"]))

    _trainer(tmp_path, 30, enable_checkpointing=False, callbacks=[Record()]).fit(module, _loader([batch] * 30))
    teacher = teacher_targets(batch.last_hidden, head, draft.t2d)
    with torch.no_grad():
        acc, _ = step_accuracy(ttt_step_counts(ttt_unroll(draft, batch.input_ids, batch.aux_hidden, steps=3),
                                               teacher, batch.loss_mask))
    assert losses[-1] < 0.25 * losses[0], losses
    assert acc[0] > 0.9, acc


def test_non_finite_loss_stops_with_last_checkpoint_intact(tiny_target_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    draft, head, batch = _setup(tiny_target_dir)
    poisoned = TokenBatch(**{**batch.__dict__, "aux_hidden": torch.full_like(batch.aux_hidden, float("nan"))})
    module = Eagle3LitModule(draft, head, optim=OptimConfig(lr=1e-3, warmup_steps=0), ttt_steps=2, max_steps=100)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=2)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        _trainer(tmp_path, 10, callbacks=[ckpt]).fit(module, _loader([batch] * 4 + [poisoned] * 6))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
