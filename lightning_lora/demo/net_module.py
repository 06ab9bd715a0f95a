"""NetModule: what the demo's LightningModules around a plain net share (see ``classifiers``).

They know nothing of *when* adapters are injected (that is the callback's job). They write
adapter-only checkpoints (:class:`~lightning_lora.LoRACheckpointMixin`): the base comes from
``base_checkpoint`` again on load, so ``LitClassifier.load_from_checkpoint(path)`` restores a
fine-tuned model strictly, with no callback. And they evaluate every validation and test batch
with the adapter on and off (``compare_base``), logging the base's numbers with a ``_base``
suffix: what the adapter changed, in one run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_lora.core.active_adapters import disable_lora
from lightning_lora.core.inject import get_lora_config
from lightning_lora.core.lora_plus import lora_plus_param_groups
from lightning_lora.demo.digit_metrics import write_scalar_layout
from lightning_lora.demo.run_loading import base_shapes, build_net, load_base_checkpoint, net_spec
from lightning_lora.errors import NonFiniteLossError, UsageError
from lightning_lora.integration.checkpoint_mixin import LoRACheckpointMixin
from lightning_lora.integration.class_allowlist import MODULE_CLASS_KEY
from lightning_lora.integration.evaluation_log import BASE_SUFFIX, evaluation_step

Batch = tuple[torch.Tensor, torch.Tensor]


class NetModule(LoRACheckpointMixin, pl.LightningModule):
    """What every module here shares: the net, its optimizer, base weights and checkpoints.

    Its stored hyper-parameters are its own plain arguments (the net as a checked spec), so
    ``load_from_checkpoint`` builds it directly from them, never through the instantiator
    LightningCLI records (which would hand the values to jsonargparse, and jsonargparse imports
    what strings name).

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
            lower rate. (With LoRA+ it is ``A``'s rate; ``B``'s stays ``lora_plus_ratio`` times it.)
        lora_plus_ratio: Train with LoRA+ (:func:`~lightning_lora.core.lora_plus.lora_plus_param_groups`):
            ``B`` at this many times the optimizer's learning rate (16 in Hayou et al., 2024).
    """

    hyper_parameters_are_plain = True

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        base_checkpoint: str | None = None,
        compare_base: bool = True,
        lr_on_resume: float | None = None,
        lora_plus_ratio: float | None = None,
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
        if lora_plus_ratio is not None and (
            isinstance(lora_plus_ratio, bool) or not 1 <= lora_plus_ratio < float("inf")
        ):
            raise ValueError(f"lora_plus_ratio must be a number >= 1 (B's rate over A's), got {lora_plus_ratio!r}")
        self.lora_plus_ratio = lora_plus_ratio
        self.eval_metrics = nn.ModuleDict()  # one metrics object per (evaluation set, adapter on/off), made on use
        self._set_prefixes: list[str] = []
        self._base_cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._layouts_written: set[str] = set()
        self._train_sums: torch.Tensor | None = None
        self._train_names: list[str] = []
        self._step_values: dict[str, torch.Tensor] = {}
        self._step_batch_size = 1
        self._last_logged_step = -1

    def new_eval_metrics(self) -> nn.Module:
        """A fresh metrics object with ``update(loss, preds, targets)`` and ``log(module, stage, suffix)``."""
        raise NotImplementedError

    def model_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, predictions and targets for one batch: shared by every stage."""
        raise NotImplementedError

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
        # Running sums for the epoch means, and the step's values kept for on_train_batch_end: Lightning's
        # self.log costs ~1 ms per call on the CPU, more than a small model's whole step.
        stacked = torch.stack([v.float() for v in values.values()]) * len(targets)
        if self._train_sums is None or self._train_sums.device != stacked.device:
            self._train_sums = torch.zeros(len(values) + 1, device=stacked.device)
            self._train_names = list(values)
        self._train_sums[:-1] += stacked
        self._train_sums[-1] += len(targets)
        self._step_values, self._step_batch_size = values, len(targets)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``log_every_n_steps`` optimizer steps (and the first), the step's values: to the loggers
        at that step, and to the progress bar.

        The cadence is this module's own rule on ``trainer.global_step``; values go to the loggers
        directly (``logger.log_metrics``), not through ``self.log``, whose per-call cost the other
        steps do not pay.
        """
        trainer, every = self.trainer, self.trainer.log_every_n_steps
        step = trainer.global_step
        if not every or not self._step_values or step == 0 or step == self._last_logged_step:
            return
        if step % every and step != 1:
            return
        self._last_logged_step = step
        named = {f"train/{name}": value for name, value in self._step_values.items()}
        self.log_dict(named, prog_bar=True, logger=False, batch_size=self._step_batch_size)
        plain = {name: float(value) for name, value in named.items()}
        for logger in trainer.loggers:
            logger.log_metrics(plain, step=step)

    def _stop_if_not_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop at the first NaN/inf loss, on every rank at once, before weights are touched.

        Raising here (inside the step) means no optimizer step and no checkpoint follow, so the
        last checkpoint written stays the last good one (``ResumableCheckpoint`` also removes the one
        holding the weights that gave it, and says where to resume from). Under DDP the ranks agree
        first; a lone rank raising would leave the others waiting in the next all-reduce.
        """
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            for callback in self.trainer.checkpoint_callbacks:
                if hasattr(callback, "save_on_exception"):  # a ModelCheckpoint: never of the weights that gave NaN
                    callback.save_on_exception = False
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); training stopped before applying it. Likely causes: a learning rate too high "
                "for this model, or an overflow in reduced precision (with 16-mixed try bf16-mixed or 32-true)."
            )

    def on_train_start(self) -> None:
        if self.lr_on_resume is None and self.trainer.ckpt_path is not None:
            self._say_which_settings_hold()
        if self.lr_on_resume is not None and self.trainer.ckpt_path is not None:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self._rate_on_resume(group)
            for config in self.trainer.lr_scheduler_configs:
                groups = config.scheduler.optimizer.param_groups
                config.scheduler.base_lrs = [self._rate_on_resume(group) for group in groups]

    def _say_which_settings_hold(self) -> None:
        """A resume restores the checkpoint's optimizer settings: a changed ``lr``, ``weight_decay`` or other setting
        of the optimizer in the config would be dropped silently."""
        configured = getattr(self, "_configured", None)
        groups = self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []
        if configured is None or not groups:
            return
        restored = groups[0].get("initial_lr", groups[0]["lr"])  # a scheduler keeps the run's starting rate there
        lr = configured.get("lr")
        if isinstance(restored, float) and isinstance(lr, float) and abs(restored - lr) > 1e-12 * max(abs(lr), 1e-30):
            rank_zero_info(
                f"resuming with the checkpoint's learning rate {restored:g}, not the configured {lr:g}: a "
                f"resume continues the interrupted run; --model.lr_on_resume {lr:g} sets a new rate"
            )
        others = [
            f"{key} {groups[0][key]!r} (configured: {value!r})"
            for key, value in configured.items()
            if key != "lr" and key in groups[0] and _differs(groups[0][key], value)
        ]
        if others:
            rank_zero_info(
                f"resuming with the checkpoint's optimizer settings {', '.join(others)}: a resume continues the "
                "interrupted run's optimizer; start a new fit from its adapter to train with other settings"
            )

    def _rate_on_resume(self, group: dict[str, Any]) -> float:
        """``lr_on_resume`` for a group; LoRA+'s ``B`` group at its ratio, its embedding group as it was."""
        name = group.get("name")
        if name == "lora_plus_B":
            return self.lr_on_resume * (self.lora_plus_ratio or 1.0)
        return group["lr"] if name == "lora_plus_embedding" else self.lr_on_resume

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

    def on_validation_end(self) -> None:
        # The "step" logged for the loggers' x-axis stays among the callback metrics, where a ModelCheckpoint
        # takes it for its file names' {step}: later checkpoints would be named after this validation's step
        # and overwrite each other. Callbacks saw it at this validation's end (they run before this hook).
        self.trainer.callback_metrics.pop("step", None)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        """Log every set's numbers, adapter on and off; then the pictures of them."""
        # Lightning logs an evaluation at step 0 outside fit, and during fit one step before the training
        # curves (its batches-that-stepped count); a logged "step" is its public way to say which step.
        step = float(evaluation_step(self.trainer))  # every rank's is the same: max says so to DDP
        self.log("step", step, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")
        on, off = {}, {}
        for prefix in self._set_prefixes:
            on[prefix] = self._metrics(prefix, base=False).log(self, prefix)
            if self._comparing():
                off[prefix] = self._metrics(prefix, base=True).log(self, prefix, suffix=BASE_SUFFIX)
        self.log_eval_images(stage, on, off)
        if not self.trainer.sanity_checking and stage not in self._layouts_written:
            self._layouts_written.add(stage)
            suffixes = ("", BASE_SUFFIX) if off else ("",)
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
        if self.lora_plus_ratio is not None and get_lora_config(self.net) is None:
            raise UsageError(
                "--model.lora_plus_ratio is set, but the network holds no LoRA adapters: LoRA+ has no B to speed up "
                "(the base's biases would train at ratio x lr). Add the adapters (--lora.* options, a "
                "LoRAInjectionCallback), or drop --model.lora_plus_ratio"
            )
        try:
            optimizer = self.optimizer(trainable)
            self._configured = dict(optimizer.defaults)  # a resume's restored settings replace these: said
            if self.lora_plus_ratio is None:
                return optimizer
            # The optimizer's own rate (from its config) is A's; built again over LoRA+'s groups.
            return self.optimizer(lora_plus_param_groups(self, optimizer.defaults["lr"], self.lora_plus_ratio))
        except ValueError as err:  # torch's own check, e.g. "Invalid learning rate: -1.0"
            raise UsageError(f"model.optimizer: {err}; fix its setting (e.g. --model.optimizer.init_args.lr)") from err

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        try:
            fitting = self.trainer.state.fn == TrainerFn.FITTING
        except RuntimeError:  # load_from_checkpoint: no trainer, no optimizer to restore
            fitting = False
        if fitting:
            self._check_lora_plus_on_resume(checkpoint)

    def _check_lora_plus_on_resume(self, checkpoint: dict[str, Any]) -> None:
        """Before Lightning restores the optimizer: the checkpoint's LoRA+ groups must be this run's.

        A resume restores the checkpoint's rates, so a changed ratio would be dropped without a word
        (unless ``lr_on_resume`` sets new rates), and another grouping fails inside torch.
        """
        states = checkpoint.get("optimizer_states") or [{}]
        groups = {g.get("name"): g.get("lr") for g in states[0].get("param_groups", []) if isinstance(g, dict)}
        a, b = groups.get("lora_plus_A"), groups.get("lora_plus_B")
        saved = b / a if isinstance(a, float) and isinstance(b, float) and a > 0 else None
        had_plus = any(str(name).startswith("lora_plus_") for name in groups)
        if had_plus and self.lora_plus_ratio is None:
            ratio = f" {saved:g}" if saved else ""
            raise UsageError(f"the checkpoint was trained with LoRA+ (B at{ratio} times A's rate); resume with "
                             f"--model.lora_plus_ratio{ratio or ' <its ratio>'}")  # fmt: skip
        if not had_plus and self.lora_plus_ratio is not None and groups:
            raise UsageError("the checkpoint was trained without LoRA+; resume without --model.lora_plus_ratio")
        if saved and self.lr_on_resume is None and abs(saved / self.lora_plus_ratio - 1) > 1e-6:
            raise UsageError(
                f"model.lora_plus_ratio: {saved:g} in the checkpoint, {self.lora_plus_ratio:g} now; a resume restores "
                f"the checkpoint's rates: keep {saved:g}, or give --model.lr_on_resume to set new ones"
            )


def _differs(restored: Any, configured: Any) -> bool:
    """Whether an optimizer setting changed (tensors and tuples compared by value)."""
    if isinstance(restored, torch.Tensor) or isinstance(configured, torch.Tensor):
        return not torch.equal(torch.as_tensor(restored), torch.as_tensor(configured))
    if isinstance(restored, (list, tuple)) and isinstance(configured, (list, tuple)):
        return tuple(restored) != tuple(configured)
    return bool(restored != configured)
