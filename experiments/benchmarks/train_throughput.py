"""EAGLE-3 draft training throughput and CPU MFU, with the matmul peak measured in the same run.

A SmolLM2-shaped draft (hidden 576, 9/3 heads, 1 layer) is trained on synthetic features for a few
steps per setting (fp32, bf16 autocast). MFU = the draft's forward+backward FLOP/s
(`draft_flops_per_token`, matmuls of fc, attention, MLP and lm_head over all K TTT steps) divided by
the best square-matmul FLOP/s measured in this process for the same dtype. The teacher (the
frozen target lm_head over the full vocabulary) is timed inside the step but not counted.

    .venv/bin/python experiments/benchmarks/train_throughput.py --tokens 2048 --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 6) -> float:
    """Best FLOP/s of an n x n x n matmul (torch.mm) in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def smollm2_config(draft_vocab: int):
    from confu_lightning.draft.eagle3 import draft_config_from_target

    hf = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
          "head_dim": 64, "num_hidden_layers": 30, "rms_norm_eps": 1e-5, "vocab_size": 49152,
          "max_position_embeddings": 8192, "rope_theta": 100000.0, "model_type": "llama"}
    return draft_config_from_target(hf, draft_vocab_size=draft_vocab)


def bench(cfg, tokens: int, seq_len: int, steps: int, ttt: int, autocast: bool) -> dict:
    from confu_lightning.draft.eagle3 import Eagle3Draft, draft_flops_per_token
    from confu_lightning.train.losses import teacher_targets, ttt_loss
    from confu_lightning.train.ttt import ttt_unroll

    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    b = max(1, tokens // seq_len)
    ids = torch.randint(0, cfg.target_vocab_size, (b, seq_len))
    aux = torch.randn(b, seq_len, 3 * cfg.hidden_size)
    last = torch.randn(b, seq_len, cfg.hidden_size) * 4
    head = torch.randn(cfg.target_vocab_size, cfg.hidden_size) * 0.05
    mask = torch.ones(b, seq_len, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    times, teacher_s = [], 0.0
    for i in range(steps + 1):  # step 0 is warm-up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            teacher = teacher_targets(last, head, draft.t2d)
            t1 = time.perf_counter()
            out = ttt_unroll(draft, ids, aux, steps=ttt)
            loss = ttt_loss(out, teacher, mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
            teacher_s += t1 - t0
    step_s = sum(times) / len(times)
    flops = draft_flops_per_token(cfg, ttt, seq_len) * b * seq_len
    return {"batch": [b, seq_len], "step_s": round(step_s, 3), "tokens_per_s": round(b * seq_len / step_s, 1),
            "teacher_share": round(teacher_s / sum(times), 3), "draft_gflop_per_step": round(flops / 1e9, 1),
            "draft_gflops": round(flops / step_s / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ttt", type=int, default=7)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    args = parser.parse_args()
    cfg = smollm2_config(args.draft_vocab)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result = {"threads": torch.get_num_threads(), "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):
        r = bench(cfg, args.tokens, args.seq_len, args.steps, args.ttt, autocast)
        r["mfu"] = round(r["draft_gflops"] * 1e9 / peaks["bf16" if autocast else "fp32"], 3)
        result[name] = r
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
