"""The demo's LightningModules: LitClassifier (MNIST digits, optional distillation) and LitRegressor."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_lora.core.active_adapters import disable_lora
from lightning_lora.core.inject import get_lora_config
from lightning_lora.demo.digit_metrics import (
    DigitMetrics,
    RegressionMetrics,
    confusion_image,
    digit_values,
    log_images,
    mistakes_image,
)
from lightning_lora.demo.live_bars import mistakes_bars
from lightning_lora.demo.net_module import Batch, NetModule
from lightning_lora.errors import UsageError
from lightning_lora.integration.evaluation_log import evaluation_step


class LitClassifier(NetModule):
    """Classifies digits with ``net``; logs micro accuracy, per-digit numbers, confusion matrices.

    Optionally distils the fine-tuned model towards its own base: ``distill_weight *
    KL(base || adapted)`` is added to the loss, with the base's outputs computed by the same
    network with the adapter disabled (no second copy of the model; exact, since the base is
    frozen), in eval mode and before the adapted forward.

    Args:
        net, optimizer, base_checkpoint, compare_base, lr_on_resume, lora_plus_ratio: See :class:`NetModule`.
        num_classes: Size of the output layer (10 for MNIST, also for digit subsets, so the
            head keeps the pretrained base's shape).
        distill_weight: Weight of the distillation term; 0 turns it off.
        distill_on: ``"retain"``: only the samples of digits not trained on (the DataModule's
            ``replay_fraction`` puts them in every batch); ``"all"``: every sample.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        base_checkpoint: str | None = None,
        compare_base: bool = True,
        num_classes: int = 10,
        lr_on_resume: float | None = None,
        distill_weight: float = 0.0,
        distill_on: Literal["retain", "all"] = "retain",
        lora_plus_ratio: float | None = None,
    ) -> None:
        self.num_classes = num_classes
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or not distill_weight >= 0:
            raise ValueError(f"distill_weight must be a number >= 0, got {distill_weight!r}")
        if not distill_weight <= 1e6:  # beyond this the loss overflows float32 (inf, too, lands here)
            raise ValueError(f"distill_weight {distill_weight!r} is too large: use at most 1e6 (1-3 is typical)")
        if distill_on not in ("retain", "all"):
            raise ValueError(f"distill_on must be 'retain' or 'all', got {distill_on!r}")
        self.distill_weight, self.distill_on = float(distill_weight), distill_on
        self._target_digits: torch.Tensor | None = None
        super().__init__(net, optimizer, base_checkpoint, compare_base, lr_on_resume, lora_plus_ratio)

    def resume_settings(self) -> dict[str, Any]:
        """What decides what the adapter learns beyond the data (``ExactResume`` records and compares them)."""
        return {"distill_weight": self.distill_weight, "distill_on": self.distill_on}

    def new_eval_metrics(self) -> DigitMetrics:
        return DigitMetrics(self.num_classes)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"net outputs {logits.shape[-1]} classes but num_classes is {self.num_classes}; "
                "make the net's num_classes match"
            )
        return logits

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self._logits(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=-1), y

    def on_fit_start(self) -> None:
        if not self.distill_weight:
            return
        if get_lora_config(self.net) is None:
            raise UsageError("distill_weight needs adapters to distil: the base is the model itself without them")
        if self.distill_on == "retain":
            data = self.trainer.datamodule
            digits = getattr(data, "target_digits", None)
            if digits is None or not getattr(data, "replay_fraction", 0):
                raise UsageError(
                    "distill_on 'retain' distils on the samples of the digits not trained on, but the training "
                    "batches hold none: set --data.train_digits and --data.replay_fraction (e.g. 0.25), or "
                    "--model.distill_on all"
                )
            self._target_digits = torch.tensor(digits, device=self.device)

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        if not self.distill_weight:
            return super().training_loss(batch)
        x, y = batch
        keep = slice(None) if self._target_digits is None else ~torch.isin(y, self._target_digits)
        with torch.no_grad(), disable_lora(self.net):  # the base first: the adapted forward keeps its graph
            was_training = self.net.training
            self.net.eval()
            try:
                base_logits = self._logits(x[keep])
            finally:
                self.net.train(was_training)
        logits = self._logits(x)
        ce = F.cross_entropy(logits, y)
        if len(base_logits):
            log_adapted = F.log_softmax(logits[keep].float(), dim=-1)
            log_base = F.log_softmax(base_logits.float(), dim=-1)
            distill = F.kl_div(log_adapted, log_base, log_target=True, reduction="batchmean")  # KL(base || adapted)
        else:
            distill = logits.new_zeros(())
        loss = ce + self.distill_weight * distill
        return loss, logits.argmax(dim=-1), y, {"ce": ce, "distill": distill}

    def train_step_metrics(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> dict:
        return {"loss": loss.detach(), "acc": (preds == targets).float().mean()}

    def log_eval_images(self, stage: str, on: dict[str, dict], off: dict[str, dict]) -> None:
        """Mistakes per digit as bars (adapter on vs off, every set together); at test also the confusion matrices.

        At every validation the bars come from Pillow (:mod:`~lightning_lora.demo.live_bars`, ~3 ms);
        matplotlib's figures (~100 ms each, ~0.5 s to import) are drawn at test only.
        """
        trainer = self.trainer
        if trainer.sanity_checking or not trainer.is_global_zero or not trainer.loggers:
            return
        wrong_on = [sum(x) for x in zip(*(digit_values(v) for v in on.values()), strict=True)]
        wrong_off = [sum(x) for x in zip(*(digit_values(v) for v in off.values()), strict=True)] if off else None
        sets = [prefix.rpartition("/")[2] for prefix in on]
        together = f" ({' + '.join(sets)})" if sets != [stage] else ""
        title = f"{stage}{together}: mistakes per digit (step {evaluation_step(trainer)})"
        if stage != "test":
            log_images(self, {f"{stage}/mistakes_per_digit": mistakes_bars(wrong_on, wrong_off, title)})
            return
        images = {"test/mistakes_per_digit": mistakes_image(wrong_on, wrong_off, title)}
        for prefix, values in on.items():
            images[f"{prefix}/confusion_matrix"] = confusion_image(values["confusion"], f"{prefix}: adapter on")
        for prefix, values in off.items():
            images[f"{prefix}/confusion_matrix_base"] = confusion_image(values["confusion"], f"{prefix}: base")
        log_images(self, images)


class LitRegressor(NetModule):
    """Fits ``net`` to real-valued targets with the mean squared error (logged as ``*/mse``)."""

    def new_eval_metrics(self) -> RegressionMetrics:
        return RegressionMetrics()

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        preds = self(x)
        return F.mse_loss(preds.float(), y), preds, y
