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
