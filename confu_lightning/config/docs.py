"""Field documentation read from the schema's attribute docstrings, and the dotted-key inventory.

`schema.py` documents each field with a string literal right under it (litgpt style). Python
drops those strings at run time, so this module reads them back from the source with `ast`; the
same walk over the dataclasses lists every valid dotted key, which the loader uses to suggest the
closest key for a typo. Stdlib only.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import typing
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written under it (whitespace folded)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside `annotation` (`X`, `X | None`, `list[X]`), or None."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        found = dataclass_of(arg)
        if found is not None:
            return found
    return None


def is_list_of_dataclass(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list and dataclass_of(annotation) is not None


def is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def schema_fields(cls: type) -> dict[str, Any]:
    """Field name → resolved type annotation of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema rooted at `cls` (sections and leaves)."""
    keys = []
    for name, annotation in schema_fields(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = dataclass_of(annotation)
        if sub is not None and not is_list_of_dataclass(annotation):
            keys.extend(all_keys(sub, prefix=f"{key}."))
    return keys


def closest_key(key: str, cls: type) -> str | None:
    """The valid dotted key most similar to `key`, or None when nothing is close."""
    match = difflib.get_close_matches(key, all_keys(cls), n=1, cutoff=0.6)
    return match[0] if match else None
