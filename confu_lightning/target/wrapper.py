"""The frozen target (verifier) model: logits, EAGLE-3 aux features, KV cache and custom 4D masks.

Everything downstream sees the Hugging Face causal LM through `TargetModel`: the cache writer
(aux features + post-norm last hidden state, DESIGN.md §5), the ConFu trainer (soft prompts and
contemplate embeddings fed as `inputs_embeds` *with* gradients through the frozen weights, a custom
4D mask and explicit positions, reusing the pass-1 KV cache; DESIGN.md §6) and the speculative
engine (tree verification in one forward, then keeping only the accepted path's KV). Aux features
use the HF `output_hidden_states` index convention (0 = layer-0 input, i = output of decoder layer
i, L = post-final-norm) but are collected with forward hooks on just those modules, so an 8B target
does not keep all L+1 hidden states alive. `TargetModel` is deliberately not an `nn.Module`: a
LightningModule holding it must not register, checkpoint or DDP-wrap billions of frozen weights.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from confu_lightning.errors import TargetError

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

    from confu_lightning.config.schema import TargetConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`TargetConfig.dtype` names → torch dtypes."""

HEADS_FORMAT = "confu-frozen-heads/1"
"""`format` metadata written by `save_heads` and checked by `load_heads`."""


@dataclass
class TargetOutput:
    """What one target forward returns.

    Shapes:
        logits: (B, T', V), T' = T, or the last `logits_to_keep` positions when that is > 0.
        aux_hidden: (B, T, 3H) concatenated hidden states at `TargetModel.aux_layers`; None if
            `need_hidden=False`.
        last_hidden: (B, T, H) post-final-norm hidden state (`lm_head(last_hidden) == logits`);
            None if `need_hidden=False`.
    """

    logits: Tensor
    aux_hidden: Tensor | None
    last_hidden: Tensor | None
    cache: Cache | None
    """The transformers cache passed in, now holding the new tokens too; None if none was passed."""


@dataclass
class FrozenHeads:
    """Detached copies of the target's input embedding, output head and final norm.

    Enough to train a draft on cached features without loading the whole target (the draft's
    frozen embedding and the teacher logits `last_hidden @ lm_head_weight.T`).

    Shapes:
        embedding_weight: (V, H). lm_head_weight: (V, H). norm_weight: (H,) or None.
    """

    embedding_weight: Tensor
    lm_head_weight: Tensor
    norm_weight: Tensor | None = None
    norm_eps: float | None = None


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high feature indices, [2, L//2, L-3] (DESIGN.md §5)."""
    return [2, num_layers // 2, num_layers - 3]


def resolve_aux_layers(aux_layers: list[int] | None, num_layers: int) -> list[int]:
    """Return `aux_layers` (or the default) after checking every index lies in [0, L]."""
    layers = default_aux_layers(num_layers) if aux_layers is None else [int(i) for i in aux_layers]
    for index in layers:
        if not 0 <= index <= num_layers:
            raise TargetError(
                f"target.aux_layers index {index} out of range for a {num_layers}-layer model "
                f"(valid 0..{num_layers})"
            )
    return layers


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a boolean mask (True = may attend) into the additive float form every kernel accepts.

    Eager attention adds the mask to the scores, so a bool mask would add 1 where it should block;
    the dtype minimum (not -inf) keeps fully masked rows finite.
    """
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def prepare_attention_mask(
    mask: Tensor | None, batch: int, length: int, past: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Validate a 2D padding mask or a 3D/4D custom mask; bool custom masks become additive float.

    Shapes:
        mask: (B, past+T) padding mask (1 = real token), or (B, T, past+T) / (B, 1, T, past+T)
            bool (True = may attend) or additive float; B may be 1 to broadcast.
        returns: the 2D mask unchanged, or (B, 1, T, past+T) additive float in `dtype`.
    """
    if mask is None:
        return None
    mask = mask.to(device)
    total = past + length
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, total):
            raise TargetError(
                f"2D attention_mask must have shape ({batch}, {total}) = (B, past+T), got {tuple(mask.shape)}"
            )
        return mask
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)  # (B, 1, T, past+T)
    shape_ok = mask.ndim == 4 and mask.shape[0] in (1, batch) and mask.shape[1] == 1
    if not shape_ok or tuple(mask.shape[-2:]) != (length, total):
        raise TargetError(
            f"attention_mask must be (B, past+T), (B, T, past+T) or (B, 1, T, past+T) with B={batch}, "
            f"T={length}, past={past}; got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return additive_mask(mask, dtype)
    if mask.is_floating_point():
        return mask.to(dtype)
    raise TargetError(f"a 3D/4D attention_mask must be bool (True = may attend) or additive float, got {mask.dtype}")


def cache_length(cache: Cache | None) -> int:
    """Tokens held by `cache` (0 for None or an empty cache)."""
    return 0 if cache is None else int(cache.get_seq_length())


def crop_cache(cache: Cache, n_keep: int) -> Cache:
    """Keep the first `n_keep` positions of `cache` in place (transformers 5.x crops by -n_removed)."""
    length = cache_length(cache)
    if not 0 <= n_keep <= length:
        raise TargetError(f"cannot crop a {length}-token KV cache to {n_keep} tokens (valid 0..{length})")
    if n_keep < length:
        cache.crop(n_keep - length)  # negative: drop the last (length - n_keep) tokens
    return cache


def _take_positions(x: Tensor, keep: Tensor) -> Tensor:
    """Gather sequence positions of a (B, H, S, Dh) key/value tensor; keep is (S',) or (B, S')."""
    if keep.ndim == 1:
        return x.index_select(-2, keep)
    index = keep[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])  # (B, H, S', Dh)
    return x.gather(-2, index)


def select_cache(cache: Cache, keep: Tensor) -> Cache:
    """Keep only the absolute positions `keep`, in that order, of every layer's keys and values.

    The speculative engine keeps the prefix plus the accepted tree path this way. RoPE is already
    applied to cached keys, so kept tokens keep their original positions; the next forward must
    continue from position ids, not from the (shorter) cache length, when the kept positions are
    not 0..S'-1.

    Shapes:
        keep: (S',) shared by the batch, or (B, S'); int64 positions in [0, S).
    """
    length = cache_length(cache)
    keep = keep.long()
    if keep.ndim not in (1, 2):
        raise TargetError(f"select_cache keep must be (S',) or (B, S') positions, got shape {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= length):
        raise TargetError(f"select_cache positions must lie in 0..{length - 1} for a {length}-token cache")
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None:
            raise TargetError(
                f"select_cache supports full-attention dynamic cache layers only, got {type(layer).__name__}"
            )
        layer.keys = _take_positions(layer.keys, keep.to(layer.keys.device))
        layer.values = _take_positions(layer.values, keep.to(layer.values.device))
    return cache


def save_heads(heads: FrozenHeads, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `heads` to a safetensors file (no pickle); `metadata` adds string entries such as the target id."""
    from safetensors.torch import save_file

    tensors = {"embedding_weight": heads.embedding_weight, "lm_head_weight": heads.lm_head_weight}
    if heads.norm_weight is not None:
        tensors["norm_weight"] = heads.norm_weight
    meta = {**(metadata or {}), "format": HEADS_FORMAT}
    if heads.norm_eps is not None:
        meta["norm_eps"] = repr(float(heads.norm_eps))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)


def load_heads(path: str | Path, device: str | torch.device = "cpu") -> FrozenHeads:
    """Read heads written by `save_heads`."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise TargetError(
            f"frozen heads file {path} does not exist; write it with save_heads(target.frozen_heads(), path)"
        )
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != HEADS_FORMAT:
            raise TargetError(
                f"{path} is not a frozen-heads file (format {meta.get('format')!r}, expected {HEADS_FORMAT!r})"
            )
        names = set(f.keys())
        tensors = {name: f.get_tensor(name) for name in names}
    eps = meta.get("norm_eps")
    return FrozenHeads(
        embedding_weight=tensors["embedding_weight"],
        lm_head_weight=tensors["lm_head_weight"],
        norm_weight=tensors.get("norm_weight"),
        norm_eps=float(eps) if eps is not None else None,
    )


def _output_hook(collector: ContextVar, index: int) -> Callable:
    """Forward hook storing a module's output (or its first element) under `index` while collecting."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        store = collector.get()
        if store is not None:
            store[index] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def _input_hook(collector: ContextVar, index: int) -> Callable:
    """Forward pre-hook storing a module's hidden-state input (index 0: embeddings / inputs_embeds)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        store = collector.get()
        if store is not None:
            store[index] = args[0] if args else kwargs["hidden_states"]

    return hook


def _find_decoder(model: nn.Module) -> nn.Module | None:
    """The module holding `layers` (ModuleList) and the final `norm`, or None for exotic layouts."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except (AttributeError, NotImplementedError, ValueError):
            pass
    candidates.append(getattr(model, "model", None))
    for module in candidates:
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if isinstance(layers, nn.ModuleList) and isinstance(norm, nn.Module):
            return module
    return None


def _short_reason(exc: BaseException) -> str:
    """First line of an exception message, trimmed for a one-line error."""
    text = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class TargetModel:
    """A frozen Hugging Face causal LM and its tokenizer, as the rest of the package needs them.

    Args:
        model: a loaded causal LM; it is frozen (`requires_grad_(False)`) and put in eval mode.
        tokenizer: its tokenizer (chat template used by `chat`).
        name: how errors and summaries name the target (the configured `target.name`).
        aux_layers: hidden-state indices for `aux_hidden`; None means [2, L//2, L-3].
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        aux_layers: list[int] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        text = model.config.get_text_config(decoder=True)
        self.num_layers: int = int(text.num_hidden_layers)
        self.hidden_size: int = int(text.hidden_size)
        self.num_heads: int = int(text.num_attention_heads)
        self.num_kv_heads: int = int(getattr(text, "num_key_value_heads", None) or self.num_heads)
        self.vocab_size: int = int(text.vocab_size)
        self.num_parameters: int = sum(p.numel() for p in model.parameters())
        self._aux_layers = tuple(resolve_aux_layers(aux_layers, self.num_layers))
        self._collector: ContextVar[dict[int, Tensor] | None] = ContextVar(f"confu_target_{id(self)}", default=None)
        self.uses_hooks = self._install_hooks()

    @classmethod
    def from_pretrained(cls, path: str | Path, cfg: TargetConfig, *, name: str | None = None) -> TargetModel:
        """Load model + tokenizer from a local directory or hub id with `cfg`'s dtype, kernel and device."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        label = name or cfg.name
        common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **common)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **common
            )
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise TargetError(
                f"could not load target '{label}': {_short_reason(exc)}. Check the id, your network/HF token, "
                "or pass a local checkpoint directory"
            ) from exc
        try:
            model.to(cfg.device)
        except (RuntimeError, AssertionError) as exc:
            raise TargetError(f"cannot move target '{label}' to device '{cfg.device}': {_short_reason(exc)}") from exc
        return cls(model, tokenizer, name=label, aux_layers=cfg.aux_layers)

    @property
    def aux_layers(self) -> list[int]:
        """Resolved hidden-state indices concatenated into `aux_hidden` (HF convention)."""
        return list(self._aux_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The (frozen) input embedding module, (V, H)."""
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        """The (frozen) output projection, H → V."""
        return self.model.get_output_embeddings()

    def to(self, device: str | torch.device) -> TargetModel:
        """Move the wrapped model to `device` (Lightning does not, since this is not an `nn.Module`)."""
        self.model.to(device)
        return self

    def _install_hooks(self) -> bool:
        """Register gated hooks on the modules producing the aux indices and the post-norm state.

        Hooks stay registered but only record while `_collector` holds a dict, i.e. inside
        `forward`; a ContextVar keeps concurrent threads from seeing each other's tensors.
        Returns False (use `output_hidden_states`) when the layout has no `layers` / `norm`.
        """
        decoder = _find_decoder(self.model)
        if decoder is None or len(decoder.layers) < self.num_layers:
            return False
        last = self.num_layers
        for index in sorted(set(self._aux_layers) - {0, last}):
            decoder.layers[index - 1].register_forward_hook(_output_hook(self._collector, index))
        if 0 in self._aux_layers:
            decoder.layers[0].register_forward_pre_hook(_input_hook(self._collector, 0), with_kwargs=True)
        decoder.norm.register_forward_hook(_output_hook(self._collector, last))  # last_hidden and index L
        return True

    def _run(self, kwargs: dict[str, Any], need_hidden: bool) -> tuple[Any, dict[int, Tensor] | None]:
        """Call the HF model, collecting the aux indices and index L when `need_hidden`."""
        if not need_hidden:
            return self.model(**kwargs), None
        if self.uses_hooks:
            store: dict[int, Tensor] = {}
            token = self._collector.set(store)
            try:
                out = self.model(**kwargs)
            finally:
                self._collector.reset(token)
            return out, store
        # transformers 5.x keeps only the listed indices; older-style models treat the list as True
        wanted = sorted(set(self._aux_layers) | {self.num_layers})
        out = self.model(**kwargs, output_hidden_states=wanted)
        return out, {i: out.hidden_states[i] for i in wanted}

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        need_hidden: bool = True,
        grad: bool = False,
    ) -> TargetOutput:
        """Run the frozen target on new tokens, optionally after the tokens held in `cache`.

        Without `attention_mask` the new tokens attend causally to the cache and each other. With
        `position_ids` and no mask, a plain causal mask is still used: transformers would otherwise
        read position jumps as packed sequences. Runs under `torch.no_grad()` unless `grad=True`,
        which lets gradients reach `inputs_embeds` (ConFu soft prompts); never `inference_mode`,
        whose cached keys could not be reused in a later forward with gradients.

        Args:
            input_ids: token ids; exactly one of `input_ids` / `inputs_embeds`.
            inputs_embeds: input embeddings instead of ids.
            position_ids: RoPE positions; default past..past+T-1.
            attention_mask: 2D padding mask or a 3D/4D custom mask (see `prepare_attention_mask`).
            cache: a transformers Cache (`new_cache()`), updated in place with the new tokens.
            logits_to_keep: > 0 computes logits for only the last that many positions.
            need_hidden: False skips `aux_hidden` / `last_hidden`.
            grad: run with autograd enabled.

        Shapes:
            input_ids: (B, T). inputs_embeds: (B, T, H). position_ids: (B, T) or (1, T).
            attention_mask: (B, past+T), (B, T, past+T) or (B, 1, T, past+T).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise TargetError("pass exactly one of input_ids or inputs_embeds to the target forward")
        device, dtype = self.device, self.dtype
        x = input_ids if input_ids is not None else inputs_embeds
        batch, length = x.shape[0], x.shape[1]
        mask = prepare_attention_mask(attention_mask, batch, length, cache_length(cache), dtype, device)
        if position_ids is not None:
            position_ids = position_ids.to(device)
            if mask is None and cache is None:
                mask = torch.ones(batch, length, dtype=torch.long, device=device)  # disables packed-sequence guessing
        kwargs = {
            "input_ids": None if input_ids is None else input_ids.to(device),
            "inputs_embeds": None if inputs_embeds is None else inputs_embeds.to(device),
            "position_ids": position_ids,
            "attention_mask": mask,
            "cache": cache,
            "use_cache": cache is not None,
            "logits_to_keep": logits_to_keep,
            "return_dict": True,
        }
        with torch.set_grad_enabled(grad):
            out, store = self._run(kwargs, need_hidden)
            aux = None if store is None else torch.cat([store[i] for i in self._aux_layers], dim=-1)  # (B, T, 3H)
        last = None if store is None else store[self.num_layers]  # (B, T, H)
        return TargetOutput(logits=out.logits, aux_hidden=aux, last_hidden=last, cache=cache)

    __call__ = forward

    def new_cache(self) -> Cache:
        """An empty `DynamicCache` laid out for this model's layers."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def chat(self, prompt: str, max_new_tokens: int = 48) -> str:
        """Greedy reply to one user `prompt` through the tokenizer's chat template (a smoke test)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise TargetError(
                f"{self.name} has no chat template; use an -Instruct/chat model or set tokenizer.chat_template"
            )
        encoded = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = encoded["input_ids"].to(self.device)  # (1, T)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    def summary(self) -> dict[str, Any]:
        """Architecture facts that reports print and drafts copy (sizes, aux layers, RoPE settings)."""
        config = self.model.config.get_text_config(decoder=True)
        rope = getattr(config, "rope_parameters", None)
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        return {
            "name": self.name,
            "architecture": type(self.model).__name__,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads),
            "vocab_size": self.vocab_size,
            "num_parameters": self.num_parameters,
            "aux_layers": self.aux_layers,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "rms_norm_eps": getattr(config, "rms_norm_eps", None),
            "rope_theta": theta if theta is not None else getattr(config, "rope_theta", None),
            "rope_parameters": dict(rope) if isinstance(rope, dict) else None,
            "rope_scaling": getattr(config, "rope_scaling", None) if rope is None else None,
        }

    def frozen_heads(self) -> FrozenHeads:
        """Detached clones of the embedding, lm_head and final-norm weights (see `save_heads`)."""
        decoder = _find_decoder(self.model)
        norm = getattr(decoder, "norm", None)
        norm_weight = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        return FrozenHeads(
            embedding_weight=self.embed_tokens.weight.detach().clone(),
            lm_head_weight=self.lm_head.weight.detach().clone(),
            norm_weight=None if norm_weight is None else norm_weight.detach().clone(),
            norm_eps=None if eps is None else float(eps),
        )


def load_target(cfg: TargetConfig, progress: Callable | None = None) -> TargetModel:
    """Resolve `cfg.name` (built-in, hub id or local directory) and load the frozen target.

    Args:
        cfg: the `target` config section.
        progress: passed to `registry.resolve_target` for long downloads / conversions.
    """
    from confu_lightning.target.registry import resolve_target

    path = resolve_target(cfg.name, progress=progress)
    return TargetModel.from_pretrained(path, cfg, name=cfg.name)
