"""ResumableCheckpoint: writes checkpoints only where Lightning resumes them exactly.

Lightning 2.6 restores a checkpoint exactly when it was written at the end of a training batch that
completed an optimizer step, mid-epoch, or at the end of the validation that follows an epoch's
last batch (``ExactResume`` says why the other places are not; its tests try them all). So this
callback writes ``epoch=E-step=S.ckpt``, and ``last.ckpt`` beside it:

- every ``every_n_steps`` optimizer steps, at the end of the batch that completed the step;
- at the end of the run's last batch (``max_steps`` reached, or the last batch of the last epoch),
  so that ``--ckpt_path`` continues a finished run with more steps or more epochs;
- on SIGTERM, at the end of the batch it arrived in (if that batch completed a step; all ranks
  agree first), so that the run continues where it stopped; one arriving while validating is
  taken at the end of the validation batch it arrived in (Lightning stops the validation there;
  the resumed run goes on training and does not repeat it), or at the validation's end.

A checkpoint due at an epoch's last batch is written again, under the same name, at the end of the
validation that follows (the place Lightning resumes from cleanly; without such a validation the
batch-end one stays). Nothing is written on an exception: the state then may be in the middle of a
step. After a non-finite loss, the checkpoint holding the weights that produced it (written at the
step just before) is removed, and ``last.ckpt`` points at the newest one before it.

Every checkpoint is written through the Trainer (``trainer.save_checkpoint``: all of Lightning's
and the callbacks' state, and the strategy's checkpoint I/O, atomic under ``lightning-lora``). Only
files this run wrote are ever replaced or removed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_lora.core.safe_io import atomic_file
from lightning_lora.errors import NonFiniteLossError, UsageError

LAST = "last.ckpt"


class ResumableCheckpoint(Checkpoint):
    """Checkpoints every N steps, at the run's end and on SIGTERM, each one exactly resumable.

    Args:
        every_n_steps: Optimizer steps between checkpoints (``None``: only at the end and on
            SIGTERM). Not ``every_n_train_steps`` on purpose: a user's ``ModelCheckpoint`` put in its
            place by a second config (``-c my.yaml``) would inherit that value from the shipped config
            (jsonargparse keeps the parameters two classes share) and clash with ``every_n_epochs``.
        dirpath: The folder (default: ``checkpoints/`` in the run's log folder, as ModelCheckpoint's).
        keep: How many ``epoch=E-step=S.ckpt`` files of this run to keep, newest first (``last.ckpt``
            is always kept). Two, so that after a non-finite loss one from before it remains.
    """

    def __init__(self, every_n_steps: int | None = None, dirpath: str | Path | None = None, keep: int = 2) -> None:
        super().__init__()
        for name, value, least in (("every_n_steps", every_n_steps, 1), ("keep", keep, 1)):
            if value is None and name == "every_n_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ResumableCheckpoint.{name} must be an integer >= {least}, got {value!r}")
        self.every_n_steps, self.keep = every_n_steps, keep
        self.dirpath = None if dirpath is None else str(dirpath)  # a str: checkpoints load with weights_only
        self.last_model_path = ""
        self.best_model_path = ""  # Lightning's ckpt_path="best" reads it; no metric decides here
        self.saved: list[str] = []  # this run's step files, oldest first
        self._step_at_batch_start = 0
        self._again_after_validation = False
        self._saved_step: int | None = None  # the step of this run's newest checkpoint, on every rank

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[every_n_steps={self.every_n_steps}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:  # on every rank: trainer.log_dir is a collective under DDP
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        others = [
            type(cb).__name__
            for cb in trainer.checkpoint_callbacks
            if cb is not self and getattr(cb, "save_last", None) and getattr(cb, "dirpath", None) == self.dirpath
        ]
        if others:
            raise UsageError(
                f"{others[0]} and ResumableCheckpoint would both write {Path(self.dirpath) / LAST}: keep one of them "
                "(drop the other from trainer.callbacks, or give it another dirpath, or save_last: false)"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._step_at_batch_start = trainer.global_step
        self._again_after_validation = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        if trainer.global_step == self._step_at_batch_start or trainer.fast_dev_run:
            return  # a batch inside an accumulated step: nothing can be resumed exactly here
        step = trainer.global_step
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if due or self._run_ends_here(trainer, last_of_epoch) or self._sigterm(trainer):
            self._save(trainer)
            self._again_after_validation = last_of_epoch

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # A SIGTERM stops the validation after this batch: a checkpoint due again after it is written here.
        if not self._validating_after_a_step(trainer):
            return
        due = self._again_after_validation or self._saved_step != trainer.global_step  # the same on every rank
        if due and self._sigterm(trainer):
            self._again_after_validation = False
            self._save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validating_after_a_step(trainer):
            return
        again, self._again_after_validation = self._again_after_validation, False
        if again or self._unsaved_sigterm(trainer):
            self._save(trainer)

    def _unsaved_sigterm(self, trainer: pl.Trainer) -> bool:
        """A SIGTERM arrived and no checkpoint of this step was written yet (the same answer on every rank)."""
        return self._saved_step != trainer.global_step and self._sigterm(trainer)

    def _validating_after_a_step(self, trainer: pl.Trainer) -> bool:
        """A validation inside a fit, after a training batch that completed an optimizer step."""
        return (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
            and trainer.global_step != self._step_at_batch_start
        )

    @staticmethod
    def _run_ends_here(trainer: pl.Trainer, last_of_epoch: bool) -> bool:
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        epochs = trainer.max_epochs
        return last_of_epoch and epochs is not None and epochs != -1 and trainer.current_epoch + 1 >= epochs

    @staticmethod
    def _sigterm(trainer: pl.Trainer) -> bool:
        received = bool(trainer.received_sigterm)
        if trainer.world_size > 1:  # every rank must save at the same batch, or none
            received = bool(trainer.strategy.reduce_boolean_decision(received, all=False))
        return received

    def _save(self, trainer: pl.Trainer) -> None:
        path = Path(self.dirpath) / f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the full state a resume needs, said, not defaulted
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            if str(path) not in self.saved:
                self.saved.append(str(path))
            self._point_last_at(path)
            for old in self.saved[: -self.keep]:
                Path(old).unlink(missing_ok=True)
            self.saved = self.saved[-self.keep :]
        self.last_model_path = str(Path(self.dirpath) / LAST)
        trainer.strategy.barrier("ResumableCheckpoint")

    def _point_last_at(self, path: Path) -> None:
        """``last.ckpt`` becomes the same file as ``path``: a hard link, swapped in with one rename."""
        last = path.parent / LAST
        with atomic_file(last) as tmp:
            tmp.unlink()
            try:
                os.link(path, tmp)
            except OSError:  # a filesystem without hard links
                tmp.write_bytes(path.read_bytes())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, NonFiniteLossError) or not trainer.is_global_zero:
            return
        step = trainer.global_step
        bad = [p for p in self.saved if p.endswith(f"-step={step}.ckpt")]
        for path in bad:  # its weights gave the non-finite loss: resuming it would fail at once
            Path(path).unlink(missing_ok=True)
            self.saved.remove(path)
        good = self.saved[-1] if self.saved else (str(trainer.ckpt_path) if trainer.ckpt_path else None)
        if bad:
            last = Path(self.dirpath) / LAST
            if self.saved:
                self._point_last_at(Path(self.saved[-1]))
            else:
                last.unlink(missing_ok=True)
            rank_zero_info(f"removed {bad[0]}: it holds the weights that gave the non-finite loss")
        exception.advice = (
            f"Resume from {good} with a lower learning rate (a checkpoint restores its own rate otherwise): "
            f"--ckpt_path {good} --model.lr_on_resume <lower lr>, or start again with a lower "
            "model.optimizer.init_args.lr."
            if good
            else "No checkpoint from before it is left to resume from; start again with a lower "
            "model.optimizer.init_args.lr."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "last_model_path": self.last_model_path}


__all__ = ["ResumableCheckpoint"]
