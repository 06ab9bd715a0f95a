"""Per-digit classification metrics, and the pictures TensorBoard shows of them.

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

from lightning_lora.integration.evaluation_log import BASE_SUFFIX, evaluation_step


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

    def log(self, module: pl.LightningModule, prefix: str, suffix: str = "") -> dict[str, torch.Tensor]:
        """Log ``{prefix}/{name}{suffix}`` for every value, reset, and return the values and the confusion."""
        values, confusion = self.compute()
        module.log_dict({f"{prefix}/{name}{suffix}": value for name, value in values.items()}, add_dataloader_idx=False)
        self.reset()
        return {**values, "confusion": confusion}


class RegressionMetrics(nn.Module):
    """The mean squared error over all outputs of all samples (gathered across DDP ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.mse = MeanSquaredError()

    def update(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.mse.update(preds.detach().float(), targets)

    def log(self, module: pl.LightningModule, prefix: str, suffix: str = "") -> dict[str, torch.Tensor]:
        values = {"mse": self.mse.compute()}
        module.log(f"{prefix}/mse{suffix}", values["mse"], add_dataloader_idx=False)
        self.mse.reset()
        return values


def _render(figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(confusion: torch.Tensor, title: str) -> np.ndarray:
    """Render a confusion matrix as an RGB array (H, W, 3): row-normalised colours, raw counts."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 5), dpi=80)
    draw_confusion(figure.subplots(), confusion.detach().cpu().numpy(), title)
    return _render(figure)


def draw_confusion(axes, counts: np.ndarray, title: str) -> None:
    """A confusion matrix on matplotlib axes (rows: true digit, columns: predicted)."""
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    n = len(counts)
    for row in range(n):
        for col in range(n):
            if counts[row, col]:
                color = "white" if rates[row, col] > 0.5 else "black"
                axes.text(col, row, int(counts[row, col]), ha="center", va="center", fontsize=7, color=color)
    axes.set(xticks=range(n), yticks=range(n), xlabel="predicted digit", ylabel="true digit", title=title)


def draw_mistake_bars(axes, wrong_on: list[float], wrong_off: list[float] | None, title: str) -> None:
    """Mistakes per digit as bars: adapter on beside adapter off (the base), counts above the bars."""
    digits = np.arange(len(wrong_on))
    width = 0.4 if wrong_off is not None else 0.8
    series = [("adapter on" if wrong_off is not None else "model", wrong_on, "tab:orange")]
    if wrong_off is not None:
        series.insert(0, ("adapter off (base)", wrong_off, "tab:blue"))
    for i, (label, values, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        bars = axes.bar(digits + offset, values, width, label=label, color=color)
        axes.bar_label(bars, labels=[f"{int(v)}" for v in values], fontsize=6, padding=1)
    axes.set(xticks=digits, xlabel="true digit", ylabel="mistakes (images wrong)", title=title)
    axes.legend(fontsize=8)
    axes.margins(y=0.12)


def mistakes_image(wrong_on: list[float], wrong_off: list[float] | None, title: str) -> np.ndarray:
    """:func:`draw_mistake_bars` as an RGB array for TensorBoard."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.6), dpi=80, layout="constrained")
    draw_mistake_bars(figure.subplots(), wrong_on, wrong_off, title)
    return _render(figure)


def paired_layout(tags: list[str], base_suffix: str = BASE_SUFFIX) -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout: each metric drawn in one chart with its ``_base`` twin.

    Categories are the tags' prefixes (``val/target``, ``test``); a tag whose twin was not
    logged gets a chart of its own.
    """
    layout: dict[str, dict[str, list]] = {}
    for tag in sorted(t for t in tags if not t.endswith(base_suffix)):
        category, _, name = tag.rpartition("/")
        pair = [tag] + ([tag + base_suffix] if tag + base_suffix in tags else [])
        title = f"{name}: adapter on vs off" if len(pair) == 2 else name
        layout.setdefault(category or "metrics", {})[title] = ["Multiline", pair]
    return layout


def digit_values(values: dict[str, torch.Tensor], name: str = "wrong_digit", num_classes: int = 10) -> list[float]:
    """``values[f"{name}_{d}"]`` for every digit (0 for digits absent from the data)."""
    return [float(values.get(f"{name}_{d}", 0.0)) for d in range(num_classes)]


def log_images(module: pl.LightningModule, images: dict[str, np.ndarray]) -> None:
    """Log RGB images to every logger that takes images, at the current step, from rank zero only."""
    trainer = module.trainer
    if not trainer.is_global_zero or trainer.sanity_checking:
        return
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_image"):
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, evaluation_step(trainer), dataformats="HWC")


def write_scalar_layout(module: pl.LightningModule, tags: list[str]) -> None:
    """Write :func:`paired_layout` of ``tags`` to every TensorBoard logger (rank zero; once per run and stage)."""
    trainer = module.trainer
    if not trainer.is_global_zero or not tags:
        return
    for logger in trainer.loggers:
        if hasattr(logger.experiment, "add_custom_scalars"):
            logger.experiment.add_custom_scalars(paired_layout(tags))
