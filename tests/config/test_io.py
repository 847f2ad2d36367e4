"""Config merge order, validation messages, documented fields, and the saved-YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from confu_lightning.config import schema
from confu_lightning.config.docs import dataclass_of, field_docs, schema_fields
from confu_lightning.config.io import flatten, load_config, render_yaml, save_config
from confu_lightning.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_file_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  max_steps: 7\n  ttt_steps: 3\ntarget:\n  aux_layers: [1, 2, 3]\n")
    cfg = load_config(path, ["train.max_steps=9", "data.sources=[{path: a.jsonl, limit: 5}]"])
    assert cfg.train.max_steps == 9  # override beats file
    assert cfg.train.ttt_steps == 3  # file beats default
    assert cfg.train.step_weight == 0.8  # default kept
    assert cfg.target.aux_layers == [1, 2, 3]
    assert cfg.data.sources == [schema.DataSourceConfig(path="a.jsonl", limit=5)]
    assert isinstance(cfg, schema.ExperimentConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.max_step=5"], "unknown config key `train.max_step` in command line; did you mean `train.max_steps`?"),
        (["trian.max_steps=5"], "did you mean `train"),
        (["data.sources=[{pth: a}]"], "`data.sources[0].pth` in command line; did you mean `data.sources[0].path`?"),
        (["train.max_steps=abc"], "`train.max_steps`"),
        (["train.max_steps=1.5"], "`train.max_steps`"),
        (["target.dtype=fp8"], "`target.dtype`"),
        (["draft.n_layers=0"], "`draft.n_layers` must be >= 1, got 0"),
        (["contemplate.top_k=9"], "`contemplate.top_k` must be in [1, contemplate.n_experts=8], got 9"),
        (["target.aux_layers=[1,2]"], "`target.aux_layers` must list exactly 3"),
        (["max_steps"], "must look like key=value"),
        (["train=3"], "`train` in command line must be a mapping"),
    ],
)
def test_bad_overrides_give_one_line_messages(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"`optim\.warmup_step` in .*exp\.yaml; did you mean `optim\.warmup_steps`"):
        load_config(_write(tmp_path, "optim:\n  warmup_step: 10\n"))
    with pytest.raises(ConfigError, match=r"`optim\.learning_rate` .*; valid keys here: lr, weight_decay"):
        load_config(_write(tmp_path, "optim:\n  learning_rate: 0.1\n"))


def _schema_classes(cls: type = schema.ExperimentConfig) -> set[type]:
    found = {cls}
    for annotation in schema_fields(cls).values():
        sub = dataclass_of(annotation)
        if sub is not None:
            found |= _schema_classes(sub)
    return found


def test_every_field_is_documented_and_frozen() -> None:
    classes = _schema_classes()
    assert len(classes) >= 11
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
        missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert missing == [], f"{cls.__name__} fields without a docstring: {missing}"


def test_saved_yaml_round_trips_with_docs(tmp_path: Path) -> None:
    cfg = load_config(None, ["target.name=tiny-random-llama", "eval.temperatures=[0.0,0.7]", "sweep.grid={a.b: [1, 2]}"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    text = path.read_text()
    assert "# Draft architecture." in text
    assert load_config(path) == cfg
    assert load_config(None, []) != cfg
    assert not list((tmp_path / "run").glob(".config.yaml.*"))  # temp file renamed away


def test_render_without_docs_and_flatten() -> None:
    cfg = load_config(None, [])
    assert "#" not in render_yaml(cfg, docs=False)
    flat = flatten(cfg)
    assert flat["train.max_steps"] == cfg.train.max_steps
    assert flat["target.name"] == "smollm2-135m"
    assert flat["optim.betas"] == [0.9, 0.95]
