"""The data pipeline end to end on the tiny target: prepare → cache → DataModule → a training loop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from confu_lightning.cache.reader import open_cache
from confu_lightning.config.io import load_config
from confu_lightning.draft.vocab import load_vocab
from confu_lightning.errors import CacheError, DataError
from confu_lightning.lit.datamodules import HiddenStateCacheDataModule
from confu_lightning.run import expected_identity, run_cache, run_prepare, target_identity
from confu_lightning.target.wrapper import load_heads, load_target


def _cfg(tiny_target_dir: Path, tmp_path: Path, *extra: str):
    return load_config("experiments/debug/tiny_cpu.yaml", [
        f"target.name={tiny_target_dir}", f"data.output_dir={tmp_path / 'data'}", f"cache.dir={tmp_path / 'cache'}",
        "data.sources=[{path: builtin, limit: 12}]", "data.gen_batch_size=6", "data.gen_max_new_tokens=8",
        "cache.shard_tokens=600", "cache.batch_size=4", "tracking.enabled=false", *extra,
    ])


@pytest.fixture(scope="module")
def pipeline(tiny_target_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = _cfg(tiny_target_dir, tmp)
    prepared = run_prepare(cfg, show_bars=False)
    cached = run_cache(cfg, show_bars=False)
    return cfg, prepared, cached


def test_prepare_and_cache_outputs(pipeline) -> None:
    cfg, prepared, cached = pipeline
    assert prepared["loaded"] == 12 and prepared["written"] + sum(prepared["skipped"].values()) >= 12
    assert (Path(cfg.data.output_dir) / "config.yaml").exists()
    cache_dir = Path(cfg.cache.dir)
    assert cached["samples"] + sum(cached["skipped"].values()) == prepared["written"]
    assert cached["samples"] >= 6 and cached["shards"] > 1
    assert cached["bytes_per_token"] == pytest.approx((3 * 64 + 64) * 4 + 5, rel=0.01)  # float32 in tiny_cpu.yaml
    vocab = load_vocab(cache_dir / "draft_vocab.safetensors", target_vocab_size=320)
    assert vocab.draft_size == 64
    heads = load_heads(cache_dir / "target_heads.safetensors")
    assert heads.lm_head_weight.shape == (320, 64)
    assert (cache_dir / "config.yaml").exists()


def test_cached_features_equal_a_fresh_target_forward(pipeline) -> None:
    cfg, _, _ = pipeline
    target = load_target(cfg.target)
    assert expected_identity(cfg)[0] == target_identity(target, cfg)
    cache = open_cache(cfg.cache.dir, target_identity(target, cfg))
    sample = cache[0]
    out = target(sample.input_ids[None])
    torch.testing.assert_close(sample.aux_hidden, out.aux_hidden[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample.last_hidden, out.last_hidden[0], rtol=1e-5, atol=1e-5)
    assert sample.loss_mask.any() and not sample.loss_mask.all()


def test_reruns_resume_without_work(pipeline) -> None:
    cfg, prepared, cached = pipeline
    again = run_prepare(cfg, show_bars=False)
    assert again["written"] == 0 and again["already_done"] == prepared["written"]
    assert run_cache(cfg, show_bars=False)["samples"] == cached["samples"]


def test_cache_of_other_layers_or_target_is_refused(pipeline, tiny_target_dir: Path) -> None:
    cfg, _, _ = pipeline
    other = _cfg(tiny_target_dir, Path(cfg.data.output_dir).parent, "target.aux_layers=[1,2,3]")
    with pytest.raises(CacheError, match=r"layers \[1, 2, 3\] vs \[2, 4, 5\]|layers \[2, 4, 5\] vs \[1, 2, 3\]"):
        run_cache(other, show_bars=False)
    with pytest.raises(DataError, match="prepared with other settings"):
        run_prepare(_cfg(tiny_target_dir, Path(cfg.data.output_dir).parent, "data.gen_max_new_tokens=9"),
                     show_bars=False)


def test_cache_without_prepare_is_a_clear_error(tiny_target_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `confu prepare`"):
        run_cache(_cfg(tiny_target_dir, tmp_path), show_bars=False)


class _FeatureRegressor(L.LightningModule):
    """Predicts the post-norm state from the fused aux features: the cache feeds a real loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 64, 64)

    def training_step(self, batch, _: int) -> torch.Tensor:
        keep = batch.attention_mask
        loss = torch.nn.functional.mse_loss(self.fc(batch.aux_hidden.float())[keep], batch.last_hidden.float()[keep])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_cache_datamodule_feeds_a_trainer(pipeline, tmp_path: Path) -> None:
    cfg, _, _ = pipeline
    dm = HiddenStateCacheDataModule(cfg.cache.dir, batch_tokens=256, val_fraction=0.2, seed=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=25, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    model = _FeatureRegressor()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 25
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert len(dm.val_idx) >= 1 and not set(dm.val_idx) & set(dm.train_idx)


def test_steps_are_recorded_in_mlflow(tiny_target_dir: Path, tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tiny_target_dir, tmp_path, "tracking.enabled=true", f"tracking.uri={mlflow_uri}",
               "data.sources=[{path: builtin, limit: 3}]")
    prepared = run_prepare(cfg, show_bars=False, experiment_file="experiments/debug/tiny_cpu.yaml")
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(prepared["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["target.name"] == str(tiny_target_dir)
    assert run.data.params["data.gen_max_new_tokens"] == "8"
    assert run.data.metrics["prepare/loaded"] == 3
    assert run.data.tags["step"] == "prepare" and run.data.tags["experiment_file"].endswith("tiny_cpu.yaml")
