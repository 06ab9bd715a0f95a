"""What the sweeps share: one ``lightning-lora fit`` per setting, run in this process, timed; test predictions.

Each setting is exactly a command line (printed, recorded), run through the same LightningCLI
as ``lightning-lora fit``, so a sweep's row can be reproduced by hand. Running them in one process
saves the start-up of each (several seconds here).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.experiments.evaluate import outputs

PRETRAIN = ["fit", "-c", "configs/pretrain.yaml"]


def say(experiment: str, message: str) -> None:
    print(f"{experiment}: {message}", flush=True)


@contextmanager
def _quiet_stdout():
    """Lightning's per-run banners, summaries and tables, sent to /dev/null: the sweep prints its own lines."""
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        sys.stdout.flush()
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def fit(args: list[str]) -> tuple[Any, float]:
    """Run ``lightning-lora fit`` with ``args`` in this process; the LightningCLI object and the seconds it took."""
    from lightning_lora.integration import benign_warnings
    from lightning_lora.integration.lightning_verbs import run_lightning

    benign_warnings.install()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # its per-run notices; warnings still show
    began = time.perf_counter()
    try:
        with _quiet_stdout():
            cli = run_lightning(["fit", *args, "--trainer.enable_progress_bar", "false"])
    finally:
        lightning_log.setLevel(level)
    return cli, time.perf_counter() - began


def ensure_base(experiment: str, data_dir: str) -> Path:
    """The latest pretraining run's checkpoint; pretrained now (as ``make demo`` does) when there is none."""
    from lightning_lora.integration.checkpoint_reader import resolve_checkpoint

    try:
        return resolve_checkpoint("runs/pretrain", "the base")
    except FileNotFoundError:
        command = [*PRETRAIN, "--data.data_dir", data_dir]
        say(experiment, f"no pretraining run yet; running lightning-lora {' '.join(command)}")
        fit(command[1:])
        return resolve_checkpoint("runs/pretrain", "the base")


def test_split(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's test images and labels, as the experiments score them."""
    from lightning_lora.demo.mnist_datamodule import MNISTDataModule

    test = MNISTDataModule(data_dir=data_dir)
    test.setup("test")
    return test.test_set.inputs, test.test_set.targets


def predictions(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The predicted digits of ``net`` for ``images`` (eval mode, large batches)."""
    return outputs(net, images).argmax(dim=1)


def shown(args: list[str]) -> str:
    """The command line ``args`` make, quoted so that it can be pasted into a shell."""
    return "lightning-lora " + shlex.join(args)


def finish(name: str, record: dict[str, Any], started: float, figure: Path, results: Path) -> Path:
    """Write a sweep's record (with its figure, total time and machine) and say where it went."""
    from lightning_lora.experiments.pipeline import duration, environment, write_record

    record = {"experiment": name, **record, "figure": str(figure)}
    record.update(total_seconds=round(time.perf_counter() - started, 1), environment=environment())
    path = write_record(name, record, results)
    say(name, f"done in {duration(record['total_seconds'])}; record {path}, figure {figure}")
    return path


def command_line(module: str, doc: str | None, run: Callable[[str, Path], Path]) -> Callable[..., int]:
    """The ``python -m`` entry point of a sweep: ``--data-dir`` and ``--results``."""
    from lightning_lora.experiments.pipeline import RESULTS, RUN_RECORDS

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc)
        parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (default: %(default)s)")
        parser.add_argument(
            "--results",
            default=str(RUN_RECORDS),
            help=f"where the record goes (default: %(default)s; `make results` gives {RESULTS}, the committed ones)",
        )
        opts = parser.parse_args(argv)
        run(opts.data_dir, Path(opts.results))
        return 0

    return main
