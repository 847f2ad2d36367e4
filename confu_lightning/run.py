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


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (`torchrun`, `fabric run`)."""
    import os

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def _rank_target_config(cfg: ExperimentConfig, local_rank: int, world: int):
    """Under a multi-GPU launcher, `target.device=cuda` means this rank's own GPU."""
    import dataclasses

    if world > 1 and cfg.target.device == "cuda":
        return dataclasses.replace(cfg.target, device=f"cuda:{local_rank}")
    return cfg.target


def _check_prepare_meta(out_dir, meta: dict[str, Any]) -> None:
    """Refuse to resume into a folder prepared with another target or generation settings."""
    import json
    from pathlib import Path

    from confu_lightning.errors import DataError

    path = Path(out_dir) / "prepare.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise DataError(
                f"{out_dir} already holds conversations prepared with other settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} vs {[meta[k] for k in diff]}); choose another data.output_dir or delete it"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")


def _log_step(cfg: ExperimentConfig, step: str, result: dict[str, Any], experiment_file: str | None,
              artifacts: tuple[Any, ...] = ()) -> None:
    """Record a finished step as one MLflow run: config params, numeric results as metrics, artifacts."""
    from confu_lightning.tracking import step_run

    with step_run(cfg, step, experiment_file) as run:
        if run is None:
            return
        run.log_metrics({f"{step}/{k}": v for k, v in result.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_metrics({f"{step}/skipped_{k}": v for k, v in result.get("skipped", {}).items()})
        for path in artifacts:
            run.log_artifact(path)
        result["mlflow_run_id"] = run.run_id


def run_prepare(cfg: ExperimentConfig, progress: Progress | None = None, show_bars: bool = True,
                experiment_file: str | None = None) -> dict[str, Any]:
    """Load the configured conversation sources and, with `data.regenerate`, let the target answer
    every user turn; writes `conversations*.jsonl`, `prepare.json` and `config.yaml` in
    `data.output_dir`. Resumes a killed run. Returns counts and throughput.
    """
    from pathlib import Path

    from confu_lightning.config.io import save_config
    from confu_lightning.data.conversations import SkipCounts, load_conversations, require_assistant, save_conversations
    from confu_lightning.data.regenerate import GenerationSettings, iter_regenerated, part_path, regenerate

    rank, world, local = dist_env()
    out_dir = Path(cfg.data.output_dir)
    counts = SkipCounts()
    conversations = load_conversations(cfg.data.sources, counts)
    if progress:
        progress(f"{len(conversations)} conversations from {len(cfg.data.sources)} source(s); {counts.summary()}")
    d = cfg.data
    settings = GenerationSettings(max_new_tokens=d.gen_max_new_tokens, temperature=d.gen_temperature,
                                  top_p=d.gen_top_p, batch_size=d.gen_batch_size, seed=cfg.seed)
    meta = {"target": cfg.target.name if d.regenerate else None, "regenerate": d.regenerate,
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "top_p": settings.top_p}
    if rank == 0:
        _check_prepare_meta(out_dir, meta)
        save_config(cfg, out_dir)
    result: dict[str, Any] = {"output_dir": str(out_dir), "loaded": len(conversations)}
    if d.regenerate:
        from confu_lightning.target.wrapper import load_target

        target = load_target(_rank_target_config(cfg, local, world), progress=progress)
        report = regenerate(conversations, target.model, target.tokenizer, out_dir, settings,
                            rank=rank, world_size=world, progress=show_bars)
        counts.counts.update(report.skipped or {})
        result.update(written=report.written, already_done=report.already_done, new_tokens=report.new_tokens,
                      tokens_per_s=round(report.tokens_per_s, 1), seconds=round(report.seconds, 1))
    else:
        kept = require_assistant(conversations, counts)
        save_conversations(part_path(out_dir, rank, world), kept[rank::world])
        result.update(written=len(kept[rank::world]), already_done=0)
    result["total_on_disk"] = sum(1 for _ in iter_regenerated(out_dir))
    result["skipped"] = dict(counts.counts)
    result["skip_summary"] = counts.summary()
    if rank == 0:
        _log_step(cfg, "prepare", result, experiment_file, artifacts=(out_dir / "config.yaml",))
    return result


def cache_identity(cfg: ExperimentConfig, target: Any):
    """What the cached features depend on: target weights, tokenizer, chat template, layers."""
    from pathlib import Path

    from confu_lightning.cache.format import CacheIdentity, fingerprint_model_dir, hash_text

    path = Path(target.model.config._name_or_path or "")
    revision = fingerprint_model_dir(path) if (path / "config.json").is_file() else (cfg.target.revision or "main")
    tok = target.tokenizer
    tok_json = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else str(tok.get_vocab())
    return CacheIdentity(
        target=cfg.target.name,
        target_revision=revision,
        tokenizer_hash=hash_text(tok_json),
        chat_template_hash=hash_text(tok.chat_template),
        aux_layers=tuple(target.aux_layers),
        hidden_size=target.hidden_size,
    )


def _barrier_and_finalize(world: int, rank: int, cache_dir: Any) -> None:
    """Every rank wrote its own shards; rank 0 records the complete manifest after a barrier."""
    import torch.distributed as dist

    from confu_lightning.cache.writer import finalize_manifest

    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
    if rank == 0:
        finalize_manifest(cache_dir)
    if world > 1:
        dist.barrier()


def run_cache(cfg: ExperimentConfig, progress: Progress | None = None, show_bars: bool = True,
              experiment_file: str | None = None) -> dict[str, Any]:
    """Tokenise the prepared conversations with the target's chat template, run the frozen target
    over them and write the hidden-state cache, the draft vocabulary (`draft_vocab.safetensors`)
    and the frozen embedding / lm_head (`target_heads.safetensors`) into `cache.dir`. Resumable.
    """
    from pathlib import Path

    import torch

    from confu_lightning.cache.reader import open_cache
    from confu_lightning.cache.writer import write_cache
    from confu_lightning.config.io import save_config
    from confu_lightning.data.chat import check_chat_tokenizer, tokenize_conversations
    from confu_lightning.data.conversations import SkipCounts
    from confu_lightning.data.regenerate import iter_regenerated
    from confu_lightning.draft.vocab import build_draft_vocab, count_tokens, save_vocab
    from confu_lightning.errors import DataError
    from confu_lightning.target.wrapper import DTYPES, load_target, save_heads

    rank, world, local = dist_env()
    conversations = list(iter_regenerated(cfg.data.output_dir))
    if not conversations:
        raise DataError(f"no prepared conversations in {cfg.data.output_dir}; run `confu prepare` with the same config first")
    target = load_target(_rank_target_config(cfg, local, world), progress=progress)
    check_chat_tokenizer(target.tokenizer)
    counts = SkipCounts()
    samples = tokenize_conversations(target.tokenizer, conversations, cfg.data.max_seq_len, cfg.data.overlong, counts)
    if not samples:
        raise DataError(f"no conversation in {cfg.data.output_dir} has a supervised token; {counts.summary()}")
    if progress:
        progress(f"{len(samples)} samples, {sum(len(s.input_ids) for s in samples):,} tokens; {counts.summary()}")

    def forward_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = target(input_ids.to(target.device), attention_mask=attention_mask.to(target.device), logits_to_keep=1)
        return out.aux_hidden, out.last_hidden

    identity = cache_identity(cfg, target)
    cache_dir = Path(cfg.cache.dir)
    write_cache(samples, forward_fn, cache_dir, identity, shard_tokens=cfg.cache.shard_tokens,
                batch_size=cfg.cache.batch_size, dtype=DTYPES[cfg.cache.dtype], rank=rank, world_size=world,
                progress=show_bars)
    _barrier_and_finalize(world, rank, cache_dir)
    cache = open_cache(cache_dir, identity)
    result: dict[str, Any] = {"cache_dir": str(cache_dir), "samples": len(cache),
                              "tokens": int(cache.manifest.n_tokens), "shards": len(cache.manifest.shards),
                              "skipped": dict(counts.counts), "skip_summary": counts.summary()}
    if rank == 0:
        ids, masks = zip(*cache.token_chunks())
        vocab = build_draft_vocab(count_tokens(ids, masks, target.vocab_size), cfg.draft.vocab_size)
        save_vocab(vocab, cache_dir / "draft_vocab.safetensors")
        save_heads(target.frozen_heads(), cache_dir / "target_heads.safetensors")
        save_config(cfg, cache_dir)
        seen = int((vocab.counts > 0).sum()) if vocab.counts is not None else None
        result.update(draft_vocab_size=vocab.draft_size, distinct_supervised_tokens=seen, vocab_note=vocab.warning)
        disk = sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))
        result["bytes_per_token"] = round(disk / max(1, result["tokens"]), 2)
        _log_step(cfg, "cache", result, experiment_file,
                  artifacts=(cache_dir / "config.yaml", cache_dir / "manifest.json"))
    return result
