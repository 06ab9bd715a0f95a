"""Test helpers: synthetic MNIST in the real IDX format, base checkpoints, a per-rank recorder."""

from __future__ import annotations

import struct
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_lora.inject import lora_state_dict


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x08 = unsigned byte, big-endian sizes)."""
    header = struct.pack(">HBB", 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.contiguous().numpy().tobytes())


def write_fake_mnist(root: Path, train_per_digit: int = 40, test_per_digit: int = 10, seed: int = 0) -> Path:
    """A learnable fake MNIST: each digit is a fixed random pattern plus noise, 28x28 uint8.

    Returns ``root``, which then holds ``MNIST/raw/`` as torchvision expects.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (10, 28, 28), generator=generator)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_digit in (("train", train_per_digit), ("t10k", test_per_digit)):
        labels = torch.arange(10).repeat_interleave(per_digit)
        labels = labels[torch.randperm(len(labels), generator=generator)]
        noise = torch.randint(-60, 61, (len(labels), 28, 28), generator=generator)
        images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def write_base_checkpoint(path: Path, net: nn.Module) -> Path:
    """A minimal Lightning-style checkpoint of a plain net (what a pretraining run leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


class RecordAdapters(pl.Callback):
    """Saves each rank's adapter tensors at the end of training, to compare ranks afterwards."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.cpu().clone() for k, v in lora_state_dict(pl_module.net).items()}
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class SlowSteps(pl.Callback):
    """Sleeps after every training step, so a test can kill a run midway (no effect on numerics)."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)
