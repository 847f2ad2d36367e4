"""The benchmark scripts run end to end on the tiny random target and report what they claim to."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"


def _run(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> dict:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_verify_cost_reports_every_dtype_and_tree_size(tiny_target_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    report = _run("verify_cost.py", ["--target", str(tiny_target_dir), "--dtypes", "float32", "bfloat16",
                                     "--nodes", "1", "4", "--prefix", "16", "--repeats", "1"], monkeypatch, capsys)
    cost = report["forward_cost"]
    assert set(cost) == {"float32", "bfloat16"} and set(cost["float32"]) == {"1", "4"}
    assert cost["bfloat16"]["1"]["x_one_token"] == 1.0 and cost["float32"]["4"]["ms"] > 0


def test_ar_loop_matches_hf_generate(tiny_target_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    report = _run("ar_vs_hf.py", ["--target", str(tiny_target_dir), "--prompts", "3", "--max-new-tokens", "8"],
                  monkeypatch, capsys)
    assert report["prompts"] == 3 and report["identical_outputs"] == 3 and report["tokens"] > 0
