"""Assistant-only loss masks by the render-boundary method, on ChatML and a Llama-3-style template."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from confu_lightning.data.chat import assistant_spans, tokenize_conversation, tokenize_conversations
from confu_lightning.data.conversations import Conversation, SkipCounts
from confu_lightning.errors import ConfigError, DataError

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

MULTI_TURN = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And in words, with ünïcode?"},
    {"role": "assistant", "content": "Four ✓"},
]


@pytest.fixture(scope="module")
def chatml(tiny_target_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_target_dir)


@pytest.fixture(scope="module")
def llama3(tiny_target_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    tokenizer.add_tokens(LLAMA3_SPECIALS, special_tokens=True)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def masked_runs(tokenizer, sample) -> list[str]:
    """Decode each maximal run of supervised tokens separately."""
    runs, current = [], []
    for token, bit in zip(sample.input_ids, sample.loss_mask):
        if bit:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def unmasked_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, bit in zip(sample.input_ids, sample.loss_mask) if not bit])


@pytest.mark.parametrize(("template", "eot"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_multi_turn_mask_is_exactly_assistant_content_and_end_of_turn(template: str, eot: str, chatml, llama3) -> None:
    tokenizer = {"chatml": chatml, "llama3": llama3}[template]
    sample = tokenize_conversation(tokenizer, MULTI_TURN, max_seq_len=1024, sample_id="m1")
    full = tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert sample.id == "m1" and not sample.truncated
    assert sample.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]  # one tokenisation
    assert len(sample.loss_mask) == len(sample.input_ids)
    # The trailing newline ChatML writes after <|im_end|> is not supervised (the target stops first).
    assert masked_runs(tokenizer, sample) == ["It is 4." + eot, "Four ✓" + eot]
    rest = unmasked_text(tokenizer, sample)
    for message in MULTI_TURN[:2] + MULTI_TURN[3:4]:
        assert message["content"] in rest
    assert rest.count("assistant") == 2  # both role headers stay unsupervised
    assert tokenizer.decode(sample.input_ids) == full


def test_template_injected_system_prompt_is_not_supervised(chatml) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    sample = tokenize_conversation(chatml, messages, max_seq_len=1024)
    assert "You are a helpful AI assistant." in unmasked_text(chatml, sample)
    assert masked_runs(chatml, sample) == ["Hello there<|im_end|>"]


def test_character_spans_exclude_header_and_trailing_newline(chatml) -> None:
    full, spans = assistant_spans(chatml, MULTI_TURN[:3])
    assert [full[a:b] for a, b in spans] == ["It is 4.<|im_end|>"]
    assert full[spans[0][1]:] == "\n"


def test_token_merged_across_the_header_boundary_is_supervised() -> None:
    """A BPE token spanning header and content ('\\nO') cannot shift the mask: offsets decide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from confu_lightning.target.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"ĊO": len(alphabet)}  # Ċ is "\n" in byte-level
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "O")]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no word split
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}]
    sample = tokenize_conversation(tokenizer, messages, max_seq_len=1024)
    merged = vocab["ĊO"]
    assert merged in sample.input_ids
    assert sample.loss_mask[sample.input_ids.index(merged)] == 1
    assert masked_runs(tokenizer, sample) == ["\nOK<|im_end|>"]


def test_truncate_keeps_prefix_and_drops_unsupervised(chatml) -> None:
    full = tokenize_conversation(chatml, MULTI_TURN, max_seq_len=1024)
    first_masked = full.loss_mask.index(1)
    cut = len(full.input_ids) - 3
    sample = tokenize_conversation(chatml, MULTI_TURN, max_seq_len=cut)
    assert sample.truncated and sample.input_ids == full.input_ids[:cut] and sample.loss_mask == full.loss_mask[:cut]
    counts = SkipCounts()
    assert tokenize_conversation(chatml, MULTI_TURN, max_seq_len=first_masked, sample_id="t", counts=counts) is None
    assert counts.counts == Counter({"no_supervised_after_truncation": 1})


def test_drop_discards_overlong_and_keeps_short(chatml) -> None:
    n = len(tokenize_conversation(chatml, MULTI_TURN, max_seq_len=1024).input_ids)
    counts = SkipCounts()
    assert tokenize_conversation(chatml, MULTI_TURN, max_seq_len=n - 1, overlong="drop", counts=counts) is None
    assert counts.counts == Counter({"overlong_dropped": 1})
    assert tokenize_conversation(chatml, MULTI_TURN, max_seq_len=n, overlong="drop").n_supervised > 0
    with pytest.raises(ConfigError, match="data.overlong"):
        tokenize_conversation(chatml, MULTI_TURN, max_seq_len=n, overlong="wrap")


def test_no_assistant_turn_gives_none_and_is_counted(chatml) -> None:
    counts = SkipCounts()
    prompt_only = [{"role": "user", "content": "Only a question"}]
    assert tokenize_conversation(chatml, prompt_only, max_seq_len=64, sample_id="p", counts=counts) is None
    assert counts.counts == Counter({"no_assistant_turn": 1}) and counts.examples == {"no_assistant_turn": ["p"]}


def test_tokenize_conversations_counts_unusable(chatml) -> None:
    conversations = [Conversation("a", MULTI_TURN), Conversation("b", [{"role": "user", "content": "Q"}])]
    counts = SkipCounts()
    samples = tokenize_conversations(chatml, conversations, max_seq_len=1024, counts=counts)
    assert [s.id for s in samples] == ["a"] and counts.counts == Counter({"no_assistant_turn": 1})


def test_template_failures_are_counted_not_raised(chatml) -> None:
    from copy import deepcopy

    refusing, counting = deepcopy(chatml), deepcopy(chatml)
    refuse = "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}"
    refusing.chat_template = refuse + chatml.chat_template
    counting.chat_template = "{{ messages|length }}" + chatml.chat_template  # earlier text depends on later turns
    counts = SkipCounts()
    assert tokenize_conversation(refusing, MULTI_TURN, 1024, counts=counts) is None
    assert tokenize_conversation(counting, MULTI_TURN, 1024, counts=counts) is None
    assert counts.counts == Counter({"template_error": 1, "template_not_incremental": 1})


def test_tokenizer_without_chat_template_is_an_error(chatml) -> None:
    from copy import deepcopy

    plain = deepcopy(chatml)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"tokenizer '.*tiny-random-llama.*' has no chat template; .*chat_template"):
        tokenize_conversation(plain, MULTI_TURN, max_seq_len=64)
