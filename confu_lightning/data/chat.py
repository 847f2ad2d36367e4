"""Chat-template tokenisation with an assistant-only loss mask found by render boundaries.

Implements the *Tokenized sample* contract of DESIGN.md §5. The target's own chat template renders
the conversation; for assistant turn j, the text that rendering `messages[:j+1]` adds over
`messages[:j]` is that turn, and the part of it that `add_generation_prompt=True` would already
add after `messages[:j]` is its role header. The supervised text of the turn is what remains: the
content and its end-of-turn marker (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama-3), i.e. exactly
what the target generates after the generation prompt, up to and including its stop token.
Whitespace the template writes *after* the end-of-turn marker (ChatML's `\n`) is not supervised,
because the target stops before generating it. No separator is hard-coded, and template-injected
text (a default system prompt) is never supervised.

The full render is tokenised once; character spans become token masks through the fast tokenizer's
offset mapping, so a BPE merge across a boundary cannot shift the mask. A token overlapping a
supervised span is supervised.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confu_lightning.data.conversations import Conversation, SkipCounts
from confu_lightning.errors import ConfigError, DataError

OVERLONG = ("truncate", "drop")


@dataclass
class TokenizedSample:
    """One tokenised conversation; `loss_mask[i]` is 1 where `input_ids[i]` is assistant output."""

    id: str
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False
    """Whether the conversation was cut to `max_seq_len` tokens."""

    @property
    def n_supervised(self) -> int:
        """Number of supervised tokens."""
        return sum(self.loss_mask)


class UnusableConversation(DataError):
    """A conversation yields no sample; `tokenize_conversation` counts `reason` and returns None."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"conversation gives no training sample: {reason}")
        self.reason = reason


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Raise `DataError` unless `tokenizer` has a chat template and character offsets (a fast tokenizer)."""
    name = _tokenizer_name(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {name!r} has no chat template; use a chat (instruct) model or set "
                        "`tokenizer.chat_template`")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {name!r} is not a fast tokenizer; the loss mask needs its offset "
                        "mapping (load it with `use_fast=True`)")


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as exc:  # e.g. a template that refuses system turns or empty histories
        raise UnusableConversation("template_error") from exc
    if not isinstance(text, str):
        raise DataError(f"chat template of {_tokenizer_name(tokenizer)!r} rendered {type(text).__name__}, not text")
    return text


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and find the supervised character span of each assistant turn.

    Returns:
        The full render and sorted `(start, end)` character spans into it, one per non-empty
        assistant turn: content plus end-of-turn marker, without role header or trailing whitespace.

    Raises:
        UnusableConversation: The template fails on a prefix (`template_error`), or rendering a
            prefix does not give a prefix of the full render (`template_not_incremental`).
    """
    full = _render(tokenizer, messages)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j])
        prompt = _render(tokenizer, messages[:j], generation_prompt=True)
        upto = full if j == len(messages) - 1 else _render(tokenizer, messages[: j + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UnusableConversation("template_not_incremental")
        header = prompt[len(before):] if prompt.startswith(before) else ""
        turn = upto[len(before):]
        # A template whose generation prompt differs from its rendered header (rare) still gets
        # the common part excluded.
        start = len(before) + len(os.path.commonprefix([header, turn]))
        end = len(before) + len(turn.rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps a span; both inputs are sorted by position."""
    mask, k = [0] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        if start < spans[k][1] and max(end, start + 1) > spans[k][0]:
            mask[i] = 1
    return mask


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_seq_len: int,
    overlong: str = "truncate",
    *,
    sample_id: str = "",
    counts: SkipCounts | None = None,
) -> TokenizedSample | None:
    """Tokenise a conversation with its target's chat template and mask the assistant output.

    Args:
        tokenizer: A fast `transformers` tokenizer with a chat template.
        messages: Turns `{"role", "content"}` as in `Conversation.messages`.
        max_seq_len: Longest sequence kept, in tokens.
        overlong: `truncate` keeps the first `max_seq_len` tokens; `drop` discards the sample.
        sample_id: Id carried into the sample and named in skip examples.
        counts: Receives the reason whenever None is returned: `no_assistant_turn` (nothing
            to supervise), `overlong_dropped`, `no_supervised_after_truncation`,
            `template_error`, `template_not_incremental`.

    Returns:
        The sample, or None when no token would be supervised or the sample is dropped.
    """
    if overlong not in OVERLONG:
        raise ConfigError(f"`data.overlong` must be one of {OVERLONG}, got {overlong!r}")
    check_chat_tokenizer(tokenizer)
    try:
        full, spans = assistant_spans(tokenizer, messages)
        if not spans:
            raise UnusableConversation("no_assistant_turn")
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, mask = list(encoding["input_ids"]), _mask_from_offsets(encoding["offset_mapping"], spans)
        truncated = len(input_ids) > max_seq_len
        if truncated and overlong == "drop":
            raise UnusableConversation("overlong_dropped")
        input_ids, mask = input_ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            raise UnusableConversation("no_supervised_after_truncation" if truncated else "no_assistant_turn")
    except UnusableConversation as unusable:
        if counts is not None:
            counts.add(unusable.reason, sample_id or None)
        return None
    return TokenizedSample(id=sample_id, input_ids=input_ids, loss_mask=mask, truncated=truncated)


def tokenize_conversations(
    tokenizer: Any,
    conversations: Iterable[Conversation],
    max_seq_len: int,
    overlong: str = "truncate",
    counts: SkipCounts | None = None,
) -> list[TokenizedSample]:
    """`tokenize_conversation` over many conversations; unusable ones are counted in `counts`."""
    samples = []
    for conversation in conversations:
        sample = tokenize_conversation(tokenizer, conversation.messages, max_seq_len, overlong,
                                       sample_id=conversation.id, counts=counts)
        if sample is not None:
            samples.append(sample)
    return samples
