"""`Eagle3LitModule`: EAGLE-3 draft distillation as thin Lightning glue over `train/` functions.

Each step: target features (cached, or from the target in the loop through `feature_source`) →
`ttt_unroll` (K steps) → soft cross-entropy to the target distribution restricted to the draft
vocabulary (`ttt_loss`) → per-step accuracy counts (`TTTAccuracy`). Validation reports
`val/acc_k{i}`, `val/cond_acc_k{i}` and the simulated acceptance length `val/sim_tau`, which the
best checkpoint is chosen by. A non-finite loss stops the run with `TrainingDiverged` before the
optimizer touches the weights, so the last checkpoint stays the last good one. Checkpoints also
carry the RNG states and the flattened config (resuming with a changed config is refused by
`run_train` unless forced).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from confu_lightning.config.schema import OptimConfig
from confu_lightning.data.batching import TokenBatch
from confu_lightning.draft.eagle3 import Eagle3Draft
from confu_lightning.errors import ConfuError
from confu_lightning.train.losses import teacher_targets, ttt_loss, ttt_step_counts
from confu_lightning.train.metrics import TTTAccuracy
from confu_lightning.train.optim import build_optimizer
from confu_lightning.train.ttt import ttt_unroll

FeatureSource = Callable[[TokenBatch], TokenBatch]
"""Fills `aux_hidden` / `last_hidden` of a batch (online training: the target in the loop)."""


class TrainingDiverged(ConfuError):
    """The loss became NaN or infinite."""


class Eagle3LitModule(L.LightningModule):
    """Trains an injected `Eagle3Draft` against the frozen target `lm_head` (teacher)."""

    def __init__(
        self,
        draft: Eagle3Draft,
        lm_head_weight: Tensor,
        *,
        optim: OptimConfig,
        ttt_steps: int = 7,
        step_weight: float = 0.8,
        max_steps: int = 1000,
        feature_source: FeatureSource | None = None,
        run_config: dict[str, Any] | None = None,
        data_order_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.draft = draft
        self.register_buffer("lm_head_weight", lm_head_weight.detach().clone(), persistent=False)  # (V, H) frozen
        self.optim = optim
        self.ttt_steps = ttt_steps
        self.step_weight = step_weight
        self.max_steps = max_steps
        self.feature_source = feature_source
        self.run_config = dict(run_config or {})
        self.train_acc = TTTAccuracy(ttt_steps)
        self.val_acc = TTTAccuracy(ttt_steps)
        self.data_order_dir = None if data_order_dir is None else Path(data_order_dir)

    def _record(self, entry: dict[str, Any]) -> None:
        if self.data_order_dir is None:
            return
        self.data_order_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_order_dir / f"data_order.rank{self.global_rank}.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def on_train_batch_start(self, batch: TokenBatch, batch_idx: int) -> None:
        if self.data_order_dir is not None:
            rows = [hashlib.sha1(r[m].cpu().numpy().tobytes()).hexdigest()[:16]
                    for r, m in zip(batch.input_ids, batch.attention_mask)]
            self._record({"step": self.global_step, "samples": rows})

    def on_train_end(self) -> None:
        if self.data_order_dir is not None:
            digest = hashlib.sha1()
            for name, value in sorted(self.draft.state_dict().items()):
                digest.update(name.encode())
                digest.update(value.detach().float().cpu().numpy().tobytes())
            self._record({"final_weights_sha1": digest.hexdigest()})

    def _unroll(self, batch: TokenBatch):
        if batch.aux_hidden is None:
            if self.feature_source is None:
                raise ConfuError("batch has no cached features and the module has no feature_source (online target)")
            batch = self.feature_source(batch)
        dtype = self.draft.fc.weight.dtype
        out = ttt_unroll(self.draft, batch.input_ids, batch.aux_hidden.to(dtype), segment_ids=batch.segment_ids,
                         position_ids=batch.position_ids, steps=self.ttt_steps)
        teacher = teacher_targets(batch.last_hidden.to(self.lm_head_weight.dtype), self.lm_head_weight, self.draft.t2d)
        return out, teacher

    def training_step(self, batch: TokenBatch, batch_idx: int) -> Tensor:
        out, teacher = self._unroll(batch)
        loss = ttt_loss(out, teacher, batch.loss_mask, self.step_weight)
        if not torch.isfinite(loss.loss):
            raise TrainingDiverged(
                f"loss became {loss.loss.item()} at step {self.global_step}; the last good checkpoint is intact. "
                "Lower optim.lr, raise optim.warmup_steps, or check the cache for non-finite features")
        self.train_acc.update(ttt_step_counts(out, teacher, batch.loss_mask))
        n = batch.input_ids.shape[0]
        self.log("train/loss", loss.loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/loss_k{k}": v for k, v in enumerate(loss.step_losses)}, batch_size=n)
        self.log("train/tokens", float(batch.num_tokens), reduce_fx="sum", batch_size=n)
        if (batch_idx + 1) % 10 == 0:
            values = self.train_acc.compute()
            self.log("train/acc_k0", values["acc"][0], prog_bar=True, batch_size=n)
            self.log("train/sim_tau", values["tau"], batch_size=n)
            self.train_acc.reset()
        return loss.loss

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        out, teacher = self._unroll(batch)
        loss = ttt_loss(out, teacher, batch.loss_mask, self.step_weight)
        self.val_acc.update(ttt_step_counts(out, teacher, batch.loss_mask))
        self.log("val/loss", loss.loss, batch_size=batch.input_ids.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_acc.compute()
        logs = {f"val/acc_k{i}": v for i, v in enumerate(values["acc"])}
        logs.update({f"val/cond_acc_k{i}": v for i, v in enumerate(values["cond_acc"])})
        logs["val/sim_tau_cond"] = values["tau_cond"]
        self.log_dict(logs, prog_bar=False)
        self.log("val/sim_tau", values["tau"], prog_bar=True)
        self.val_acc.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        optimizer, scheduler = build_optimizer([(self.draft.parameters(), 1.0)], lr=o.lr, weight_decay=o.weight_decay,
                                               betas=o.betas, warmup_steps=o.warmup_steps, total_steps=self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["confu_config"] = self.run_config
        checkpoint["confu_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("confu_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
