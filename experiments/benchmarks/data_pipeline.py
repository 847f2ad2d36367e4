"""Data-pipeline benchmark on a real target (default: the embedded SmolLM2-135M, CPU).

Measures, side by side in one process:
  1. regeneration tokens/s at batch size 1 and at larger batch sizes;
  2. cache-writer wall time against the bare target forward inside it (same batches);
  3. bytes per token on disk against the ideal (3H + H) * 2 + 5;
  4. HiddenStateCacheDataModule batches/s against a proxy draft training step
     (fc 3H->H + one Llama decoder layer + lm_head over the draft vocabulary, forward + backward).

    .venv/bin/python experiments/benchmarks/data_pipeline.py --prompts ../shared/data/sharegpt/sharegpt_v3_first_turn_1000.json

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _conversations(path: str, limit: int):
    from confu_lightning.config.schema import DataSourceConfig
    from confu_lightning.data.conversations import SkipCounts, load_conversations

    return load_conversations([DataSourceConfig(path=path, limit=limit)], SkipCounts())


def bench_regeneration(target, convs, batch_sizes, max_new_tokens, workdir: Path) -> dict:
    from confu_lightning.data.regenerate import GenerationSettings, regenerate

    out = {}
    for bs in batch_sizes:
        n = max(bs * 2, 8) if bs > 1 else 8
        settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=bs)
        report = regenerate(convs[:n], target.model, target.tokenizer, workdir / f"regen_bs{bs}", settings, progress=False)
        out[f"bs{bs}"] = {"conversations": n, "new_tokens": report.new_tokens, "tokens_per_s": round(report.tokens_per_s, 1)}
    return out


def bench_cache(target, samples, workdir: Path, batch_size: int) -> dict:
    from confu_lightning.cache.format import CacheIdentity
    from confu_lightning.cache.writer import write_cache

    spent = {"forward_s": 0.0}

    def forward_fn(ids, mask):
        t = time.perf_counter()
        o = target(ids, attention_mask=mask, logits_to_keep=1)
        spent["forward_s"] += time.perf_counter() - t
        return o.aux_hidden, o.last_hidden

    identity = CacheIdentity(target="bench", target_revision="x", tokenizer_hash="x", chat_template_hash="x",
                             aux_layers=tuple(target.aux_layers), hidden_size=target.hidden_size)
    cache_dir = workdir / "cache"
    t = time.perf_counter()
    manifest = write_cache(samples, forward_fn, cache_dir, identity, shard_tokens=65536,
                           batch_size=batch_size, dtype=torch.bfloat16, progress=False)
    total = time.perf_counter() - t
    disk = sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))
    h = target.hidden_size
    return {
        "tokens": manifest.n_tokens, "writer_total_s": round(total, 2), "bare_forward_s": round(spent["forward_s"], 2),
        "writer_overhead_pct": round(100 * (total / spent["forward_s"] - 1), 1),
        "bytes_per_token": round(disk / manifest.n_tokens, 2), "ideal_bytes_per_token": (3 * h + h) * 2 + 5,
        "cache_dir": str(cache_dir),
    }


class ProxyDraftStep(torch.nn.Module):
    """Roughly the EAGLE-3 draft's compute for one unroll step: fc, one decoder layer, lm_head."""

    def __init__(self, config, draft_vocab: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        h = config.hidden_size
        self.fc = torch.nn.Linear(3 * h, h, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rope = LlamaRotaryEmbedding(config)
        self.head = torch.nn.Linear(h, draft_vocab, bias=False)

    def forward(self, aux: torch.Tensor) -> torch.Tensor:
        x = self.fc(aux)  # (B, T, H)
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        x = self.layer(x, position_embeddings=self.rope(x, pos), position_ids=pos)
        return self.head(x)


def bench_loading(cache_dir: str, config, batch_tokens: int) -> dict:
    from confu_lightning.lit.datamodules import HiddenStateCacheDataModule

    dm = HiddenStateCacheDataModule(cache_dir, batch_tokens=batch_tokens, val_fraction=0.0)
    dm.setup()
    t = time.perf_counter()
    batches = list(dm.train_dataloader())
    load_s = time.perf_counter() - t
    proxy = ProxyDraftStep(config, draft_vocab=32000)
    opt = torch.optim.AdamW(proxy.parameters())
    steps = batches[: min(8, len(batches))]
    t = time.perf_counter()
    for b in steps:
        logits = proxy(b.aux_hidden.float())
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    step_s = (time.perf_counter() - t) / len(steps)
    per_batch = load_s / len(batches)
    return {"batches": len(batches), "load_batches_per_s": round(1 / per_batch, 1),
            "proxy_train_steps_per_s": round(1 / step_s, 2), "loader_headroom_x": round(step_s / per_batch, 1)}


def main() -> None:
    from confu_lightning.config.schema import TargetConfig
    from confu_lightning.data.chat import tokenize_conversations
    from confu_lightning.data.conversations import SkipCounts
    from confu_lightning.target.wrapper import load_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--prompts", default="builtin")
    parser.add_argument("--n", type=int, default=64, help="conversations for the cache / loading benchmarks")
    parser.add_argument("--regen-batch-sizes", default="1,8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache-batch-size", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    target = load_target(TargetConfig(name=args.target))
    convs = _conversations(args.prompts, max(args.n, 64))
    result: dict = {"target": args.target, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = [int(x) for x in args.regen_batch_sizes.split(",")]
        result["regeneration"] = bench_regeneration(target, convs, sizes, args.max_new_tokens, work)
        from confu_lightning.data.regenerate import iter_regenerated

        answered = list(iter_regenerated(work / f"regen_bs{max(sizes)}"))
        samples = tokenize_conversations(target.tokenizer, answered * max(1, args.n // max(1, len(answered))),
                                         1024, "truncate", SkipCounts())
        result["cache"] = bench_cache(target, samples, work, args.cache_batch_size)
        result["loading"] = bench_loading(result["cache"]["cache_dir"], target.model.config, args.batch_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
