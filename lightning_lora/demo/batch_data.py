"""Datasets served whole batches at a time, and the replay sampler that mixes old digits into new ones.

A dataset with ``__getitems__`` gathers a whole batch with one index op inside a real
``DataLoader``: Lightning's ``DistributedSampler`` still shards it under DDP, and it is about 40x
faster than torchvision's per-sample PIL path, which is slower than the training step of the
networks here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_lora.integration.resumable_loader import EpochShuffle


class TensorBatchDataset(Dataset):
    """Inputs and targets in memory (images and labels, or regression samples); ``__getitems__``
    gathers a whole batch with one index op."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.targets.device)
        return self.inputs[index], self.targets[index]


class ReplayShuffle(EpochShuffle):
    """Batches of ``batch_size`` in which ``replay`` samples come from ``others``, the rest from ``indices``.

    Both pools are shuffled by (seed, epoch); the other digits are drawn without repeats until
    their pool runs out. An epoch ends when the trained digits run out (partial batches are
    dropped, so every batch has the same mix).

    Under DDP, Lightning's sampler wrapper deals position ``i`` of this sequence to rank
    ``i % world_size``; the sequence is laid out for that, so every rank's batches have the
    same mix too.
    """

    def __init__(self, indices: torch.Tensor, others: torch.Tensor, batch_size: int, replay: int, seed: int) -> None:
        super().__init__(indices, seed)
        self.others, self.batch_size, self.replay = others, batch_size, replay

    @staticmethod
    def _world_size() -> int:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_world_size() if distributed else 1

    def __len__(self) -> int:
        world = self._world_size()
        batches = len(self.indices) // ((self.batch_size - self.replay) * world)
        return batches * self.batch_size * world

    def __iter__(self) -> Iterator[int]:
        world, size = self._world_size(), len(self)
        generator = self.generator()
        trained = self.indices[torch.randperm(len(self.indices), generator=generator)]
        replayed = self.others[torch.randperm(len(self.others), generator=generator)]
        slot = (torch.arange(size) // world) % self.batch_size  # the position within its rank's batch
        from_others = slot >= self.batch_size - self.replay
        need = int(from_others.sum())
        order = torch.empty(size, dtype=torch.long)
        order[~from_others] = trained[: size - need]
        order[from_others] = replayed.repeat(math.ceil(need / max(len(replayed), 1)))[:need]
        return iter(order.tolist())


def keep_batch(batch: Any) -> Any:
    """The collate function for :class:`TensorBatchDataset`: the batch is already collated.

    A module-level function, so ``ddp_spawn`` can pickle the DataLoader.
    """
    return batch
