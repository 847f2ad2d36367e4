"""Response regeneration: turn-by-turn answers, batching invariance, resume after a crash, rank split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from confu_lightning.data.conversations import Conversation
from confu_lightning.data.regenerate import GenerationSettings, iter_regenerated, part_path, regenerate


@pytest.fixture(scope="module")
def tiny(tiny_target_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_target_dir).eval(), AutoTokenizer.from_pretrained(tiny_target_dir)


def _convs(n: int = 6) -> list[Conversation]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}" + "?" * i}]
        if i % 2 == 0:  # multi-turn with an original answer that must be replaced
            msgs += [{"role": "assistant", "content": "ORIGINAL"}, {"role": "user", "content": "and then?"}]
        out.append(Conversation(id=f"c{i}", messages=msgs))
    return out


SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=4)


def _read(out: Path) -> dict[str, list[dict[str, str]]]:
    return {c.id: c.messages for c in iter_regenerated(out)}


def test_every_user_turn_is_answered_in_order(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    report = regenerate(_convs(), model, tok, tmp_path, SETTINGS, progress=False)
    assert report.written == 6 and report.new_tokens > 0
    got = _read(tmp_path)
    for i in range(6):
        roles = [m["role"] for m in got[f"c{i}"]]
        assert roles == (["user", "assistant", "user", "assistant"] if i % 2 == 0 else ["user", "assistant"])
        assert all(m["content"] != "ORIGINAL" for m in got[f"c{i}"])


def test_batched_equals_one_by_one(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    regenerate(_convs(), model, tok, tmp_path / "b4", SETTINGS, progress=False)
    regenerate(_convs(), model, tok, tmp_path / "b1",
               GenerationSettings(max_new_tokens=6, batch_size=1), progress=False)
    assert _read(tmp_path / "b4") == _read(tmp_path / "b1")


class _Crash(RuntimeError):
    pass


class _CrashingModel:
    """Delegates to the real model but dies on the n-th `generate`, like a killed job."""

    def __init__(self, model, crash_at: int) -> None:
        self.model, self.calls, self.crash_at = model, 0, crash_at
        self.config, self.generation_config = model.config, model.generation_config

    def parameters(self):
        return self.model.parameters()

    def generate(self, **kwargs):
        self.calls += 1
        if self.calls == self.crash_at:
            raise _Crash
        return self.model.generate(**kwargs)


def test_resume_after_crash_matches_uninterrupted_run(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    convs = _convs(10)
    regenerate(convs, model, tok, tmp_path / "ref", SETTINGS, progress=False)
    out = tmp_path / "run"
    with pytest.raises(_Crash):
        regenerate(convs, _CrashingModel(model, crash_at=3), tok, out, SETTINGS, progress=False)
    assert 0 < len(_read(out)) < 10  # first chunk (2 generate calls) landed
    with part_path(out, 0, 1).open("a") as fh:
        fh.write('{"id": "torn", "messa')  # a write cut off by kill -9
    report = regenerate(convs, model, tok, out, SETTINGS, progress=False)
    assert report.already_done == 4
    ids = [json.loads(line)["id"] for line in part_path(out, 0, 1).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 10
    assert _read(out) == _read(tmp_path / "ref")


def test_ranks_split_the_work(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    for rank in range(2):
        regenerate(_convs(), model, tok, tmp_path, SETTINGS, rank=rank, world_size=2, progress=False)
    per_rank = [set(json.loads(x)["id"] for x in part_path(tmp_path, r, 2).read_text().splitlines()) for r in range(2)]
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == {f"c{i}" for i in range(6)}


def test_prompt_too_long_is_counted_not_fatal(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    convs = [Conversation("long", [{"role": "user", "content": "x" * 600}]), *_convs(2)]
    report = regenerate(convs, model, tok, tmp_path, SETTINGS, progress=False)
    assert report.skipped["prompt_too_long"] == 1 and report.written == 2


def test_sampling_is_seeded(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    hot = GenerationSettings(max_new_tokens=8, batch_size=3, temperature=1.0, top_p=0.9, seed=7)
    regenerate(_convs(3), model, tok, tmp_path / "a", hot, progress=False)
    regenerate(_convs(3), model, tok, tmp_path / "b", hot, progress=False)
    assert _read(tmp_path / "a") == _read(tmp_path / "b")
