"""Evaluation prompt sources: the built-in set, question files, ShareGPT files and offline SpecBench."""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from confu_lightning.data.conversations import builtin_prompts_path
from confu_lightning.errors import DataError
from confu_lightning.eval import prompts as eval_prompts
from confu_lightning.eval.prompts import (
    EvalPrompt,
    builtin_eval_prompts_path,
    load_eval_prompts,
    spec_bench_cache_path,
)

CATEGORIES = ("writing", "qa", "summarization", "translation", "coding", "math")


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network (any `urlopen` fails) and an empty `CONFU_HOME`; returns that home."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("CONFU_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_builtin_set_size_categories_and_ids() -> None:
    prompts = load_eval_prompts("builtin")
    per_category = Counter(p.category for p in prompts)
    assert len(prompts) >= 60
    assert set(per_category) == set(CATEGORIES)
    assert min(per_category.values()) >= 10
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.id.startswith("builtin-eval-") for p in prompts)
    assert any(len(p.turns) == 2 for p in prompts)
    assert all(t.strip() for p in prompts for t in p.turns)


def test_builtin_file_is_clean_specbench_schema() -> None:
    problems: list[tuple[str, str]] = []
    load_eval_prompts("builtin", problems=problems)
    assert problems == []
    for line in builtin_eval_prompts_path().read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"question_id", "category", "turns"}


def test_builtin_eval_prompts_are_disjoint_from_training_prompts() -> None:
    training = set()
    for line in builtin_prompts_path().read_text(encoding="utf-8").splitlines():
        training |= {_normal(m["content"]) for m in json.loads(line)["messages"]}
    evaluation = {_normal(t) for p in load_eval_prompts("builtin") for t in p.turns}
    assert training and evaluation
    assert not training & evaluation
    # Also no shared passage or sentence: no eval turn contains a training turn or vice versa.
    assert not [e for e in evaluation for t in training if len(t) > 30 and (t in e or e in t)]


def test_builtin_limit_keeps_file_order() -> None:
    first = load_eval_prompts("builtin", limit=3)
    assert [p.id for p in first] == ["builtin-eval-0001", "builtin-eval-0002", "builtin-eval-0003"]


@pytest.mark.parametrize("limit", [0, -1, 1.5])
def test_bad_limit_is_rejected(limit: object) -> None:
    with pytest.raises(DataError, match="limit"):
        load_eval_prompts("builtin", limit=limit)  # type: ignore[arg-type]


def test_question_file_round_trip_with_multi_turn(tmp_path: Path) -> None:
    records = [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it sad."],
         "reference": ["a", "b"]},
        {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Hallo."]},
        {"question_id": "x-3", "turns": ["No category here."]},
    ]
    path = _write_jsonl(tmp_path / "question.jsonl", records)
    assert load_eval_prompts(str(path)) == [
        EvalPrompt(id="81", category="writing", turns=["Write a haiku.", "Now make it sad."]),
        EvalPrompt(id="161", category="translation", turns=["Translate German to English: Hallo."]),
        EvalPrompt(id="x-3", category="", turns=["No category here."]),
    ]
    assert [p.id for p in load_eval_prompts(str(path), limit=2)] == ["81", "161"]


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["Why?"]}\n\n{"question_id": 2, "turns": [\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON line")):
        load_eval_prompts(str(path))


@pytest.mark.parametrize("record, message", [
    ([1, 2], "expected a JSON object"),
    ({"question_id": 2, "category": "qa", "turns": "Why?"}, "`turns` must be a list"),
    ({"category": "qa", "turns": ["Why?"]}, "`question_id`"),
])
def test_structurally_wrong_record_raises_with_location(tmp_path: Path, record: object, message: str) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Hi"]}, record])
    with pytest.raises(DataError, match=rf"q\.jsonl:2: .*{message}"):
        load_eval_prompts(str(path))


def test_bad_prompts_are_skipped_and_reported(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "qa", "turns": ["Why is the sea salty?"]},
        {"question_id": 2, "category": "qa", "turns": ["Fine first turn", "  \u200b "]},
        {"question_id": 3, "category": "qa", "turns": [7]},
        {"question_id": 4, "category": "qa", "turns": []},
        {"question_id": 1, "category": "qa", "turns": ["Duplicate id"]},
        {"question_id": 5, "category": "math", "turns": ["What is 2 + 2?"]},
    ])
    problems: list[tuple[str, str]] = []
    prompts = load_eval_prompts(str(path), problems=problems)
    assert [p.id for p in prompts] == ["1", "5"]
    assert problems == [
        (f"{path}:2", "turn 2 is empty"),
        (f"{path}:3", "turn 1 is not a string (int)"),
        (f"{path}:4", "no turns"),
        (f"{path}:5", "duplicate question_id '1'"),
    ]


def test_skips_are_logged_when_no_problem_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": [""]}, {"question_id": 2, "turns": ["Hi"]}])
    with caplog.at_level("WARNING", logger="confu_lightning.eval.prompts"):
        assert [p.id for p in load_eval_prompts(str(path))] == ["2"]
    assert f"{path}:1" in caplog.text and "turn 1 is empty" in caplog.text


def test_only_bad_prompts_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": [""]}])
    with pytest.raises(DataError, match=r"no usable evaluation prompts .*1 skipped"):
        load_eval_prompts(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable evaluation prompts"):
        load_eval_prompts(str(empty))


def test_sharegpt_jsonl_source_takes_user_turns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "chats.jsonl", [
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there"},
                                      {"from": "gpt", "value": "Hi!"},
                                      {"from": "human", "value": "Tell me a fact."}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "only an answer"}]},
        {"id": "c", "conversations": [{"from": "system", "value": "Be brief."},
                                      {"from": "human", "value": "Name a colour."}]},
    ])
    problems: list[tuple[str, str]] = []
    prompts = load_eval_prompts(str(path), problems=problems)
    assert prompts == [
        EvalPrompt(id="a", category="sharegpt", turns=["Hello there", "Tell me a fact."]),
        EvalPrompt(id="c", category="sharegpt", turns=["Name a colour."]),
    ]
    assert problems == [("chats.jsonl#1", "no_user_turn")]
    assert [p.id for p in load_eval_prompts(str(path), limit=1)] == ["a"]


def test_sharegpt_json_list_source(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "What is rain?"}]}]),
                    encoding="utf-8")
    assert load_eval_prompts(str(path)) == [EvalPrompt(id="q1", category="sharegpt", turns=["What is rain?"])]


def test_spec_bench_offline_names_url_and_fix(offline: Path) -> None:
    with pytest.raises(DataError) as error:
        load_eval_prompts("spec_bench")
    message = str(error.value)
    assert message.startswith("could not download SpecBench question.jsonl from https://")
    assert "pass a local path to question.jsonl" in message and "\n" not in message
    assert not (offline / "eval").exists() or not any((offline / "eval").iterdir())


def test_spec_bench_downloads_once_into_cache(monkeypatch: pytest.MonkeyPatch, offline: Path) -> None:
    body = b'{"question_id": 81, "category": "writing", "turns": ["A", "B"]}\n'
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    first = load_eval_prompts("spec_bench")
    second = load_eval_prompts("spec_bench")
    assert first == second == [EvalPrompt(id="81", category="writing", turns=["A", "B"])]
    assert calls == [eval_prompts.SPEC_BENCH_URL]
    assert spec_bench_cache_path() == offline / "eval" / "spec_bench_question.jsonl"
    assert spec_bench_cache_path().read_bytes() == body


def test_missing_path_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_eval_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"\.jsonl or \.json file"):
        load_eval_prompts(str(tmp_path))
    other = tmp_path / "prompts.txt"
    other.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.jsonl or \.json file"):
        load_eval_prompts(str(other))
