"""Entry functions for every user-facing step; the CLI and (later) the sweep runner call these.

Each `run_*` takes the resolved `ExperimentConfig` and returns a plain dict of results, so it can
be called from Python, from `confu`, or from a sweep without parsing text. Progress messages go to
an optional callback; this module never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
        counts.counts.update(report.skipped)
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


def cache_identity(cfg: ExperimentConfig, model_path: str, tokenizer: Any, aux_layers: list[int], hidden_size: int):
    """What the cached features depend on: target weights, tokenizer, chat template, layers."""
    from pathlib import Path

    from confu_lightning.cache.format import CacheIdentity, fingerprint_model_dir, hash_text

    path = Path(model_path or "")
    revision = fingerprint_model_dir(path) if (path / "config.json").is_file() else (cfg.target.revision or "main")
    tok_json = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else str(tokenizer.get_vocab())
    return CacheIdentity(
        target=cfg.target.name,
        target_revision=revision,
        tokenizer_hash=hash_text(tok_json),
        chat_template_hash=hash_text(tokenizer.chat_template),
        aux_layers=tuple(aux_layers),
        hidden_size=hidden_size,
    )


def target_identity(target: Any, cfg: ExperimentConfig):
    """`cache_identity` of a loaded `TargetModel`."""
    return cache_identity(cfg, target.model.config._name_or_path, target.tokenizer, target.aux_layers,
                          target.hidden_size)


def expected_identity(cfg: ExperimentConfig) -> tuple[Any, dict[str, Any]]:
    """The cache identity the configured target would produce, from its config and tokenizer only
    (no weights). Returns it with the target's HF config as a dict."""
    from transformers import AutoConfig, AutoTokenizer

    from confu_lightning.target.registry import resolve_target
    from confu_lightning.target.wrapper import resolve_aux_layers

    path = resolve_target(cfg.target.name)
    kwargs = {"revision": cfg.target.revision, "trust_remote_code": cfg.target.trust_remote_code}
    hf_config = AutoConfig.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    layers = resolve_aux_layers(cfg.target.aux_layers, hf_config.num_hidden_layers)
    return cache_identity(cfg, path, tokenizer, layers, hf_config.hidden_size), hf_config.to_dict()


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

    identity = target_identity(target, cfg)
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


RESUMABLE_CHANGES = ("train.max_steps", "train.resume", "train.force_resume", "tracking.")
"""Config keys that may differ between a checkpoint and the run resuming it."""


def _check_resume(cfg: ExperimentConfig, last) -> None:
    import torch

    from confu_lightning.config.io import flatten
    from confu_lightning.errors import ConfigError

    saved = torch.load(last, map_location="cpu", weights_only=False).get("confu_config") or {}
    now = flatten(cfg)
    changed = sorted(k for k in set(saved) | set(now)
                     if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES))
    if changed and not cfg.train.force_resume:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"{last} was trained with another config ({shown}{', ...' if len(changed) > 4 else ''}); "
                          "use another train.output_dir, set train.resume=false to start over, or "
                          "train.force_resume=true to continue anyway")


def _offline_parts(cfg: ExperimentConfig):
    """Draft ingredients from the cache: vocab, frozen heads, aux layers, target config, DataModule."""
    from pathlib import Path

    from confu_lightning.cache.reader import open_cache
    from confu_lightning.draft.vocab import build_draft_vocab, count_tokens, load_vocab
    from confu_lightning.lit.datamodules import HiddenStateCacheDataModule
    from confu_lightning.target.wrapper import load_heads

    identity, hf_config = expected_identity(cfg)
    cache_dir = Path(cfg.cache.dir)
    cache = open_cache(cache_dir, identity)  # refuses a cache of another target / layers / tokenizer early
    vocab = load_vocab(cache_dir / "draft_vocab.safetensors", target_vocab_size=hf_config["vocab_size"])
    if vocab.draft_size != min(cfg.draft.vocab_size, hf_config["vocab_size"]):
        ids, masks = zip(*cache.token_chunks())  # draft.vocab_size changed since caching: recount (cheap)
        vocab = build_draft_vocab(count_tokens(ids, masks, hf_config["vocab_size"]), cfg.draft.vocab_size)
    heads = load_heads(cache_dir / "target_heads.safetensors")
    t = cfg.train
    dm = HiddenStateCacheDataModule(cache_dir, expected_identity=identity, batch_tokens=t.batch_tokens,
                                    batching=t.batching, val_fraction=t.val_fraction, seed=cfg.seed,
                                    num_workers=t.num_workers)
    return vocab, heads, list(identity.aux_layers), hf_config, dm, None


def _online_parts(cfg: ExperimentConfig, progress: Progress | None):
    """Draft ingredients with the target in the loop: vocab from the prepared data, live features."""
    from confu_lightning.data.chat import tokenize_conversations
    from confu_lightning.data.conversations import SkipCounts
    from confu_lightning.data.regenerate import iter_regenerated
    from confu_lightning.draft.vocab import build_draft_vocab, count_tokens
    from confu_lightning.errors import DataError
    from confu_lightning.lit.datamodules import ConversationDataModule
    from confu_lightning.target.wrapper import load_target
    from confu_lightning.train.features import target_features
    import torch

    _, world, local = dist_env()
    target = load_target(_rank_target_config(cfg, local, world), progress=progress)
    conversations = list(iter_regenerated(cfg.data.output_dir))
    if not conversations:
        raise DataError(f"no prepared conversations in {cfg.data.output_dir}; run `confu prepare` first")
    samples = tokenize_conversations(target.tokenizer, conversations, cfg.data.max_seq_len, cfg.data.overlong,
                                     SkipCounts())
    counts = count_tokens([torch.tensor(s.input_ids) for s in samples], [torch.tensor(s.loss_mask) for s in samples],
                          target.vocab_size)
    vocab = build_draft_vocab(counts, cfg.draft.vocab_size)
    t = cfg.train
    dm = ConversationDataModule(samples, batch_tokens=t.batch_tokens, batching=t.batching,
                                val_fraction=t.val_fraction, seed=cfg.seed, num_workers=t.num_workers,
                                pad_id=target.tokenizer.pad_token_id or 0)
    hf_config = target.model.config.to_dict()
    return vocab, target.frozen_heads(), target.aux_layers, hf_config, dm, target_features(target)


def build_eagle3(cfg: ExperimentConfig, vocab: Any, heads: Any, aux_layers: list[int], hf_config: dict):
    """An `Eagle3Draft` shaped after the target, with its frozen embedding and draft vocabulary."""
    from confu_lightning.draft.eagle3 import Eagle3Draft, draft_config_from_target

    if cfg.draft.init_from:  # e.g. ConFu starting from a trained EAGLE-3 draft
        from confu_lightning.draft.export import load_exported

        draft = load_exported(cfg.draft.init_from, embedding=heads.embedding_weight)
        return draft.float()
    dcfg = draft_config_from_target(hf_config, vocab.draft_size, cfg.draft.n_layers, aux_layers)
    draft = Eagle3Draft(dcfg)
    draft.load_embedding(heads.embedding_weight)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    return draft


def _callbacks(cfg: ExperimentConfig, ckpt_dir):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", save_top_k=0, save_last=True,
                                 every_n_train_steps=cfg.train.ckpt_every_steps, auto_insert_metric_name=False)]
    if cfg.train.val_fraction > 0:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/sim_tau", mode="max",
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False))
    if cfg.tracking.enabled:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def run_train(cfg: ExperimentConfig, progress: Progress | None = None, show_bars: bool = True,
              experiment_file: str | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train an EAGLE-3 draft (offline from the cache or online with the target) with Lightning.

    Writes `config.yaml`, `checkpoints/last.ckpt` (every `train.ckpt_every_steps`) and
    `checkpoints/best.ckpt` (by `val/sim_tau`) in `train.output_dir`; resumes from `last.ckpt`.
    Returns the final metrics and paths.
    """
    from pathlib import Path

    import lightning as L

    from confu_lightning.config.io import flatten, save_config
    from confu_lightning.lit.eagle3_module import Eagle3LitModule

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    resume = cfg.train.resume and last.exists()
    if resume:
        _check_resume(cfg, last)
    if cfg.train.mode == "offline":
        vocab, heads, aux_layers, hf_config, dm, source = _offline_parts(cfg)
    else:
        vocab, heads, aux_layers, hf_config, dm, source = _online_parts(cfg, progress)
    draft = build_eagle3(cfg, vocab, heads, aux_layers, hf_config)
    t = cfg.train
    module = Eagle3LitModule(draft, heads.lm_head_weight, optim=cfg.optim, ttt_steps=t.ttt_steps,
                             step_weight=t.step_weight, max_steps=t.max_steps, feature_source=source,
                             run_config=flatten(cfg), data_order_dir=out_dir if t.record_data_order else None)
    logger = False
    if cfg.tracking.enabled:
        from confu_lightning.tracking import config_params, make_lightning_logger

        logger = make_lightning_logger(cfg, "train", experiment_file)
        logger.log_hyperparams(config_params(cfg))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_every_steps,
        check_val_every_n_epoch=None, limit_val_batches=None if t.val_fraction > 0 else 0,
        gradient_clip_val=cfg.optim.grad_clip or None, use_distributed_sampler=False,
        default_root_dir=out_dir, logger=logger, callbacks=[*_callbacks(cfg, ckpt_dir), *callbacks],
        log_every_n_steps=t.log_every_steps, enable_progress_bar=show_bars, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if trainer.is_global_zero:
        save_config(cfg, out_dir)
    if progress:
        progress(("resuming from " + str(last)) if resume else f"training {t.max_steps} steps into {out_dir}")
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None)
    trainer.save_checkpoint(last)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result.update(global_step=trainer.global_step, output_dir=str(out_dir), last_checkpoint=str(last))
    best = ckpt_dir / "best.ckpt"
    if best.exists():
        result["best_checkpoint"] = str(best)
    if trainer.is_global_zero:
        result["draft_dir"] = str(_save_final_draft(draft, best if best.exists() else last, out_dir / "draft", cfg))
    if logger and trainer.is_global_zero:
        logger.experiment.log_artifact(logger.run_id, str(out_dir / "config.yaml"))
        logger.experiment.log_artifact(logger.run_id, result["draft_dir"], "draft")
        result["mlflow_run_id"] = logger.run_id
    return result


def _draft_from_checkpoint(draft: Any, ckpt: Any) -> Any:
    """Load the `draft.*` weights of a Lightning checkpoint into `draft` (in place)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("draft."): v for k, v in state.items() if k.startswith("draft.")}
    draft.load_state_dict(weights, strict=True)
    return draft


def _save_final_draft(draft: Any, ckpt: Any, directory: Any, cfg: ExperimentConfig):
    """The checkpoint's draft as a native draft directory (what eval and export read)."""
    from confu_lightning.draft.export import save_draft

    _draft_from_checkpoint(draft, ckpt)
    return save_draft(draft, directory, overwrite=True,
                      extra_meta={"source_checkpoint": str(ckpt), "target": cfg.target.name})


def run_export(cfg: ExperimentConfig, progress: Progress | None = None, experiment_file: str | None = None):
    """Export a trained draft to the EAGLE/SGLang, speculators/vLLM or native layout (`export.*`)."""
    from pathlib import Path

    from confu_lightning.draft.export import export_eagle, export_speculators, load_draft, save_draft
    from confu_lightning.errors import ConfuError
    from confu_lightning.target.wrapper import DTYPES

    e = cfg.export
    source = Path(e.source or Path(cfg.train.output_dir) / "draft")
    if not source.exists():
        raise ConfuError(f"no trained draft at {source}; run `confu train` first or set export.source")
    if source.suffix == ".ckpt":
        vocab, heads, aux_layers, hf_config, _, _ = _offline_parts(cfg)
        draft = _draft_from_checkpoint(build_eagle3(cfg, vocab, heads, aux_layers, hf_config), source)
    else:
        draft = load_draft(source)
    out, dtype = Path(e.output_dir), DTYPES[e.dtype]
    if e.format == "eagle":
        path = export_eagle(draft, out, target_name_or_path=cfg.target.name, dtype=dtype, overwrite=True)
    elif e.format == "speculators":
        from transformers import AutoConfig

        from confu_lightning.target.registry import resolve_target

        archs = AutoConfig.from_pretrained(resolve_target(cfg.target.name)).architectures or ["LlamaForCausalLM"]
        path = export_speculators(draft, out, verifier_name_or_path=cfg.target.name, verifier_architectures=archs,
                                  speculative_tokens=e.speculative_tokens, dtype=dtype, overwrite=True)
    else:
        path = save_draft(draft.to(dtype), out, overwrite=True, extra_meta={"target": cfg.target.name})
    from confu_lightning.config.io import save_config

    save_config(cfg, path)
    result = {"source": str(source), "format": e.format, "output_dir": str(path),
              "bytes": sum(p.stat().st_size for p in Path(path).iterdir())}
    _log_step(cfg, "export", result, experiment_file, artifacts=tuple(Path(path).glob("*.json")))
    return result


def run_eval(cfg: ExperimentConfig, progress: Progress | None = None, show_bars: bool = True,
             experiment_file: str | None = None) -> dict[str, Any]:
    """Evaluate `eval.methods` against AR on `eval.prompts` at `eval.temperatures`; writes
    `results.json`, plots and `config.yaml` in `eval.output_dir` and records an MLflow run."""
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    from confu_lightning.config.io import save_config
    from confu_lightning.eval.bench import format_table, write_plots
    from confu_lightning.eval.prompts import load_eval_prompts
    from confu_lightning.eval.runner import build_generators, check_compatible, check_methods, evaluate, time_split
    from confu_lightning.target.wrapper import load_target

    e = cfg.eval
    check_methods(e.methods, list(e.drafts))
    problems: list[tuple[str, str]] = []
    prompts = load_eval_prompts(e.prompts, limit=e.max_prompts, problems=problems)
    target = load_target(cfg.target, progress=progress)
    from confu_lightning.draft.export import load_exported

    drafts: dict[str, Any] = {}
    for method in e.methods:
        if method == "ar":
            continue
        draft_dir = Path(e.drafts.get(method) or e.draft or Path(cfg.train.output_dir) / "draft")
        draft = load_exported(draft_dir, embedding=target.embed_tokens.weight.detach()).to(target.device).float()
        check_compatible(target, draft)
        drafts[method] = draft
    timings: dict[str, list[Any]] = {}
    generators = build_generators(e.methods, target, drafts, e, target.tokenizer.eos_token_id, timings)
    max_context = getattr(target.model.config, "max_position_embeddings", None) or 1 << 30
    total = len(prompts) * len(e.methods) * len(e.temperatures)
    with tqdm(total=total, desc="eval", unit="prompt", disable=not show_bars) as bar:
        outcome = evaluate(generators, target.tokenizer, prompts, temperatures=e.temperatures,
                           max_new_tokens=e.max_new_tokens, system_prompt=e.system_prompt, seed=cfg.seed,
                           max_context=max_context, depth=e.depth, progress=bar.update)
    out = Path(e.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(outcome.results, indent=2) + "\n")
    with open(out / "requests.jsonl", "w") as fh:
        for r in outcome.records:
            fh.write(json.dumps(r.__dict__) + "\n")
    plots = write_plots(outcome.records, outcome.results, out)
    save_config(cfg, out)
    overall = {f"{r['method']}_T{r['temperature']}": r for r in outcome.results if r["category"] == "all"}
    result: dict[str, Any] = {"output_dir": str(out), "table": format_table(outcome.results),
                              "skipped": problems + outcome.skipped,
                              "time_split": {m: time_split(v) for m, v in timings.items()}}
    from confu_lightning.tracking import step_run

    with step_run(cfg, "eval", experiment_file) as run:
        if run is not None:
            for name, row in overall.items():
                keys = ("tau", "tau_per_request", "tokens_per_s", "speedup", "identical_to_ar")
                run.log_metrics({f"eval/{k}_{name}": row[k] for k in keys if row.get(k) is not None})
            for path in (out / "results.json", out / "config.yaml", *plots):
                run.log_artifact(path)
            result["mlflow_run_id"] = run.run_id
    return result
