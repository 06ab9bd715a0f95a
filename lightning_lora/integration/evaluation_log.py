"""Where a ``validate`` or ``test`` run's numbers go: the step they belong to, and the printed table.

A ``test`` of a fine-tune's checkpoint measures the weights of that fine-tune's last step, so its
scalars and pictures belong at that step, beside the fine-tune's curves (Lightning logs an
evaluation outside ``fit`` at step 0). And a module that logs each number with its adapter-off
twin (``<name>_base``) over two dataloaders is printed by Lightning once per dataloader, every
number in both columns with long names cut: :func:`results_table` prints each number once,
adapter on beside adapter off, names whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

BASE_SUFFIX = "_base"
"""A metric logged with the adapter off is the adapter-on metric's name plus this suffix."""

_STEPS: dict[tuple[str, int, int], int] = {}


def evaluation_step(trainer: pl.Trainer) -> int:
    """The step an evaluation's numbers belong to.

    During ``fit`` the global step; in ``validate`` / ``test`` / ``predict`` from a checkpoint, the
    step the checkpoint was written at (read from the file once, memory-mapped); else 0.
    """
    if trainer.state.fn == TrainerFn.FITTING or not trainer.ckpt_path:
        return trainer.global_step
    path = Path(trainer.ckpt_path)
    try:
        stat = path.stat()
    except OSError:
        return trainer.global_step
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _STEPS:
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        except Exception:  # Lightning's own restore reports a bad file; the step is only a label here
            step = None
        _STEPS[key] = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
    return _STEPS[key]


def logger_beside_its_fit(logger: Logger, checkpoint: Path, settings: dict[str, Any]) -> TensorBoardLogger | None:
    """A logger like ``logger`` (built from its ``settings``) writing into the version folder of the fit
    that wrote ``checkpoint``; ``None`` unless ``logger`` is a TensorBoard logger of that fit's
    ``save_dir``/``name`` and the checkpoint lies in ``<version>/checkpoints/``.

    An evaluation's numbers then sit beside the fit's curves (at :func:`evaluation_step`), not in
    a run of their own; the fit's ``hparams.yaml`` is left as it is (the logger writes one only
    where none is).
    """
    checkpoint = checkpoint.resolve()
    if not isinstance(logger, TensorBoardLogger) or checkpoint.parent.name != "checkpoints":
        return None
    version = checkpoint.parent.parent
    if version.parent != (Path(logger.save_dir) / logger.name).resolve():
        return None
    return type(logger)(**{**settings, "version": version.name})


def results_table(metrics: dict[str, torch.Tensor | float], title: str) -> str:
    """Every scalar once, sorted, with its adapter-off twin beside it when one was logged."""
    values = {
        name: float(value)
        for name, value in metrics.items()
        if name != "step" and (not torch.is_tensor(value) or value.numel() == 1)  # "step": the x-axis, not a number
    }
    names = sorted(n for n in values if not (n.endswith(BASE_SUFFIX) and n[: -len(BASE_SUFFIX)] in values))
    paired = any(n + BASE_SUFFIX in values for n in names)
    header = ["metric", "adapter on", "adapter off (base)"] if paired else ["metric", "value"]
    rows = [
        [name, f"{values[name]:.6g}"] + ([f"{values[name + BASE_SUFFIX]:.6g}" if name + BASE_SUFFIX in values else ""]
                                         if paired else [])
        for name in names
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, rows), rule])
