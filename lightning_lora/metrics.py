"""Per-digit classification metrics and the confusion-matrix image.

Accuracy is micro-averaged (correct / total): torchmetrics' default macro average reads 0.375
where micro reads 0.75 on a one-digit subset, which would make every digit-filtered run look
broken. Per-digit accuracy and wrong counts are reported only for digits present in the data.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassConfusionMatrix


class DigitMetrics(nn.Module):
    """Loss, accuracy, per-digit accuracy and wrong counts, from one confusion matrix.

    Both parts are torchmetrics objects, so under DDP ``compute()`` gathers all ranks.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.loss = MeanMetric()

    def update(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.confusion.update(preds, targets)
        self.loss.update(loss.detach(), weight=len(targets))

    def compute(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The scalars by name, and the confusion matrix (rows: true digit, columns: predicted)."""
        confusion = self.confusion.compute()
        support, correct = confusion.sum(dim=1), confusion.diag()
        values = {"loss": self.loss.compute(), "acc": correct.sum() / support.sum().clamp_min(1)}
        for digit in range(self.num_classes):
            if support[digit] > 0:
                values[f"acc_digit_{digit}"] = correct[digit] / support[digit]
                values[f"wrong_digit_{digit}"] = (support[digit] - correct[digit]).float()
        return values, confusion

    def reset(self) -> None:
        self.confusion.reset()
        self.loss.reset()

    def log(self, module: pl.LightningModule, stage: str, suffix: str = "") -> None:
        log_digit_metrics(module, stage, self, suffix)


class RegressionMetrics(nn.Module):
    """The mean squared error over all outputs of all samples (gathered across DDP ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.mse = MeanSquaredError()

    def update(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.mse.update(preds.detach().float(), targets)

    def log(self, module: pl.LightningModule, stage: str, suffix: str = "") -> None:
        module.log(f"{stage}/mse{suffix}", self.mse.compute())
        self.mse.reset()


def confusion_image(confusion: torch.Tensor, title: str) -> np.ndarray:
    """Render a confusion matrix as an RGB array (H, W, 3): row-normalised colours, raw counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = confusion.detach().cpu().numpy()
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(5.5, 5), dpi=80)
    axes = figure.subplots()
    axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    n = len(counts)
    for row in range(n):
        for col in range(n):
            if counts[row, col]:
                color = "white" if rates[row, col] > 0.5 else "black"
                axes.text(col, row, int(counts[row, col]), ha="center", va="center", fontsize=7, color=color)
    axes.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_digit_metrics(module: pl.LightningModule, stage: str, metrics: DigitMetrics, suffix: str = "") -> None:
    """Log ``{stage}/{name}{suffix}`` scalars and a confusion-matrix image, then reset ``metrics``."""
    values, confusion = metrics.compute()
    module.log_dict({f"{stage}/{name}{suffix}": value for name, value in values.items()})
    trainer = module.trainer
    if trainer.is_global_zero and not trainer.sanity_checking:
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                tag = f"{stage}/confusion_matrix{suffix}"
                image = confusion_image(confusion, f"{tag} (step {trainer.global_step})")
                logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
    metrics.reset()
