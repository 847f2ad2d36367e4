"""`confu train` on the tiny target: exact resume after a crash, refusals, online mode, 2-process launches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from confu_lightning.config.io import load_config
from confu_lightning.errors import CacheError, ConfigError
from confu_lightning.run import run_cache, run_prepare, run_train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "eagle3" / "tiny_cpu.yaml"


def _overrides(target: Path, data: Path, *extra: str) -> list[str]:
    return [f"target.name={target}", f"data.output_dir={data / 'data'}", f"cache.dir={data / 'cache'}",
            "data.sources=[{path: builtin, limit: 16}]", "tracking.enabled=false", *extra]


@pytest.fixture(scope="module")
def prepared(tiny_target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("train_data")
    cfg = load_config(EXPERIMENT, _overrides(tiny_target_dir, data))
    run_prepare(cfg, show_bars=False)
    run_cache(cfg, show_bars=False)
    return data


def _cfg(tiny_target_dir: Path, data: Path, out: Path, *extra: str):
    return load_config(EXPERIMENT, _overrides(tiny_target_dir, data, f"train.output_dir={out}", "train.max_steps=8",
                                              "train.ckpt_every_steps=3", "train.val_every_steps=4", *extra))


def _draft_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("draft.")}


class _Crash(Exception):
    pass


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.step:
            raise _Crash


def test_killed_run_resumes_to_the_same_weights(tiny_target_dir: Path, prepared: Path, tmp_path: Path) -> None:
    full = run_train(_cfg(tiny_target_dir, prepared, tmp_path / "full"), show_bars=False)
    assert full["global_step"] == 8 and "val/sim_tau" in full and Path(full["best_checkpoint"]).exists()
    crashed = _cfg(tiny_target_dir, prepared, tmp_path / "crashed")
    with pytest.raises(_Crash):
        run_train(crashed, show_bars=False, callbacks=[_CrashAt(5)])  # last.ckpt holds step 3
    assert torch.load(tmp_path / "crashed/checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    resumed = run_train(crashed, show_bars=False)
    assert resumed["global_step"] == 8
    a = _draft_weights(tmp_path / "full/checkpoints/last.ckpt")
    b = _draft_weights(tmp_path / "crashed/checkpoints/last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "config.yaml").exists()


def test_resume_with_changed_config_is_refused_unless_forced(tiny_target_dir: Path, prepared: Path,
                                                              tmp_path: Path) -> None:
    run_train(_cfg(tiny_target_dir, prepared, tmp_path, "train.max_steps=3"), show_bars=False)
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.003 -> 0\.001"):
        run_train(_cfg(tiny_target_dir, prepared, tmp_path, "train.max_steps=4", "optim.lr=0.001"), show_bars=False)
    forced = run_train(_cfg(tiny_target_dir, prepared, tmp_path, "train.max_steps=4", "optim.lr=0.001",
                            "train.force_resume=true"), show_bars=False)
    assert forced["global_step"] == 4


def test_cache_of_other_layers_is_refused(tiny_target_dir: Path, prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="layers"):
        run_train(_cfg(tiny_target_dir, prepared, tmp_path, "target.aux_layers=[1,3,6]"), show_bars=False)


def test_online_mode_trains_with_the_target_in_the_loop(tiny_target_dir: Path, prepared: Path,
                                                        tmp_path: Path) -> None:
    result = run_train(_cfg(tiny_target_dir, prepared, tmp_path, "train.mode=online", "train.max_steps=4"),
                       show_bars=False)
    assert result["global_step"] == 4 and torch.isfinite(torch.tensor(result["train/loss"]))


def _launch(kind: str, tiny_target_dir: Path, prepared: Path, out: Path) -> None:
    args = ["train", "--config", str(EXPERIMENT), *_overrides(tiny_target_dir, prepared),
            f"train.output_dir={out}", "train.max_steps=4", "train.devices=2", "train.strategy=ddp",
            "train.accelerator=cpu", "train.record_data_order=true", "train.batch_tokens=64"]  # one sample a batch: 4 steps stay in epoch 0
    script = str(ROOT / "experiments" / "launch.py")
    if kind == "fabric":
        cmd = [str(Path(sys.executable).parent / "fabric"), "run", "--accelerator", "cpu", "--devices", "2", script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFU_HOME": str(out / "home")}
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["fabric", "torchrun"])
def test_two_process_launch_shards_data_and_agrees(kind: str, tiny_target_dir: Path, prepared: Path,
                                                   tmp_path: Path) -> None:
    if kind == "fabric" and not (Path(sys.executable).parent / "fabric").exists():
        pytest.skip("the `fabric` command is not installed in this environment")
    _launch(kind, tiny_target_dir, prepared, tmp_path)
    seen, checksums = [], []
    for rank in range(2):
        lines = [json.loads(x) for x in (tmp_path / f"data_order.rank{rank}.jsonl").read_text().splitlines()]
        seen.append({s for x in lines if "samples" in x for s in x["samples"]})
        checksums.append(next(x["final_weights_sha1"] for x in lines if "final_weights_sha1" in x))
        assert sum("samples" in x for x in lines) == 4
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # disjoint data
    assert checksums[0] == checksums[1]  # identical weights at the end
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


def test_export_formats_reload_to_the_trained_draft(tiny_target_dir: Path, prepared: Path, tmp_path: Path) -> None:
    from confu_lightning.draft.export import load_draft, load_exported
    from confu_lightning.run import run_export

    trained = run_train(_cfg(tiny_target_dir, prepared, tmp_path / "train", "train.max_steps=4"), show_bars=False)
    reference = load_draft(trained["draft_dir"])
    ids = torch.randint(0, 320, (1, 6))
    feature = reference.fuse(torch.randn(1, 6, 3 * 64))
    pos = torch.arange(6)[None]
    expected = reference(ids, feature, pos).logits
    for fmt, source in (("eagle", None), ("speculators", None), ("native", str(tmp_path / "train/checkpoints/last.ckpt"))):
        overrides = [f"export.format={fmt}", f"export.output_dir={tmp_path / fmt}", "export.dtype=float32"]
        if source:
            overrides.append(f"export.source={source}")
        cfg = _cfg(tiny_target_dir, prepared, tmp_path / "train", "train.max_steps=4", *overrides)
        result = run_export(cfg)
        loaded = load_exported(result["output_dir"], embedding=reference.embed_tokens.weight)
        assert torch.equal(loaded(ids, feature, pos).logits, expected), fmt
        assert torch.equal(loaded.d2t, reference.d2t)


def test_init_from_a_trained_draft(tiny_target_dir: Path, prepared: Path, tmp_path: Path) -> None:
    from confu_lightning.draft.export import load_draft
    from confu_lightning.run import _offline_parts, build_eagle3

    trained = run_train(_cfg(tiny_target_dir, prepared, tmp_path / "a", "train.max_steps=2"), show_bars=False)
    cfg = _cfg(tiny_target_dir, prepared, tmp_path / "b", f"draft.init_from={trained['draft_dir']}")
    vocab, heads, layers, hf_config, _, _ = _offline_parts(cfg)
    draft = build_eagle3(cfg, vocab, heads, layers, hf_config)
    saved = load_draft(trained["draft_dir"], embedding=heads.embedding_weight)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), saved.state_dict().values()))


def test_eval_against_ar_is_lossless_and_writes_results(tiny_target_dir: Path, prepared: Path, tmp_path: Path,
                                                        mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from confu_lightning.errors import ConfuError
    from confu_lightning.run import run_eval

    run_train(_cfg(tiny_target_dir, prepared, tmp_path / "train", "train.max_steps=2"), show_bars=False)
    cfg = _cfg(tiny_target_dir, prepared, tmp_path / "train", "train.max_steps=2", f"eval.output_dir={tmp_path / 'eval'}",
               "eval.max_prompts=4", "eval.max_new_tokens=12", "eval.temperatures=[0.0,1.0]", "eval.depth=3",
               "eval.total_tokens=8", "tracking.enabled=true", f"tracking.uri={mlflow_uri}",
               "eval.methods=[ar,eagle3,again]", f"eval.drafts={{again: {tmp_path / 'train' / 'draft'}}}")
    result = run_eval(cfg, show_bars=False)
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    overall = {(r["method"], r["temperature"]): r for r in rows if r["category"] == "all"}
    assert set(overall) == {(m, t) for m in ("ar", "eagle3", "again") for t in (0.0, 1.0)}
    same = ("tau", "n_tokens", "accept_rate_by_position", "identical_to_ar")  # one draft under two names
    assert [overall[("again", 0.0)][k] for k in same] == [overall[("eagle3", 0.0)][k] for k in same]
    assert overall[("again", 0.0)]["identical_to_ar"] == 1.0
    assert overall[("ar", 0.0)]["tau"] == 1.0 and overall[("eagle3", 0.0)]["tau"] >= 1.0
    assert overall[("eagle3", 0.0)]["speedup"] > 0 and len(overall[("eagle3", 0.0)]["accept_rate_by_position"]) == 3
    requests = [json.loads(x) for x in (tmp_path / "eval" / "requests.jsonl").read_text().splitlines()]
    greedy = {(r["method"], r["prompt_id"]): r["answers"] for r in requests if r["temperature"] == 0.0}
    assert all(greedy[("eagle3", pid)] == answers for (m, pid), answers in greedy.items() if m == "ar")  # lossless
    assert (tmp_path / "eval" / "acceptance_histogram.png").exists()
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(result["mlflow_run_id"])
    assert "eval/tau_eagle3_T0.0" in run.data.metrics
    with pytest.raises(ConfuError, match="unknown eval.methods"):
        run_eval(load_config(EXPERIMENT, _overrides(tiny_target_dir, prepared, "eval.methods=[ar,medusa]")))
