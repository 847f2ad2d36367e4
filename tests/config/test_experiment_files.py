"""Every shipped experiment and sweep YAML loads onto the schema, and says what it is for."""

from __future__ import annotations

from pathlib import Path

import pytest

from confu_lightning.config.io import load_config

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted([*ROOT.glob("experiments/**/*.yaml"), *ROOT.glob("sweeps/**/*.yaml")])


def test_there_are_experiment_files() -> None:
    assert any("experiments" in p.parts for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_file_loads_and_starts_with_a_comment(path: Path) -> None:
    load_config(path)
    assert path.read_text().startswith("#"), f"{path} must open with a comment: what it reproduces, the command"
