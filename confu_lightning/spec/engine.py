"""The speculative decoding loop (EAGLE-3 style) and the autoregressive baseline it is compared with.

research/eval-anchors.md §3.4 and DESIGN.md §6: prefill the target (and the draft with the
target's features), then per round: draft a chain or dynamic tree, run *one* target forward over
the tree with a bool mask (prefix all visible + `tree_mask`) and positions `n + depth`, verify,
keep the prefix plus the accepted path in the target cache (`select_cache`; this also drops
ConFu extra tokens), append the accepted tokens and the bonus token. Batch size 1. τ is reported
per round as accepted + 1 (Spec-Bench `accept_lengths`); the first token comes from the prefill
and belongs to no round. Rounds are recorded untruncated; `tokens` is cut at EOS / the budget.

Timings are wall clock and need no explicit device synchronisation: each timed phase ends by
copying its result to the host (drafted ids `.cpu()`, the accepted path and bonus as ints, the new
tokens `.tolist()`), which waits for the GPU's queued work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from confu_lightning.spec.drafting import draft_chain, draft_dynamic
from confu_lightning.spec.protocols import DraftLike, ExtraInputs, SpecError, TargetLike, TargetStep
from confu_lightning.spec.tree import DraftTree
from confu_lightning.spec.verify import process_logits, sample, verify_chain_sampling, verify_greedy, \
    verify_tree_sampling


@dataclass
class GenerationResult:
    """One request's output and accounting (times in seconds, CPU wall clock)."""

    tokens: list[int]
    verify_forwards: int
    accept_lengths: list[int] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_bookkeeping: float = 0.0

    @property
    def tau(self) -> float:
        """Mean accepted tokens per verification forward (accepted + bonus); 1.0 for AR."""
        return sum(self.accept_lengths) / max(1, len(self.accept_lengths))

    @property
    def wall_time(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_bookkeeping


class RoundHooks(Protocol):
    """ConFu pass-through: extra verification tokens and per-round draft conditioning (no logic here)."""

    def verify_extra(self, tree: DraftTree, prefix_len: int) -> ExtraInputs | None:
        """Extra tokens for this round's verification forward (placed after the tree tokens)."""

    def conditioning(self, step: TargetStep, path: Tensor) -> Any:
        """Draft conditioning for the next round from the verification outputs and accepted `path`."""


def _finish(tokens: list[int], new: list[int], eos_id: int | None, budget: int) -> tuple[list[int], bool]:
    """Append `new`, cut at the first EOS or at `budget` tokens; returns (tokens, stop)."""
    for tok in new:
        tokens.append(tok)
        if (eos_id is not None and tok == eos_id) or len(tokens) >= budget:
            return tokens, True
    return tokens, False


def _pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Next token from one logits row with the shared processor (argmax at temperature 0)."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    return int(sample(process_logits(logits, temperature, top_p)[None].cpu(), generator)[0])


def autoregressive(target: TargetLike, prompt_ids: Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> GenerationResult:
    """Vanilla decoding through the same target protocol and cache code. Shapes: prompt_ids (P,)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = prompt_ids.flatten().long()
    start = time.perf_counter()
    cache = target.new_cache()
    step = target.forward(prompt, torch.arange(prompt.numel()), None, cache)
    result = GenerationResult(tokens=[], verify_forwards=0)
    tokens, stop = _finish([], [_pick(step.logits[-1], temperature, top_p, generator)], eos_id, max_new_tokens)
    result.time_prefill = time.perf_counter() - start
    start = time.perf_counter()
    while not stop:
        n = target.cache_length(cache)
        step = target.forward(torch.tensor([tokens[-1]]), torch.tensor([n]), None, cache)
        result.verify_forwards += 1
        result.accept_lengths.append(1)
        tokens, stop = _finish(tokens, [_pick(step.logits[-1], temperature, top_p, generator)], eos_id,
                               max_new_tokens)
    result.time_verify = time.perf_counter() - start
    result.tokens = tokens
    return result


@dataclass
class _State:
    """Mutable per-request state: committed sequence, draft rows still to feed, next conditioning."""

    seq: list[int]
    pending: Tensor  # (n - c, F) target features of positions c..n-1 not yet fed to the draft
    fed: int  # c: the draft cache holds rows 1..c
    conditioning: Any = None


class SpeculativeEngine:
    """Speculative decoding with a chain or an EAGLE-2 dynamic tree (batch size 1).

    Args:
        tree: "chain" drafts `depth` tokens; "dynamic" builds an EAGLE-2 tree of `total_tokens`
            nodes (root included) from `top_k` expansions, longest path `depth`.
        temperature, top_p: the target's sampling; 0 = greedy (lossless w.r.t. greedy AR).
        hooks: optional ConFu pass-through (`RoundHooks`).
    """

    def __init__(self, target: TargetLike, draft: DraftLike, *, tree: Literal["chain", "dynamic"] = "chain",
                 depth: int = 5, top_k: int = 8, total_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, eos_id: int | None = None, max_new_tokens: int = 64, seed: int = 0,
                 hooks: RoundHooks | None = None) -> None:
        if tree not in ("chain", "dynamic"):
            raise SpecError(f"tree must be 'chain' or 'dynamic', got {tree!r}")
        if depth < 1 or top_k < 1 or total_tokens < 2 or max_new_tokens < 1:
            raise SpecError("need depth >= 1, top_k >= 1, total_tokens >= 2 and max_new_tokens >= 1")
        self.target, self.draft, self.tree = target, draft, tree
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        self.temperature, self.top_p, self.eos_id = temperature, top_p, eos_id
        self.max_new_tokens, self.seed, self.hooks = max_new_tokens, seed, hooks
        self.generator = torch.Generator().manual_seed(seed)
        self._vocab_size: int | None = None  # learned from the prefill logits (sampled chains scatter q into V)

    def generate(self, prompt_ids: Tensor) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt_ids` (P,)."""
        self.generator = torch.Generator().manual_seed(self.seed)
        prompt = prompt_ids.flatten().long()
        start = time.perf_counter()
        tcache, dcache = self.target.new_cache(), self.draft.new_cache()
        step = self.target.forward(prompt, torch.arange(prompt.numel()), None, tcache)
        first = _pick(step.logits[-1], self.temperature, self.top_p, self.generator)
        self._vocab_size = int(step.logits.shape[-1])
        result = GenerationResult(tokens=[], verify_forwards=0)
        tokens, stop = _finish([], [first], self.eos_id, self.max_new_tokens)
        state = _State(seq=prompt.tolist() + [first], pending=step.features, fed=0)
        result.time_prefill = time.perf_counter() - start
        while not stop:
            new = self._round(state, tcache, dcache, result)
            tokens, stop = _finish(tokens, new, self.eos_id, self.max_new_tokens)
        result.tokens = tokens
        return result

    def _draft(self, state: _State, dcache: Any) -> tuple[DraftTree, Tensor | None, int]:
        """Feed the pending rows (target features) to the draft, then grow this round's tree."""
        n = len(state.seq) - 1  # position of the root = target cache length
        rows = torch.tensor(state.seq[state.fed + 1: n + 1])
        feats = self.draft.encode_target(state.pending)
        out = self.draft.forward(rows, feats, torch.arange(state.fed + 1, n + 1), None, dcache, state.conditioning)
        state.fed = n
        root, logits, hidden = state.seq[-1], out.logits[-1], out.hidden[-1]
        if self.tree == "dynamic":
            tree = draft_dynamic(self.draft, dcache, root, n, logits, hidden, depth=self.depth, top_k=self.top_k,
                                 total_tokens=self.total_tokens, conditioning=state.conditioning)
            return tree, None, n
        tree, q = draft_chain(self.draft, dcache, root, n, logits, hidden, self.depth, temperature=self.temperature,
                              vocab_size=self._vocab_size, generator=self.generator, conditioning=state.conditioning)
        return tree, q, n

    def _verify(self, tree: DraftTree, q: Tensor | None, logits: Tensor) -> tuple[Tensor, int]:
        """Accepted path (root first) and the bonus token for this round's target logits (N, V)."""
        if self.temperature <= 0:
            return verify_greedy(tree, logits)
        p = process_logits(logits, self.temperature, self.top_p).cpu()  # (N, V)
        if q is not None:  # sampled chain: recursive rejection against the recorded q
            n_acc, nxt = verify_chain_sampling(tree.tokens[1:][None], q[None], p[None], self.generator)
            return torch.arange(int(n_acc[0]) + 1), int(nxt[0])
        paths, n_acc, bonus = verify_tree_sampling(tree, p[None], self.generator)
        return paths[0, : int(n_acc[0]) + 1], int(bonus[0])

    def _round(self, state: _State, tcache: Any, dcache: Any, result: GenerationResult) -> list[int]:
        """One draft → verify → compact round; returns the tokens it emits (accepted + bonus)."""
        t0 = time.perf_counter()
        tree, q, n = self._draft(state, dcache)
        t1 = time.perf_counter()
        extra = None if self.hooks is None else self.hooks.verify_extra(tree, n)
        mask = torch.cat([torch.ones(tree.num_nodes, n, dtype=torch.bool), tree.tree_mask], 1)  # (N, n+N)
        step = self.target.forward(tree.tokens, tree.positions(n), mask, tcache, extra)
        path, bonus = self._verify(tree, q, step.logits)
        t2 = time.perf_counter()
        self.target.select_cache(tcache, torch.cat([torch.arange(n), n + path]))
        new = tree.tokens[path[1:]].tolist() + [bonus]
        state.seq += new
        state.pending = step.features[path.to(step.features.device)]
        if self.hooks is not None:
            state.conditioning = self.hooks.conditioning(step, path)
        result.verify_forwards += 1
        result.accept_lengths.append(len(new))
        result.time_draft += t1 - t0
        result.time_verify += t2 - t1
        result.time_bookkeeping += time.perf_counter() - t2
        return new
