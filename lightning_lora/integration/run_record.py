"""What a run was, beside what it measured: its settings and final numbers in the loggers' hparams.

TensorBoard's HPARAMS tab compares runs side by side, but only by what was logged as
hyper-parameters. Lightning logs the LightningModule's and DataModule's ``__init__`` arguments;
the LoRA settings (a callback's), the optimizer (built later, in ``configure_optimizers``) and
the Trainer's budget are missing, and no final metric is attached. :class:`RunRecord` adds them:
at the start of a stage it records the settings (so a crashed run still has them in
``hparams.yaml``), and at its end the settings again with the stage's final numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from lightning_lora.core.inject import get_lora_config
from lightning_lora.integration.evaluation_log import evaluation_step


class RunRecord(pl.Callback):
    """Record every run's LoRA config, optimizer, Trainer budget and final metrics as hyper-parameters.

    ``lightning-lora``'s commands add it to every run; add it to your own Trainer to get the same.
    Final metrics are the headline ones (loss and accuracy per set, adapter on and off, and the
    trained digits' mistakes); per-digit numbers of every digit stay in the scalars.
    """

    def __init__(self) -> None:
        self._found: set[Path] = set()

    def settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The settings beyond ``__init__`` arguments, grouped by where they come from."""
        record: dict[str, Any] = {}
        config = next((c for c in map(get_lora_config, pl_module.modules()) if c is not None), None)
        if config is not None:
            record["lora"] = config.to_dict()
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            defaults = {
                key: list(value) if isinstance(value, tuple) else value  # hparams.yaml stays plain YAML
                for key, value in optimizer.defaults.items()
                if isinstance(value, (int, float, str, bool, tuple))
            }
            record["optimizer"] = {"class": type(optimizer).__name__, **defaults}
        digits = getattr(trainer.datamodule, "target_digits", None)
        if digits is not None:
            record["data"] = {"trained_digits": digits}
        record["trainer"] = {
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
            "precision": trainer.precision,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
        }
        return record

    @staticmethod
    def headline_metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
        """The stage's final scalars, without the per-digit ones of digits not trained on."""
        digits = getattr(trainer.datamodule, "target_digits", None) or []
        trained = tuple(f"_digit_{d}" for d in digits)
        return {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(prefix)
            and torch.is_tensor(value)
            and value.numel() == 1
            and ("_digit_" not in name or any(t in name for t in trained))
        }

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefixes: tuple[str, ...] = ()) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        settings = self.settings(trainer, pl_module)
        metrics = {}
        for prefix in prefixes:
            metrics.update(self.headline_metrics(trainer, prefix))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: settings beside final numbers
                # The tab shows only what this call passes: the module's and data's arguments too, but not
                # LightningCLI's bookkeeping (_instantiator, _class_path), which would be its first columns.
                logger.hparams.update(settings)
                shown = {key: value for key, value in logger.hparams.items() if not str(key).startswith("_")}
                logger.log_hyperparams(shown, metrics=metrics or None, step=evaluation_step(trainer))
                hparams_file = Path(logger.log_dir) / logger.NAME_HPARAMS_FILE
                if hparams_file.is_file() and hparams_file not in self._found:
                    save_hparams_to_yaml(hparams_file, logger.hparams)  # written once, maybe before these settings
            else:
                logger.log_hyperparams(settings)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning writes this run's hparams.yaml: one that is already there is another run's
        # (a `test` logging beside its fit) and stays as it is.
        self._found = {
            Path(logger.log_dir) / logger.NAME_HPARAMS_FILE
            for logger in trainer.loggers
            if isinstance(logger, TensorBoardLogger) and (Path(logger.log_dir) / logger.NAME_HPARAMS_FILE).is_file()
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, ("train/", "val/"))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module, ("test/",))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # a `validate` run; during fit, fit's hooks record
            self._record(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._record(trainer, pl_module, ("val/",))
