"""Evaluation aggregation: pooled and per-request τ, speed-up over the same prompts, acceptance by position."""

from __future__ import annotations

from pathlib import Path

import pytest

from confu_lightning.eval.bench import RequestRecord, aggregate, format_table, write_plots


def _rec(method: str, pid: str, cat: str, tokens: int, forwards: int, seconds: float, accepted=()) -> RequestRecord:
    return RequestRecord(method, 0.0, pid, cat, tokens, forwards, seconds, list(accepted), ["x"])


RECORDS = [
    _rec("ar", "a", "math", 10, 10, 2.0), _rec("ar", "b", "qa", 20, 20, 4.0),
    _rec("eagle3", "a", "math", 10, 4, 1.0, [2, 1, 3, 0]), _rec("eagle3", "b", "qa", 20, 10, 1.0, [1] * 10),
]


def test_aggregate_overall_and_per_category() -> None:
    rows = {(r["method"], r["category"]): r for r in aggregate(RECORDS, depth=4)}
    overall = rows[("eagle3", "all")]
    assert overall["tau"] == pytest.approx(30 / 14, abs=1e-4)  # pooled
    assert overall["tau_per_request"] == pytest.approx((10 / 4 + 20 / 10) / 2, abs=1e-4)
    assert overall["speedup"] == pytest.approx(6.0 / 2.0, abs=1e-4)
    assert rows[("eagle3", "math")]["speedup"] == pytest.approx(2.0, abs=1e-4)
    assert rows[("ar", "all")]["tau"] == 1.0 and rows[("ar", "all")]["speedup"] == 1.0
    # rounds with accepted > i: 14 rounds: [2,1,3,0] + ten 1s
    assert overall["accept_rate_by_position"] == pytest.approx([13 / 14, 2 / 14, 1 / 14, 0.0], abs=1e-4)
    assert overall["n_prompts"] == 2 and overall["n_tokens"] == 30
    keys = {"method", "temperature", "category", "n_prompts", "n_tokens", "tau", "tau_per_request",
            "tokens_per_s", "speedup", "accept_rate_by_position"}
    assert all(keys <= set(r) for r in rows.values())


def test_speedup_uses_only_prompts_both_methods_answered() -> None:
    rows = aggregate(RECORDS + [_rec("ar", "c", "qa", 5, 5, 100.0)], depth=2)
    eagle = next(r for r in rows if r["method"] == "eagle3" and r["category"] == "all")
    assert eagle["speedup"] == pytest.approx(6.0 / 2.0, abs=1e-4)  # prompt c (AR only) is left out


def test_table_and_plots(tmp_path: Path) -> None:
    results = aggregate(RECORDS, depth=3)
    assert "eagle3" in format_table(results)
    paths = write_plots(RECORDS, results, tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_identical_to_ar_counts_prompts_whose_greedy_answers_match() -> None:
    differing = _rec("eagle3", "b", "qa", 20, 10, 1.0, [1] * 10)
    differing.answers = ["y"]
    rows = {(r["method"], r["category"]): r for r in aggregate(RECORDS[:3] + [differing], depth=2)}
    assert rows[("eagle3", "all")]["identical_to_ar"] == 0.5
    assert rows[("eagle3", "math")]["identical_to_ar"] == 1.0
    assert "identical_to_ar" not in rows[("ar", "all")]
    sampled = [RequestRecord(r.method, 1.0, r.prompt_id, r.category, r.n_tokens, r.forwards, r.seconds, r.accepted,
                             r.answers) for r in RECORDS]
    assert all("identical_to_ar" not in r for r in aggregate(sampled, depth=2))
