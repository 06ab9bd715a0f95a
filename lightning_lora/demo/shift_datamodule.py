"""A synthetic regression task whose change is exactly rank one (experiment 3, ``make demo-shift``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_lora.demo.batch_data import TensorBatchDataset, keep_batch
from lightning_lora.integration.resumable_loader import EpochShuffle, ResumableDataLoader


class LinearShiftDataModule(pl.LightningDataModule):
    """Synthetic regression ``y = X @ (theta + shift)``, ``theta`` and ``X`` standard normal.

    ``theta`` (num_features, num_outputs) comes from ``theta_seed`` and the samples from
    ``data_seed``, so a pretraining run (``shift=0``) and a fine-tuning run (``shift=1``, new
    samples) share the same ``theta``: the second task differs from the first by a rank-1
    matrix of ones, which a rank-1 adapter can represent exactly.

    Args:
        num_samples: Training samples (validation and test sets are a tenth of this each).
        num_features, num_outputs: Shape of ``theta``.
        shift: Added to every entry of ``theta``.
        theta_seed, data_seed: Seeds of ``theta`` and of the samples.
        batch_size: Samples per batch.
    """

    def __init__(
        self,
        num_samples: int = 10000,
        num_features: int = 1001,
        num_outputs: int = 1000,
        shift: float = 0.0,
        theta_seed: int = 0,
        data_seed: int = 1,
        batch_size: int = 100,
    ) -> None:
        super().__init__()
        for name, value in (("num_samples", num_samples), ("num_features", num_features), ("num_outputs", num_outputs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.save_hyperparameters()
        self.num_samples, self.num_features, self.num_outputs = num_samples, num_features, num_outputs
        self.shift, self.theta_seed, self.data_seed, self.batch_size = float(shift), theta_seed, data_seed, batch_size
        self.splits: dict[str, TensorBatchDataset] = {}

    def theta(self) -> torch.Tensor:
        """The true weights, shift included: (num_features, num_outputs)."""
        generator = torch.Generator().manual_seed(self.theta_seed)
        return torch.randn(self.num_features, self.num_outputs, generator=generator) + self.shift

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        theta = self.theta()
        generator = torch.Generator().manual_seed(self.data_seed)
        held_out = max(1, self.num_samples // 10)
        for name, size in (("train", self.num_samples), ("val", held_out), ("test", held_out)):
            x = torch.randn(size, self.num_features, generator=generator)
            self.splits[name] = TensorBatchDataset(x, x @ theta)

    def _loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError("LinearShiftDataModule.setup() has not run yet")
        return DataLoader(self.splits[split], batch_size=self.batch_size, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (data seed, epoch); after a mid-epoch resume it continues where the run stopped."""
        train = self._loader("train").dataset  # (checks that setup has run)
        sampler = EpochShuffle(torch.arange(len(train)), self.data_seed)
        return ResumableDataLoader(train, batch_size=self.batch_size, sampler=sampler, collate_fn=keep_batch)

    def resume_settings(self) -> dict[str, Any]:
        """What decides the data and its order (``ExactResume`` compares them on resume)."""
        return {"num_samples": self.num_samples, "shift": self.shift, "theta_seed": self.theta_seed,
                "data_seed": self.data_seed, "batch_size": self.batch_size}  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
