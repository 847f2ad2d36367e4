"""A deterministic tiny Llama target with a byte-level tokenizer and ChatML template, built offline.

Tests and CPU smoke runs need a real `transformers` causal LM and tokenizer without touching a hub.
`build_tiny_llama` writes one with `save_pretrained`, so every consumer exercises the same
`from_pretrained` path as a real target. Eight layers make the default EAGLE-3 feature indices
[2, L//2, L-3] = [2, 4, 5] distinct and ordered (with four layers they would be [2, 2, 1]).
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the template family SmolLM2-Instruct uses."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (256 byte symbols, no merges) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """The tiny model's `LlamaConfig`: 8 layers, hidden 64, 4 heads / 2 KV heads (GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.08,  # peakier than 0.02, so greedy decoding is not a coin toss
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def build_tiny_llama(dest: Path, seed: int = 0) -> None:
    """Write a deterministic tiny Llama checkpoint and tokenizer into `dest` with `save_pretrained`.

    The weights depend only on `seed`; the global torch RNG is left untouched.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    vocab_size = 320  # > len(tokenizer) = 259: real targets pad their vocabulary too
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = tiny_llama_config(vocab_size, bos_id=ids[1], eos_id=ids[2], pad_id=ids[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
