"""Load, validate, render and save experiment configs; the only module that imports OmegaConf.

A config is the schema defaults (`schema.py`), then one optional YAML file, then `key=value`
overrides, merged by OmegaConf and turned back into frozen dataclasses (which run their
`__post_init__` validation). Every failure becomes a one-line `ConfigError` that names the key,
the file, and for typos the closest valid key.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from confu_lightning.config.docs import (
    closest_key,
    dataclass_of,
    field_docs,
    is_list_of_dataclass,
    is_mapping,
    schema_fields,
)
from confu_lightning.config.schema import ExperimentConfig
from confu_lightning.errors import ConfigError

CONFIG_FILENAME = "config.yaml"
"""Name of the resolved config saved beside every output."""


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Merge schema defaults, an optional YAML file and `key=value` overrides into a typed config.

    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type or invalid value.
    """
    layers: list[DictConfig] = [OmegaConf.structured(ExperimentConfig)]
    if path is not None:
        layers.append(_load_yaml(Path(path)))
    if overrides:
        layers.append(_parse_overrides(overrides))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        raise _type_error(err, path) from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, not a list or scalar")
    check_keys(OmegaConf.to_container(cfg, resolve=False), source=str(path))
    return cfg


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=100")
    try:
        cfg = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {_first_line(err)}") from None
    check_keys(OmegaConf.to_container(cfg, resolve=False), source="command line")
    return cfg


def check_keys(node: Any, cls: type = ExperimentConfig, *, source: str) -> None:
    """Reject any key of the nested mapping `node` that the schema rooted at `cls` lacks."""

    def walk(node: Any, sub: type, prefix: str) -> None:
        if not isinstance(node, Mapping):
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"`{where}` in {source} must be a mapping of keys, got {node!r}")
        fields = schema_fields(sub)
        for name, value in node.items():
            key = f"{prefix}{name}"
            if name not in fields:
                raise ConfigError(f"unknown config key `{key}` in {source}{_suggest(key, str(name), sub, prefix)}")
            annotation = fields[name]
            inner = dataclass_of(annotation)
            if is_mapping(annotation) or inner is None or value is None:
                continue
            if not is_list_of_dataclass(annotation):
                walk(value, inner, f"{key}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, inner, f"{key}[{i}].")

    def _suggest(key: str, name: str, sub: type, prefix: str) -> str:
        if "[" in prefix:  # inside a list item: compare with that item's own fields
            hint = closest_key(name, sub)
            hint = hint and f"{prefix}{hint}"
        else:
            hint = closest_key(key, cls)
        return f"; did you mean `{hint}`?" if hint else f"; valid keys here: {', '.join(schema_fields(sub))}"

    walk(node, cls, "")


def _type_error(err: OmegaConfBaseException, path: str | os.PathLike | None) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    where = f" (from {path} or the command line)" if path else ""
    return ConfigError(f"bad value for config key `{key}`{where}: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = getattr(err, "msg", None) or str(err)
    return str(text).strip().splitlines()[0]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted-key → leaf value (lists kept whole), e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return out


def render_yaml(cfg: Any, *, docs: bool = True, width: int = 100) -> str:
    """The config as YAML; with `docs`, each key is preceded by its field documentation as comments."""
    lines: list[str] = []
    _emit(cfg, 0, lines, docs, width)
    return "\n".join(lines) + "\n"


def _emit(obj: Any, indent: int, lines: list[str], docs: bool, width: int) -> None:
    pad = " " * indent
    notes = field_docs(type(obj)) if docs else {}
    annotations = schema_fields(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in notes:
            lines.extend(f"{pad}# {line}" for line in textwrap.wrap(notes[f.name], width - indent - 2, break_on_hyphens=False))
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, indent + 2, lines, docs, width)
            continue
        if is_list_of_dataclass(annotations[f.name]):
            value = [dataclasses.asdict(item) for item in value]
        flow = isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value)
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=flow or False, sort_keys=False, width=10_000)
        if flow:  # `{key: [1, 2]}` → `key: [1, 2]`
            dumped = dumped.strip()[1:-1]
        lines.extend(f"{pad}{line}" for line in dumped.rstrip("\n").splitlines())


def save_config(cfg: Any, directory: str | os.PathLike) -> Path:
    """Write the resolved config (with field docs) atomically as `<directory>/config.yaml`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFIG_FILENAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CONFIG_FILENAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(render_yaml(cfg))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the config is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
