"""Our autoregressive loop (the speed-up baseline) against HF `generate` on the same prompts.

Both decode greedily with a KV cache, batch 1, same prompts and lengths, in one process, after one
warm-up prompt each; the outputs must match token for token. A baseline slower than HF would
inflate every speed-up we report, so this ratio belongs next to them.

    .venv/bin/python experiments/benchmarks/ar_vs_hf.py --prompts 20 --max-new-tokens 64
    .venv/bin/python experiments/benchmarks/ar_vs_hf.py --prompts 20 --max-new-tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from confu_lightning.config.schema import TargetConfig
    from confu_lightning.eval.adapters import TargetAdapter
    from confu_lightning.eval.bench import chat_prompt_ids
    from confu_lightning.eval.prompts import load_eval_prompts
    from confu_lightning.spec.engine import autoregressive
    from confu_lightning.target.wrapper import load_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    target = load_target(TargetConfig(name=args.target, dtype=args.dtype))
    tok = target.tokenizer
    prompts = [chat_prompt_ids(tok, None, [{"role": "user", "content": p.turns[0]}])
               for p in load_eval_prompts("builtin", limit=args.prompts + 1)]
    adapter = TargetAdapter(target)

    def ours(ids: torch.Tensor) -> list[int]:
        return autoregressive(adapter, ids, max_new_tokens=args.max_new_tokens, eos_id=tok.eos_token_id).tokens

    def hf(ids: torch.Tensor) -> list[int]:
        out = target.model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=False,
                                    max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
        return out[0, ids.numel():].tolist()

    timing, tokens, same = {"ours": 0.0, "hf": 0.0}, 0, 0
    for name, fn in (("ours", ours), ("hf", hf)):
        fn(prompts[0])  # warm-up
    for ids in prompts[1:]:
        outs = {}
        for name, fn in (("ours", ours), ("hf", hf)):
            start = time.perf_counter()
            with torch.no_grad():
                outs[name] = fn(ids)
            timing[name] += time.perf_counter() - start
        tokens += len(outs["ours"])
        same += outs["ours"] == outs["hf"][: len(outs["ours"])]
    print(json.dumps({"dtype": args.dtype, "prompts": len(prompts) - 1, "tokens": tokens, "identical_outputs": same,
                      "ours_tokens_per_s": round(tokens / timing["ours"], 2),
                      "hf_tokens_per_s": round(tokens / timing["hf"], 2),
                      "ours_over_hf_speed": round(timing["hf"] / timing["ours"], 3)}, indent=2))


if __name__ == "__main__":
    main()
