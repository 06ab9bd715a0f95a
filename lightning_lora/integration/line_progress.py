"""Progress as plain lines, for output that is not a terminal (a log file, ``tee``, CI).

Lightning's progress bar redraws one line with carriage returns; written to a file or a pipe it
shows nothing until the epoch ends, so a pretraining epoch looks like minutes of silence. The
command line uses :class:`LineProgress` instead whenever its output is not a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar


class LineProgress(ProgressBar):
    """One line every ``every_seconds`` of training (and at each epoch's end): batches, rate, loss.

    The position is the batch's place in its epoch, out of the epoch's batches, also in a run
    resumed inside an epoch or ended by ``max_steps``.

    Args:
        every_seconds: Seconds between lines while an epoch trains (default: ``default_every_seconds``).
    """

    default_every_seconds = 15.0

    def __init__(self, every_seconds: float | None = None) -> None:
        super().__init__()
        self.every_seconds = self.default_every_seconds if every_seconds is None else every_seconds
        self.showing = True
        self._epoch_start = self._last_line = 0.0
        self._batches = self._position = 0

    def disable(self) -> None:
        self.showing = False

    def enable(self) -> None:
        self.showing = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a resumed run may start inside an epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()
        self._batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1  # this process's batches, for the rate
        self._position = batch_idx + 1  # where in the epoch (also after a resume), for the total
        if time.monotonic() - self._last_line >= self.every_seconds:
            self._line(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches:  # not an epoch a resumed run only closes: the interrupted run said it was done
            self._line(trainer, pl_module, done=True)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: bool = False) -> None:
        if not self.showing or not trainer.is_global_zero:
            return
        now = time.monotonic()
        self._last_line = now
        # The epoch's own length: ProgressBar.total_train_batches shrinks to the steps left under max_steps.
        batches, total = self._position, trainer.num_training_batches
        rate = self._batches / max(now - self._epoch_start, 1e-9)
        of = f"/{total}" if isinstance(total, int) else ""  # (inf for an iterable without a length)
        loss = trainer.callback_metrics.get("train/loss")
        shown = f", train/loss {float(loss):.4f}" if loss is not None and loss.numel() == 1 else ""
        state = "done" if done else "training"
        print(
            f"epoch {trainer.current_epoch}: {batches}{of} batches {state}, {rate:.1f} batches/s, "
            f"step {trainer.global_step}{shown}",
            file=sys.stderr,
            flush=True,
        )
