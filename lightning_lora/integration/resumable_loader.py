"""A training DataLoader whose position Lightning saves and restores itself, so that a resumed run
continues with the very batch the interrupted one would have trained next.

Lightning calls ``state_dict()`` on a training loader that has one whenever it writes a checkpoint,
and hands the state back through ``load_state_dict()`` when it resumes mid-epoch: the public door
for exact data order. :class:`ResumableDataLoader` records how many batches of which epoch it has
handed out (Lightning reads no batch ahead from a loader whose length it knows, so those are the
batches trained on) and skips exactly those on resume. Its order must depend only on (seed, epoch):
:class:`EpochShuffle` is such a sampler (Lightning's ``DistributedSampler`` under DDP is another).

A saved position fits only the order it was taken in. The state records the batch size and the
number of batches an epoch has, and a position applied to a loader where either differs is refused
(:class:`~lightning_lora.errors.ResumeError`), unless :meth:`ResumableDataLoader.discard_saved_position`
was called first: ``ExactResume(new_data_order=True)`` does that, and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from lightning_lora.errors import ResumeError
from lightning_lora.integration.host_random import forked_draws


class EpochShuffle(Sampler[int]):
    """The given dataset indices in an order that depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` at the start of every epoch (also through its DDP wrapper).
    """

    def __init__(self, indices: torch.Tensor, seed: int) -> None:
        self.indices, self.seed, self.epoch = indices, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def generator(self) -> torch.Generator:
        """A generator seeded by (seed, epoch) alone."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices[torch.randperm(len(self.indices), generator=self.generator())].tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch, so a resumed run continues exactly.

    The position is counted after DDP's sharding (each rank skips its own batches), and the skipped
    batches are only indexed, never trained on.

    With ``draw_seed`` set (``ExactResume`` sets it from its run seed and the rank), each batch is
    fetched with torch's, Python's and NumPy's random state seeded from (draw_seed, epoch, position)
    and restored after (:mod:`~lightning_lora.integration.host_random`):
    random draws in a dataset's ``__getitem__`` (augmentation) are then the same in a resumed run.
    Only in the process itself (``num_workers=0``): workers draw from their own seeds.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pass: dict[str, Any] = {"epoch": None, "handed_out": 0}
        self._saved_position: dict[str, Any] | None = None
        self.skipped_at_start = 0  # batches of this pass's epoch the restored position skipped (ExactResume checks it)
        self.draw_seed: int | None = None
        self.restored = False  # whether Lightning handed this loader a saved position (ExactResume checks it)

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)  # EpochShuffle, or Lightning's DistributedSampler

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        # Runs at the first batch, not at iter(): Lightning sets the sampler's epoch in between, and
        # a position restored or discarded before the first batch is what counts.
        epoch, saved, self._saved_position = self._epoch(), self._saved_position, None
        skip = self._batches_to_skip(saved, epoch)
        for position in range(skip):
            self._fetch(iterator, epoch, position)
        self._pass = {"epoch": epoch, "handed_out": skip}
        self.skipped_at_start = skip
        while True:
            try:
                batch = self._fetch(iterator, epoch, self._pass["handed_out"])
            except StopIteration:
                return
            self._pass["handed_out"] += 1
            yield batch

    def _fetch(self, iterator: Iterator[Any], epoch: int | None, position: int) -> Any:
        if self.draw_seed is None or self.num_workers:
            return next(iterator)
        with forked_draws(((self.draw_seed * 1_000_003 + (epoch or 0)) * 1_000_003 + position) % 2**63):
            return next(iterator)

    def _batches_to_skip(self, saved: dict[str, Any] | None, epoch: int | None) -> int:
        if not saved or saved.get("epoch") != epoch or not saved.get("batches"):
            return 0
        now = {"batch_size": self.batch_size, "batches_per_epoch": len(self)}
        changed = [f"{k} {saved.get(k)} then, {v} now" for k, v in now.items() if saved.get(k, v) != v]
        if changed:
            raise ResumeError(
                f"the checkpoint's training loader stopped {saved['batches']} batches into epoch {epoch}, but this "
                f"loader's order differs ({'; '.join(changed)}), so that position would skip other batches. Resume "
                "with the settings of the interrupted run, or ask for a new data order (ExactResume(new_data_order="
                "True); on the command line --new_data_order true)"
            )
        return min(int(saved["batches"]), len(self))

    def discard_saved_position(self) -> None:
        """Forget a restored position: this epoch's order starts from its first batch."""
        self._saved_position = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._pass["epoch"],
            "batches": self._pass["handed_out"],
            "batch_size": self.batch_size,
            "batches_per_epoch": len(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = ("batches", "batch_size", "batches_per_epoch")
        sound = isinstance(state, dict) and all(_count(state.get(key)) for key in counts)
        if not sound or not (state.get("epoch") is None or _count(state.get("epoch"))):
            raise ResumeError(
                f"resume refused: the checkpoint's training-loader position {state!r} is not one a "
                "ResumableDataLoader writes (whole numbers: epoch, batches, batch_size, batches_per_epoch): it was "
                "altered after it was written; resume another checkpoint of the run"
            )
        if state["batches"] > state["batches_per_epoch"]:
            raise ResumeError(
                f"resume refused: the checkpoint's training loader says it handed out {state['batches']} batches of an "
                f"epoch of {state['batches_per_epoch']}: it was altered after it was written; resume another "
                "checkpoint of the run"
            )
        self._saved_position = dict(state)
        self.restored = True


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
