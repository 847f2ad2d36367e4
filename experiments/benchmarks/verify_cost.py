"""Cost of one target forward over N new tokens (a verification tree) relative to one token (an AR step).

Speculative decoding pays one forward over the whole draft tree per round, so whether it can win
on a machine is set by this curve: a tree of N nodes must return more than cost(N) / cost(1)
tokens per round (plus drafting). The forward runs after a cached prefix, with an explicit tree
mask for N > 1, through the same adapter the engine uses; medians of `--repeats` calls, one process.

    .venv/bin/python experiments/benchmarks/verify_cost.py --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from confu_lightning.config.schema import TargetConfig
    from confu_lightning.eval.adapters import TargetAdapter
    from confu_lightning.target.wrapper import crop_cache, load_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prefix", type=int, default=300, help="tokens already in the KV cache")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 48, 64])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    report = {}
    for dtype in args.dtypes:
        adapter = TargetAdapter(load_target(TargetConfig(name=args.target, dtype=dtype)))
        vocab = adapter.target.vocab_size
        gen = torch.Generator().manual_seed(0)
        cache = adapter.new_cache()
        prefix_ids = torch.randint(0, vocab, (args.prefix,), generator=gen)
        adapter.forward(prefix_ids, torch.arange(args.prefix), None, cache)
        ms = {}
        for n in args.nodes:
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(n, args.prefix, dtype=torch.bool), causal], 1)
            times = []
            for _ in range(args.repeats + 2):  # the first two are warm-up
                ids = torch.randint(0, vocab, (n,), generator=gen)
                start = time.perf_counter()
                adapter.forward(ids, torch.arange(args.prefix, args.prefix + n), mask if n > 1 else None, cache)
                times.append(time.perf_counter() - start)
                crop_cache(cache, args.prefix)
            ms[n] = statistics.median(times[2:]) * 1000
        one = ms[args.nodes[0]]
        report[dtype] = {str(n): {"ms": round(v, 2), "x_one_token": round(v / one, 3)} for n, v in ms.items()}
    print(json.dumps({"target": args.target, "prefix": args.prefix, "threads": torch.get_num_threads(),
                      "forward_cost": report}, indent=2))


if __name__ == "__main__":
    main()
