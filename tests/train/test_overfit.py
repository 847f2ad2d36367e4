"""A tiny EAGLE-3 draft overfits one batch of real (tiny random Llama) target features with plain AdamW."""

from __future__ import annotations

from pathlib import Path

import torch

from confu_lightning.draft.eagle3 import Eagle3Draft, draft_config_from_target
from confu_lightning.draft.vocab import build_draft_vocab, count_tokens
from confu_lightning.train.losses import step_accuracy, teacher_targets, ttt_loss, ttt_step_counts
from confu_lightning.train.ttt import ttt_unroll

SHARPEN = 20.0
"""A random tiny target is almost uniform (max prob ~0.015); scaling its final hidden state makes a peaked teacher."""


def target_batch(path: Path, batch: int = 2, length: int = 24):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states  # HF indices: 0 = embeddings, i = output of layer i, last = post-final-norm
    torch.testing.assert_close(hs[-1] @ model.lm_head.weight.T, out.logits, rtol=1e-4, atol=1e-4)
    aux = torch.cat([hs[i] for i in (2, 4, 5)], dim=-1)  # EAGLE-3's [2, L//2, L-3] for L = 8
    return model, ids, aux, hs[-1] * SHARPEN


def tiny_draft_and_batch(path: Path):
    """A fresh draft over the tiny target (vocabulary = the teacher's argmax tokens) and one batch of its features."""
    torch.manual_seed(0)
    model, ids, aux, last = target_batch(path)
    head = model.lm_head.weight.detach()
    cfg = draft_config_from_target(model.config.to_dict(), draft_vocab_size=64)
    draft = Eagle3Draft(cfg)
    draft.load_embedding(model.get_input_embeddings().weight.detach())
    argmax = (last @ head.T).argmax(-1)
    vocab = build_draft_vocab(count_tokens([argmax.flatten()], [torch.ones_like(argmax).flatten()],
                                           cfg.target_vocab_size), 64)
    draft.set_vocab(vocab.d2t, vocab.t2d)
    return model, draft, head, ids, aux, last


def test_draft_overfits_one_batch(tiny_target_dir: Path) -> None:
    model, draft, head, ids, aux, last = tiny_draft_and_batch(tiny_target_dir)
    loss_mask = torch.ones_like(ids)
    teacher = teacher_targets(last, head, draft.t2d)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        out = ttt_unroll(draft, ids, aux, steps=3)
        loss = ttt_loss(out, teacher, loss_mask, step_weight=0.8)
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(float(loss.loss.detach()))
    with torch.no_grad():
        acc, _ = step_accuracy(ttt_step_counts(ttt_unroll(draft, ids, aux, steps=3), teacher, loss_mask))
    assert losses[-1] < 0.25 * losses[0], losses
    assert acc[0] > 0.9, acc
    assert torch.equal(draft.embed_tokens.weight, model.get_input_embeddings().weight)  # stayed frozen
