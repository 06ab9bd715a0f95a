"""ExactResume: a resumed run repeats the uninterrupted one, or is refused before it trains.

Three parts, all through Lightning's public callback hooks and its own checkpointing of callback
state (``state_dict`` / ``load_state_dict``):

- **Random streams.** At every training batch torch's generators are seeded from (run seed,
  batch number, rank), so dropout masks and any other draw of batch ``k`` are the same whatever
  ran before (validation, a DataLoader's own seed draw, a resume). The run seed is
  ``seed_everything``'s, or one drawn once per run; the checkpoint keeps it.
- **Where a checkpoint was written.** The callback notes which hook every checkpoint was written
  in. Lightning 2.6 restores a checkpoint exactly when it was written at the end of a training
  batch that completed an optimizer step, or at the end of a validation or of one of its batches
  (a SIGTERM's: the resumed run goes on training, and the validation cut short is not repeated);
  one written at an epoch's or the training's end only into a run that counts epochs. One written
  at the end of an epoch's last batch resumes exactly, but the run resumed from it starts its next
  epoch without counting it started, so it counts its epochs one behind: its checkpoints written
  inside an epoch resume exactly only into a run that counts steps (``max_steps``, which counts the
  epochs right again; a resume counting epochs is refused with the ``max_steps`` that trains as
  far), and those at an epoch's end in neither way (refused, naming the checkpoint that run started
  from). ``tests/test_exact_resume.py`` tries each of these against Lightning and fails if it
  changes. A resume from anything else is refused, naming why and what to resume from instead.
  :class:`~lightning_lora.integration.resumable_checkpoint.ResumableCheckpoint` writes only
  checkpoints of the first kind.
- **What decides the data order.** The Trainer's ``accumulate_grad_batches``,
  ``limit_train_batches`` and number of processes, and the DataModule's and the module's
  ``resume_settings()`` (batch size, data seed, digits, replay share, for
  :class:`~lightning_lora.demo.mnist_datamodule.MNISTDataModule`; the distillation for
  :class:`~lightning_lora.demo.classifiers.LitClassifier`) are recorded; a resume that
  changes one is refused naming the setting and both values, unless ``new_data_order`` is set:
  then the run says that the order restarts and the training loader forgets its saved position.
  The seed is recorded too: a changed ``seed_everything`` is not refused, the interrupted run's
  seed holds and the run says so. A checkpoint that holds no ExactResume state (a plain Trainer
  run's, or altered) cannot be checked, so it is refused unless ``new_data_order`` is set.
- **What the optimizer restored.** At the start of a resumed fit, before any step, every
  optimizer state tensor must have its parameter's shape and be finite: a tampered state would
  otherwise reach the optimizer's kernels (a wrong shape corrupts memory in fused Adam).

The refusal comes from ``load_state_dict``, which Lightning calls while it restores the model and
callbacks, before the strategy wraps the model, before the optimizer exists and before any step.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import RandomSampler

from lightning_lora.errors import ResumeError
from lightning_lora.integration.host_random import seed_python_and_numpy
from lightning_lora.integration.resume_refusals import (
    EXACT_EVERYWHERE,
    flat_loaders,
    lasting_name,
    refuse_altered_state,
    refuse_at_start,
    refuse_damaged_optimizer_state,
    refuse_inexact_checkpoint,
    refuse_loaders_that_cannot_continue,
    refuse_other_sampler_seeds,
    sampler_seeds,
    state_digest,
    steps_per_epoch,
    whole_number,
)

RESTORED = {"global_step": "optimizer step {}", "next_batch_idx": "batch {} of the epoch", "next_epoch": "epoch {}"}
"""Where Lightning's restored loops put a resumed run (public: ``trainer.global_step``, a batch's ``batch_idx``)."""

RESUME_NEEDS = {"optimizer_states": "optimizer state", "loops": "loop state"}
"""What a checkpoint must hold for a fit to continue from it (Lightning's own keys), and how to name it."""


class ExactResume(pl.Callback):
    """Exact, checked resume for any LightningModule (the ``lightning-lora`` command adds it to every run).

    Args:
        new_data_order: On a resume, accept changed data-order settings (batch size, data seed,
            digits, replay share, ``accumulate_grad_batches``, the seed): the data order restarts (the
            batches left in the current epoch are the new order's first) and the run prints that it does.
    """

    def __init__(self, new_data_order: bool = False) -> None:
        super().__init__()
        if not isinstance(new_data_order, bool):
            raise ValueError(f"new_data_order must be true or false, got {new_data_order!r}")
        self.new_data_order = new_data_order
        self.run_seed: int | None = None
        self.batches_started = 0
        self.epochs_behind_since: str | None = None  # the epoch-end checkpoint this run resumed from, if it did
        self.step_at_start: int | None = None  # the global step this run's training began at; None: not begun
        self._run_trainer: pl.Trainer | None = None
        self._phase = "elsewhere"
        self._step_at_batch_start = 0
        self._stepped = True
        self._epoch_last_batch = False
        self._next_batch_idx = 0  # the batch_idx the run goes on with after a checkpoint written now
        self._next_epoch = 0  # and the epoch
        self._restored: dict[str, int] = {}  # the step and next batch_idx a resumed run must start at
        self._restart_order = False
        self._recorded_sampler_seeds: list[Any] | None = None
        self._resumed_mid_epoch = False

    # -- settings -------------------------------------------------------------------------------

    def order_settings(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What decides the data order (and the random draws) of ``trainer``'s run, by name."""
        settings: dict[str, Any] = {
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "trainer.limit_train_batches": trainer.limit_train_batches,
            "trainer.world_size (processes: devices x num_nodes)": trainer.world_size,
            "trainer.gradient_clip_val": trainer.gradient_clip_val,
            "trainer.gradient_clip_algorithm": trainer.gradient_clip_algorithm,
        }
        for prefix, holder in (("data", trainer.datamodule), ("model", trainer.lightning_module)):
            own = holder.resume_settings() if callable(getattr(holder, "resume_settings", None)) else {}
            settings.update({f"{prefix}.{name}": value for name, value in own.items()})
        return settings

    def _run_seed(self, trainer: pl.Trainer) -> int:
        """``seed_everything``'s seed; without one, a random seed drawn once (rank zero's, for every rank)."""
        if self.run_seed is None:
            self.run_seed = int(trainer.strategy.broadcast(_current_seed(), src=0))
        return self.run_seed

    # -- hooks: where are we? -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run_trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = flat_loaders(trainer.train_dataloader)
        if self._restart_order:
            for loader in loaders:
                if callable(getattr(loader, "discard_saved_position", None)):
                    loader.discard_saved_position()
        elif self._resumed_mid_epoch:
            refuse_loaders_that_cannot_continue(trainer, loaders)
        if not self.new_data_order:
            refuse_other_sampler_seeds(trainer, self._recorded_sampler_seeds)
        _seed_plain_shuffles(trainer, self._run_seed(trainer))
        for loader in loaders:  # a ResumableDataLoader fetches each batch with draws seeded by its position
            if hasattr(loader, "draw_seed"):
                loader.draw_seed = (self._run_seed(trainer) * 8_191 + trainer.global_rank) % 2**63
        self.step_at_start = trainer.global_step
        if trainer.ckpt_path:
            refuse_damaged_optimizer_state(trainer)
            self._refuse_altered_position(trainer, "global_step", trainer.global_step)
        self._phase = "elsewhere"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        """Seed torch's generators from (run seed, batch number, rank).

        Only the generators a step can draw from are seeded, the CPU's and the module's device's:
        ``torch.manual_seed`` also queues a seeding of every backend not yet initialised, capturing a
        stack trace each time (0.2-0.7 ms a step, a quarter of a small network's step on the CPU).
        """
        if self._restored:
            self._refuse_a_moved_start(trainer, batch_idx)
            self._restored = {}
        seed = ((self._run_seed(trainer) * 1_000_003 + self.batches_started) * 8_191 + trainer.global_rank) % 2**63
        torch.default_generator.manual_seed(seed)
        seed_python_and_numpy(seed)
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
        elif device.type != "cpu":
            torch.manual_seed(seed)
        self.batches_started += 1
        self._phase = "elsewhere"
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        self._phase = "batch_end"
        self._stepped = trainer.global_step != self._step_at_batch_start
        self._epoch_last_batch = batch_idx + 1 >= trainer.num_training_batches
        self._next_batch_idx = 0 if self._epoch_last_batch else batch_idx + 1
        self._next_epoch = trainer.current_epoch + int(self._epoch_last_batch)

    def _fitting(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            self._phase = "elsewhere"

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._fitting(trainer):
            self._phase = "elsewhere"

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._fitting(trainer):
            self._phase = "validation_batch_end"

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            self._phase = "validation_end"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = "epoch_end"
        self._next_batch_idx, self._next_epoch = 0, trainer.current_epoch + 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = "train_end"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._phase = "exception"

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]):
        """Refuse, before anything is restored into the run, a checkpoint that cannot continue a fit."""
        missing = [key for key in RESUME_NEEDS if key not in checkpoint]
        if missing:
            lacking = " and no ".join(RESUME_NEEDS[key] for key in missing)
            raise ResumeError(
                f"resume refused: checkpoint {trainer.ckpt_path} holds no {lacking} "
                "(it was written weights-only, or altered), so a fit cannot continue from it. Resume from a full "
                "checkpoint of the run (runs/<name>/version_N/checkpoints/last.ckpt); test or predict can use this one"
            )
        if self.state_key not in (checkpoint.get("callbacks") or {}) and not self.new_data_order:
            raise ResumeError(
                f"resume refused: checkpoint {trainer.ckpt_path} holds no ExactResume state (it was written by a run "
                "without it, such as a plain Trainer, or altered), so where it was written and which settings decided "
                "its data order cannot be checked, and the resumed run would not repeat the interrupted one. Resume a "
                "checkpoint of a lightning-lora run, or continue this one with a new data order (--new_data_order "
                "true; in Python ExactResume(new_data_order=True))"
            )

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        trainer = self._run_trainer
        state = {
            "run_seed": self.run_seed,
            "batches_started": self.batches_started,
            "written_at": self._phase,
            "step_boundary": self._stepped,
            "epoch_last_batch": self._epoch_last_batch,
            "global_step": trainer.global_step if trainer is not None else 0,
            "next_batch_idx": self._next_batch_idx,
            "next_epoch": self._next_epoch,
            "epochs_behind_since": self.epochs_behind_since,
            "steps_per_epoch": steps_per_epoch(trainer) if trainer is not None else None,
            "settings": self.order_settings(trainer) if trainer is not None else {},
            "sampler_seeds": sampler_seeds(trainer) if trainer is not None else None,
        }
        return {**state, "digest": state_digest(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = self._run_trainer
        if trainer is None:
            raise RuntimeError("ExactResume.load_state_dict before setup(): Lightning no longer restores callbacks "
                               "after setting them up; please report this")  # fmt: skip
        refuse_altered_state(state_dict, trainer, digest=False)  # a mapping, before anything reads it
        refuse_inexact_checkpoint(state_dict, trainer)
        differences = self._differences(state_dict, trainer)
        if differences and not self.new_data_order:
            raise ResumeError(
                "resume refused: this run's settings differ from the interrupted run's where they decide the data "
                f"order or what the adapter learns ({'; '.join(differences)}). Resuming would apply the saved position "
                "to another order, or train otherwise, and not repeat the interrupted run. Resume with the interrupted "
                "run's settings, or accept them as a new start of the order (--new_data_order true; in Python "
                "ExactResume(new_data_order=True))."
            )
        if self.new_data_order:
            self._restart_order = True
            rank_zero_info(
                "--new_data_order: the data order restarts: the batches left in the current epoch are the new "
                "order's first, and later epochs follow it"
                + (f" ({'; '.join(differences)})" if differences else "")
                + "; this run no longer repeats the interrupted one"
            )
        self.batches_started = whole_number(state_dict, "batches_started", trainer)
        self._recorded_sampler_seeds = state_dict.get("sampler_seeds")
        self._restored = {key: whole_number(state_dict, key, trainer) for key in RESTORED if key in state_dict}
        if self.new_data_order:
            self._restored.pop("next_batch_idx", None)  # the order restarts: the loader's position is dropped
        recorded = state_dict.get("run_seed")
        if isinstance(recorded, int) and not self.new_data_order:
            current = os.environ.get("PL_GLOBAL_SEED")
            if current is not None and int(current) != recorded:
                rank_zero_info(
                    f"resuming with the interrupted run's seed {recorded}, not seed_everything {current}: the seed "
                    "decides the data order and the dropout masks of the run being resumed (--new_data_order true "
                    "would start a new order with the new seed)"
                )
            self.run_seed = recorded
        self._resumed_mid_epoch = state_dict.get("written_at") in EXACT_EVERYWHERE and not state_dict.get(
            "epoch_last_batch"
        )
        if state_dict.get("written_at") == "batch_end" and state_dict.get("epoch_last_batch"):
            self.epochs_behind_since = lasting_name(trainer.ckpt_path)
        refuse_altered_state(state_dict, trainer)  # last: an edit that a check above names is said as such

    def _refuse_a_moved_start(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """At a resumed run's first batch: Lightning's batch and epoch, and a ResumableDataLoader's restart, must be
        where the checkpoint was written."""
        self._refuse_altered_position(trainer, "next_batch_idx", batch_idx)
        self._refuse_altered_position(trainer, "next_epoch", trainer.current_epoch)
        if "next_batch_idx" not in self._restored:
            return
        for loader in flat_loaders(trainer.train_dataloader):
            skipped = getattr(loader, "skipped_at_start", None)
            if not isinstance(skipped, int):
                continue
            if self._restored["next_batch_idx"] and not getattr(loader, "restored", True):
                refuse_at_start(
                    trainer,
                    f"resume refused: checkpoint {trainer.ckpt_path} was written in the middle of an epoch but holds "
                    "no saved position for the training loader (it was written with a loader that saves none, such as "
                    "a plain DataLoader, or the position was removed), so the run cannot continue where it stopped. "
                    "Resume from a checkpoint of that run written at an epoch's end",
                )
            self._refuse_altered_position(trainer, "next_batch_idx", skipped, by="the training loader's")

    def _refuse_altered_position(self, trainer: pl.Trainer, key: str, restored: int, by: str = "Lightning's") -> None:
        """The restored position (Lightning's loops', a loader's) must be the one recorded when the checkpoint was
        written."""
        recorded = self._restored.get(key)
        if recorded is not None and recorded != restored:
            refuse_at_start(
                trainer,
                f"resume refused: checkpoint {trainer.ckpt_path} puts {by} position at "
                f"{RESTORED[key].format(restored)}, but it was written at {RESTORED[key].format(recorded)}: its saved "
                "position was altered after it was written (or it was put together from two checkpoints), so the run "
                "would not continue where it stopped. Resume another checkpoint of the run",
            )

    def _differences(self, state: dict[str, Any], trainer: pl.Trainer) -> list[str]:
        recorded = state.get("settings") or {}
        current = self.order_settings(trainer)
        return [
            f"{name}: {recorded[name]!r} in the checkpoint, {current[name]!r} now"
            for name in sorted(set(recorded) & set(current))
            if recorded[name] != current[name]
        ]


def _current_seed() -> int:
    seed = os.environ.get("PL_GLOBAL_SEED")  # what seed_everything (LightningCLI's too) sets
    return int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little")


def _seed_plain_shuffles(trainer: pl.Trainer, run_seed: int) -> None:
    """Give a plain ``DataLoader(shuffle=True)`` an order that depends only on (run seed, epoch), and a
    ``RandomSampler`` with a generator of its own one that depends on (that generator's seed, epoch).

    Its ``RandomSampler`` draws each epoch's order from torch's global random state, which no
    checkpoint restores, so a resumed run would see other batches. Lightning calls ``set_epoch``
    on every training sampler that has one before each epoch (also the first after a resume),
    so the sampler gets a generator reseeded there. Such a loader cannot continue mid-epoch (a
    resume there is refused). Under DDP Lightning's own DistributedSampler does the same.
    """
    for loader in flat_loaders(trainer.train_dataloader):
        sampler = getattr(loader, "sampler", None)
        if type(sampler) is RandomSampler and not hasattr(sampler, "set_epoch"):
            # A generator of the user's own keeps its seed, reseeded per epoch too: no checkpoint holds its state.
            base = run_seed if sampler.generator is None else sampler.generator.initial_seed()
            if sampler.generator is None:
                sampler.generator = torch.Generator()

            def set_epoch(epoch: int, generator: torch.Generator = sampler.generator, base: int = base) -> None:
                generator.manual_seed((base * 1_000_003 + epoch) % 2**63)

            sampler.set_epoch = set_epoch
            set_epoch(trainer.current_epoch)


__all__ = ["ExactResume"]
