"""The evaluation loop: methods × temperatures × prompts, results records, skipped prompts.

Methods are named: `ar` (the autoregressive baseline through the same target forward and KV
code as the engine), `eagle3` (the trained draft through `SpeculativeEngine`) and any name given
a draft in `eval.drafts`, so several drafts are compared in one run. Each gets a `Generate`
callable; `evaluate` answers every prompt with every method at every temperature (one warm-up
prompt untimed first, methods taking turns prompt by prompt), skips and reports a prompt that
fails (empty turn, too long), and returns the request records plus the aggregated results
(`bench.aggregate`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confu_lightning.errors import ConfuError
from confu_lightning.eval.bench import Generate, RequestRecord, aggregate, answer_prompt
from confu_lightning.eval.prompts import EvalPrompt

METHODS = ("ar", "eagle3")
"""Built-in method names (ConFu adds `confu`); `eval.drafts` names more drafts to compare."""


@dataclass
class EvalOutcome:
    """Everything one evaluation produced."""

    records: list[RequestRecord]
    results: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def check_methods(methods: Sequence[str], named_drafts: Sequence[str] = ()) -> None:
    """Every method must be built in or a name in `eval.drafts`, and `ar` must be among them."""
    known = [*METHODS, *named_drafts]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfuError(f"unknown eval.methods {unknown}; known methods: {', '.join(known)} "
                         "(name more drafts in eval.drafts)")
    if "ar" not in methods:
        raise ConfuError("eval.methods must include `ar`: speed-ups are measured against it in the same run")


def evaluate(
    generators: Mapping[str, Generate],
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    *,
    temperatures: Sequence[float],
    max_new_tokens: int,
    system_prompt: str | None,
    seed: int,
    max_context: int,
    depth: int,
    progress: Callable[[int], None] | None = None,
) -> EvalOutcome:
    """Run every method on every prompt at every temperature.

    Methods take turns prompt by prompt (AR first), so a slow spell of a noisy machine hits the
    baseline and the drafts alike and the speed-up ratios stay paired. A prompt that fails for one
    method is dropped for all of them.
    """
    order = ["ar", *[m for m in generators if m != "ar"]]
    records: list[RequestRecord] = []
    skipped: list[tuple[str, str]] = []
    bad: set[str] = set()
    kwargs = {"system_prompt": system_prompt, "max_new_tokens": max_new_tokens, "max_context": max_context}
    for temperature in temperatures:
        for method in order:  # warm-up: allocator, kernels, caches; not timed
            warm = next((p for p in prompts if p.id not in bad), None)
            if warm is not None:
                try:
                    answer_prompt(method, generators[method], tokenizer, EvalPrompt(warm.id, warm.category,
                                  warm.turns[:1]), temperature=temperature, seed=seed,
                                  **{**kwargs, "max_new_tokens": 8})
                except ConfuError:
                    pass
        for prompt in prompts:
            for method in order:
                if prompt.id not in bad:
                    try:
                        records.append(answer_prompt(method, generators[method], tokenizer, prompt,
                                                     temperature=temperature, seed=seed, **kwargs))
                    except ConfuError as err:
                        bad.add(prompt.id)
                        skipped.append((prompt.id, str(err)))
                if progress:
                    progress(1)
    records = [r for r in records if r.prompt_id not in bad]  # every method answers the same prompts
    return EvalOutcome(records, aggregate(records, depth=depth), skipped)


def build_generators(methods: Sequence[str], target: Any, drafts: Mapping[str, Any], cfg: Any, eos_id: int | None,
                     timings: dict[str, list[Any]] | None = None) -> dict[str, Generate]:
    """`Generate` callables for `methods` over a `TargetModel`: `ar`, and one speculative engine per
    draft method with its `Eagle3Draft` from `drafts` (eval config `cfg` gives the tree settings).

    `timings` (method → list) collects each request's `GenerationResult` for the per-round time split.
    """
    from confu_lightning.eval.adapters import DraftAdapter, TargetAdapter
    from confu_lightning.eval.bench import Generation
    from confu_lightning.spec.engine import SpeculativeEngine, autoregressive

    check_methods(methods, list(drafts))
    t_adapter = TargetAdapter(target)

    def record(method: str, result: Any) -> None:
        if timings is not None:
            timings.setdefault(method, []).append(result)

    def ar(ids, max_new_tokens, temperature, seed) -> Generation:
        out = autoregressive(t_adapter, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=cfg.top_p, eos_id=eos_id, seed=seed)
        record("ar", out)
        return Generation(out.tokens, out.verify_forwards + 1)

    def speculative(method: str, draft: Any) -> Generate:
        d_adapter = DraftAdapter(draft)

        def generate(ids, max_new_tokens, temperature, seed) -> Generation:
            engine = SpeculativeEngine(t_adapter, d_adapter, tree=cfg.tree, depth=cfg.depth, top_k=cfg.top_k,
                                       total_tokens=cfg.total_tokens, temperature=temperature, top_p=cfg.top_p,
                                       eos_id=eos_id, max_new_tokens=max_new_tokens, seed=seed)
            out = engine.generate(ids)
            record(method, out)
            return Generation(out.tokens, out.verify_forwards + 1, [a - 1 for a in out.accept_lengths])

        return generate

    generators: dict[str, Generate] = {}
    for method in methods:
        if method == "ar":
            generators[method] = ar
        elif method not in drafts:
            raise ConfuError(f"eval.methods includes {method} but no draft was given for it")
        else:
            generators[method] = speculative(method, drafts[method])
    return generators


def check_compatible(target: Any, draft: Any) -> None:
    """Refuse a draft built for another target (vocabulary, hidden size, feature width)."""
    d = draft.config
    problems = []
    if d.target_vocab_size != target.vocab_size:
        problems.append(f"vocabulary {d.target_vocab_size} vs the target's {target.vocab_size}")
    if d.feature_size != 3 * target.hidden_size or d.hidden_size != target.hidden_size:
        problems.append(f"hidden size {d.hidden_size} (features {d.feature_size}) vs the target's {target.hidden_size}")
    if problems:
        raise ConfuError(f"the draft does not fit target {target.name!r}: {'; '.join(problems)}")


def time_split(results: Sequence[Any]) -> dict[str, float]:
    """Share of wall time spent in prefill / drafting / verification / bookkeeping over `results`."""
    parts = {k: sum(getattr(r, f"time_{k}") for r in results) for k in ("prefill", "draft", "verify", "bookkeeping")}
    total = sum(parts.values()) or 1.0
    return {k: round(v / total, 4) for k, v in parts.items()}
