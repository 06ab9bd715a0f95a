"""LightningModules around a plain net: LitClassifier (MNIST digits) and LitRegressor.

They know nothing of *when* adapters are injected (that is the callback's job). They write
adapter-only checkpoints (:class:`~lightning_lora.LoRACheckpointMixin`): the base comes from
``base_checkpoint`` again on load, so ``LitClassifier.load_from_checkpoint(path)`` restores a
fine-tuned model strictly, with no callback. And they evaluate every validation and test batch
with the adapter on and off (``compare_base``), logging the base's numbers with a ``_base``
suffix: what the adapter changed, in one run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_lora.core.inject import disable_lora, get_lora_config
from lightning_lora.demo.digit_metrics import (
    DigitMetrics,
    RegressionMetrics,
    confusion_image,
    digit_values,
    log_images,
    mistakes_image,
    write_scalar_layout,
)
from lightning_lora.errors import NonFiniteLossError, UsageError
from lightning_lora.integration import class_allowlist as trust
from lightning_lora.integration.checkpoint_mixin import LoRACheckpointMixin
from lightning_lora.integration.checkpoint_reader import (
    base_shapes,
    build_net,
    load_base_checkpoint,
    net_spec,
    read_checkpoint_state,
)
from lightning_lora.integration.class_allowlist import MODULE_CLASS_KEY

Batch = tuple[torch.Tensor, torch.Tensor]


class NetModule(LoRACheckpointMixin, pl.LightningModule):
    """What every module here shares: the net, its optimizer, base weights and checkpoints.

    Subclasses define :meth:`model_step` (loss, predictions, targets for one batch) and
    :meth:`new_eval_metrics`; validation and test then run the same way for all of them, with
    the adapter on and, when ``compare_base``, off.

    Args:
        net: The network (a plain ``nn.Module``). From YAML: ``class_path`` + ``init_args``.
        optimizer: Called with the trainable parameters only; built after the callback has
            injected the adapters, so it never holds frozen weights.
        base_checkpoint: A pretraining checkpoint whose weights are loaded (strictly) before
            any callback runs. This starts a fine-tune; ``--ckpt_path`` means resume only.
            Adapter-only checkpoints take their base from here again when loaded.
        compare_base: When the net holds adapters, also evaluate every validation and test
            batch with the adapter disabled (the base model) and log those numbers with a
            ``_base`` suffix (``test/acc_base``, ``test/wrong_digit_9_base``).
        lr_on_resume: When resuming (``--ckpt_path``), replace the learning rate the checkpoint
            restores with this one: after a NaN, resume from the last good checkpoint with a
            lower rate.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        base_checkpoint: str | None = None,
        compare_base: bool = True,
        lr_on_resume: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(net, dict):  # a spec (from a checkpoint's hparams): checked against the base before building
            net = build_net(net, "model.net", base_shapes(base_checkpoint) if base_checkpoint else None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable that builds an optimizer, got {type(optimizer).__name__}")
        self.save_hyperparameters(ignore=["net", "optimizer"])
        spec = net_spec(net)
        if spec is not None:
            self.hparams["net"] = spec
        self.net = net
        self.optimizer = optimizer
        if base_checkpoint is not None:
            # Recorded as the file it resolved to, absolute: a checkpoint loads from any working folder,
            # and a later pretraining run never changes what this fine-tune's base is.
            self.hparams["base_checkpoint"] = str(load_base_checkpoint(net, base_checkpoint).resolve())
        self.compare_base = compare_base
        self.lr_on_resume = lr_on_resume
        self.eval_metrics = nn.ModuleDict()  # one metrics object per (evaluation set, adapter on/off), made on use
        self._set_prefixes: list[str] = []
        self._base_cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._layouts_written: set[str] = set()
        self._train_sums: torch.Tensor | None = None
        self._train_names: list[str] = []

    def new_eval_metrics(self) -> nn.Module:
        """A fresh metrics object with ``update(loss, preds, targets)`` and ``log(module, stage, suffix)``."""
        raise NotImplementedError

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, predictions and targets for one batch: shared by every stage."""
        raise NotImplementedError

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Restore a trained model; a fine-tune takes its base from ``base_checkpoint`` (override it here).

        The stored hyper-parameters are this class's own plain arguments (the net as a checked
        spec), so the module is built directly from them: LightningCLI's record of how it was
        instantiated (``_instantiator``, which would hand the values to jsonargparse, and jsonargparse
        imports what strings name) is dropped, and a stored ``_class_path`` must be this class.
        """
        checkpoint = read_checkpoint_state(checkpoint_path)
        trust.check_class_paths(checkpoint, f"checkpoint {checkpoint_path}")
        hyper_parameters = checkpoint.get("hyper_parameters")
        if isinstance(hyper_parameters, dict):
            stored = hyper_parameters.pop("_class_path", None)
            hyper_parameters.pop("_instantiator", None)
            own = f"{cls.__module__}.{cls.__qualname__}"
            if stored is not None and stored != own:
                raise UsageError(
                    f"checkpoint {checkpoint_path} was written by {stored}, not {own}; load it with that class"
                )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, *args, **kwargs)  # the mixin checks it again, then Lightning

    def base_hint(self) -> str:
        recorded = self.hparams.get("base_checkpoint")
        return (
            "Pass the pretraining checkpoint the fine-tune started from as --model.base_checkpoint "
            f"(or base_checkpoint=... to load_from_checkpoint); this module was built from {recorded!r}."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_step_metrics(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> dict:
        """Per-step training metrics by name (the loss, plus what a subclass adds)."""
        return {"loss": loss.detach()}

    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """The loss to train on, with predictions, targets and the loss's parts by name (if any)."""
        return (*self.model_step(batch), {})

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, preds, targets, parts = self.training_loss(batch)
        self._stop_if_not_finite(loss, batch_idx)
        values = {**self.train_step_metrics(loss, preds, targets), **{k: v.detach() for k, v in parts.items()}}
        # Running sums for the epoch means: Lightning's self.log costs ~1 ms per call on CPU
        # (it re-places its result object on every call), more than a small model's whole step.
        stacked = torch.stack([v.float() for v in values.values()]) * len(targets)
        if self._train_sums is None or self._train_sums.device != stacked.device:
            self._train_sums = torch.zeros(len(values) + 1, device=stacked.device)
            self._train_names = list(values)
        self._train_sums[:-1] += stacked
        self._train_sums[-1] += len(targets)
        if self._logs_this_step():
            self.log_dict({f"train/{name}": v for name, v in values.items()}, prog_bar=True, batch_size=len(targets))
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop at the first NaN/inf loss, on every rank at once, before weights are touched.

        Raising here (inside the step) means no optimizer step and no checkpoint follow, so the
        last checkpoint written stays the last good one. Under DDP the ranks agree first; a lone
        rank raising would leave the others waiting in the next all-reduce.
        """
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); training stopped before applying it. Likely causes: a learning rate too high "
                "for this model, or an overflow in reduced precision (with 16-mixed try bf16-mixed or 32-true). "
                + self._resume_advice()
            )

    def _resume_advice(self) -> str:
        """How to go on after a NaN: the newest checkpoint whose weights still gave a finite loss.

        A checkpoint at step ``k`` holds the weights the forward of step ``k + 1`` used; the loss
        was finite up to the current step, so every checkpoint before it is good and the one at
        it is not. No checkpoint is written of the state that gave NaN.
        """
        candidates = {Path(self.trainer.ckpt_path)} if self.trainer.ckpt_path else set()
        for callback in self.trainer.checkpoint_callbacks:
            if hasattr(callback, "save_on_exception"):
                callback.save_on_exception = False  # the weights that gave NaN must not become a checkpoint
            if getattr(callback, "dirpath", None) and Path(callback.dirpath).is_dir():
                candidates.update(Path(callback.dirpath).glob("*.ckpt"))
        good = []
        for path in candidates:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                step = checkpoint.get("global_step", -1)
                progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
                between_steps = (
                    progress["is_last_batch"]
                    or progress["current"]["processed"] % (self.trainer.accumulate_grad_batches) == 0
                )
            except Exception:  # unreadable, or not a Lightning training checkpoint: not a candidate
                continue
            if isinstance(step, int) and 0 <= step < self.global_step and between_steps:
                good.append((step, path))
        if not good:
            return (
                "No checkpoint from before this step is left to resume from; start again with a lower "
                "model.optimizer.init_args.lr."
            )
        step, path = max(good, key=lambda item: (item[0], item[1].stat().st_mtime))
        return (
            f"The newest checkpoint from before it is {path} (step {step}); resume from it with a lower rate (a "
            f"checkpoint restores its own rate otherwise): --ckpt_path {path} --model.lr_on_resume <lower lr>, "
            "or start again with a lower model.optimizer.init_args.lr."
        )

    def _logs_this_step(self) -> bool:
        """Whether the loggers write this step: Lightning's ``log_every_n_steps`` rule, plus the first step.

        Lightning has no public way to ask; its rule (``_LoggerConnector.should_update_logs``) is
        mirrored here, in one place, and ``tests/test_module.py`` compares the two on a real run.
        """
        trainer = self.trainer
        if trainer.log_every_n_steps == 0:  # Lightning's way to switch step logging off
            return False
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.global_step == 0

    def on_train_start(self) -> None:
        if self.lr_on_resume is not None and self.trainer.ckpt_path is not None:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr_on_resume
            for config in self.trainer.lr_scheduler_configs:
                config.scheduler.base_lrs = [self.lr_on_resume] * len(config.scheduler.base_lrs)

    def on_train_epoch_start(self) -> None:
        self._train_sums = None

    def on_train_epoch_end(self) -> None:
        if self._train_sums is None:
            return
        means = self._train_sums[:-1] / self._train_sums[-1].clamp_min(1)
        self.log_dict({f"train/{n}_epoch": m for n, m in zip(self._train_names, means, strict=True)}, sync_dist=True)

    def _comparing(self) -> bool:
        return self.compare_base and get_lora_config(self.net) is not None

    def setup(self, stage: str) -> None:
        self._base_cache.clear()  # the base's outputs, kept for the whole fit: it never changes

    def _prefixes(self, stage: str) -> list[str]:
        """One metric prefix per evaluation DataLoader: ``val``, or ``val/target`` and ``val/retain``."""
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        count = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        names = getattr(self.trainer.datamodule, "val_set_names", None) if stage == "val" else None
        if count == 1 and not names:
            return [stage]
        if not names or len(names) != count:
            names = [f"set{i}" for i in range(count)]
        return [f"{stage}/{name}" for name in names]

    def _metrics(self, prefix: str, base: bool) -> nn.Module:
        key = prefix.replace("/", "__") + ("__base" if base else "")
        if key not in self.eval_metrics:
            self.eval_metrics[key] = self.new_eval_metrics().to(self.device)
        return self.eval_metrics[key]

    def _evaluate(self, batch: Batch, batch_idx: int, dataloader_idx: int, cache: bool) -> None:
        prefix = self._set_prefixes[dataloader_idx]
        self._metrics(prefix, base=False).update(*self.model_step(batch))
        if not self._comparing():
            return
        key = (dataloader_idx, batch_idx)
        cached = self._base_cache.get(key) if cache else None
        if cached is None or not torch.equal(cached[2], batch[1]):
            with disable_lora(self.net):
                cached = tuple(t.detach() for t in self.model_step(batch))
            if cache:
                self._base_cache[key] = cached
        self._metrics(prefix, base=True).update(*cached)

    def on_validation_epoch_start(self) -> None:
        self._set_prefixes = self._prefixes("val")

    def on_test_epoch_start(self) -> None:
        self._set_prefixes = self._prefixes("test")

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The base is frozen: its outputs on the validation sets are computed once per fit.
        self._evaluate(batch, batch_idx, dataloader_idx, cache=True)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, dataloader_idx, cache=False)

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch)[1]

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Log every set's numbers, adapter on and off; then the pictures of them."""
        on, off = {}, {}
        for prefix in self._set_prefixes:
            on[prefix] = self._metrics(prefix, base=False).log(self, prefix)
            if self._comparing():
                off[prefix] = self._metrics(prefix, base=True).log(self, prefix, suffix="_base")
        self.log_eval_images(stage, on, off)
        if not self.trainer.sanity_checking and stage not in self._layouts_written:
            self._layouts_written.add(stage)
            suffixes = ("", "_base") if off else ("",)
            tags = [f"{p}/{n}{x}" for p, values in on.items() for n in values if n != "confusion" for x in suffixes]
            write_scalar_layout(self, tags)

    def log_eval_images(self, stage: str, on: dict[str, dict], off: dict[str, dict]) -> None:
        """Pictures of an evaluation's numbers (``on``/``off``: per set, the values logged); none here."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise UsageError(
                "nothing to train: every parameter is frozen. Add a LoRAInjectionCallback "
                "(trainer.callbacks) or unfreeze part of the net."
            )
        try:
            return self.optimizer(trainable)
        except ValueError as err:  # torch's own check, e.g. "Invalid learning rate: -1.0"
            raise UsageError(f"model.optimizer: {err}; fix its setting (e.g. --model.optimizer.init_args.lr)") from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"


class LitClassifier(NetModule):
    """Classifies digits with ``net``; logs micro accuracy, per-digit numbers, confusion matrices.

    Optionally distils the fine-tuned model towards its own base: ``distill_weight *
    KL(base || adapted)`` is added to the loss, with the base's outputs computed by the same
    network with the adapter disabled (no second copy of the model; exact, since the base is
    frozen), in eval mode and before the adapted forward.

    Args:
        net, optimizer, base_checkpoint, compare_base, lr_on_resume: See :class:`NetModule`.
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
        super().__init__(net, optimizer, base_checkpoint, compare_base, lr_on_resume)

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
        """At test: mistakes per digit as bars (adapter on vs off) and the confusion matrices.

        Validation draws none: a picture costs ~80 ms (and matplotlib's import ~0.4 s), more
        than validating the demo's live sets; its numbers are in the scalars, and ``report``
        adds its figures to the run.
        """
        trainer = self.trainer
        if stage != "test" or not trainer.is_global_zero or not trainer.loggers:
            return
        wrong_on = [sum(x) for x in zip(*(digit_values(v) for v in on.values()), strict=True)]
        wrong_off = [sum(x) for x in zip(*(digit_values(v) for v in off.values()), strict=True)] if off else None
        title = f"test: mistakes per digit (step {trainer.global_step})"
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
