"""What a failed command leaves in run folders, removed when it holds nothing of value.

A ``fit`` that trained nothing (a refused resume, a target that matches nothing) leaves no empty
version folder behind; a ``test`` or ``validate`` that logs into an existing run's folder and is
refused leaves that folder as it was. Only what this very command created (or rewrote) is touched.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_lora.core.safe_io import atomic_file


def new_run_folder(trainer: pl.Trainer) -> Path | None:
    """The version folder this run's logger will create, if it does not exist yet (else ``None``).

    Asked before anything is written: a TensorBoard logger names its next version folder without
    creating it. A failed run that trained nothing leaves no such folder behind (:func:`discard_failed_run`).
    """
    logger = trainer.logger
    if not isinstance(logger, TensorBoardLogger) or not trainer.is_global_zero:
        return None
    folder = Path(logger.log_dir)
    return None if folder.exists() else folder


def entries_held(trainer: pl.Trainer, new_folder: Path | None) -> dict[str, bytes | None] | None:
    """What an existing run folder holds before this command logs into it (``test`` with ``--ckpt_path``): each
    entry's name, with the contents of the config copies a command rewrites (``<verb>_config.yaml``)."""
    if new_folder is not None or not isinstance(trainer.logger, TensorBoardLogger) or not trainer.is_global_zero:
        return None
    folder = Path(trainer.logger.log_dir)
    if not folder.is_dir():
        return None
    return {
        p.name: p.read_bytes() if p.name.endswith("_config.yaml") and p.is_file() else None for p in folder.iterdir()
    }


def _is_own_log(path: Path) -> bool:
    """A file every command writes into its run folder: TensorBoard's event file, Lightning's config copy."""
    return path.name.startswith("events.out.tfevents.") or path.name.endswith("_config.yaml")


def discard_failed_run(
    trainer: pl.Trainer, folder: Path | None, held: dict[str, bytes | None] | None, began: int | None
) -> Path | None:
    """Remove what a failed command left that holds nothing of value.

    Args:
        trainer: The failed command's trainer.
        folder: The version folder it created (:func:`new_run_folder`), if any.
        held: What the existing folder it logged into held before (:func:`entries_held`), if any.
        began: The optimizer step training started from (``None``: it never started).

    Returns:
        The version folder removed, if any: one with no checkpoint in it and no training step done.
    """
    if held is not None and trainer.global_step == 0:
        _discard_own_logs(Path(trainer.logger.log_dir), held)
    if folder is None or not folder.is_dir():
        return None
    if any(folder.rglob("*.ckpt")) or (began is not None and trainer.global_step > began):
        return None
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # runs/<name>/ too, when nothing else is in it
        folder.parent.rmdir()
    return folder


def _discard_own_logs(folder: Path, held: dict[str, bytes | None]) -> None:
    """A failed command that logged into an existing run folder (``test``/``validate`` with ``--ckpt_path``) trained
    nothing: remove the empty event file and the config copy it added there, put back a config copy it rewrote,
    and touch nothing else."""
    for path in folder.iterdir() if folder.is_dir() else []:
        if not _is_own_log(path) or not path.is_file():
            continue
        if path.name not in held:
            path.unlink(missing_ok=True)
        elif held[path.name] is not None and path.read_bytes() != held[path.name]:
            with atomic_file(path) as tmp:
                tmp.write_bytes(held[path.name])
