"""Lightning's checkpoint I/O plugin, made safe: atomic writes, and reads that trust nothing.

Writes: Lightning's default ``TorchCheckpointIO`` writes the final file in place, so a SIGKILL
during a write can leave a truncated ``last.ckpt``: the one checkpoint a crashed run needs. Here
each checkpoint goes to ``.<name>.<pid>.<random>.tmp`` beside its destination and is renamed over
it once complete; a later run sweeps what a killed one left behind. A full disk names the file.

Reads (``--ckpt_path``): the file is read once, with ``torch.load(weights_only=True)`` (no pickle
code can run), and a damaged, truncated or foreign file, or one holding weights only, is one clear
error naming it (:func:`~lightning_lora.integration.checkpoint_reader.read_checkpoint_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_lora.core.safe_io import atomic_file, sweep_stale_temporaries
from lightning_lora.errors import UsageError
from lightning_lora.integration.checkpoint_reader import read_checkpoint_state


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, fsynced local writes and checked reads (remote writes keep Lightning's)."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = Path(path).parent
        if folder not in self._swept:  # a killed run's temporaries, under any checkpoint's name
            self._swept.add(folder)
            sweep_stale_temporaries(folder)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None):
        checkpoint = read_checkpoint_state(path, "ckpt_path")
        if "pytorch-lightning_version" not in checkpoint:
            raise UsageError(
                f"ckpt_path {path} holds weights only, not a Lightning run to resume or evaluate; to start from "
                "pretrained weights pass them as --model.base_checkpoint"
            )
        return checkpoint  # on the CPU, as Lightning's own reader leaves it: the strategy places it
