"""The one place where Lightning's saved loop state is adjusted, so that resuming is exact.

A checkpoint written by the epoch-end hooks of a run that counts steps (``max_steps``) records
the epoch as processed *and* completed while the epoch loop still holds that epoch's batch
count. Lightning 2.6 restores such a checkpoint as an epoch already under way with all its
batches done: the resumed run trains one batch of the next epoch's order and starts another
epoch, so it is not the longer uninterrupted run. That is the checkpoint a run leaves when
``max_steps`` ends it (to be resumed with a larger ``max_steps``), and the one an epoch-end
``ModelCheckpoint`` writes.

:func:`as_batch_end_checkpoint` rewrites that loop state into what a checkpoint written by the
last batch's end hooks holds at the same step (the state Lightning restores exactly; the tests
compare the two field by field). Lightning offers no public hook for this; if its loop state
changes shape, the rewrite leaves the checkpoint alone and ``tests/test_loop_state.py`` fails.

Not handled: after a resume from a checkpoint at an epoch's last batch, Lightning counts the
epoch processed without counting it started, so that run's epoch counters are off by one and
its end-of-run checkpoint is left as written (not exact); and a checkpoint of a run that counted
epochs (``max_epochs``) is not rewritten, though a resume may count steps.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn


def _at_an_epochs_end(trainer: pl.Trainer) -> bool:
    """Whether the epoch's batches are all processed (epoch-end hooks, or after them) and not yet reset."""
    epoch = trainer.fit_loop.epoch_progress.current
    batch = trainer.fit_loop.epoch_loop.batch_progress.current
    return epoch.processed == epoch.started >= 1 and batch.completed == batch.processed >= 1


def as_batch_end_checkpoint(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> bool:
    """Rewrite ``checkpoint``'s loop state as a batch-end checkpoint's, where that makes resuming exact.

    Only for a fit that counts steps, written once the epoch's batches are all processed (in its
    end hooks, or after them) and before the next epoch starts; returns whether it did.
    """
    if trainer.state.fn != TrainerFn.FITTING or trainer.max_steps == -1 or not _at_an_epochs_end(trainer):
        return False
    try:
        fit = checkpoint["loops"]["fit_loop"]
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        counters = fit["epoch_loop.state_dict"]
        if any(epochs[part]["started"] < 1 or batches[part]["completed"] < 1 for part in ("total", "current")):
            return False
        for part in ("total", "current"):  # the epoch under way again, its last batch not yet counted done
            epochs[part]["processed"] = epochs[part]["completed"] = epochs[part]["started"] - 1
            batches[part]["completed"] -= 1
        counters["_batches_that_stepped"] -= 1
    except (KeyError, TypeError):
        return False
    checkpoint["epoch"] = epochs["current"]["started"] - 1
    return True
