"""Epoch-end checkpoints of step-counted runs resume exactly (lightning_lora.integration.loop_state).

Lightning 2.6 restores a checkpoint written after an epoch counted as completed, in a run that
counts steps, as an epoch under way with all its batches done. These tests fail if that rewrite
stops matching what Lightning writes at a batch's end, or if a resumed run is not, batch for batch
and bit for bit, the longer uninterrupted run.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_any_module import UserModule, lora, trainer

from lightning_lora import lora_state_dict
from lightning_lora.demo.mnist_datamodule import MNISTDataModule


class Batches(pl.Callback):
    """(epoch, batch index, step, a digest of the labels) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, trainer.global_step, int(batch[1].sum())))


def data(fake_mnist) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(fake_mnist), batch_size=64)  # 360 training images: 6 batches an epoch


def epoch_end_checkpoints(folder) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=folder, save_last=True, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True, filename="{step}"
    )


def straight_run(tmp_path, fake_mnist, steps: int = 9, **kwargs):
    seen, model = Batches(), UserModule()
    trainer(tmp_path / "straight", [lora(), seen], max_steps=steps, **kwargs).fit(model, data(fake_mnist))
    return model, seen.seen


def resumed_run(tmp_path, fake_mnist, checkpoint, steps: int = 9, **kwargs):
    seen, model = Batches(), UserModule()
    run = trainer(tmp_path / "resumed", [lora(), seen], max_steps=steps, **kwargs)
    run.fit(model, data(fake_mnist), ckpt_path=str(checkpoint))
    return model, seen.seen


def assert_same_adapters(a, b) -> None:
    for key, value in lora_state_dict(a.net).items():
        assert torch.equal(lora_state_dict(b.net)[key], value), key


@pytest.mark.parametrize("stop", [4, 6], ids=["mid-epoch", "at-the-epochs-end"])
@pytest.mark.parametrize("val_batches", [0, 2], ids=["no-validation", "validation"])
def test_a_run_ended_by_max_steps_resumes_as_one_longer_run(tmp_path, fake_mnist, stop, val_batches):
    straight, straight_batches = straight_run(tmp_path, fake_mnist, limit_val_batches=val_batches)
    first = trainer(tmp_path / "first", [lora(), epoch_end_checkpoints(tmp_path / "ck")], max_steps=stop,
                    limit_val_batches=val_batches)  # fmt: skip
    first.fit(UserModule(), data(fake_mnist))
    resumed, batches = resumed_run(tmp_path, fake_mnist, tmp_path / "ck" / "last.ckpt", limit_val_batches=val_batches)
    assert batches == straight_batches[stop:]
    assert_same_adapters(straight, resumed)


def test_an_epoch_end_checkpoint_from_inside_a_longer_run_resumes_exactly(tmp_path, fake_mnist):
    seen, model = Batches(), UserModule()
    trainer(tmp_path / "a", [lora(), seen, epoch_end_checkpoints(tmp_path / "ck")], max_steps=9).fit(
        model, data(fake_mnist)
    )
    resumed, batches = resumed_run(tmp_path, fake_mnist, tmp_path / "ck" / "step=6.ckpt")
    assert batches == seen.seen[6:]
    assert_same_adapters(model, resumed)


def test_the_rewritten_loop_state_is_what_a_batch_end_checkpoint_holds(tmp_path, fake_mnist):
    batch_end = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "ra", [lora(), batch_end], max_steps=5).fit(UserModule(), data(fake_mnist))
    trainer(tmp_path / "rb", [lora(), epoch_end_checkpoints(tmp_path / "b")], max_steps=4).fit(
        UserModule(), data(fake_mnist)
    )
    a = torch.load(tmp_path / "a" / "step=4.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert b["loops"] == a["loops"] and b["epoch"] == a["epoch"] == 0 and b["global_step"] == a["global_step"] == 4
