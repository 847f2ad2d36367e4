"""Entry functions for every user-facing step; the CLI and (later) the sweep runner call these.

Each `run_*` takes the resolved `ExperimentConfig` and returns a plain dict of results, so it can
be called from Python, from `confu`, or from a sweep without parsing text. Progress messages go to
an optional callback; this module never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confu_lightning.config.schema import ExperimentConfig

Progress = Callable[[str], None]


def run_target(cfg: ExperimentConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Load the configured target, describe it and answer `target.prompt` through its chat template.

    Returns:
        The target's `summary()` plus `load_s`, `prompt`, `reply`, `reply_tokens_per_s`.
    """
    from confu_lightning.target.wrapper import load_target

    started = time.perf_counter()
    target = load_target(cfg.target, progress=progress)
    load_s = time.perf_counter() - started
    if progress:
        progress(f"loaded {cfg.target.name} in {load_s:.1f} s; answering the sample prompt")
    started = time.perf_counter()
    reply = target.chat(cfg.target.prompt, max_new_tokens=cfg.target.max_new_tokens)
    reply_s = time.perf_counter() - started
    n_tokens = len(target.tokenizer(reply, add_special_tokens=False)["input_ids"])
    return {
        **target.summary(),
        "load_s": round(load_s, 2),
        "prompt": cfg.target.prompt,
        "reply": reply,
        "reply_tokens_per_s": round(n_tokens / reply_s, 1) if reply_s > 0 else None,
    }
