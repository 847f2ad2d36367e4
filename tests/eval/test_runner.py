"""Evaluation loop: bad prompts are reported and skipped, methods validated, mismatched drafts refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from confu_lightning.errors import ConfuError
from confu_lightning.eval.bench import Generation
from confu_lightning.eval.prompts import EvalPrompt
from confu_lightning.eval.runner import check_compatible, check_methods, evaluate


def _echo(ids: torch.Tensor, max_new_tokens: int, temperature: float, seed: int) -> Generation:
    return Generation(ids[-max_new_tokens:].tolist(), forwards=max_new_tokens)


def _fast(ids: torch.Tensor, max_new_tokens: int, temperature: float, seed: int) -> Generation:
    return Generation(ids[-max_new_tokens:].tolist(), forwards=max_new_tokens // 2, accepted=[1] * (max_new_tokens // 2))


def test_bad_prompts_are_skipped_and_the_rest_completes(tiny_target_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    prompts = [EvalPrompt("ok1", "qa", ["hi"]), EvalPrompt("empty", "qa", ["  "]),
               EvalPrompt("long", "qa", ["x" * 400]), EvalPrompt("ok2", "math", ["1+1?", "and 2+2?"])]
    outcome = evaluate({"ar": _echo, "eagle3": _fast}, tok, prompts, temperatures=[0.0], max_new_tokens=4,
                       system_prompt=None, seed=0, max_context=256, depth=2)
    assert [s[0] for s in outcome.skipped] == ["empty", "long"]
    assert "turn 1 is empty" in outcome.skipped[0][1] and "context window of 256" in outcome.skipped[1][1]
    assert {(r.method, r.prompt_id) for r in outcome.records} == {(m, p) for m in ("ar", "eagle3") for p in ("ok1", "ok2")}
    overall = {r["method"]: r for r in outcome.results if r["category"] == "all"}
    assert overall["eagle3"]["tau"] == 2.0 and overall["ar"]["tau"] == 1.0
    assert next(r for r in outcome.records if r.prompt_id == "ok2").n_tokens == 8  # both turns answered


def test_methods_are_checked() -> None:
    with pytest.raises(ConfuError, match="unknown eval.methods"):
        check_methods(["ar", "medusa"])
    with pytest.raises(ConfuError, match="must include `ar`"):
        check_methods(["eagle3"])
    check_methods(["ar", "eagle3", "long_run"], named_drafts=["long_run"])
    with pytest.raises(ConfuError, match="unknown eval.methods \\['long_run'\\]"):
        check_methods(["ar", "long_run"])


def test_draft_for_another_target_is_refused() -> None:
    target = SimpleNamespace(name="t", vocab_size=320, hidden_size=64)
    draft = SimpleNamespace(config=SimpleNamespace(target_vocab_size=512, feature_size=96, hidden_size=32))
    with pytest.raises(ConfuError, match=r"vocabulary 512 vs the target's 320; hidden size 32"):
        check_compatible(target, draft)


def test_methods_take_turns_prompt_by_prompt(tiny_target_dir: Path) -> None:
    from transformers import AutoTokenizer

    calls: list[tuple[str, int]] = []

    def tracked(name: str):
        def generate(ids: torch.Tensor, max_new_tokens: int, temperature: float, seed: int) -> Generation:
            calls.append((name, max_new_tokens))
            return _echo(ids, max_new_tokens, temperature, seed)
        return generate

    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    prompts = [EvalPrompt("p1", "qa", ["hi"]), EvalPrompt("p2", "qa", ["yo"])]
    evaluate({"eagle3": tracked("eagle3"), "ar": tracked("ar")}, tok, prompts, temperatures=[0.0], max_new_tokens=4,
             system_prompt=None, seed=0, max_context=256, depth=2)
    timed = [name for name, n in calls if n == 4]  # warm-ups generate 8 tokens
    assert timed == ["ar", "eagle3", "ar", "eagle3"]
