"""Shared fixtures: offline hub, an isolated CONFU_HOME per test, and the tiny random Llama target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_confu_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own CONFU_HOME so nothing is written to the user's cache."""
    home = tmp_path / "confu_home"
    monkeypatch.setenv("CONFU_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama checkpoint + ChatML tokenizer (8 layers, hidden 64, vocab 320)."""
    from confu_lightning.target.tiny import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-random-llama")
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store created once (creating the tables takes seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(_migrated_mlflow_db: Path, tmp_path: Path) -> str:
    """A fresh, already-migrated MLflow SQLite store for one test."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, path)
    return f"sqlite:///{path}"
