"""Why a resume is refused: the rules of where Lightning 2.6 resumes a checkpoint exactly, and the checks.

:class:`~lightning_lora.integration.exact_resume.ExactResume` decides *when* each check runs (while
Lightning restores the callbacks, or at the start of training, before any step); this module holds
*what* is refused and the message that names the problem and the fix. Each rule about Lightning
is tried against Lightning itself in ``tests/test_exact_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_lora.core.safe_io import non_finite_names
from lightning_lora.errors import ResumeError

EXACT_EVERYWHERE = ("batch_end", "validation_batch_end", "validation_end")
"""Hooks whose checkpoints Lightning resumes exactly into any run (at an optimizer-step boundary)."""

EXACT_IN_EPOCH_RUNS = ("epoch_end", "train_end")
"""Hooks whose checkpoints Lightning resumes exactly only into a run that counts epochs (``max_steps=-1``), and
only after an epoch's last batch (a run stopped by ``max_steps`` mid-epoch calls them too)."""

HOOK_NAMES = {
    "batch_end": "the end of a training batch",
    "validation_batch_end": "the end of a validation batch",
    "validation_end": "the end of a validation",
    "epoch_end": "the end of a training epoch (on_train_epoch_end)",
    "train_end": "the end of training (on_train_end)",
    "exception": "an exception (a crash, Ctrl-C or SIGTERM)",
    "elsewhere": "the middle of a training step or another hook",
}


def state_digest(state: dict[str, Any]) -> str:
    """A digest of a callback's recorded state, written beside it, so that an edit of the state is noticed."""
    canonical = json.dumps({k: v for k, v in state.items() if k != "digest"}, sort_keys=True, default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()


def refuse_altered_state(state: Any, trainer: pl.Trainer, digest: bool = True) -> None:
    """ExactResume's state must be a mapping (and, with ``digest``, match its digest): else it was altered."""
    if not isinstance(state, dict):
        raise ResumeError(
            f"resume refused: checkpoint {trainer.ckpt_path} holds ExactResume state of type {type(state).__name__}, "
            "not the record it writes: it was altered after it was written; resume another checkpoint of the run"
        )
    if digest and state.get("digest") != state_digest(state):
        raise ResumeError(
            f"resume refused: checkpoint {trainer.ckpt_path} holds ExactResume state that does not match its digest "
            "(its run seed, batch count, settings or where it was written were changed after it was written), so the "
            "run could not be checked; resume another checkpoint of the run"
        )


def whole_number(state: dict[str, Any], key: str, trainer: pl.Trainer) -> int:
    """ExactResume's count ``key`` (0 when absent), refused unless it is a whole number."""
    value = state.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ResumeError(
            f"resume refused: checkpoint {trainer.ckpt_path} holds ExactResume {key}={value!r}, not a count: it was "
            "altered after it was written; resume another checkpoint of the run"
        )
    return value


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch, once the loader is known (a refusal names ``max_steps`` with it)."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:
        return None
    return -(-batches // trainer.accumulate_grad_batches)


def refuse_damaged_optimizer_state(trainer: pl.Trainer) -> None:
    """The restored optimizer state is this optimizer's, each tensor of its parameter's shape and finite, or the resume
    stops (before any step, saving nothing)."""
    for number, optimizer in enumerate(trainer.optimizers):
        lacking = sorted({key for group in optimizer.param_groups for key in optimizer.defaults if key not in group})
        if lacking:
            refuse_at_start(
                trainer,
                f"resume refused: checkpoint {trainer.ckpt_path} holds optimizer {number}'s state from another kind of "
                f"optimizer than this run's {type(optimizer).__name__} (its settings lack {', '.join(lacking)}), which "
                "would fail at the first step. Resume with the optimizer the interrupted run used (its config.yaml "
                "says which), or start a new fit from the adapter",
            )
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for param, state in ((p, optimizer.state[p]) for p in params if p in optimizer.state):
            wrong = {
                key: v for key, v in state.items() if isinstance(v, torch.Tensor) and v.ndim and v.shape != param.shape
            }
            bad = next(iter(wrong), None) or next(iter(non_finite_names(state)), None)
            if bad is None:
                continue
            what = (f"shape {tuple(wrong[bad].shape)} for a parameter of {tuple(param.shape)}" if bad in wrong
                    else "NaN or infinite values")  # fmt: skip
            refuse_at_start(
                trainer,
                f"resume refused: checkpoint {trainer.ckpt_path} holds optimizer {number}'s state {bad!r} with {what}: "
                "it was altered or damaged after it was written (stepping with it would corrupt the run). Resume "
                "another checkpoint of the run",
            )


def refuse_inexact_checkpoint(state: dict[str, Any], trainer: pl.Trainer) -> None:
    """Refuse a checkpoint that Lightning 2.6 would not resume exactly into this run (see the module docstring)."""
    where = state.get("written_at", "elsewhere")
    written = HOOK_NAMES.get(where, where)
    advice = (
        "Resume from a checkpoint that ResumableCheckpoint wrote (lightning-lora's configs write only those; "
        "every_n_steps sets how often)"
    )
    since = state.get("epochs_behind_since")
    if since:
        refuse_a_run_counting_epochs_behind(state, trainer, str(since))
    if where in EXACT_EVERYWHERE:
        if not state.get("step_boundary", True):
            raise ResumeError(
                f"resume refused: the checkpoint was written at {written} in the middle of an accumulated optimizer "
                "step, so the gradient of that step's earlier batches is not in it and the run cannot continue "
                f"exactly. {advice}."
            )
        return
    if where in EXACT_IN_EPOCH_RUNS and not state.get("epoch_last_batch"):
        raise ResumeError(
            f"resume refused: the checkpoint was written at {written} in the middle of an epoch (the run stopped at "
            "its max_steps there): Lightning 2.6 counts that epoch as finished, so a resumed run would skip the rest "
            f"of it. {advice}."
        )
    if where in EXACT_IN_EPOCH_RUNS and trainer.max_steps == -1:
        return
    kind = " into a run that counts steps (max_steps)" if where in EXACT_IN_EPOCH_RUNS else ""
    raise ResumeError(
        f"resume refused: the checkpoint was written at {written}, which Lightning 2.6 does not resume exactly{kind}. "
        f"{advice}"
        + (", or resume this one with --trainer.max_epochs instead of --trainer.max_steps." if kind else ".")
    )


def refuse_a_run_counting_epochs_behind(state: dict[str, Any], trainer: pl.Trainer, since: str) -> None:
    """Refuse what Lightning 2.6 resumes inexactly from a run that was resumed at an epoch's last batch.

    Such a run counts the epochs it starts one behind. Its checkpoints written inside an epoch resume
    exactly into a run that counts steps (which counts the epochs right again); a run counting epochs
    takes them for checkpoints of a finished epoch and repeats it. Its checkpoints at an epoch's end
    resume inexactly either way (an epoch is repeated or cut, by the loader's saved position).
    """
    why = (
        f"its run was itself resumed from {since}, written at the end of an epoch's last batch with no validation "
        "after it, and Lightning 2.6 counts such a run's epochs one behind"
    )
    avoid = (
        "Validating at every epoch end (check_val_every_n_epoch: 1, with validation batches) avoids this: checkpoints "
        "at epoch ends are then written after the validation, where Lightning restores them exactly"
    )
    if state.get("epoch_last_batch") or state.get("written_at") in EXACT_IN_EPOCH_RUNS:
        raise ResumeError(
            f"resume refused: this checkpoint was written at the end of an epoch, and {why}: resumed from here, "
            f"counting epochs or steps, the run would repeat or skip training batches. Resume from {since}, where that "
            "run started (it resumes exactly), or from a checkpoint that run wrote inside an epoch, continuing with "
            f"--trainer.max_steps. {avoid}"
        )
    if trainer.max_steps != -1:
        return
    per_epoch, epochs = state.get("steps_per_epoch"), trainer.max_epochs
    as_far = (
        f"--trainer.max_steps {epochs * per_epoch} (max_epochs={epochs} x {per_epoch} optimizer steps an epoch)"
        if isinstance(per_epoch, int) and isinstance(epochs, int) and epochs > 0 and per_epoch > 0
        else "--trainer.max_steps <max_epochs x optimizer steps an epoch>"
    )
    raise ResumeError(
        f"resume refused: this checkpoint resumes exactly only into a run that counts steps, not epochs: {why}, so a "
        f"run counting epochs would repeat this epoch from its first batch. Continue it with {as_far}, which trains "
        f"as far and counts the epochs right again. {avoid}"
    )


def refuse_loaders_that_cannot_continue(trainer: pl.Trainer, loaders: list[Any]) -> None:
    """A mid-epoch resume needs training loaders that saved their position (``state_dict``/``load_state_dict``).

    Lightning would restart such an epoch from its first batch, with only a warning.
    """
    stuck = [type(loader).__name__ for loader in loaders if not callable(getattr(loader, "load_state_dict", None))]
    if not stuck:
        return
    refuse_at_start(
        trainer,
        f"resume refused: the checkpoint was written in the middle of an epoch, but the training DataLoader "
        f"({', '.join(stuck)}) cannot continue where the run stopped (it has no state_dict()/load_state_dict()), so "
        "training would not repeat the interrupted run, and the checkpoint holds no position any loader could "
        "continue from. Resume from a checkpoint of that run written at an epoch's end; for runs to come, use a "
        "loader that saves its position (lightning_lora.integration.resumable_loader.ResumableDataLoader).",
    )


def flat_loaders(loaders: Any) -> list[Any]:
    """A Trainer's training loaders as a list (Lightning gives one, a list or a dict of them)."""
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def sampler_seeds(trainer: pl.Trainer) -> list[Any] | None:
    """The ``seed`` of each training loader's sampler (EpochShuffle's, DistributedSampler's; None where it has none)."""
    if trainer.train_dataloader is None:
        return None
    return [
        getattr(getattr(loader, "sampler", None), "seed", None) for loader in flat_loaders(trainer.train_dataloader)
    ]


def lasting_name(path: Any) -> str:
    """The file a checkpoint path names for good: ``last.ckpt`` is a hard link a later run of the same folder moves,
    so the step file it links to (same inode) is named instead, where there is one."""
    given = Path(str(path))
    try:
        target = given.stat()
        for sibling in sorted(given.parent.glob("*.ckpt")):
            if sibling.name != given.name and os.path.samestat(sibling.stat(), target):
                return str(sibling)
    except OSError:
        pass
    return str(given)


def refuse_other_sampler_seeds(trainer: pl.Trainer, recorded: list[Any] | None) -> None:
    """A training loader's sampler seed (where it has one, then and now) must be the interrupted run's."""
    now = sampler_seeds(trainer)
    if recorded is None or now is None or len(recorded) != len(now):
        return
    if any(then is not None and seed is not None and then != seed for then, seed in zip(recorded, now, strict=True)):
        refuse_at_start(
            trainer,
            f"resume refused: the training loader's sampler seed is {now} now, {recorded} in checkpoint "
            f"{trainer.ckpt_path}: it decides the data order, so the run would train on other batches than the "
            "interrupted one. Resume with the interrupted run's sampler seed (under DDP Lightning's DistributedSampler "
            "takes seed_everything's), or ask for a new data order (--new_data_order true; in Python "
            "ExactResume(new_data_order=True))",
        )


def refuse_at_start(trainer: pl.Trainer, message: str) -> None:
    """Stop a resumed fit at its start without saving the step it restored (save-on-exception is switched off)."""
    for callback in trainer.checkpoint_callbacks:
        if hasattr(callback, "save_on_exception"):
            callback.save_on_exception = False
    raise ResumeError(message)


__all__ = [
    "EXACT_EVERYWHERE",
    "EXACT_IN_EPOCH_RUNS",
    "HOOK_NAMES",
    "flat_loaders",
    "lasting_name",
    "refuse_a_run_counting_epochs_behind",
    "refuse_altered_state",
    "refuse_at_start",
    "refuse_damaged_optimizer_state",
    "refuse_inexact_checkpoint",
    "refuse_loaders_that_cannot_continue",
    "refuse_other_sampler_seeds",
    "sampler_seeds",
    "state_digest",
    "steps_per_epoch",
    "whole_number",
]
