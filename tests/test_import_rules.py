"""DESIGN.md §4 import direction, checked with an `ast` walk (imports inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "confu_lightning"
THIRD_PARTY_HEAVY = ("lightning", "pytorch_lightning", "mlflow", "omegaconf")
MODEL_LAYERS = ("nn", "target", "draft", "cache", "spec")


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(module: str, imports: set[str]) -> list[str]:
    """Rules of DESIGN.md §4 for one module (dotted name relative to the package)."""
    top = module.split(".")[0]
    found = []

    def uses(prefix: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for name in imports)

    if top in MODEL_LAYERS:
        found += [f"{module} imports {lib}" for lib in THIRD_PARTY_HEAVY if uses(lib)]
    if top == "draft" and uses("confu_lightning.target"):
        found.append(f"{module} imports confu_lightning.target (drafts receive tensors)")
    if top == "spec":
        found += [f"{module} imports confu_lightning.{p}" for p in ("draft", "target") if uses(f"confu_lightning.{p}")]
    if uses("mlflow") and module != "tracking":
        found.append(f"{module} imports mlflow (only tracking.py may)")
    if uses("omegaconf") and module != "config.io":
        found.append(f"{module} imports omegaconf (only config/io.py may)")
    if module == "config.schema":
        allowed = {"confu_lightning.errors", "confu_lightning.errors.ConfigError"}
        found += [f"config.schema imports {n}" for n in imports
                  if n.split(".")[0] not in sys.stdlib_module_names and n not in allowed]
    for high in ("run", "sweep", "cli"):
        allowed_importers = {"run": ("sweep", "cli"), "sweep": ("sweep", "cli"), "cli": ("__main__",)}[high]
        if uses(f"confu_lightning.{high}") and top not in allowed_importers and module not in allowed_importers:
            found.append(f"{module} imports confu_lightning.{high}")
    return found


def package_modules() -> dict[str, str]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
        out[".".join(parts)] = path.read_text()
    return out


def test_package_follows_import_rules() -> None:
    problems = [v for module, src in package_modules().items() for v in violations(module, imported_modules(src))]
    assert problems == []


def test_checker_catches_violations() -> None:
    assert violations("draft.eagle3", imported_modules("from confu_lightning.target import wrapper"))
    assert violations("target.wrapper", imported_modules("def f():\n    import lightning\n"))
    assert violations("spec.engine", imported_modules("import confu_lightning.draft.eagle3"))
    assert violations("eval.bench", imported_modules("import mlflow"))
    assert violations("run", imported_modules("from omegaconf import OmegaConf"))
    assert violations("config.schema", imported_modules("import torch"))
    assert violations("train.ttt", imported_modules("from confu_lightning.run import run_train"))
    assert not violations("tracking", imported_modules("import mlflow"))
    assert not violations("cli", imported_modules("from confu_lightning.run import run_target"))
