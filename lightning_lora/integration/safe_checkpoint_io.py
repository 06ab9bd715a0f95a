"""Checkpoint writes that an interruption cannot tear: temporary file, fsync, rename.

Lightning's default ``TorchCheckpointIO`` writes the final file in place, so a SIGKILL during a
write can leave a truncated ``last.ckpt``: the one checkpoint a crashed run needs. Here each
checkpoint goes to ``.<name>.<pid>.<random>.tmp`` beside its destination and is renamed over it
once complete; a later run sweeps what a killed one left behind. A full disk names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_lora.core.safe_io import atomic_file, sweep_stale_temporaries


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, fsynced local writes (remote paths keep Lightning's writer)."""

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
