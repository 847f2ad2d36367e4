"""The EAGLE-3 draft model: fused target features + token embedding -> one (or more) Llama layers.

EAGLE-3 (Li et al. 2025, §3.2; research/anchors.md §0): `fc` fuses the target's low/mid/high
hidden states (3H -> H); the first decoder layer attends over concat(input_layernorm(embedding),
hidden_norm(feature)) (2H wide) while its residual stream is the feature itself; further layers are
plain Llama layers; a final norm and a freshly trained `lm_head` predict over the reduced draft
vocabulary (`d2t` / `t2d`, draft/vocab.py). The token embedding is copied from the target and
frozen: a `requires_grad=False` parameter, so Lightning checkpoints are self-contained while
`trainable_state_dict` (and export) leave it out. Parameter names follow the speculators / vLLM
layout (`layers.0.*`, `fc`, `norm`, `lm_head`, `embed_tokens`, `d2t`, `t2d`); EAGLE / SGLang call
`layers.0` `midlayer`. `forward` takes explicit positions and an explicit mask over
[past keys; new keys], so training (train/ttt.py), tree drafting with a `KVCache` and ConFu's extra
future-token key all use the same code; RoPE settings are recorded in `Eagle3DraftConfig.rope`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from confu_lightning.errors import DraftError
from confu_lightning.nn.attention import KV, AttnImpl, GQAttention, KVCache
from confu_lightning.nn.layers import RMSNorm, RotaryEmbedding, SwiGLU, check_rope, rope_from_hf_config

EMBEDDING_KEY = "embed_tokens.weight"
"""State-dict key of the frozen target embedding (left out of exports)."""


@dataclass(frozen=True)
class Eagle3DraftConfig:
    """Architecture of an EAGLE-3 draft; recorded in checkpoints so a draft can be rebuilt and served."""

    hidden_size: int
    """Draft width H (the target's hidden size: the embedding is copied from the target)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """SwiGLU width."""
    target_vocab_size: int
    """V: rows of the frozen embedding, length of `t2d`."""
    draft_vocab_size: int
    """Vd: `lm_head` outputs, length of `d2t`."""
    rms_norm_eps: float = 1e-6
    rope: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    """Flat RoPE parameters (`rope_type`, `rope_theta`, scaling keys), normally the target's."""
    max_position_embeddings: int = 2048
    n_layers: int = 1
    aux_layers: tuple[int, ...] = ()
    """Target `output_hidden_states` indices fused by `fc` (recorded for export; not used by the math)."""
    target_hidden_size: int | None = None
    """Width of each target feature (None = hidden_size); `fc` reads 3 of them."""

    def __post_init__(self) -> None:
        positive = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                    "target_vocab_size", "draft_vocab_size", "n_layers")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise DraftError(f"draft config values must be >= 1: {', '.join(bad)}")
        if self.num_heads % self.num_kv_heads:
            raise DraftError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.draft_vocab_size > self.target_vocab_size:
            raise DraftError(f"draft_vocab_size {self.draft_vocab_size} exceeds target_vocab_size "
                             f"{self.target_vocab_size}")
        if self.head_dim % 2:
            raise DraftError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_rope(self.rope)
        object.__setattr__(self, "rope", dict(self.rope))
        object.__setattr__(self, "aux_layers", tuple(int(i) for i in self.aux_layers))

    @property
    def feature_size(self) -> int:
        """Width of the concatenated target features, 3 x target hidden."""
        return 3 * (self.target_hidden_size or self.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists, plain dicts) for checkpoints."""
        out = asdict(self)
        out["rope"], out["aux_layers"] = dict(self.rope), list(self.aux_layers)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Eagle3DraftConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise DraftError(f"unknown EAGLE-3 draft config keys {unknown}")
        return cls(**{k: (tuple(v) if k == "aux_layers" else v) for k, v in values.items()})


def draft_config_from_target(hf_config: Mapping[str, Any], draft_vocab_size: int, n_layers: int = 1,
                             aux_layers: Sequence[int] | None = None) -> Eagle3DraftConfig:
    """Build the draft's architecture from a target's Hugging Face config dict (`model.config.to_dict()`).

    The draft copies width, heads, MLP size, norm eps and RoPE settings from the target (EAGLE-3
    practice); `draft_vocab_size` is clipped to the target vocabulary; `aux_layers` defaults to
    EAGLE-3's [2, L//2, L-3].
    """
    cfg = dict(hf_config.get("text_config") or hf_config)
    try:
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        vocab, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
    except KeyError as err:
        raise DraftError(f"target config has no {err.args[0]!r}; cannot size an EAGLE-3 draft from it") from None
    aux = tuple(aux_layers) if aux_layers is not None else (2, layers // 2, layers - 3)
    return Eagle3DraftConfig(
        hidden_size=hidden, num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=inter,
        target_vocab_size=vocab, draft_vocab_size=min(int(draft_vocab_size), vocab),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=rope_from_hf_config(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)), n_layers=int(n_layers),
        aux_layers=aux, target_hidden_size=hidden)


@dataclass
class DraftOutput:
    """One draft forward.

    Shapes:
        hidden: (B, T, H) last layer output before the final norm (the next TTT step's feature).
        logits: (B, T, Vd) or None. kv: per layer, this call's new keys/values (B, Hkv, T, D).
    """

    hidden: Tensor
    logits: Tensor | None
    kv: list[KV]


class Eagle3DecoderLayer(nn.Module):
    """A Llama decoder layer; the first one attends over [input_layernorm(embedding); hidden_norm(feature)]."""

    def __init__(self, cfg: Eagle3DraftConfig, first: bool, impl: AttnImpl = "auto") -> None:
        super().__init__()
        self.first = first
        width = 2 * cfg.hidden_size if first else cfg.hidden_size
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GQAttention(width, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: Tensor, embeds: Tensor | None, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                past: KV | None, extra: KV | None, extra_mask: Tensor | None,
                diagonal: bool) -> tuple[Tensor, KV]:
        """Shapes: hidden, embeds (B, T, H). returns: (B, T, H), new KV (B, Hkv, T, D)."""
        if self.first:
            x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)  # (B, T, 2H)
        else:
            x = self.input_layernorm(hidden)  # (B, T, H)
        attn, new = self.self_attn(x, *rope, mask=mask, past=past, extra=extra, extra_mask=extra_mask,
                                   diagonal=diagonal)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), new


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft head over a frozen copy of the target embedding."""

    def __init__(self, cfg: Eagle3DraftConfig, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.target_vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(cfg.feature_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(cfg, i == 0, attn_impl) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope)
        t2d = torch.zeros(cfg.target_vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True  # identity mapping until `set_vocab`
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", t2d)

    def fuse(self, aux_hidden: Tensor) -> Tensor:
        """Shapes: aux_hidden (B, T, 3H_target) -> (B, T, H)."""
        return self.fc(aux_hidden.to(self.fc.weight.dtype))

    def embed(self, input_ids: Tensor) -> Tensor:
        """Frozen target embedding. Shapes: (B, T) -> (B, T, H)."""
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Shapes: (B, T, H) -> (B, T, Vd)."""
        return self.lm_head(self.norm(hidden))

    def forward(self, input_ids: Tensor | None, feature: Tensor, position_ids: Tensor, mask: Tensor | None = None,
                *, cache: KVCache | None = None, past: Sequence[KV] | None = None,
                extra: Sequence[KV] | None = None, extra_mask: Tensor | None = None, diagonal: bool = False,
                inputs_embeds: Tensor | None = None, compute_logits: bool = True) -> DraftOutput:
        """One draft step for T new positions.

        Shared keys per layer are the earlier positions (`cache` contents or read-only `past`)
        followed by the T new ones; `mask` (bool True = may attend, or additive) covers them and
        defaults to "all earlier + causal among the new". With `diagonal=True` (TTT step k > 0) the
        new keys are per-query instead (see `GQAttention.forward`) and `mask` covers only `past`.
        A `cache` is extended in place with the new keys; `inputs_embeds` replaces the token
        embedding (ConFu's future token).

        Shapes:
            input_ids, position_ids: (B, T). feature: (B, T, H). mask: (B|1, T, L) or (B|1, 1, T, L).
            extra: per layer (B, Hkv, T, J, D); extra_mask: (B|1, T, J). returns: `DraftOutput`.
        """
        if cache is not None and (past is not None or diagonal):
            raise DraftError("pass either a mutable `cache` or a read-only `past` (with `diagonal`), not both")
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        embeds = embeds.to(feature.dtype)  # (B, T, H)
        if cache is not None:
            past = cache.layers if cache.length else None
        n_past = 0 if past is None else past[0].length
        if mask is None and not diagonal:
            mask = causal_after_past(position_ids.shape[1], n_past, feature.device)
        rope = self.rotary(position_ids)
        hidden, new_kv = feature, []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer(hidden, embeds, rope, mask, None if past is None else past[i],
                               None if extra is None else extra[i], extra_mask, diagonal)
            new_kv.append(kv)
        if cache is not None:
            for i, kv in enumerate(new_kv):
                cache.update(i, kv)
        return DraftOutput(hidden, self.compute_logits(hidden) if compute_logits else None, new_kv)

    def new_cache(self) -> KVCache:
        """An empty incremental cache for this draft."""
        return KVCache(len(self.layers))

    @torch.no_grad()
    def load_embedding(self, weight: Tensor) -> None:
        """Copy the target's input embedding (V, H) into the frozen table."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise DraftError(f"target embedding has shape {tuple(weight.shape)}, the draft expects "
                             f"{tuple(self.embed_tokens.weight.shape)} (target_vocab_size, hidden_size)")
        self.embed_tokens.weight.copy_(weight)

    @torch.no_grad()
    def set_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a draft vocabulary (`DraftVocab.d2t`, `.t2d`; validate it with `validate_vocab` first)."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise DraftError(f"vocabulary d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} does not fit the draft "
                             f"(Vd={self.d2t.numel()}, V={self.t2d.numel()})")
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    def draft_to_target_ids(self, draft_ids: Tensor) -> Tensor:
        """Map draft-vocabulary ids to target ids (id + d2t[id]); any shape."""
        return draft_ids + self.d2t[draft_ids]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the frozen target embedding (what export and small checkpoints keep)."""
        return {k: v for k, v in self.state_dict().items() if k != EMBEDDING_KEY}


def causal_after_past(length: int, n_past: int, device: torch.device | None = None) -> Tensor:
    """Bool (1, T, L+T): every earlier entry visible, causal among the T new ones."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(n_past + length, device=device)[None, :]
    return (cols <= rows + n_past).unsqueeze(0)


def draft_flops_per_token(cfg: Eagle3DraftConfig, ttt_steps: int, seq_len: int) -> float:
    """Analytic forward+backward matmul FLOPs per training token of a K-step TTT unroll.

    Counts 2·m·n per (m×n) matmul: `fc` once per token; per step the q/k/v/o projections (2H input
    in layer 0), attention scores and weighted values over the *visible* keys (causal average
    (T+1)/2 step-0 keys + k diagonal keys; masked work is not counted), the SwiGLU MLP and
    `lm_head`. Backward ≈ 2 × forward, so the total is 3 × forward. Norms, softmax and the
    frozen-embedding lookup are ignored; the teacher head is `teacher_flops_per_token`.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    proj = sum(2 * (2 * h if i == 0 else h) * (q_out + 2 * kv_out) + 2 * q_out * h for i in range(cfg.n_layers))
    mlp = cfg.n_layers * 2 * 3 * h * cfg.intermediate_size
    head = 2 * h * cfg.draft_vocab_size
    attn = sum(cfg.n_layers * 4 * q_out * ((seq_len + 1) / 2 + k) for k in range(ttt_steps))
    forward = 2 * cfg.feature_size * h + ttt_steps * (proj + mlp + head) + attn
    return 3.0 * forward


def teacher_flops_per_token(cfg: Eagle3DraftConfig) -> float:
    """Forward FLOPs per token of the frozen teacher head (full-vocab argmax + draft-vocab probabilities)."""
    return 2.0 * cfg.hidden_size * (cfg.target_vocab_size + cfg.draft_vocab_size)
