"""Draft checkpoints: our native format and the two serving layouts, EAGLE / SGLang and speculators / vLLM.

An EAGLE-3 draft (EAGLE-3 paper §3.2; research/anchors.md §0, §1.1-1.3) leaves the trainer in
one of three directory layouts, each written atomically (a temp directory renamed into place) and
validated on the way out and on the way back in (missing / unexpected tensors by name, shapes
against the config, `d2t` / `t2d` through `vocab_problem`, since an all-zero or `arange` `d2t`
silently ruins acceptance):

* native (`save_draft` / `load_draft`): `draft.safetensors` = `Eagle3Draft.trainable_state_dict()`
  (our names, `d2t` / `t2d` included) + `draft_config.json` = {format, config: `Eagle3DraftConfig`
  dict with the RoPE settings, meta}.
* EAGLE / SGLang (`export_eagle`): `model.safetensors` with `midlayer.*` (our `layers.0.*`), `fc.weight`,
  `norm.weight`, `lm_head.weight`, `d2t`, `t2d`, and an HF Llama `config.json` with architecture
  `LlamaForCausalLMEagle3` and `draft_vocab_size`. SGLang's loader reads safetensors or .bin and
  only ever builds `midlayer` for layer 0 (extra layers there are a different block), so this
  layout holds one layer only.
* speculators / vLLM (`export_speculators`): `model.safetensors` with `layers.{i}.*` (layers after
  the first are plain Llama layers, as in speculators and vLLM), `fc`, `norm`, `lm_head`, `d2t`,
  `t2d` (both left out when Vd == V, as speculators does), and a `config.json` with
  `speculators_model_type: "eagle3"`, `transformer_layer_config` and `speculators_config`.

The frozen target embedding is never stored: serving engines take the target's. Loaders take it as
`embedding=`; without it (and without an `embed_tokens.weight` in a third-party checkpoint) the
table is left all zeros and `has_embedding` says so. Target-layer ids are converted per reader
(see `sglang_layer_ids`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from confu_lightning.draft.eagle3 import EMBEDDING_KEY, Eagle3Draft, Eagle3DraftConfig
from confu_lightning.draft.vocab import DraftVocab, vocab_problem
from confu_lightning.errors import DraftError
from confu_lightning.nn.layers import rope_from_hf_config

NATIVE_FORMAT = "confu-eagle3-draft/1"
"""`format` entry of a native `draft_config.json`."""
NATIVE_WEIGHTS, NATIVE_CONFIG = "draft.safetensors", "draft_config.json"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_VERSION = "0.7.0"
"""speculators release whose EAGLE-3 config fields we write (research/anchors.md §1.3 snapshot)."""
SPECULATORS_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
"""speculators EAGLE-3 variants our draft does not implement; written false, refused when true."""

Layout = Literal["native", "eagle", "speculators"]


def sglang_layer_ids(aux_layers: Sequence[int]) -> list[int]:
    """Our aux indices -> SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids`.

    Ours are HF `output_hidden_states` indices (h = output of decoder layer h-1, 0 = embeddings).
    SGLang's `set_eagle3_layers_to_capture` adds 1 to every configured id and captures the residual
    stream entering that layer, so an id there means "output of layer id": id = h - 1. vLLM (and
    speculators, which writes the field at top level) compares its ids with the index of the layer
    about to run, i.e. the same numbers as ours ([2, 16, 29] for Llama-3.1-8B vs SGLang's [1, 15, 28]).
    """
    return [int(i) - 1 for i in aux_layers]


def has_embedding(draft: Eagle3Draft) -> bool:
    """False when a loader left the frozen embedding all zeros (call `draft.load_embedding` before use)."""
    return bool(draft.embed_tokens.weight.any())


def save_draft(draft: Eagle3Draft, directory: str | Path, *, extra_meta: Mapping[str, Any] | None = None,
               overwrite: bool = False, allow_trivial_vocab: bool = False) -> Path:
    """Write the native checkpoint (trainable weights + `d2t`/`t2d`, config, `extra_meta`); returns the directory.

    Raises:
        DraftError: an invalid vocabulary, unserialisable `extra_meta`, or an existing non-empty
            `directory` without `overwrite`.
    """
    tensors = _tensors(draft, allow_trivial_vocab)
    try:
        config = json.dumps({"format": NATIVE_FORMAT, "config": draft.config.to_dict(),
                             "meta": dict(extra_meta or {})}, indent=2)
    except (TypeError, ValueError) as err:
        raise DraftError(f"extra_meta for {directory} is not JSON-serialisable: {err}") from None
    return _publish(Path(directory), lambda tmp: _write(tmp, NATIVE_WEIGHTS, tensors, NATIVE_CONFIG, config),
                    overwrite)


def load_draft(directory: str | Path, embedding: Tensor | None = None, *,
               allow_trivial_vocab: bool = False) -> Eagle3Draft:
    """Rebuild a draft written by `save_draft`, in the stored dtype; `embedding` (V, H) fills the frozen table.

    Without `embedding` the table is all zeros (`has_embedding` is False): call `load_embedding`
    with the target's input embedding before drafting.

    Raises:
        DraftError: a missing or foreign file, missing / unexpected tensors, a shape that does not
            match the config, or an invalid vocabulary.
    """
    directory = Path(directory)
    try:
        cfg = Eagle3DraftConfig.from_dict(_native_json(directory).get("config") or {})
    except (DraftError, TypeError) as err:  # TypeError: a required field is missing
        raise DraftError(f"{directory / NATIVE_CONFIG}: invalid draft config ({err})") from None
    tensors = _read_safetensors(directory / NATIVE_WEIGHTS)
    return _materialise(cfg, tensors, embedding, directory / NATIVE_WEIGHTS, allow_trivial_vocab)


def load_draft_meta(directory: str | Path) -> dict[str, Any]:
    """The `extra_meta` stored by `save_draft`."""
    return dict(_native_json(Path(directory)).get("meta") or {})


def export_eagle(draft: Eagle3Draft, directory: str | Path, *, target_name_or_path: str,
                 bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 dtype: torch.dtype | None = None, overwrite: bool = False, allow_trivial_vocab: bool = False) -> Path:
    """Write the EAGLE / SGLang layout (`LlamaForCausalLMEagle3`) for `sglang --speculative-draft-model-path`.

    `dtype` (e.g. `torch.bfloat16`) casts the floating weights for serving; default: as trained.

    Raises:
        DraftError: more than one draft layer (the layout has a single `midlayer`), an invalid
            vocabulary, or an existing non-empty `directory` without `overwrite`.
    """
    cfg = draft.config
    if cfg.n_layers != 1:
        raise DraftError(f"the EAGLE / SGLang layout holds one decoder layer (midlayer); this draft has "
                         f"n_layers={cfg.n_layers}, export it with export_speculators instead")
    _check_aux(cfg)
    tensors = {_rename(k, "layers.0.", "midlayer."): v for k, v in _tensors(draft, allow_trivial_vocab, dtype).items()}
    config: dict[str, Any] = {"architectures": [EAGLE_ARCHITECTURE], **_llama_fields(cfg),
                              "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": _target_width(cfg),
                              "torch_dtype": _dtype_name(tensors["fc.weight"])}
    config.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None})
    if cfg.aux_layers:  # SGLang reads eagle_config (its ids), vLLM the top-level field (ours)
        config["eagle_config"] = {"use_aux_hidden_state": True,
                                  "eagle_aux_hidden_state_layer_ids": sglang_layer_ids(cfg.aux_layers)}
        config["eagle_aux_hidden_state_layer_ids"] = list(cfg.aux_layers)
    config["confu_lightning"] = _provenance(cfg, "eagle", target_name_or_path)
    text = json.dumps(config, indent=2)
    return _publish(Path(directory), lambda tmp: _write(tmp, WEIGHTS, tensors, CONFIG, text), overwrite)


def export_speculators(draft: Eagle3Draft, directory: str | Path, *, verifier_name_or_path: str,
                       verifier_architectures: str | Sequence[str], speculative_tokens: int = 3,
                       dtype: torch.dtype | None = None, overwrite: bool = False,
                       allow_trivial_vocab: bool = False) -> Path:
    """Write the speculators layout (`Eagle3Speculator`) that `vllm serve <directory>` reads.

    `speculative_tokens` becomes the greedy proposal length (vLLM's `num_speculative_tokens`);
    `dtype` casts the floating weights as in `export_eagle`.

    Raises:
        DraftError: an invalid vocabulary or `speculative_tokens`, or an existing non-empty
            `directory` without `overwrite`.
    """
    cfg = draft.config
    if speculative_tokens < 1:
        raise DraftError(f"speculative_tokens must be >= 1, got {speculative_tokens}")
    _check_aux(cfg)
    tensors = _tensors(draft, allow_trivial_vocab, dtype)
    if cfg.draft_vocab_size == cfg.target_vocab_size:  # speculators keeps no mapping for a full vocabulary
        tensors = {k: v for k, v in tensors.items() if k not in ("d2t", "t2d")}
    architectures = [verifier_architectures] if isinstance(verifier_architectures, str) else verifier_architectures
    proposal = {"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                "verifier_accept_k": 1, "accept_tolerance": 0.0}
    config = {"architectures": [SPECULATORS_ARCHITECTURE], "speculators_model_type": "eagle3",
              "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": _llama_fields(cfg),
              "draft_vocab_size": cfg.draft_vocab_size, **dict.fromkeys(SPECULATORS_FLAGS, False),
              "embed_requires_grad": False, "target_hidden_size": _target_width(cfg),
              "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers) or None,
              "speculators_config": {"algorithm": "eagle3", "proposal_methods": [proposal],
                                     "default_proposal_method": "greedy",
                                     "verifier": {"name_or_path": verifier_name_or_path,
                                                  "architectures": list(architectures)}},
              "torch_dtype": _dtype_name(tensors["fc.weight"]),
              "confu_lightning": _provenance(cfg, "speculators", verifier_name_or_path)}
    text = json.dumps(config, indent=2)
    return _publish(Path(directory), lambda tmp: _write(tmp, WEIGHTS, tensors, CONFIG, text), overwrite)


def detect_layout(directory: str | Path) -> Layout:
    """Which of the three layouts `directory` holds, from its config file."""
    directory = Path(directory)
    if (directory / NATIVE_CONFIG).is_file():
        return "native"
    config = _read_json(directory / CONFIG)
    if "speculators_model_type" in config:
        return "speculators"
    if EAGLE_ARCHITECTURE in (config.get("architectures") or []):
        return "eagle"
    raise DraftError(f"{directory / CONFIG} is neither an EAGLE-3 ({EAGLE_ARCHITECTURE}) nor a speculators config")


def load_exported(directory: str | Path, embedding: Tensor | None = None, *,
                  allow_trivial_vocab: bool = False) -> Eagle3Draft:
    """Rebuild our draft from any of the three layouts (third-party EAGLE-3 / speculators drafts too).

    `embedding` (V, H) fills the frozen table; otherwise an `embed_tokens.weight` stored in the
    checkpoint is used, or the table stays zeros (`has_embedding`).

    Raises:
        DraftError: an unknown layout, an unsupported variant, missing / unexpected tensors, shapes
            that do not match config.json, or an invalid vocabulary.
    """
    directory = Path(directory)
    layout = detect_layout(directory)
    if layout == "native":
        return load_draft(directory, embedding, allow_trivial_vocab=allow_trivial_vocab)
    config, where = _read_json(directory / CONFIG), directory / CONFIG
    cfg = _eagle_draft_config(config, where) if layout == "eagle" else _speculators_draft_config(config, where)
    tensors = _read_weights(directory)
    if layout == "eagle":
        tensors = {_rename(k, "midlayer.", "layers.0."): v for k, v in tensors.items()}
    if cfg.draft_vocab_size == cfg.target_vocab_size and not {"d2t", "t2d"} & set(tensors):
        tensors["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.int64)  # full vocabulary: identity
        tensors["t2d"] = torch.ones(cfg.target_vocab_size, dtype=torch.bool)
    return _materialise(cfg, tensors, embedding, directory / WEIGHTS, allow_trivial_vocab)


# -- configs ---------------------------------------------------------------------------------------


def _llama_fields(cfg: Eagle3DraftConfig) -> dict[str, Any]:
    """The draft's shapes and RoPE as HF Llama config fields (legacy and transformers-5 RoPE keys)."""
    rope = dict(cfg.rope)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "num_hidden_layers": cfg.n_layers, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.target_vocab_size,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "rope_theta": rope["rope_theta"], "rope_scaling": None if rope["rope_type"] == "default" else scaling,
            "rope_parameters": rope}


def _eagle_draft_config(config: Mapping[str, Any], where: Path) -> Eagle3DraftConfig:
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    direct = config.get("eagle_aux_hidden_state_layer_ids")
    aux = [int(i) + 1 for i in ids] if ids else list(direct or [])  # undo sglang_layer_ids
    if ids and direct and aux != list(direct):
        raise DraftError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids {list(ids)} (output of layer) and "
                         f"eagle_aux_hidden_state_layer_ids {list(direct)} (input of layer) disagree")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise DraftError(f"{where}: num_hidden_layers={config['num_hidden_layers']}; the EAGLE layout loads one layer")
    return _config_from_llama(_with_llama_defaults(config, where), config, aux, where)


def _speculators_draft_config(config: Mapping[str, Any], where: Path) -> Eagle3DraftConfig:
    if config.get("speculators_model_type") != "eagle3":
        raise DraftError(f"{where}: speculators_model_type {config.get('speculators_model_type')!r} is not 'eagle3'")
    flags = [flag for flag in SPECULATORS_FLAGS if config.get(flag)]
    if flags:
        raise DraftError(f"{where}: {', '.join(flags)} set; this EAGLE-3 variant is not implemented by our draft")
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, Mapping):
        raise DraftError(f"{where} has no transformer_layer_config dict")
    aux = list(config.get("eagle_aux_hidden_state_layer_ids") or [])
    return _config_from_llama(_with_llama_defaults(layer, where), config, aux, where)


def _with_llama_defaults(layer: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """`layer` completed as `LlamaConfig` completes it: `save_pretrained` leaves out fields equal to defaults."""
    from transformers import LlamaConfig

    if layer.get("model_type", "llama") != "llama":
        raise DraftError(f"{where}: model_type {layer.get('model_type')!r} is not supported (the draft is Llama)")
    try:
        return LlamaConfig(**{k: v for k, v in layer.items() if k != "model_type"}).to_dict()
    except Exception as err:  # transformers raises TypeError, ValueError or KeyError for bad fields
        raise DraftError(f"{where}: not a valid Llama config ({str(err).splitlines()[0]})") from None


def _config_from_llama(layer: Mapping[str, Any], top: Mapping[str, Any], aux: list[int],
                       where: Path) -> Eagle3DraftConfig:
    """Our config from a complete HF Llama config dict (`layer`) plus the EAGLE-3 fields (`top`)."""
    unsupported = [k for k, ok in (("hidden_act", layer.get("hidden_act", "silu") == "silu"),
                                   ("attention_bias", not layer.get("attention_bias")),
                                   ("mlp_bias", not layer.get("mlp_bias"))) if not ok]
    if unsupported:
        raise DraftError(f"{where}: unsupported {', '.join(f'{k}={layer.get(k)!r}' for k in unsupported)} "
                         "(the draft is a bias-free SiLU Llama layer)")
    if top.get("draft_vocab_size") is None:
        raise DraftError(f"{where} has no draft_vocab_size (a serving engine would reuse the target lm_head)")
    target_width = top.get("target_hidden_size")
    try:
        return Eagle3DraftConfig(
            hidden_size=int(layer["hidden_size"]), num_heads=int(layer["num_attention_heads"]),
            num_kv_heads=int(layer["num_key_value_heads"]), head_dim=int(layer["head_dim"]),
            intermediate_size=int(layer["intermediate_size"]), target_vocab_size=int(layer["vocab_size"]),
            draft_vocab_size=int(top["draft_vocab_size"]), rms_norm_eps=float(layer["rms_norm_eps"]),
            rope=rope_from_hf_config(layer), max_position_embeddings=int(layer["max_position_embeddings"]),
            n_layers=int(layer["num_hidden_layers"]), aux_layers=tuple(aux),
            target_hidden_size=None if target_width is None else int(target_width))
    except (TypeError, ValueError) as err:
        raise DraftError(f"{where}: malformed value ({err})") from None


def _check_aux(cfg: Eagle3DraftConfig) -> None:
    if cfg.aux_layers and len(cfg.aux_layers) != 3:
        raise DraftError(f"aux_layers {list(cfg.aux_layers)} must name 3 target layers (fc fuses 3 features)")


def _target_width(cfg: Eagle3DraftConfig) -> int:
    return cfg.target_hidden_size or cfg.hidden_size


def _dtype_name(weight: Tensor) -> str:
    return str(weight.dtype).removeprefix("torch.")


def _provenance(cfg: Eagle3DraftConfig, layout: str, target: str) -> dict[str, Any]:
    """Our own block in config.json (ignored by serving engines): what the draft was trained against."""
    return {"layout": layout, "target_name_or_path": target, "aux_layers_hf_index": list(cfg.aux_layers)}


# -- tensors and files -----------------------------------------------------------------------------


def _tensors(draft: Eagle3Draft, allow_trivial_vocab: bool, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Validated CPU copies of the trainable weights (floating ones cast to `dtype`) and the vocabulary buffers."""
    cfg = draft.config
    problem = vocab_problem(DraftVocab(draft.d2t.cpu(), draft.t2d.cpu()), cfg.target_vocab_size,
                            allow_trivial=allow_trivial_vocab)
    if problem:
        raise DraftError(f"refusing to export an invalid draft vocabulary: {problem}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in draft.trainable_state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


def _materialise(cfg: Eagle3DraftConfig, tensors: dict[str, Tensor], embedding: Tensor | None, where: Path,
                 allow_trivial_vocab: bool) -> Eagle3Draft:
    """Build a draft for `cfg`, check `tensors` against it by name and shape, and load them."""
    draft = Eagle3Draft(cfg)
    stored_embedding = tensors.pop(EMBEDDING_KEY, None)
    expected = {k: tuple(v.shape) for k, v in draft.trainable_state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DraftError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}")
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in tensors.items()
             if tuple(v.shape) != expected[k]]
    if wrong:
        raise DraftError(f"{where}: tensor shapes do not match the config: {'; '.join(wrong)}")
    problem = vocab_problem(DraftVocab(tensors["d2t"], tensors["t2d"]), cfg.target_vocab_size,
                            allow_trivial=allow_trivial_vocab)
    if problem:
        raise DraftError(f"{where}: invalid draft vocabulary: {problem}")
    dtype = tensors["fc.weight"].dtype
    for param in draft.parameters():  # parameters only: the RoPE table stays float32
        param.data = param.data.to(dtype)
    draft.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        draft.embed_tokens.weight.zero_()
    source = embedding if embedding is not None else stored_embedding
    if source is not None:
        draft.load_embedding(source.to(dtype))
    return draft


def _rename(key: str, old: str, new: str) -> str:
    return new + key[len(old):] if key.startswith(old) else key


def _write(tmp: Path, weights_name: str, tensors: dict[str, Tensor], config_name: str, config: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
    (tmp / config_name).write_text(config + "\n")


def _publish(directory: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run `write` into a temp directory beside `directory`, then rename it into place (nothing half-written)."""
    if directory.exists() and not directory.is_dir():
        raise DraftError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise DraftError(f"{directory} already exists and is not empty; pass overwrite=True or pick a new directory")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    except OSError as err:
        raise DraftError(f"cannot create a temporary directory beside {directory}: {err}") from None
    old = tmp.with_name(f"{tmp.name}.old")  # unique because tmp is
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
    except OSError as err:
        if old.exists() and not directory.exists():
            os.rename(old, directory)
        raise DraftError(f"could not write {directory}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DraftError(f"{path} not found; not a draft checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DraftError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise DraftError(f"{path} does not hold a JSON object")
    return data


def _native_json(directory: Path) -> dict[str, Any]:
    data = _read_json(directory / NATIVE_CONFIG)
    if data.get("format") != NATIVE_FORMAT:
        raise DraftError(f"{directory / NATIVE_CONFIG} has format {data.get('format')!r}, expected {NATIVE_FORMAT!r}")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DraftError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DraftError(f"{path} is not a readable safetensors file ({err})") from None


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """`model.safetensors`, sharded safetensors (index.json) or a legacy `pytorch_model.bin`."""
    index, legacy = directory / f"{WEIGHTS}.index.json", directory / "pytorch_model.bin"
    if index.is_file() and not (directory / WEIGHTS).is_file():
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set((_read_json(index).get("weight_map") or {}).values())):
            tensors.update(_read_safetensors(directory / shard))
        return tensors
    if legacy.is_file() and not (directory / WEIGHTS).is_file():
        try:
            return dict(torch.load(legacy, map_location="cpu", weights_only=True))
        except Exception as err:  # torch raises several types for a corrupt or unsafe pickle
            raise DraftError(f"{legacy} is not a readable weights-only state dict ({err})") from None
    return _read_safetensors(directory / WEIGHTS)
