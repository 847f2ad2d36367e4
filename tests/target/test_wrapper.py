"""Tests for the frozen target wrapper: aux features, KV cache, tree masks, gradients, errors.

Invariants rather than golden numbers: hooks equal `output_hidden_states`, incremental decoding
equals one full forward, a tree in one forward equals each branch run sequentially, a pruned cache
equals a forward that never saw the pruned tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from confu_lightning.config.schema import TargetConfig
from confu_lightning.errors import TargetError
from confu_lightning.target.wrapper import (
    TargetModel,
    crop_cache,
    load_heads,
    load_target,
    save_heads,
    select_cache,
)

ATOL = 1e-5  # fp32; incremental vs full attention differ only in summation order

# A 6-node draft tree: root 0; branch A 0→1→2→3; branch B 0→4→5 (different depths).
TREE_PARENTS = [-1, 0, 1, 2, 0, 4]


def _load(path: Path, **overrides) -> TargetModel:
    cfg = TargetConfig(name=str(path), **overrides)
    return TargetModel.from_pretrained(path, cfg)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def target(request, tiny_target_dir: Path) -> TargetModel:
    return _load(tiny_target_dir, attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_target(tiny_target_dir: Path) -> TargetModel:
    return _load(tiny_target_dir)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=gen)


def _path(node: int) -> list[int]:
    """Nodes from the root down to `node`."""
    nodes = []
    while node != -1:
        nodes.append(node)
        node = TREE_PARENTS[node]
    return nodes[::-1]


def _tree_mask(prefix: int) -> torch.Tensor:
    """(1, 1, N, prefix+N) bool: every node sees the prefix, itself and its ancestors."""
    n = len(TREE_PARENTS)
    mask = torch.zeros(1, 1, n, prefix + n, dtype=torch.bool)
    mask[..., :prefix] = True
    for node in range(n):
        for ancestor in _path(node):
            mask[0, 0, node, prefix + ancestor] = True
    return mask


# --- 1. aux features ---------------------------------------------------------------------------


@pytest.mark.parametrize("aux_layers", [None, [0, 3, 8], [8, 1, 0]])
def test_aux_hidden_equals_output_hidden_states(tiny_target_dir: Path, aux_layers) -> None:
    target = _load(tiny_target_dir, aux_layers=aux_layers)
    assert target.uses_hooks
    ids = _ids(2, 9)
    out = target(ids)
    with torch.no_grad():
        ref = target.model(ids, output_hidden_states=True)
    expected_layers = aux_layers or [2, 4, 5]
    assert target.aux_layers == expected_layers
    assert out.aux_hidden.shape == (2, 9, 3 * 64)
    assert torch.equal(out.aux_hidden, torch.cat([ref.hidden_states[i] for i in expected_layers], dim=-1))
    assert torch.equal(out.last_hidden, ref.hidden_states[-1])
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(target.lm_head(out.last_hidden), out.logits)


def test_output_hidden_states_fallback_matches_hooks(tiny_target_dir: Path) -> None:
    hooked = _load(tiny_target_dir, aux_layers=[0, 4, 8])
    fallback = _load(tiny_target_dir, aux_layers=[0, 4, 8])
    fallback.uses_hooks = False  # what an architecture without `layers` / `norm` gets
    ids = _ids(1, 7)
    a, b = hooked(ids), fallback(ids)
    assert torch.equal(a.aux_hidden, b.aux_hidden)
    assert torch.equal(a.last_hidden, b.last_hidden)


def test_logits_to_keep_and_need_hidden(sdpa_target: TargetModel) -> None:
    ids = _ids(1, 6)
    full = sdpa_target(ids)
    tail = sdpa_target(ids, logits_to_keep=1, need_hidden=False)
    assert tail.logits.shape == (1, 1, 320)
    assert torch.allclose(tail.logits, full.logits[:, -1:], atol=ATOL)
    assert tail.aux_hidden is None and tail.last_hidden is None and tail.cache is None


# --- 2. KV cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_incremental_forward_equals_full(target: TargetModel, chunked: bool) -> None:
    ids = _ids(2, 15)
    full = target(ids)
    cache = target.new_cache()
    outs = [target(ids[:, :10], cache=cache)]
    steps = [ids[:, 10:]] if chunked else [ids[:, i : i + 1] for i in range(10, 15)]
    for step in steps:
        outs.append(target(step, cache=cache))
    assert cache.get_seq_length() == 15
    logits = torch.cat([o.logits for o in outs], dim=1)
    aux = torch.cat([o.aux_hidden for o in outs], dim=1)
    assert torch.allclose(logits, full.logits, atol=ATOL)
    assert torch.allclose(aux, full.aux_hidden, atol=ATOL)


def test_explicit_positions_without_mask_stay_causal(sdpa_target: TargetModel) -> None:
    # transformers would read the jump 2→5 as two packed sequences; the wrapper keeps one causal sequence
    ids = _ids(1, 6)
    positions = torch.tensor([[0, 1, 2, 5, 6, 7]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None]  # (1, T, T)
    plain = sdpa_target(ids, position_ids=positions)
    masked = sdpa_target(ids, position_ids=positions, attention_mask=causal)
    assert torch.allclose(plain.logits, masked.logits, atol=ATOL)


# --- 3. tree masks ------------------------------------------------------------------------------


def test_tree_forward_equals_sequential_branches(target: TargetModel) -> None:
    prefix, n = 8, len(TREE_PARENTS)
    ids = _ids(2, prefix)
    nodes = _ids(2, n, seed=1)
    depth = torch.tensor([len(_path(i)) - 1 for i in range(n)])
    cache = target.new_cache()
    target(ids, cache=cache)
    tree = target(nodes, cache=cache, attention_mask=_tree_mask(prefix), position_ids=(prefix + depth)[None])
    assert cache.get_seq_length() == prefix + n
    for node in range(n):
        seq = torch.cat([ids, nodes[:, _path(node)]], dim=1)
        ref = target(seq)
        assert torch.allclose(tree.logits[:, node], ref.logits[:, -1], atol=ATOL), node
        assert torch.allclose(tree.aux_hidden[:, node], ref.aux_hidden[:, -1], atol=ATOL), node


def test_bool_and_additive_masks_agree(target: TargetModel) -> None:
    ids = _ids(1, 5)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    allowed[3, 1] = False  # an arbitrary hole
    additive = torch.zeros(5, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    a = target(ids, attention_mask=allowed[None])  # (B, T, T)
    b = target(ids, attention_mask=additive[None, None])  # (B, 1, T, T)
    assert torch.equal(a.logits, b.logits)


# --- 4. gradients -------------------------------------------------------------------------------


def test_gradients_reach_inputs_embeds_only(sdpa_target: TargetModel) -> None:
    ids = _ids(1, 8)
    cache = sdpa_target.new_cache()
    sdpa_target(ids, cache=cache)  # pass 1, no grad (ConFu reuses this KV)
    embeds = torch.randn(1, 3, 64, requires_grad=True)  # (B, S, H) soft prompts
    mask = torch.ones(1, 3, 11, dtype=torch.bool).tril(diagonal=8)
    out = sdpa_target(
        inputs_embeds=embeds, cache=cache, attention_mask=mask, position_ids=torch.tensor([[8, 9, 10]]), grad=True
    )
    (out.logits.square().mean() + out.aux_hidden.square().mean()).backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    params = list(sdpa_target.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in params)


def test_default_forward_has_no_graph(sdpa_target: TargetModel) -> None:
    embeds = torch.randn(1, 4, 64, requires_grad=True)
    out = sdpa_target(inputs_embeds=embeds)
    assert not out.logits.requires_grad and not out.aux_hidden.requires_grad
    assert not out.last_hidden.requires_grad


# --- 5. cache crop / select ---------------------------------------------------------------------


def test_crop_then_continue_equals_truncated_forward(target: TargetModel) -> None:
    ids, new = _ids(1, 15), _ids(1, 5, seed=2)
    cache = target.new_cache()
    target(ids, cache=cache)
    crop_cache(cache, 10)
    assert cache.get_seq_length() == 10
    cont = target(new, cache=cache)
    ref = target(torch.cat([ids[:, :10], new], dim=1))
    assert torch.allclose(cont.logits, ref.logits[:, 10:], atol=ATOL)
    with pytest.raises(TargetError, match="0..15"):
        crop_cache(cache, 16)


def test_select_accepted_tree_path_equals_sequential(target: TargetModel) -> None:
    prefix, n = 8, len(TREE_PARENTS)
    ids, nodes, nxt = _ids(2, prefix), _ids(2, n, seed=1), _ids(2, 1, seed=3)
    depth = torch.tensor([len(_path(i)) - 1 for i in range(n)])
    cache = target.new_cache()
    target(ids, cache=cache)
    target(nodes, cache=cache, attention_mask=_tree_mask(prefix), position_ids=(prefix + depth)[None])
    # row 0 accepts root→1→2 (part of branch A), row 1 accepts root→4→5 (branch B)
    paths = [[0, 1, 2], [0, 4, 5]]
    keep = torch.stack([torch.cat([torch.arange(prefix), prefix + torch.tensor(p)]) for p in paths])  # (B, S')
    select_cache(cache, keep)
    assert cache.get_seq_length() == prefix + 3
    cont = target(nxt, cache=cache, position_ids=torch.full((2, 1), prefix + 3))
    for row, path in enumerate(paths):
        seq = torch.cat([ids[row], nodes[row, path], nxt[row]])[None]
        ref = target(seq)
        assert torch.allclose(cont.logits[row, -1], ref.logits[0, -1], atol=ATOL)
        assert torch.allclose(cont.aux_hidden[row, -1], ref.aux_hidden[0, -1], atol=ATOL)


def test_select_shared_positions_and_range_check(sdpa_target: TargetModel) -> None:
    ids = _ids(1, 12)
    cache = sdpa_target.new_cache()
    sdpa_target(ids, cache=cache)
    keys = cache.layers[3].keys.clone()
    keep = torch.tensor([0, 1, 2, 5, 9])
    select_cache(cache, keep)
    assert torch.equal(cache.layers[3].keys, keys[:, :, keep])
    with pytest.raises(TargetError, match="0..4"):
        select_cache(cache, torch.tensor([0, 7]))


# --- 6. bad input -------------------------------------------------------------------------------


def test_aux_layer_out_of_range(tiny_target_dir: Path) -> None:
    with pytest.raises(TargetError, match=r"index 40 out of range for a 8-layer model \(valid 0\.\.8\)"):
        _load(tiny_target_dir, aux_layers=[2, 4, 40])


def test_chat_without_template(sdpa_target: TargetModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdpa_target.tokenizer, "chat_template", None)
    with pytest.raises(TargetError, match="has no chat template"):
        sdpa_target.chat("hi", 4)


def test_missing_checkpoint_is_target_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(TargetError, match="no-such-model"):
        TargetModel.from_pretrained(missing, TargetConfig(name=str(missing)))


def test_load_target_via_registry(tiny_target_dir: Path, tmp_path: Path) -> None:
    target = load_target(TargetConfig(name=str(tiny_target_dir), aux_layers=[1, 2, 3]))
    assert target.name == str(tiny_target_dir) and target.aux_layers == [1, 2, 3]
    with pytest.raises(TargetError, match="no-such-model"):
        load_target(TargetConfig(name=str(tmp_path / "no-such-model")))


def test_bad_forward_arguments(sdpa_target: TargetModel) -> None:
    ids = _ids(1, 4)
    with pytest.raises(TargetError, match="exactly one"):
        sdpa_target(ids, inputs_embeds=torch.zeros(1, 4, 64))
    with pytest.raises(TargetError, match="got \\(1, 1, 4, 3\\)"):
        sdpa_target(ids, attention_mask=torch.ones(1, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(TargetError, match="2D attention_mask"):
        sdpa_target(ids, attention_mask=torch.ones(1, 5))


# --- 7. summary, chat, frozen heads --------------------------------------------------------------


def test_summary_and_chat(sdpa_target: TargetModel) -> None:
    info = sdpa_target.summary()
    assert (info["num_layers"], info["hidden_size"], info["vocab_size"]) == (8, 64, 320)
    assert (info["num_heads"], info["num_kv_heads"]) == (4, 2)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["aux_layers"] == [2, 4, 5] and info["rope_theta"] == 10000.0
    assert info["num_parameters"] == sum(p.numel() for p in sdpa_target.model.parameters())
    assert isinstance(sdpa_target.chat("Hello!", max_new_tokens=4), str)


def test_frozen_heads_round_trip(sdpa_target: TargetModel, tmp_path: Path) -> None:
    heads = sdpa_target.frozen_heads()
    assert heads.embedding_weight.shape == heads.lm_head_weight.shape == (320, 64)
    save_heads(heads, tmp_path / "heads.safetensors", metadata={"target": sdpa_target.name})
    loaded = load_heads(tmp_path / "heads.safetensors")
    assert torch.equal(loaded.embedding_weight, heads.embedding_weight)
    assert torch.equal(loaded.lm_head_weight, heads.lm_head_weight)
    assert torch.equal(loaded.norm_weight, heads.norm_weight) and loaded.norm_eps == heads.norm_eps
    out = sdpa_target(_ids(1, 5))
    assert torch.allclose(out.last_hidden @ loaded.lm_head_weight.T, out.logits, atol=ATOL)
    with pytest.raises(TargetError, match="does not exist"):
        load_heads(tmp_path / "missing.safetensors")
