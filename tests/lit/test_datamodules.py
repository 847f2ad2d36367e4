"""DataModules: seeded splits, rank sharding, exact resume, and feeding a real Lightning training loop."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from confu_lightning.data.batching import TokenBatch
from confu_lightning.errors import DataError
from confu_lightning.lit.datamodules import ConversationDataModule, split_indices


def _samples(n: int = 40) -> list[SimpleNamespace]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 30, (1,), generator=gen))
        ids = torch.randint(0, 100, (length,), generator=gen).tolist()
        out.append(SimpleNamespace(id=f"s{i}", input_ids=ids, loss_mask=[0] * 2 + [1] * (length - 2)))
    return out


def test_split_is_seeded_and_disjoint() -> None:
    train, val = split_indices(50, 0.1, seed=3)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(50))
    assert split_indices(50, 0.1, seed=3) == (train, val)
    assert split_indices(50, 0.1, seed=4) != (train, val)
    assert split_indices(1, 0.5, seed=0) == ([0], [])
    with pytest.raises(DataError):
        split_indices(0, 0.1, seed=0)


def test_conversation_batches_cover_the_train_split() -> None:
    samples = _samples()
    dm = ConversationDataModule(samples, batch_tokens=64, val_fraction=0.1, seed=1)
    dm.setup()
    seen = []
    for batch in dm.train_dataloader():
        assert isinstance(batch, TokenBatch)
        assert batch.input_ids.numel() <= 64 or batch.input_ids.shape[0] == 1
        for row, mask in zip(batch.input_ids, batch.attention_mask):
            seen.append(row[mask].tolist())
    expected = sorted(samples[i].input_ids for i in dm.train_idx)
    assert sorted(seen) == expected
    assert sum(b.input_ids.shape[0] for b in dm.val_dataloader()) == len(dm.val_idx) == 4


def test_ranks_get_disjoint_batches() -> None:
    samples = _samples()
    seen = []
    for rank in range(2):
        dm = ConversationDataModule(samples, batch_tokens=64, val_fraction=0.1, seed=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)  # what a DDP Trainer reports
        rows = [tuple(r[m].tolist()) for b in dm.train_dataloader() for r, m in zip(b.input_ids, b.attention_mask)]
        seen.append(set(rows))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_restored_global_step_resumes_at_the_next_batch() -> None:
    samples = _samples()
    dm = ConversationDataModule(samples, batch_tokens=64, seed=2)
    loader = dm.train_dataloader()  # Lightning iterates one loader once per epoch
    epoch0 = [b.input_ids.tolist() for b in loader]
    epoch1 = [b.input_ids.tolist() for b in loader]
    assert epoch0 != epoch1  # reshuffled per epoch
    for done in (3, len(epoch0) + 2):  # mid first epoch, mid second epoch
        resumed = ConversationDataModule(samples, batch_tokens=64, seed=2)
        resumed.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=done, accumulate_grad_batches=1)
        loader = resumed.train_dataloader()
        tail = [b.input_ids.tolist() for b in loader]
        assert tail == (epoch0 + epoch1)[done : len(epoch0) if done < len(epoch0) else None]


class _TinyLM(L.LightningModule):
    """A bigram model: enough to show the batches train something."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(100, 100)

    def training_step(self, batch: TokenBatch, _: int) -> torch.Tensor:
        logits = self.table(batch.input_ids[:, :-1])
        target = batch.input_ids[:, 1:]
        keep = batch.loss_mask[:, 1:] & batch.attention_mask[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)


def test_datamodule_feeds_a_trainer(tmp_path) -> None:
    samples = _samples(16)
    dm = ConversationDataModule(samples, batch_tokens=128, val_fraction=0.0, seed=0)
    model = _TinyLM()
    trainer = L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 30
    assert trainer.callback_metrics["train/loss"] < 3.0  # from ~ln(100) = 4.6
