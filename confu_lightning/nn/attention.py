"""Grouped-query attention over an explicit key set with an explicit mask, plus a growable KV cache.

Every attention pattern the project needs goes through `attend`: causal and packed-segment masks,
the EAGLE-3 training-time-test "diagonal" extension (EAGLE-3 paper §3.3: at unroll step k a query
sees the causal prefix of step-0 keys plus its *own* keys of steps 1..k), tree masks at inference,
and ConFu's future-token key (ConFu §2.4; research/confu-paper.md). Keys come in two kinds:

* shared keys `k, v` (B, Hkv, Tk, D) that any query may see, selected by `mask` (B, 1, Tq, Tk);
* per-query keys `extra` (B, Hkv, Tq, J, D): query i's own J keys (the TTT diagonal), selected
  by `extra_mask` (B, Tq, J) — O(Tq·J) instead of a (Tq, Tq·J) mask that is almost all False.

`impl="eager"` is the plain reference (one softmax over both kinds, GQA without copying K/V);
`impl="sdpa"` runs `torch.nn.functional.scaled_dot_product_attention`; per-query keys are then
laid out as Tq·J extra shared keys behind a block-diagonal mask (exact, but O(Tq²·J) work).
`impl="auto"` (the default) takes SDPA without per-query keys and eager with them: a 7-step TTT
unroll of a SmolLM2-sized draft ran ~1.4x faster that way on CPU at T = 512-1024 than all-SDPA.
Keys are cached after RoPE, so a cache needs no positions. Boolean masks become additive with the
dtype minimum (not -inf), so a fully masked query row stays finite instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confu_lightning.errors import DraftError
from confu_lightning.nn.layers import apply_rotary

AttnImpl = Literal["auto", "sdpa", "eager"]


@dataclass
class KV:
    """Post-RoPE keys and values of one layer.

    Shapes:
        key, value: (B, Hkv, L, D) shared keys, or (B, Hkv, Tq, J, D) per-query keys.
    """

    key: Tensor
    value: Tensor

    @property
    def length(self) -> int:
        return int(self.key.shape[2])

    def cat(self, other: KV) -> KV:
        """This KV followed by `other` along the key axis (shared keys) or J axis (per-query keys)."""
        dim = 2 if self.key.ndim == 4 else 3
        return KV(torch.cat((self.key, other.key), dim), torch.cat((self.value, other.value), dim))


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool (True = may attend) -> additive float with the dtype minimum; float masks are cast."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if not mask.is_floating_point():
        raise DraftError(f"attention masks must be bool (True = may attend) or additive float, got {mask.dtype}")
    return mask.to(dtype)


def _as_4d(mask: Tensor, tq: int, tk: int) -> Tensor:
    """(B, Tq, Tk) or (B, 1|H, Tq, Tk) -> 4D, checking the last two dims."""
    mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != (tq, tk):
        raise DraftError(f"attention mask must be (B, Tq, Tk) or (B, H, Tq, Tk) with Tq={tq}, Tk={tk}; "
                         f"got {tuple(mask.shape)}")
    return mask


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    extra: KV | None = None,
    extra_mask: Tensor | None = None,
    impl: AttnImpl = "auto",
) -> Tensor:
    """Softmax attention of `q` over shared keys `k`/`v` and optional per-query keys `extra`.

    Args:
        mask: over the shared keys, bool (True = may attend) or additive float; None = all visible.
        extra_mask: bool over the per-query keys; None = all visible.

    Shapes:
        q: (B, Hq, Tq, D). k, v: (B, Hkv, Tk, D), Hq a multiple of Hkv. mask: (B|1, Tq, Tk) or
        (B|1, 1|Hq, Tq, Tk). extra: (B, Hkv, Tq, J, D). extra_mask: (B|1, Tq, J). returns: (B, Hq, Tq, D).
    """
    batch, n_heads, tq, dim = q.shape
    if n_heads % k.shape[1]:
        raise DraftError(f"{n_heads} query heads are not a multiple of {k.shape[1]} key/value heads")
    float_mask = None if mask is None else additive_mask(_as_4d(mask, tq, k.shape[2]), q.dtype)
    if extra is not None and extra_mask is not None and tuple(extra_mask.shape[-2:]) != (tq, extra.key.shape[3]):
        raise DraftError(f"extra_mask must be (B, Tq, J) = (B, {tq}, {extra.key.shape[3]}), "
                         f"got {tuple(extra_mask.shape)}")
    if impl == "auto":
        impl = "sdpa" if extra is None else "eager"
    if impl == "eager":
        return _attend_eager(q, k, v, float_mask, extra, extra_mask)
    if impl == "sdpa":
        return _attend_sdpa(q, k, v, float_mask, extra, extra_mask)
    raise DraftError(f"unknown attention implementation {impl!r} (use 'auto', 'sdpa' or 'eager')")


def _attend_eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, extra: KV | None,
                  extra_mask: Tensor | None) -> Tensor:
    """Reference path: explicit scores, one float32 softmax over shared + per-query keys."""
    batch, n_heads, tq, dim = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(batch, n_kv, n_heads // n_kv, tq, dim)  # (B, Hkv, G, Tq, D): GQA without repeating K/V
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) / math.sqrt(dim)  # (B, Hkv, G, Tq, Tk)
    if mask is not None:
        per_head = mask.shape[1] > 1  # (B, Hq, Tq, Tk) splits into (B, Hkv, G, Tq, Tk)
        scores = scores + mask.reshape(mask.shape[0], n_kv if per_head else 1, n_heads // n_kv if per_head else 1,
                                    tq, mask.shape[-1])
    n_shared = scores.shape[-1]
    if extra is not None:
        extra_scores = torch.einsum("bhgqd,bhqjd->bhgqj", qg, extra.key) / math.sqrt(dim)  # (B, Hkv, G, Tq, J)
        if extra_mask is not None:
            extra_scores = extra_scores + additive_mask(extra_mask, q.dtype)[:, None, None]
        scores = torch.cat((scores, extra_scores), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs[..., :n_shared], v)  # (B, Hkv, G, Tq, D)
    if extra is not None:
        out = out + torch.einsum("bhgqj,bhqjd->bhgqd", probs[..., n_shared:], extra.value)
    return out.reshape(batch, n_heads, tq, dim)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, extra: KV | None,
                 extra_mask: Tensor | None) -> Tensor:
    """Fused path; per-query keys become shared keys behind a block-diagonal mask."""
    batch, _, tq, dim = q.shape
    if extra is not None:
        n_kv, n_extra = extra.key.shape[1], extra.key.shape[3]
        flat_k = extra.key.reshape(batch, n_kv, tq * n_extra, dim)  # (B, Hkv, Tq*J, D), query-major
        flat_v = extra.value.reshape(batch, n_kv, tq * n_extra, dim)
        own = torch.eye(tq, dtype=torch.bool, device=q.device).repeat_interleave(n_extra, dim=1)  # (Tq, Tq*J)
        if extra_mask is not None:
            own = own & extra_mask.reshape(extra_mask.shape[0], 1, tq * n_extra)  # (B|1, Tq, Tq*J)
        block = additive_mask(own, q.dtype).expand(batch, tq, tq * n_extra).unsqueeze(1)  # (B, 1, Tq, Tq*J)
        if mask is None:
            mask = torch.zeros(batch, 1, tq, k.shape[2], dtype=q.dtype, device=q.device)
        mask = torch.cat((mask.expand(batch, -1, -1, -1), block.expand(-1, mask.shape[1], -1, -1)), dim=-1)
        k, v = torch.cat((k, flat_k), dim=2), torch.cat((v, flat_v), dim=2)
    if q.shape[1] != k.shape[1]:  # explicit repeat: `enable_gqa` with a mask takes a slow path (CPU, mem-efficient)
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GQAttention(nn.Module):
    """Llama attention (no biases) whose q/k/v input width may differ from its output width.

    The EAGLE-3 first layer reads concat(norm(embedding), norm(feature)), so `in_features` = 2H.
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 impl: AttnImpl = "auto") -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise DraftError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.impl = num_heads, num_kv_heads, head_dim, impl
        self.q_proj = nn.Linear(in_features, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, out_features, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, KV]:
        """Queries and this input's own (rotated) keys/values.

        Shapes:
            x: (B, T, in). cos, sin: (B, T, D). returns: q (B, Hq, T, D), KV (B, Hkv, T, D).
        """
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), KV(apply_rotary(k, cos, sin), v)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, past: KV | None = None,
                extra: KV | None = None, extra_mask: Tensor | None = None,
                diagonal: bool = False) -> tuple[Tensor, KV]:
        """Attend and return (output, this input's new keys/values).

        Shared keys are `past` followed by the new keys (`mask` covers past + T); with `diagonal`
        the new keys are instead appended as each query's last per-query key (always visible) and
        `mask` covers only `past` — the TTT step k > 0 layout.

        Shapes:
            x: (B, T, in). mask: (B|1, [1|Hq,] T, L) with L = len(past) (+ T unless diagonal).
            returns: (B, T, out), KV (B, Hkv, T, D).
        """
        batch, length, _ = x.shape
        q, new = self.project(x, cos, sin)
        if diagonal:
            own = KV(new.key.unsqueeze(3), new.value.unsqueeze(3))  # (B, Hkv, T, 1, D)
            if extra_mask is not None:
                ones = torch.ones(extra_mask.shape[0], length, 1, dtype=torch.bool, device=x.device)
                extra_mask = torch.cat((extra_mask, ones), dim=-1)
            extra = own if extra is None else extra.cat(own)
            shared = past if past is not None else KV(new.key[:, :, :0], new.value[:, :, :0])
        else:
            shared = new if past is None else past.cat(new)
        out = attend(q, shared.key, shared.value, mask, extra, extra_mask, self.impl)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), new


class KVCache:
    """Per-layer keys/values of earlier positions for incremental (engine) decoding.

    A plain growable cache: `update` concatenates. `crop` drops trailing entries (rejected drafts),
    `select` keeps chosen entries in order (the accepted path of a tree); ConFu's per-round future
    token is one more entry that the engine crops away before the next round.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers: list[KV | None] = [None] * n_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first.length

    def update(self, layer: int, new: KV) -> KV:
        """Append `new` (B, Hkv, T, D) to layer `layer` and return the layer's full KV."""
        old = self.layers[layer]
        self.layers[layer] = new if old is None else old.cat(new)
        return self.layers[layer]  # type: ignore[return-value]

    def crop(self, length: int) -> None:
        """Keep the first `length` entries of every layer."""
        if not 0 <= length <= self.length:
            raise DraftError(f"cannot crop a {self.length}-entry draft KV cache to {length}")
        self.layers = [None if kv is None else KV(kv.key[:, :, :length], kv.value[:, :, :length])
                       for kv in self.layers]

    def select(self, index: Tensor) -> None:
        """Keep the entries at `index` (L',) in that order, in every layer and batch row."""
        self.layers = [None if kv is None else KV(kv.key.index_select(2, index), kv.value.index_select(2, index))
                       for kv in self.layers]
