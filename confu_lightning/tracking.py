"""MLflow tracking: the only module that imports mlflow.

Every user-facing step records one MLflow run: params = the flattened resolved config, tags = git
sha, step name, experiment file, target; metrics and artifacts (`config.yaml`, result JSON,
checkpoints) as the step produces them. Training uses Lightning's `MLFlowLogger` (built here);
the other steps use `step_run`, a context manager over an `MlflowClient` run. The default store
is SQLite (`sqlite:///mlflow.db`): current MLflow refuses the old `./mlruns` file store.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confu_lightning.config.io import flatten
from confu_lightning.config.schema import ExperimentConfig

MAX_PARAM_LENGTH = 6000
"""MLflow rejects longer param values; ours are truncated with a marker."""


def git_sha(directory: str | Path = ".") -> str:
    """The current commit of the repository holding `directory` (`unknown` outside git)."""
    try:
        out = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """Flattened config as MLflow params (strings, each within MLflow's length limit)."""
    params = {}
    for key, value in flatten(cfg).items():
        text = "None" if value is None else str(value)
        params[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return params


def run_tags(cfg: ExperimentConfig, step: str, experiment_file: str | None, extra: Mapping[str, str] | None = None):
    tags = {"step": step, "git_sha": git_sha(), "target": cfg.target.name, "draft_kind": cfg.draft.kind,
            "experiment_file": experiment_file or "none"}
    tags.update(extra or {})
    return tags


def make_lightning_logger(cfg: ExperimentConfig, step: str, experiment_file: str | None, run_name: str | None = None):
    """A Lightning `MLFlowLogger` for a training run, with the run's tags; params are logged by the caller."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=run_name or cfg.tracking.run_name or step,
        tracking_uri=cfg.tracking.uri,
        tags=run_tags(cfg, step, experiment_file),
    )


@dataclass
class StepRun:
    """A handle to log into one MLflow run from a non-training step."""

    client: Any
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            self.metrics.update({m.key: m.value for m in batch})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextlib.contextmanager
def step_run(
    cfg: ExperimentConfig, step: str, experiment_file: str | None = None, extra_tags: Mapping[str, str] | None = None
) -> Iterator[StepRun | None]:
    """Open an MLflow run for `step` (None when `tracking.enabled` is false); FAILED on an exception."""
    if not cfg.tracking.enabled:
        yield None
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or step,
                            tags=run_tags(cfg, step, experiment_file, extra_tags))
    params = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    handle = StepRun(client, run.info.run_id)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
