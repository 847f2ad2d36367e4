"""The `confu` command: fast help, one-line errors with exit code 2, subcommands end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from confu_lightning.cli import main
from confu_lightning.config.io import load_config


def test_help_does_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "from confu_lightning.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'lightning', 'mlflow', 'omegaconf') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "config" in out and "target" in out


def test_module_entry_point_reports_config_errors_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "confu_lightning", "config", "train.max_step=3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "confu config: error: unknown config key `train.max_step` in command line; did you mean `train.max_steps`?"
    )


def test_config_prints_loadable_documented_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["config", "--config", "experiments/debug/tiny_cpu.yaml", "train.max_steps=11"]) == 0
    text = capsys.readouterr().out
    assert "# Optimizer steps." in text
    saved = tmp_path / "resolved.yaml"
    saved.write_text(text)
    cfg = load_config(saved)
    assert cfg.train.max_steps == 11 and cfg.target.name == "tiny-random-llama"


def test_target_summary_on_tiny_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["target", "target.name=tiny-random-llama", "target.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert "layers" in out and " 8\n" in out
    assert "hidden size" in out and " 64\n" in out
    assert "[2, 4, 5]" in out
    assert "reply (" in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("target.name=smollm3", "smollm2-135m"),  # unknown built-in: suggests the closest
        ("target.name=/nonexistent/model", "/nonexistent/model"),
        ("target.aux_layers=[2,4,40]", "40"),  # with the tiny target below
    ],
)
def test_target_bad_input_exits_2_with_one_line(override: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["target", "target.max_new_tokens=2", override]
    if override.startswith("target.aux_layers"):
        args.append("target.name=tiny-random-llama")
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[confu]")]
    assert len(err) == 1, err  # one error line besides our progress lines; no traceback
    assert err[0].startswith("confu target: error:") and expected in err[0]
