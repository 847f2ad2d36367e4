"""Conversation records: ShareGPT / UltraChat / messages adapters, sources, and skip accounting.

Implements the *Conversation* contract of DESIGN.md §5. A source (the packaged built-in prompt set,
a local JSON / JSONL file or a hub dataset) yields raw records; an adapter, chosen per record,
turns each into `{"id", "messages": [{"role", "content"}]}` or skips it with a counted reason,
never an exception. Normalisation makes records usable by any chat template: a leading system turn
is kept, assistant turns before the first user turn are dropped, and consecutive turns of one role
are merged with a blank line (ShareGPT crawls often split one message or lose the reply between
two). Prompt-only conversations are valid, because regeneration answers them (EAGLE-3 trains on
ShareGPT / UltraChat with target-regenerated responses); `require_assistant` filters afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from confu_lightning.config.schema import DataSourceConfig
from confu_lightning.errors import ConfigError, DataError

ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant",
}
"""Role names seen in ShareGPT / messages datasets (lower-cased) → Conversation roles."""

NOTES = frozenset({"leading_assistant_dropped", "merged_same_role", "later_turns_dropped"})
"""Counted reasons that adjust a record but keep it (every other reason skips the record)."""

FORMATS = ("auto", "sharegpt", "ultrachat", "messages")
BUILTIN = "builtin"
BUILTIN_FILE = "builtin_prompts.jsonl"
_BLANK = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]*")  # whitespace and zero-width characters
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Conversation:
    """One conversation: a stable id and its turns, each `{"role": ..., "content": ...}`."""

    id: str
    messages: list[dict[str, str]]

    @property
    def has_assistant(self) -> bool:
        """Whether any turn is an assistant turn."""
        return any(m["role"] == "assistant" for m in self.messages)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of one JSONL line: `{"id": ..., "messages": [...]}`."""
        return {"id": self.id, "messages": [dict(m) for m in self.messages]}

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> Conversation:
        """Rebuild from `to_json()` output (or its JSON text); raises `DataError` if it is not one."""
        try:
            data = json.loads(data) if isinstance(data, str) else data
            messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
            if not all(isinstance(v, str) for m in messages for v in m.values()):
                raise TypeError("role and content must be strings")
            return cls(id=str(data["id"]), messages=messages)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a Conversation record ({type(exc).__name__}: {exc}): {str(data)[:80]!r}") from exc


@dataclass
class SkipCounts:
    """Counted reasons why records were skipped or adjusted, with a few example locations each."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: ClassVar[int] = 3

    def add(self, reason: str, where: str | None = None) -> None:
        """Count one occurrence of `reason`, remembering `where` (file#record, file:line) for the summary."""
        self.counts[reason] += 1
        if where is not None and len(seen := self.examples.setdefault(reason, [])) < self.max_examples:
            seen.append(where)

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    @property
    def skipped(self) -> int:
        """Records skipped (adjustments in `NOTES` do not count)."""
        return sum(n for reason, n in self.counts.items() if reason not in NOTES)

    def summary(self) -> str:
        """One line, e.g. `2 skipped: bad_json_line=2 [a.jsonl:3, a.jsonl:9]; adjusted: merged_same_role=1`."""
        def part(reasons: list[str]) -> str:
            items = []
            for reason in reasons:
                where = self.examples.get(reason)
                items.append(f"{reason}={self.counts[reason]}" + (f" [{', '.join(where)}]" if where else ""))
            return ", ".join(items)

        skips = sorted(r for r in self.counts if r not in NOTES)
        notes = sorted(r for r in self.counts if r in NOTES)
        text = f"{self.skipped} skipped" + (f": {part(skips)}" if skips else "")
        return text + (f"; adjusted: {part(notes)}" if notes else "")


class _Skip(Exception):
    """Internal: a record is unusable for `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _first_present(turn: Mapping[str, Any], keys: tuple[str, str]) -> Any:
    # Arrow-backed datasets unify schemas, so an absent key may appear as None.
    return next((turn[k] for k in keys if turn.get(k) is not None), None)


def _read_turns(raw_turns: Any) -> list[tuple[str, str]]:
    """Validate turns in either layout (`from`/`value` or `role`/`content`) → (role, content)."""
    if not isinstance(raw_turns, list):
        raise _Skip("missing_field")
    turns = []
    for turn in raw_turns:
        if not isinstance(turn, Mapping):
            raise _Skip("missing_field")
        role = _first_present(turn, ("role", "from"))
        content = _first_present(turn, ("content", "value"))
        if role is None or content is None:
            raise _Skip("missing_field")
        if not isinstance(role, str) or role.strip().lower() not in ROLES:
            raise _Skip(f"unknown_role:{str(role)[:30]}")
        if not isinstance(content, str):
            raise _Skip("non_string_content")
        if _BLANK.fullmatch(content):
            raise _Skip("empty_content")
        turns.append((ROLES[role.strip().lower()], content))
    return turns


def _normalise(turns: list[tuple[str, str]], counts: SkipCounts, where: str) -> list[dict[str, str]]:
    """Drop assistant turns before the first user turn, merge same-role runs, require a user turn."""
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        raise _Skip("no_user_turn")
    if any(role == "system" for role, _ in turns[first_user:]):
        raise _Skip("system_not_first")
    head = [t for t in turns[:first_user] if t[0] == "system"]
    if len(head) < first_user:
        counts.add("leading_assistant_dropped", where)
    merged: list[dict[str, str]] = []
    for role, content in head + turns[first_user:]:
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n\n" + content
        else:
            merged.append({"role": role, "content": content})
    if len(merged) < len(head) + len(turns) - first_user:
        counts.add("merged_same_role", where)
    return merged


def _record_id(record: Mapping[str, Any], messages: list[dict[str, str]]) -> str:
    """The record's `id` (UltraChat: `prompt_id`), else a stable hash of the normalised messages."""
    for key in ("id", "prompt_id"):
        value = record.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return "sha1-" + digest.hexdigest()[:16]


def adapt_record(record: Any, fmt: str, counts: SkipCounts, where: str = "") -> Conversation | None:
    """Turn one raw record into a Conversation, or count why it is skipped and return None.

    Args:
        record: A ShareGPT record (`conversations` of `from`/`value`), an UltraChat or generic
            record (`messages` of `role`/`content`), or anything else (skipped).
        fmt: `auto` (detected per record), `sharegpt`, `ultrachat` or `messages`.
        counts: Receives skip reasons and adjustments.
        where: Location named in the skip summary, e.g. `data.jsonl#12`.
    """
    try:
        if not isinstance(record, Mapping):
            raise _Skip("not_a_mapping")
        if fmt == "auto":
            key = "conversations" if record.get("conversations") is not None else "messages"
        else:
            key = "conversations" if fmt == "sharegpt" else "messages"
        messages = _normalise(_read_turns(record.get(key)), counts, where)
    except _Skip as skip:
        counts.add(skip.reason, where)
        return None
    return Conversation(id=_record_id(record, messages), messages=messages)


def require_assistant(conversations: Iterable[Conversation], counts: SkipCounts) -> list[Conversation]:
    """Keep conversations with at least one assistant turn; count the rest as `no_assistant_turn`."""
    kept = []
    for conversation in conversations:
        if conversation.has_assistant:
            kept.append(conversation)
        else:
            counts.add("no_assistant_turn", conversation.id)
    return kept


def _jsonl_file(path: Path, counts: SkipCounts | None) -> Iterator[Any]:
    with path.open(encoding="utf-8") as lines:  # iterating a file splits on newlines only
        yield from _jsonl_records(lines, str(path), counts)


def _jsonl_records(lines: Iterable[str], label: str, counts: SkipCounts | None) -> Iterator[Any]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if counts is None:
                raise DataError(f"{label}:{number}: malformed JSON line ({exc.msg})") from exc
            counts.add("bad_json_line", f"{label}:{number}")


def _json_records(path: Path, counts: SkipCounts | None) -> Iterator[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSONL file named .json, as many dataset dumps are
            return _jsonl_records(text.split("\n"), str(path), counts)
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from exc
    if isinstance(data, Mapping):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
        if key is None:
            raise DataError(f"{path}: a JSON object needs one top-level list of records (e.g. under "
                            f"'data'); found list keys {lists}")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return iter(data)


def _hub_records(source: DataSourceConfig) -> Iterator[Any]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.path, split=source.split)
    except Exception as exc:  # hub, network and split errors all arrive as different types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"cannot load hub dataset {source.path!r} (split {source.split!r}): "
                        f"{type(exc).__name__}: {first_line}; check the id, the split and network "
                        "access (HF_HUB_OFFLINE)") from exc
    return iter(dataset)


def builtin_prompts_path() -> Path:
    """Path of the packaged built-in training prompt set (JSONL of `id`, `category`, `messages`)."""
    return Path(__file__).with_name(BUILTIN_FILE)


def read_records(source: DataSourceConfig, counts: SkipCounts | None = None) -> Iterator[Any]:
    """Raw records of one source, in order (usually dicts; adapters skip anything else).

    `builtin` is the packaged prompt set; an existing path must be a `.json` file (a list, or an
    object holding one list of records, or JSONL content) or a `.jsonl` file; any other path that
    looks like `org/name` is loaded with `datasets.load_dataset(path, split=source.split)`.
    A malformed JSONL line is counted as `bad_json_line` in `counts`, or raises `DataError` when
    `counts` is None.
    """
    if source.path == BUILTIN:
        return _jsonl_file(builtin_prompts_path(), counts)
    path = Path(source.path).expanduser()
    if path.is_dir():
        raise DataError(f"data source {source.path!r} is a directory; point it at a .json or .jsonl file")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_file(path, counts)
        if path.suffix == ".json":
            return _json_records(path, counts)
        raise DataError(f"data source {source.path!r} has an unsupported type; use a .json or .jsonl file")
    if path.suffix in (".json", ".jsonl") or not _HUB_ID.match(source.path):
        raise DataError(f"data source {source.path!r} not found: not a local file, not `builtin` and "
                        "not a hub dataset id (org/name)")
    return _hub_records(source)


def load_conversations(sources: Sequence[DataSourceConfig], counts: SkipCounts | None = None) -> list[Conversation]:
    """Read, adapt, cap and de-duplicate conversations from `sources`, mixed in order.

    Each source contributes at most `limit` accepted conversations; ids are unique across sources
    (the first wins, later ones count as `duplicate_id`).

    Raises:
        ConfigError: A source's `limit` or `format` is out of range.
        DataError: A source cannot be read, or no conversation survives.
    """
    counts = counts if counts is not None else SkipCounts()
    seen: set[str] = set()
    kept: list[Conversation] = []
    for position, source in enumerate(sources):
        if source.limit is not None and source.limit < 0:
            raise ConfigError(f"`data.sources[{position}].limit` must be >= 0 or null, got {source.limit}")
        if source.format not in FORMATS:
            raise ConfigError(f"`data.sources[{position}].format` must be one of {FORMATS}, got {source.format!r}")
        if source.limit == 0:
            continue
        label = Path(source.path).name if Path(source.path).is_file() else source.path
        accepted = 0
        for index, record in enumerate(read_records(source, counts)):
            conversation = adapt_record(record, source.format, counts, f"{label}#{index}")
            if conversation is None:
                continue
            if conversation.id in seen:
                counts.add("duplicate_id", f"{label}#{index}")
                continue
            seen.add(conversation.id)
            kept.append(conversation)
            accepted += 1
            if source.limit is not None and accepted >= source.limit:
                break
    if not kept:
        names = ", ".join(s.path for s in sources) or "(no sources)"
        raise DataError(f"no usable conversations in {names}; skipped: {counts.summary()}")
    return kept


def save_conversations(path: str | Path, conversations: Iterable[Conversation]) -> Path:
    """Write conversations as JSONL (one `to_json` object a line); the result reads back as a source."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for conversation in conversations:
            out.write(json.dumps(conversation.to_json(), ensure_ascii=False) + "\n")
    return path
