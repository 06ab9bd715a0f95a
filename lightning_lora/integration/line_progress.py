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

    Args:
        every_seconds: Seconds between lines while an epoch trains (default: ``default_every_seconds``).
    """

    default_every_seconds = 15.0

    def __init__(self, every_seconds: float | None = None) -> None:
        super().__init__()
        self.every_seconds = self.default_every_seconds if every_seconds is None else every_seconds
        self._enabled = True
        self._epoch_start = self._last_line = 0.0
        self._batches = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()
        self._batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if time.monotonic() - self._last_line >= self.every_seconds:
            self._line(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line(trainer, pl_module, done=True)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: bool = False) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        now = time.monotonic()
        self._last_line = now
        batches, total = self._batches, self.total_train_batches
        rate = batches / max(now - self._epoch_start, 1e-9)
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
