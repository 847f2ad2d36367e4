"""Evaluation prompts: the packaged built-in set, SpecBench / MT-bench question files and ShareGPT files.

Evaluation replays the user turns of each prompt through the target and the draft, so every source
becomes a list of `EvalPrompt` (an id, a category and the user turns). The question-file schema is
the one of MT-bench and SpecBench (`data/spec_bench/question.jsonl`, Xia et al. 2024, §3): one JSON
object a line with `question_id`, `category` and `turns`, the user messages in order; `reference`
and other keys are ignored. `builtin` is a packaged file in that schema whose prompts are disjoint
from the training prompts; `spec_bench` downloads SpecBench's 480 questions once into
`confu_home()/eval/`. A structurally malformed line stops loading with a `DataError` naming the file
and line; a record with an empty or non-string turn is a bad prompt, which is skipped and reported
as `(location, reason)` so that the rest of a long evaluation still runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confu_lightning.config.schema import DataSourceConfig
from confu_lightning.data.conversations import NOTES, SkipCounts, load_conversations
from confu_lightning.errors import DataError

BUILTIN = "builtin"
BUILTIN_FILE = "builtin_eval_prompts.jsonl"
SPEC_BENCH = "spec_bench"
SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
"""SpecBench's question file (480 questions, ids 81-560) on GitHub."""
SPEC_BENCH_CACHE = "spec_bench_question.jsonl"
SHAREGPT_CATEGORY = "sharegpt"
DOWNLOAD_TIMEOUT_S = 30

Problem = tuple[str, str]
"""A skipped prompt: `(location, reason)`, e.g. `("question.jsonl:12", "turn 2 is empty")`."""

_BLANK = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]*")  # whitespace and zero-width characters
_log = logging.getLogger(__name__)


@dataclass
class EvalPrompt:
    """One evaluation prompt: a stable id, a category and the user turns replayed in order."""

    id: str
    category: str
    turns: list[str]


class _BadPrompt(Exception):
    """Internal: a well-formed record whose turns cannot be replayed."""


def builtin_eval_prompts_path() -> Path:
    """Path of the packaged built-in evaluation set (SpecBench schema, ids `builtin-eval-NNNN`)."""
    return Path(__file__).with_name(BUILTIN_FILE)


def spec_bench_cache_path() -> Path:
    """Where `spec_bench` is cached: `confu_home()/eval/spec_bench_question.jsonl`."""
    from confu_lightning.target.registry import confu_home

    return confu_home() / "eval" / SPEC_BENCH_CACHE


def download_spec_bench(path: Path | None = None, url: str = SPEC_BENCH_URL) -> Path:
    """Download SpecBench's `question.jsonl` to `path` (default: the cache) unless it is already there.

    The file is written to a temporary name and renamed, so an interrupted download leaves no cache.

    Raises:
        DataError: The download failed (offline, HTTP error, timeout).
    """
    path = path if path is not None else spec_bench_cache_path()
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"could not download SpecBench question.jsonl from {url} ({reason}); "
                        "pass a local path to question.jsonl") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)
    return path


def _question_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) for each non-blank line; a malformed line raises `DataError`."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON line ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _question_prompt(record: dict[str, Any], where: str) -> EvalPrompt:
    """Turn one question record into an `EvalPrompt`; raises `DataError` (malformed) or `_BadPrompt`."""
    qid, category, turns = record.get("question_id"), record.get("category", ""), record.get("turns")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or not str(qid).strip():
        raise DataError(f"{where}: `question_id` must be a non-empty string or an integer, got {qid!r}")
    if not isinstance(category, str):
        raise DataError(f"{where}: `category` must be a string, got {type(category).__name__}")
    if not isinstance(turns, list):
        raise DataError(f"{where}: `turns` must be a list of strings, got {type(turns).__name__}")
    if not turns:
        raise _BadPrompt("no turns")
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, str):
            raise _BadPrompt(f"turn {index} is not a string ({type(turn).__name__})")
        if _BLANK.fullmatch(turn):
            raise _BadPrompt(f"turn {index} is empty")
    return EvalPrompt(id=str(qid), category=category, turns=list(turns))


def _read_question_file(path: Path, limit: int | None, problems: list[Problem]) -> list[EvalPrompt]:
    """Prompts of a SpecBench / MT-bench question file, skipping (and reporting) bad prompts."""
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    for number, record in _question_lines(path):
        where = f"{path}:{number}"
        try:
            prompt = _question_prompt(record, where)
        except _BadPrompt as bad:
            problems.append((where, str(bad)))
            continue
        if prompt.id in seen:
            problems.append((where, f"duplicate question_id {prompt.id!r}"))
            continue
        seen.add(prompt.id)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    return prompts


def _skip_problems(counts: SkipCounts, label: str) -> list[Problem]:
    """Skip reasons of the conversation loader as problems (its example locations, then the remainder)."""
    problems: list[Problem] = []
    for reason, count in sorted(counts.counts.items()):
        if reason in NOTES:
            continue
        examples = counts.examples.get(reason, [])
        problems += [(where, reason) for where in examples]
        if count > len(examples):
            problems.append((f"{label} ({count - len(examples)} more)", reason))
    return problems


def _read_conversation_file(path: Path, limit: int | None, problems: list[Problem]) -> list[EvalPrompt]:
    """Prompts of a ShareGPT (or messages) JSON / JSONL file: each conversation's user turns."""
    counts = SkipCounts()
    conversations = load_conversations([DataSourceConfig(path=str(path), limit=limit)], counts)
    problems += _skip_problems(counts, str(path))
    return [EvalPrompt(id=c.id, category=SHAREGPT_CATEGORY,
                       turns=[m["content"] for m in c.messages if m["role"] == "user"])
            for c in conversations]


def _is_question_file(path: Path) -> bool:
    """Whether a `.jsonl` file uses the question schema (its first record has `turns`).

    A malformed first line also counts, so that the question reader reports it with its line number.
    """
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        return True
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return True
    return not isinstance(record, dict) or "turns" in record or not ({"conversations", "messages"} & record.keys())


def _resolve(source: str) -> Path:
    """The local file behind `source` (`builtin`, `spec_bench` or a path)."""
    if source == BUILTIN:
        return builtin_eval_prompts_path()
    if source == SPEC_BENCH:
        return download_spec_bench()
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"evaluation prompt source {source!r} not found: not `builtin`, not `spec_bench` "
                        "and not a local .jsonl / .json file")
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        raise DataError(f"evaluation prompt source {source!r} must be a .jsonl or .json file")
    return path


def load_eval_prompts(source: str, limit: int | None = None,
                      problems: list[Problem] | None = None) -> list[EvalPrompt]:
    """Load evaluation prompts from the built-in set, SpecBench, or a local file.

    Args:
        source: `builtin` (the packaged set), `spec_bench` (downloaded once, then cached), a local
            `.jsonl` question file (`question_id`, `category`, `turns`: SpecBench / MT-bench / EAGLE
            schema), or a ShareGPT / messages `.json` / `.jsonl` file (its user turns, category
            `sharegpt`).
        limit: Keep at most this many prompts, in file order (None: all).
        problems: Receives one `(location, reason)` per skipped prompt (empty or non-string turn,
            duplicate id, unusable conversation). When None, skips are logged as warnings instead.

    Returns:
        The prompts, in file order.

    Raises:
        DataError: The source is missing or cannot be downloaded, a line is malformed (the message
            names the file and 1-based line), `limit` is not positive, or no prompt survives.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"evaluation prompt limit must be a positive integer or None, got {limit!r}")
    found: list[Problem] = []
    path = _resolve(source)
    if path.suffix == ".jsonl" and _is_question_file(path):
        prompts = _read_question_file(path, limit, found)
    else:
        prompts = _read_conversation_file(path, limit, found)
    if problems is not None:
        problems.extend(found)
    else:
        for where, reason in found:
            _log.warning("skipped evaluation prompt at %s: %s", where, reason)
    if not prompts:
        raise DataError(f"no usable evaluation prompts in {source}; {len(found)} skipped"
                        + (f" (first: {found[0][0]}: {found[0][1]})" if found else ""))
    return prompts
