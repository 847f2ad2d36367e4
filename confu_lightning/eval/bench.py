"""SpecBench-style evaluation: acceptance length τ and wall-clock speed-up against the AR baseline.

For every temperature, every method (`ar` first: the baseline) answers every prompt, turn by turn
with its own earlier answers, after one untimed warm-up prompt. Each request records generated
tokens, target forwards, wall time and the accepted draft length of every round. `aggregate`
turns those into one record per (method, temperature, category) plus `category = "all"`:
`tau` pooled (generated tokens / verification forwards, research/eval-anchors.md §1.3),
`tau_per_request` (mean of per-request ratios), `tokens_per_s`, `speedup` (AR wall time / method
wall time over the same prompts), `accept_rate_by_position` (share of rounds whose accepted
draft length exceeds i) and, for drafts at temperature 0, `identical_to_ar` (share of prompts whose
answers equal the baseline's word for word: 1.0 in exact arithmetic; bf16 kernels that round a
tree-shaped batch differently from a one-token step can flip a near-tie, see README).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from confu_lightning.eval.prompts import EvalPrompt


@dataclass
class Generation:
    """What one method returns for one turn."""

    tokens: list[int]
    forwards: int
    accepted: list[int] = field(default_factory=list)
    """Accepted draft tokens per verification round (the bonus token excluded); empty for AR."""


Generate = Callable[[torch.Tensor, int, float, int], Generation]
"""(prompt ids (T,), max_new_tokens, temperature, seed) -> Generation."""


@dataclass
class RequestRecord:
    """One prompt answered by one method at one temperature (all its turns)."""

    method: str
    temperature: float
    prompt_id: str
    category: str
    n_tokens: int
    forwards: int
    seconds: float
    accepted: list[int]
    answers: list[str]


def chat_prompt_ids(tokenizer: Any, system_prompt: str | None, history: list[dict[str, str]]) -> torch.Tensor:
    """The target's chat template over `history` (ending with a user turn), as a (T,) id tensor."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def answer_prompt(method: str, generate: Generate, tokenizer: Any, prompt: EvalPrompt, *, system_prompt: str | None,
                  max_new_tokens: int, temperature: float, seed: int, max_context: int) -> RequestRecord:
    """Answer every turn of `prompt` in order, each turn seeing the method's own earlier answers."""
    from confu_lightning.errors import DataError

    history: list[dict[str, str]] = []
    tokens = forwards = 0
    seconds = 0.0
    accepted: list[int] = []
    answers: list[str] = []
    for j, turn in enumerate(prompt.turns):
        if not turn.strip():
            raise DataError(f"prompt {prompt.id} turn {j + 1} is empty")
        history.append({"role": "user", "content": turn})
        ids = chat_prompt_ids(tokenizer, system_prompt, history)
        if ids.numel() + max_new_tokens > max_context:
            raise DataError(f"prompt {prompt.id} turn {j + 1} has {ids.numel()} tokens; with eval.max_new_tokens="
                            f"{max_new_tokens} it exceeds the target's context window of {max_context}")
        started = time.perf_counter()
        out = generate(ids, max_new_tokens, temperature, seed + j)
        seconds += time.perf_counter() - started
        tokens += len(out.tokens)
        forwards += out.forwards
        accepted.extend(out.accepted)
        answer = tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        answers.append(answer)
        history.append({"role": "assistant", "content": answer})
    return RequestRecord(method, temperature, prompt.id, prompt.category, tokens, forwards, seconds, accepted, answers)


def _summary(records: Sequence[RequestRecord], depth: int) -> dict[str, Any]:
    tokens = sum(r.n_tokens for r in records)
    forwards = sum(r.forwards for r in records)
    seconds = sum(r.seconds for r in records)
    rounds = [a for r in records for a in r.accepted]
    accept = [sum(a > i for a in rounds) / len(rounds) for i in range(depth)] if rounds else []
    per_request = [r.n_tokens / r.forwards for r in records if r.forwards]
    return {
        "n_prompts": len(records), "n_tokens": tokens,
        "tau": round(tokens / forwards, 4) if forwards else None,
        "tau_per_request": round(sum(per_request) / len(per_request), 4) if per_request else None,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "speedup": None,  # filled by `aggregate`, which pairs the records with the baseline's
        "accept_rate_by_position": [round(x, 4) for x in accept],
    }


def aggregate(records: Sequence[RequestRecord], baseline: str = "ar", depth: int = 8) -> list[dict[str, Any]]:
    """One result record per (method, temperature, category), plus category "all"."""
    groups: dict[tuple[str, float, str], list[RequestRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.temperature, r.category)].append(r)
        groups[(r.method, r.temperature, "all")].append(r)
    results = []
    for (method, temperature, category), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        ids = {r.prompt_id for r in group}
        base = [r for r in groups.get((baseline, temperature, category), []) if r.prompt_id in ids]
        same = [r for r in group if r.prompt_id in {b.prompt_id for b in base}]
        base_s = sum(r.seconds for r in base) if base else None
        row = {"method": method, "temperature": temperature, "category": category, **_summary(group, depth)}
        if base_s is not None and same:
            row["speedup"] = round(base_s / sum(r.seconds for r in same), 4)
        if temperature == 0 and method != baseline and base:
            answers = {r.prompt_id: r.answers for r in base}
            row["identical_to_ar"] = round(sum(r.answers == answers[r.prompt_id] for r in same) / len(same), 4)
        results.append(row)
    return results


def write_plots(records: Sequence[RequestRecord], results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Acceptance-length histogram per method and per-category τ bars, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r.method for r in records if r.accepted})
    for method in methods:
        lengths = [a + 1 for r in records if r.method == method for a in r.accepted]
        ax.hist(lengths, bins=range(1, max(lengths) + 2), alpha=0.6, label=method, align="left")
    ax.set_xlabel("tokens per verification round (accepted + bonus)")
    ax.set_ylabel("rounds")
    if methods:
        ax.legend()
    paths.append(out_dir / "acceptance_histogram.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [r for r in results if r["category"] != "all" and r["method"] != "ar"]
    labels = [f"{r['category']}\n{r['method']} T={r['temperature']}" for r in rows]
    ax.bar(range(len(rows)), [r["tau"] or 0 for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=7)
    ax.set_ylabel("tau (tokens / target forward)")
    paths.append(out_dir / "tau_by_category.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The overall rows as a fixed-width text table."""
    lines = [f"{'method':<10}{'T':>5}{'prompts':>9}{'tokens':>8}{'tau':>8}{'tok/s':>9}{'speedup':>9}{'same as ar':>12}"]
    for r in results:
        if r["category"] == "all":
            same = f"{r['identical_to_ar']:.0%}" if "identical_to_ar" in r else "-"
            lines.append(f"{r['method']:<10}{r['temperature']:>5}{r['n_prompts']:>9}{r['n_tokens']:>8}"
                         f"{r['tau'] or 0:>8.3f}{r['tokens_per_s'] or 0:>9.2f}{r['speedup'] or 0:>9.3f}{same:>12}")
    return "\n".join(lines)
