"""Response regeneration: the target re-answers every user turn, so the draft learns the target's own
distribution (EAGLE-3 §4 / SpecForge practice; DESIGN.md §5).

Conversations are processed in chunks of `batch_size`, shortest first (less left padding). Inside a chunk the user turns are answered
in order, turn by turn, one batched left-padded `generate` per turn depth, each answer feeding
the next turn's history; original assistant turns are discarded. Finished chunks are appended to
a JSONL file and flushed, so a killed run resumes where it stopped: ids already on disk are
skipped and a torn trailing line is cut off. With several ranks each takes every `world_size`-th
conversation and writes its own part file. Receives the HF model and tokenizer (no `target` import).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from confu_lightning.data.conversations import Conversation
from confu_lightning.errors import DataError

PART_GLOB = "conversations*.jsonl"


@dataclass(frozen=True)
class GenerationSettings:
    """How the target answers: lengths, sampling and batching."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0


@dataclass
class RegenerateReport:
    """What one `regenerate` call did."""

    written: int = 0
    already_done: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    path: str = ""
    skipped: Counter = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def part_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """The JSONL file rank `rank` appends to."""
    if world_size == 1:
        return out_dir / "conversations.jsonl"
    return out_dir / f"conversations.rank{rank:03d}-of-{world_size:03d}.jsonl"


def repair_jsonl(path: Path) -> None:
    """Cut a torn trailing line (a run killed mid-write) so appends start on a clean line."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)


def iter_regenerated(out_dir: str | os.PathLike) -> Iterator[Conversation]:
    """Every conversation written so far, over all part files, in file then line order."""
    for path in sorted(Path(out_dir).glob(PART_GLOB)):
        with open(path) as fh:
            for number, line in enumerate(fh, 1):
                if not line.endswith("\n"):
                    break  # torn tail of a killed run; `repair_jsonl` removes it on resume
                try:
                    yield Conversation.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{number}: not a conversation record ({err})") from None


def regenerate(
    conversations: Sequence[Conversation],
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    settings: GenerationSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> RegenerateReport:
    """Answer every user turn of this rank's share of `conversations` and append them to a JSONL file.

    Returns:
        Counts, generated tokens, throughput and the skip reasons (`no_assistant_turn`, `prompt_too_long`).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = part_path(out, rank, world_size)
    repair_jsonl(path)
    done = {c.id for c in iter_regenerated(out)}
    mine = [c for i, c in enumerate(conversations) if i % world_size == rank]
    # Similar lengths share a chunk, so left padding wastes little compute.
    todo = sorted((c for c in mine if c.id not in done), key=lambda c: sum(len(m["content"]) for m in c.messages))
    report = RegenerateReport(already_done=len(mine) - len(todo), path=str(path))
    started = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"regenerate[rank {rank}]", unit="conv", disable=not progress)
    with open(path, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), settings.batch_size):
            chunk = todo[start : start + settings.batch_size]
            answered, n_tokens = _answer_chunk(chunk, model, tokenizer, settings, report.skipped)
            for conv in answered:
                fh.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            report.written += len(answered)
            report.new_tokens += n_tokens
            report.seconds = time.perf_counter() - started
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{report.tokens_per_s:.1f}")
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _answer_chunk(
    chunk: Sequence[Conversation], model: Any, tokenizer: Any, settings: GenerationSettings, skipped: Counter
) -> tuple[list[Conversation], int]:
    """Regenerate one chunk turn by turn; returns the conversations that got at least one answer.

    A conversation whose turn cannot be answered (no room left in the context window, or an empty
    answer) ends there: it is kept with its earlier turns (`later_turns_dropped`) or, without any
    answer, skipped with that reason (`prompt_too_long`, `empty_answer`).
    """
    histories: list[list[dict[str, str]]] = [[] for _ in chunk]
    pending = [list(c.messages) for c in chunk]  # messages not yet consumed, in order
    ended: list[str | None] = [None] * len(chunk)
    n_tokens = 0
    seed = settings.seed + zlib.crc32(chunk[0].id.encode())
    while True:
        ask = []
        for i, msgs in enumerate(pending):
            while ended[i] is None and msgs and msgs[0]["role"] != "user":
                msg = msgs.pop(0)
                if msg["role"] == "system":
                    histories[i].append(msg)  # original assistant turns are dropped
            if ended[i] is None and msgs:
                histories[i].append(msgs.pop(0))
                ask.append(i)
        if not ask:
            break
        answers, count = answer_batch(model, tokenizer, [histories[i] for i in ask], settings, seed)
        seed += 1
        n_tokens += count
        for i, answer in zip(ask, answers):
            if answer:
                histories[i].append({"role": "assistant", "content": answer})
            else:  # None: no room in the context window; "": the target answered nothing
                ended[i] = "prompt_too_long" if answer is None else "empty_answer"
                histories[i].pop()
    kept = []
    for conv, history, reason in zip(chunk, histories, ended):
        if any(m["role"] == "assistant" for m in history):
            kept.append(Conversation(id=conv.id, messages=history))
            if reason is not None:
                skipped["later_turns_dropped"] += 1
        else:
            skipped[reason or "no_assistant_turn"] += 1
    return kept, n_tokens


def answer_batch(
    model: Any, tokenizer: Any, histories: Sequence[list[dict[str, str]]], settings: GenerationSettings, seed: int
) -> tuple[list[str | None], int]:
    """One left-padded batched `generate` over chat histories ending in a user turn.

    Returns:
        Per history the decoded answer (None when the prompt leaves no room in the context window,
        "" when the target answered nothing), and the number of new tokens generated in total.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    prompts = [tokenizer.apply_chat_template(h, add_generation_prompt=True, tokenize=False) for h in histories]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    fits = [i for i, x in enumerate(ids) if len(x) + settings.max_new_tokens <= limit]
    answers: list[str | None] = [None] * len(histories)
    if not fits:
        return answers, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids[i]) for i in fits)
    input_ids = torch.full((len(fits), width), pad_id, dtype=torch.long)  # (B, T) left padded
    attention = torch.zeros((len(fits), width), dtype=torch.long)
    for row, i in enumerate(fits):
        input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
        attention[row, width - len(ids[i]) :] = 1
    device = next(model.parameters()).device
    sample = settings.temperature > 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            top_k=None,
            pad_token_id=pad_id,
        )
    new = out[:, width:].cpu()  # (B, new)
    stops = _stop_ids(model, tokenizer)
    total = 0
    for row, i in enumerate(fits):
        tokens = new[row].tolist()
        cut = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
        total += cut
        text = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
        answers[i] = text
    return answers, total


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(eos if isinstance(eos, list) else [eos])
    return {s for s in stops if s is not None}
