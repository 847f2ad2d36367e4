"""Conversation adapters, sources, skip accounting, mixing/limits/dedup and the built-in prompt set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from confu_lightning.config.schema import DataSourceConfig
from confu_lightning.data.conversations import (
    Conversation,
    SkipCounts,
    adapt_record,
    builtin_prompts_path,
    load_conversations,
    read_records,
    require_assistant,
    save_conversations,
)
from confu_lightning.errors import ConfigError, DataError

SHAREGPT_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sharegpt"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sharegpt(id_: str, *turns: tuple[str, str]) -> dict:
    return {"id": id_, "conversations": [{"from": f, "value": v} for f, v in turns]}


def chat(id_: str, *turns: tuple[str, str]) -> dict:
    return {"id": id_, "messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize(("speaker", "role"), [
    ("human", "user"), ("Human", "user"), ("user", "user"), ("gpt", "assistant"), ("assistant", "assistant"),
    ("chatgpt", "assistant"), ("bing", "assistant"), ("bard", "assistant"), ("model", "assistant"),
])
def test_sharegpt_speaker_names_map_to_roles(speaker: str, role: str) -> None:
    counts = SkipCounts()
    conversation = adapt_record(sharegpt("s1", ("system", "Be kind."), (speaker, "Hello")), "auto", counts)
    if role == "assistant":  # an assistant-only record has no user turn
        assert conversation is None and counts.counts == Counter({"no_user_turn": 1})
        conversation = adapt_record(sharegpt("s1", ("human", "Hi"), (speaker, "Hello")), "auto", counts)
    assert conversation is not None and conversation.id == "s1"
    assert conversation.messages[-1] == {"role": role, "content": "Hello"}


def test_ultrachat_records_from_local_json_and_jsonl(tmp_path: Path) -> None:
    records = [
        {"prompt": "Name a colour.", "prompt_id": "p-1",
         "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]},
        {"prompt": "Count to two.", "prompt_id": "p-2", "messages": [{"role": "user", "content": "Count to two."}]},
    ]
    (tmp_path / "u.json").write_text(json.dumps({"data": records}), encoding="utf-8")
    write_jsonl(tmp_path / "u.jsonl", records)
    for name, fmt in (("u.json", "ultrachat"), ("u.jsonl", "auto")):
        got = load_conversations([DataSourceConfig(path=str(tmp_path / name), format=fmt)])
        assert [c.id for c in got] == ["p-1", "p-2"]
        assert got[0].messages[1] == {"role": "assistant", "content": "Teal."}


def test_records_from_datasets_json_loader_use_the_same_adapter(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    source = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt_id": "u-1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        {"id": "g-1", "conversations": [{"from": "human", "value": "Yo"}]},
    ])
    table = datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "hf"))
    counts = SkipCounts()
    got = [adapt_record(r, "auto", counts) for r in table]  # Arrow fills absent keys with None
    assert [(c.id, len(c.messages)) for c in got] == [("u-1", 2), ("g-1", 1)]
    assert counts.counts == Counter()


def test_hub_id_goes_through_datasets_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    local = write_jsonl(tmp_path / "hub.jsonl", [chat("h-1", ("user", "Hello?"))])
    real_load, calls = datasets.load_dataset, []

    def fake_load(path: str, split: str):
        calls.append((path, split))
        return real_load("json", data_files=str(local), split="train", cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = load_conversations([DataSourceConfig(path="HuggingFaceH4/ultrachat_200k", split="train_sft")])
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
    assert [c.id for c in got] == ["h-1"]

    def failing_load(path: str, split: str):
        raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'org/missing' \(split 'train'\)"):
        read_records(DataSourceConfig(path="org/missing"))


def test_generic_messages_jsonl_and_hashed_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        {"messages": [{"role": "user", "content": "Q2"}]},
    ])
    got = load_conversations([DataSourceConfig(path=str(path), format="messages")])
    again = load_conversations([DataSourceConfig(path=str(path))])
    assert [c.id for c in got] == [c.id for c in again]  # stable across reads
    assert all(c.id.startswith("sha1-") for c in got) and got[0].id != got[1].id


@pytest.mark.parametrize(("record", "reason"), [
    ("just a string", "not_a_mapping"),
    ({"id": "x", "text": "no turns"}, "missing_field"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "missing_field"),
    ({"id": "x", "conversations": "not a list"}, "missing_field"),
    (sharegpt("x", ("wizard", "hi")), "unknown_role:wizard"),
    (sharegpt("x", ("human", "   \n\u200b")), "empty_content"),
    (chat("x", ("user", ["a", "list"])), "non_string_content"),
    (sharegpt("x", ("gpt", "Only an answer")), "no_user_turn"),
    (sharegpt("x", ("system", "Only a system prompt")), "no_user_turn"),
    (chat("x", ("user", "Q"), ("system", "late system"), ("assistant", "A")), "system_not_first"),
])
def test_each_skip_reason_is_counted(record: object, reason: str) -> None:
    counts = SkipCounts()
    assert adapt_record(record, "auto", counts, "f.json#7") is None
    assert counts.counts == Counter({reason: 1})
    assert counts.summary() == f"1 skipped: {reason}=1 [f.json#7]"


def test_leading_assistant_dropped_and_same_role_merged() -> None:
    counts = SkipCounts()
    record = sharegpt("x", ("system", "S"), ("gpt", "Welcome!"), ("human", "Part one."), ("human", "Part two."),
                      ("gpt", "Answer."))
    conversation = adapt_record(record, "sharegpt", counts, "f#0")
    assert conversation.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Part one.\n\nPart two."},
        {"role": "assistant", "content": "Answer."},
    ]
    assert counts.counts == Counter({"leading_assistant_dropped": 1, "merged_same_role": 1})
    assert counts.skipped == 0
    assert counts.summary() == "0 skipped; adjusted: leading_assistant_dropped=1 [f#0], merged_same_role=1 [f#0]"


def test_limits_mixing_in_order_and_dedup_across_sources(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [sharegpt(f"a{i}", ("human", f"qa{i}")) for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [
        chat("a0", ("user", "duplicate of a0")),  # dropped: a0 came first
        {"messages": "broken"},                   # skipped: does not count towards the limit
        *[chat(f"b{i}", ("user", f"qb{i}")) for i in range(4)],
    ])
    counts = SkipCounts()
    got = load_conversations([DataSourceConfig(path=str(a), limit=3), DataSourceConfig(path=str(b), limit=2),
                              DataSourceConfig(path=str(a), limit=0)], counts)
    assert [c.id for c in got] == ["a0", "a1", "a2", "b0", "b1"]
    assert counts.counts == Counter({"duplicate_id": 1, "missing_field": 1})
    assert "duplicate_id=1 [b.jsonl#0]" in counts.summary()
    with pytest.raises(ConfigError, match=r"data.sources\[0\].limit"):
        load_conversations([DataSourceConfig(path=str(a), limit=-1)])
    with pytest.raises(ConfigError, match=r"data.sources\[1\].format"):
        load_conversations([DataSourceConfig(path=str(a)), DataSourceConfig(path=str(a), format="alpaca")])


def test_malformed_jsonl_line_is_counted_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("ok1", ("user", "Q"))) + "\n{not json\n\n" + json.dumps(chat("ok2", ("user", "R")))
                    + "\n", encoding="utf-8")
    counts = SkipCounts()
    got = load_conversations([DataSourceConfig(path=str(path))], counts)
    assert [c.id for c in got] == ["ok1", "ok2"]
    assert counts.counts == Counter({"bad_json_line": 1})
    assert f"bad_json_line=1 [{path}:2]" in counts.summary()
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON line"):
        list(read_records(DataSourceConfig(path=str(path))))


def test_json_file_holding_jsonl_and_bad_json_objects(tmp_path: Path) -> None:
    jsonl_named_json = write_jsonl(tmp_path / "dump.json", [chat("j1", ("user", "Q")), chat("j2", ("user", "R"))])
    assert [c.id for c in load_conversations([DataSourceConfig(path=str(jsonl_named_json))])] == ["j1", "j2"]
    (tmp_path / "obj.json").write_text(json.dumps({"a": [], "b": []}), encoding="utf-8")
    with pytest.raises(DataError, match=r"obj\.json: a JSON object needs one top-level list"):
        read_records(DataSourceConfig(path=str(tmp_path / "obj.json")))
    (tmp_path / "broken.json").write_text('[{"id": 1,', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 1"):
        read_records(DataSourceConfig(path=str(tmp_path / "broken.json")))


def test_missing_path_directory_and_unsupported_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data source '.*nope\.jsonl' not found"):
        read_records(DataSourceConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"'no_such_thing' not found: .*hub dataset id \(org/name\)"):
        read_records(DataSourceConfig(path="no_such_thing"))
    with pytest.raises(DataError, match="is a directory"):
        read_records(DataSourceConfig(path=str(tmp_path)))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported type"):
        read_records(DataSourceConfig(path=str(tmp_path / "data.csv")))


def test_nothing_usable_is_an_error_naming_sources_and_skips(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [sharegpt("x", ("human", "")), sharegpt("y", ("gpt", "A"))])
    with pytest.raises(DataError, match=r"no usable conversations in .*empty\.jsonl; skipped: 2 skipped: "
                                        r"empty_content=1 .*no_user_turn=1"):
        load_conversations([DataSourceConfig(path=str(path))])


def test_require_assistant_and_jsonl_round_trip(tmp_path: Path) -> None:
    answered = Conversation("c1", [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ünïcode ✓"}])
    prompt_only = Conversation("c2", [{"role": "user", "content": "Q2"}])
    counts = SkipCounts()
    assert require_assistant([answered, prompt_only], counts) == [answered]
    assert counts.counts == Counter({"no_assistant_turn": 1})
    assert Conversation.from_json(answered.to_json()) == answered
    assert Conversation.from_json(json.dumps(answered.to_json())) == answered
    for bad in ('{"messages": []}', {"id": "x", "messages": [{"role": "user", "content": 3}]}, "not json"):
        with pytest.raises(DataError, match="not a Conversation record"):
            Conversation.from_json(bad)
    path = save_conversations(tmp_path / "out" / "c.jsonl", [answered, prompt_only])
    assert load_conversations([DataSourceConfig(path=str(path))]) == [answered, prompt_only]


def test_builtin_prompt_set() -> None:
    lines = builtin_prompts_path().read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    categories = Counter(r["category"] for r in records)
    assert len(records) >= 200
    assert set(categories) == {"writing", "qa", "summarization", "translation", "coding", "math", "chitchat"}
    assert min(categories.values()) >= 20
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["id"].startswith("builtin-train-") for r in records)
    counts = SkipCounts()
    conversations = load_conversations([DataSourceConfig(path="builtin")], counts)
    assert len(conversations) == len(records) and counts.counts == Counter()
    assert {c.messages[0]["role"] for c in conversations} == {"user"}
    mixed = load_conversations([DataSourceConfig(path="builtin", limit=14)])
    assert len({r["category"] for r in records[:14]}) == 7  # interleaved: a small limit still spans categories
    assert [c.id for c in mixed] == [r["id"] for r in records[:14]]


@pytest.mark.parametrize(("name", "kept", "skips"), [
    ("sharegpt_first_turn_2978.json", 2957, {"empty_content": 2, "no_user_turn": 19}),
    ("sharegpt_v3_first_turn_1000.json", 1000, {}),
])
def test_real_sharegpt_first_turn_files(name: str, kept: int, skips: dict[str, int]) -> None:
    path = SHAREGPT_DIR / name
    if not path.is_file():
        pytest.skip(f"shared data not present: {path}")
    counts = SkipCounts()
    conversations = load_conversations([DataSourceConfig(path=str(path))], counts)
    assert len(conversations) == kept
    assert counts.counts == Counter(skips)
    assert all(c.messages[-1]["role"] == "user" for c in conversations)
