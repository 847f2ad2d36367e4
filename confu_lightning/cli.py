"""The `confu` command: `confu <subcommand> [--config FILE] [key=value ...]`.

Only this module prints and exits. Subcommands import their heavy dependencies (torch,
transformers) inside their handler, so `confu --help` stays fast. A `ConfuError` from the library
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from confu_lightning import __version__
from confu_lightning.errors import ConfuError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _load(args: argparse.Namespace):
    from confu_lightning.config.io import load_config

    return load_config(args.config, args.overrides)


def _say(message: str) -> None:
    print(f"[confu] {message}", file=sys.stderr, flush=True)


def cmd_config(args: argparse.Namespace) -> int:
    from confu_lightning.config.io import render_yaml

    print(render_yaml(_load(args), docs=not args.no_docs), end="")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _quiet_transformers()
    from confu_lightning.run import run_target

    result = run_target(cfg, progress=_say)
    rows = [
        ("target", result["name"]),
        ("architecture", result["architecture"]),
        ("layers", result["num_layers"]),
        ("hidden size", result["hidden_size"]),
        ("attention heads / KV heads", f"{result['num_heads']} / {result['num_kv_heads']}"),
        ("vocabulary", f"{result['vocab_size']:,}"),
        ("parameters", f"{result['num_parameters']:,} ({result['num_parameters'] / 1e6:.1f} M)"),
        ("aux layers (HF hidden_states idx)", result["aux_layers"]),
        ("dtype / device", f"{result['dtype']} / {result['device']}"),
        ("load time", f"{result['load_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nprompt: {result['prompt']}")
    print(f"reply ({result['reply_tokens_per_s']} tokens/s): {result['reply']}")
    return 0


def _run_step(args: argparse.Namespace, function: str) -> tuple[object, dict]:
    """Load the config, quieten transformers, run `confu_lightning.run.<function>`."""
    cfg = _load(args)
    _quiet_transformers()
    import confu_lightning.run as run

    return cfg, getattr(run, function)(cfg, progress=_say, experiment_file=args.config)


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg, result = _run_step(args, "run_prepare")
    print(f"conversations: {result['loaded']} loaded, {result['written']} written now, "
          f"{result['already_done']} already done, {result['total_on_disk']} on disk in {result['output_dir']}")
    if "tokens_per_s" in result:
        print(f"regeneration: {result['new_tokens']:,} new tokens in {result['seconds']} s "
              f"({result['tokens_per_s']} tokens/s)")
    print(f"records: {result['skip_summary']}")
    _say_mlflow(cfg, result)
    return 0


def _say_mlflow(cfg, result: dict) -> None:
    if result.get("mlflow_run_id"):
        print(f"mlflow: run {result['mlflow_run_id']} in {cfg.tracking.uri} (browse with `mlflow ui "
              f"--backend-store-uri {cfg.tracking.uri}`)")


def cmd_cache(args: argparse.Namespace) -> int:
    cfg, result = _run_step(args, "run_cache")
    print(f"cache: {result['samples']} samples, {result['tokens']:,} tokens in {result['shards']} shard(s) "
          f"at {result['cache_dir']}")
    if "draft_vocab_size" in result:
        print(f"storage: {result['bytes_per_token']} bytes/token; draft vocabulary {result['draft_vocab_size']} "
              f"({result['distinct_supervised_tokens']} distinct supervised tokens)"
              + (f"; {result['vocab_note']}" if result["vocab_note"] else ""))
    print(f"records: {result['skip_summary']}")
    _say_mlflow(cfg, result)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg, result = _run_step(args, "run_train")
    if "draft_dir" not in result:  # not the global-zero rank of a multi-process run
        return 0
    shown = {k: v for k, v in result.items() if k.startswith(("val/acc_k", "val/sim_tau", "train/loss"))}
    for key in sorted(shown):
        print(f"{key:<20} {shown[key]:.4f}")
    print(f"steps: {result['global_step']}; checkpoints: {result['last_checkpoint']}"
          + (f", {result['best_checkpoint']}" if "best_checkpoint" in result else ""))
    print(f"draft: {result['draft_dir']} (export with `confu export`)")
    _say_mlflow(cfg, result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg, result = _run_step(args, "run_export")
    print(f"exported {result['source']} as {result['format']} to {result['output_dir']} "
          f"({result['bytes'] / 1e6:.1f} MB)")
    _say_mlflow(cfg, result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg, result = _run_step(args, "run_eval")
    for where, why in result["skipped"]:
        print(f"skipped {where}: {why}")
    print(result["table"])
    for method, split in result["time_split"].items():
        print(f"time split {method}: " + ", ".join(f"{k} {v:.0%}" for k, v in split.items()))
    print(f"results: {result['output_dir']}/results.json")
    _say_mlflow(cfg, result)
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own progress lines say what is happening


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "config": ("print the resolved config as YAML, each key with its documentation", cmd_config),
    "target": ("load the configured target, print its summary and answer a sample prompt", cmd_target),
    "prepare": ("load conversations and let the target regenerate every answer (resumable)", cmd_prepare),
    "cache": ("tokenise prepared conversations and cache the target's hidden states (resumable)", cmd_cache),
    "train": ("train an EAGLE-3 draft on the cache (or online with the target); resumes from last.ckpt", cmd_train),
    "eval": ("measure acceptance length and speed-up of the trained draft against AR decoding", cmd_eval),
    "export": ("export a trained draft for SGLang (eagle), vLLM (speculators) or as a native checkpoint", cmd_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confu",
        description="Train and evaluate speculative-decoding drafts (EAGLE-3, ConFu) with Lightning.",
        epilog="Every subcommand takes --config FILE and key=value overrides, e.g. "
        "`confu target target.name=tiny-random-llama`.",
    )
    parser.add_argument("--version", action="version", version=f"confu_lightning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name, (help_text, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", metavar="FILE", help="experiment YAML file (overrides of the defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
        if name == "config":
            p.add_argument("--no-docs", action="store_true", help="omit the per-key documentation comments")
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfuError as err:
        print(f"confu {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"confu {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
