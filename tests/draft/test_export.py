"""Draft checkpoints: native / EAGLE / speculators round trips are bit-exact; layouts, configs and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from confu_lightning.draft import export
from confu_lightning.draft.eagle3 import Eagle3Draft, Eagle3DraftConfig
from confu_lightning.draft.export import (
    detect_layout, export_eagle, export_speculators, has_embedding, load_draft, load_draft_meta, load_exported,
    save_draft, sglang_layer_ids,
)
from confu_lightning.draft.vocab import build_draft_vocab
from confu_lightning.errors import DraftError

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
         "post_attention_layernorm.weight"]
HEAD = {"fc.weight", "norm.weight", "lm_head.weight"}
VOCAB = {"d2t", "t2d"}


def layer_keys(prefix: str, first: bool = True) -> set[str]:
    return {f"{prefix}{name}" for name in LAYER + (["hidden_norm.weight"] if first else [])}


def make_draft(n_layers: int = 1, draft_vocab: int = 64, seed: int = 0) -> Eagle3Draft:
    """A tiny draft with a real vocabulary, random weights and non-unit norms (so swapped keys show)."""
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                            target_vocab_size=320, draft_vocab_size=draft_vocab, rms_norm_eps=1e-5, rope=ROPE,
                            max_position_embeddings=128, n_layers=n_layers, aux_layers=(2, 4, 5))
    draft = Eagle3Draft(cfg).eval()
    vocab = build_draft_vocab(torch.randint(0, 1000, (320,)), draft_vocab)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    with torch.no_grad():
        for param in draft.parameters():
            if param.ndim == 1:
                param.normal_(1.0, 0.3)
    return draft


def logits(draft: Eagle3Draft) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (2, 7), generator=g)
    aux = torch.randn(2, 7, 192, generator=g)  # (B, T, 3H) target features
    positions = torch.arange(3, 10).expand(2, 7)
    with torch.no_grad():
        return draft(ids, draft.fuse(aux), positions).logits


def assert_same_draft(got: Eagle3Draft, want: Eagle3Draft) -> None:
    assert torch.equal(got.d2t, want.d2t) and torch.equal(got.t2d, want.t2d)
    assert torch.equal(logits(got), logits(want))


def test_native_round_trip_is_exact(tmp_path: Path) -> None:
    draft = make_draft()
    out = save_draft(draft, tmp_path / "native", extra_meta={"step": 12, "target": "tiny"})
    assert sorted(p.name for p in out.iterdir()) == ["draft.safetensors", "draft_config.json"]
    assert set(load_file(out / "draft.safetensors")) == layer_keys("layers.0.") | HEAD | VOCAB  # no embedding
    again = load_draft(out, embedding=draft.embed_tokens.weight)
    assert again.config == draft.config and again.config.rope == ROPE
    assert_same_draft(again, draft)
    assert load_draft_meta(out) == {"step": 12, "target": "tiny"} and detect_layout(out) == "native"
    bare = load_draft(out)
    assert not has_embedding(bare) and has_embedding(again)
    assert torch.equal(load_exported(out, draft.embed_tokens.weight).d2t, draft.d2t)


def test_native_round_trip_keeps_bf16_weights(tmp_path: Path) -> None:
    draft = make_draft()
    for param in draft.parameters():
        param.data = param.data.to(torch.bfloat16)
    again = load_draft(save_draft(draft, tmp_path / "bf16"), draft.embed_tokens.weight)
    assert again.fc.weight.dtype == torch.bfloat16 and again.rotary.inv_freq.dtype == torch.float32
    assert_same_draft(again, draft)


def test_eagle_export_layout_config_and_round_trip(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    draft = make_draft()
    out = export_eagle(draft, tmp_path / "eagle", target_name_or_path="org/tiny-target", eos_token_id=[2, 3])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(out / "model.safetensors")) == layer_keys("midlayer.") | HEAD | VOCAB
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert (config["draft_vocab_size"], config["vocab_size"], config["num_hidden_layers"]) == (64, 320, 1)
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
    assert (config["head_dim"], config["intermediate_size"], config["target_hidden_size"]) == (16, 128, 64)
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_parameters"] == ROPE and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == [2, 3] and "bos_token_id" not in config
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # SGLang: output of layer
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM: HF hidden_states index
    assert config["confu_lightning"]["target_name_or_path"] == "org/tiny-target"
    hf = LlamaConfig.from_dict(config)  # what SGLang / vLLM build from the file
    assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.draft_vocab_size == 64
    again = load_exported(out, embedding=draft.embed_tokens.weight)
    assert again.config.aux_layers == (2, 4, 5) and again.config.rope == ROPE and detect_layout(out) == "eagle"
    assert_same_draft(again, draft)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_speculators_export_layout_config_and_round_trip(tmp_path: Path, n_layers: int) -> None:
    from transformers import LlamaConfig

    draft = make_draft(n_layers)
    out = export_speculators(draft, tmp_path / "spec", verifier_name_or_path="org/tiny-target",
                             verifier_architectures="LlamaForCausalLM", speculative_tokens=4)
    keys = layer_keys("layers.0.") | HEAD | VOCAB | (layer_keys("layers.1.", first=False) if n_layers == 2 else set())
    assert set(load_file(out / "model.safetensors")) == keys
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert config["draft_vocab_size"] == 64 and config["target_hidden_size"] == 64
    assert config["norm_before_residual"] is False and config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert isinstance(config["speculators_version"], str)
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 4, "verifier_accept_k": 1,
                                         "accept_tolerance": 0.0}]
    assert spec["verifier"] == {"name_or_path": "org/tiny-target", "architectures": ["LlamaForCausalLM"]}
    layer = LlamaConfig(**config["transformer_layer_config"])  # how speculators / vLLM read it
    assert (layer.vocab_size, layer.num_hidden_layers, layer.head_dim) == (320, n_layers, 16)
    assert layer.rope_parameters == ROPE
    again = load_exported(out, embedding=draft.embed_tokens.weight)
    assert again.config.n_layers == n_layers and detect_layout(out) == "speculators"
    assert_same_draft(again, draft)


def test_full_vocabulary_speculators_export_stores_no_mapping(tmp_path: Path) -> None:
    draft = make_draft(draft_vocab=320)  # Vd == V: identity mapping
    out = export_speculators(draft, tmp_path / "full", verifier_name_or_path="t", verifier_architectures=["X"])
    assert not VOCAB & set(load_file(out / "model.safetensors"))
    assert_same_draft(load_exported(out, draft.embed_tokens.weight), draft)


def test_layer_id_conversion_and_a_stored_embedding(tmp_path: Path) -> None:
    assert sglang_layer_ids([2, 16, 29]) == [1, 15, 28]  # Llama-3.1-8B, research/anchors.md §0
    draft = make_draft()
    out = export_eagle(draft, tmp_path / "eagle", target_name_or_path="t")
    config = json.loads((out / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [1, 3, 4]  # SGLang ids pasted into vLLM's field
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftError, match="disagree"):
        load_exported(out)
    del config["eagle_aux_hidden_state_layer_ids"]
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(out / "model.safetensors")
    tensors["embed_tokens.weight"] = draft.embed_tokens.weight.detach().clone()  # e.g. SpecForge --to hf
    save_file(tensors, out / "model.safetensors")
    again = load_exported(out)
    assert again.config.aux_layers == (2, 4, 5)
    assert_same_draft(again, draft)


def test_export_can_cast_for_serving(tmp_path: Path) -> None:
    draft = make_draft()
    out = export_eagle(draft, tmp_path / "bf16", target_name_or_path="t", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(out / "model.safetensors")
    assert stored["fc.weight"].dtype == torch.bfloat16 and stored["d2t"].dtype == torch.int64
    for param in draft.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert_same_draft(load_exported(out, draft.embed_tokens.weight), draft)


def test_configs_without_default_fields_load_like_llama_config(tmp_path: Path) -> None:
    """`save_pretrained` drops fields equal to LlamaConfig defaults; the serving engines fill them back in."""
    draft = make_draft()
    out = export_speculators(draft, tmp_path / "spec", verifier_name_or_path="t", verifier_architectures=["X"])
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_act", "attention_bias", "mlp_bias", "head_dim", "rope_scaling", "rope_theta"):
        del config["transformer_layer_config"][key]
    (out / "config.json").write_text(json.dumps(config))
    assert_same_draft(load_exported(out, draft.embed_tokens.weight), draft)
    config["transformer_layer_config"]["hidden_size"] = "wide"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftError, match="not a valid Llama config"):
        load_exported(out)
    native = save_draft(draft, tmp_path / "native")
    stored = json.loads((native / "draft_config.json").read_text())
    del stored["config"]["intermediate_size"]
    (native / "draft_config.json").write_text(json.dumps(stored))
    with pytest.raises(DraftError, match="draft_config.json: invalid draft config"):
        load_draft(native)


@pytest.mark.parametrize("bad", ["zeros", "arange"])
def test_trivial_d2t_is_refused_on_export_and_load(tmp_path: Path, bad: str) -> None:
    draft = make_draft()
    good = export_speculators(draft, tmp_path / "good", verifier_name_or_path="t", verifier_architectures=["X"])
    with torch.no_grad():
        draft.d2t.copy_(torch.zeros(64, dtype=torch.long) if bad == "zeros" else torch.arange(64))
    for write in (lambda d: save_draft(draft, d), lambda d: export_eagle(draft, d, target_name_or_path="t"),
                  lambda d: export_speculators(draft, d, verifier_name_or_path="t", verifier_architectures=["X"])):
        with pytest.raises(DraftError, match="silently ruins acceptance"):
            write(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    tensors = load_file(good / "model.safetensors")
    tensors["d2t"] = draft.d2t.clone()
    save_file(tensors, good / "model.safetensors")
    with pytest.raises(DraftError, match="silently ruins acceptance"):
        load_exported(good)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    out = export_eagle(make_draft(), tmp_path / "eagle", target_name_or_path="t")
    tensors = load_file(out / "model.safetensors")
    extra = {**tensors, "midlayer.self_attn.rotary.inv_freq": torch.ones(8)}
    del extra["midlayer.hidden_norm.weight"]
    save_file(extra, out / "model.safetensors")
    with pytest.raises(DraftError, match=r"missing tensors \['layers.0.hidden_norm.weight'\].*inv_freq"):
        load_exported(out)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(DraftError, match=r"layers.0.mlp.gate_proj.weight \(128, 64\) \(expected \(96, 64\)\)"):
        load_exported(out)
    (out / "config.json").write_text(json.dumps({**config, "draft_vocab_size": 60}))
    with pytest.raises(DraftError, match=r"d2t \(64,\) \(expected \(60,\)\)"):
        load_exported(out)
    native = save_draft(make_draft(), tmp_path / "native")
    tensors = load_file(native / "draft.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, native / "draft.safetensors")
    with pytest.raises(DraftError, match=r"missing tensors \['lm_head.weight'\]"):
        load_draft(native)


def test_unsupported_exports_and_configs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DraftError, match="n_layers=2.*export_speculators"):
        export_eagle(make_draft(n_layers=2), tmp_path / "eagle2", target_name_or_path="t")
    assert not (tmp_path / "eagle2").exists()
    out = export_speculators(make_draft(), tmp_path / "spec", verifier_name_or_path="t", verifier_architectures=["X"])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "norm_before_residual": True}))
    with pytest.raises(DraftError, match="norm_before_residual set"):
        load_exported(out)
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DraftError, match="neither an EAGLE-3"):
        load_exported(out)
    with pytest.raises(DraftError, match="config.json not found"):
        load_exported(tmp_path / "nowhere")


def test_exports_are_atomic_and_do_not_clobber(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draft = make_draft()
    out = save_draft(draft, tmp_path / "d")
    with pytest.raises(DraftError, match="already exists"):
        save_draft(draft, out)
    save_draft(draft, out, extra_meta={"v": 2}, overwrite=True)
    assert load_draft_meta(out) == {"v": 2}

    def broken_write(tmp: Path, *args: object) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write", broken_write)
    with pytest.raises(DraftError, match="disk full"):
        export_eagle(draft, tmp_path / "e", target_name_or_path="t")
    with pytest.raises(DraftError, match="disk full"):
        save_draft(draft, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or half-written directories
    assert load_draft_meta(out) == {"v": 2}  # the old checkpoint survived the failed overwrite
