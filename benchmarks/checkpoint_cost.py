"""What checkpointing every N steps costs, per shipped config: the target is < 3% of the step time.

    python benchmarks/checkpoint_cost.py --data-dir data

For each config: the median training step (after warm-up) and the median time of one
checkpoint write (Lightning's dump, the adapter-only filter, the atomic fsynced write), and so
the overhead at the config's own ``every_n_steps``: save / (N * step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

sys.path.insert(0, os.path.dirname(__file__))
from timing import table  # noqa: E402

from lightning_lora.demo.net_module import NetModule  # noqa: E402
from lightning_lora.integration.lora_cli import LoRACLI  # noqa: E402
from lightning_lora.integration.resumable_checkpoint import ResumableCheckpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["pretrain", "finetune_lora", "finetune_dora", "mlp_pretrain", "mlp_finetune_lora", "shift_pretrain",
           "shift_finetune_lora"]  # fmt: skip


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def measure(name: str, data_dir: str, steps: int) -> list[object]:
    args = ["-c", str(REPO / "configs" / f"{name}.yaml"), "--trainer.max_steps", str(steps)]
    args += ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    if not name.startswith("shift"):
        args += ["--data.data_dir", data_dir]
    cli = LoRACLI(NetModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=args, run=False, auto_configure_optimizers=False, save_config_callback=None)  # fmt: skip
    every = next(cb.every_n_steps for cb in cli.trainer.callbacks if isinstance(cb, ResumableCheckpoint))
    for callback in [cb for cb in cli.trainer.callbacks if isinstance(cb, (ResumableCheckpoint, LearningRateMonitor))]:
        cli.trainer.callbacks.remove(callback)  # time the step alone (and no logger here)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    step = statistics.median(timer.times[len(timer.times) // 4 :])
    with tempfile.TemporaryDirectory() as folder:
        saves = []
        for i in range(9):
            start = time.perf_counter()
            cli.trainer.save_checkpoint(Path(folder) / f"{i}.ckpt")
            saves.append(time.perf_counter() - start)
        size = (Path(folder) / "0.ckpt").stat().st_size
    save = statistics.median(saves)
    return [name, f"{1e3 * step:.2f}", f"{1e3 * save:.1f}", f"{size:,}", every, f"{100 * save / (every * step):.2f}%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=300)
    opts = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        rows = []
        for name in CONFIGS:
            if "finetune" in name:  # the fine-tunes need their pretraining run
                base = name.replace("finetune_lora", "pretrain").replace("finetune_dora", "pretrain")
                Path("runs", base, "checkpoints").mkdir(parents=True, exist_ok=True)
                _write_base(base, opts.data_dir)
            rows.append(measure(name, opts.data_dir, opts.steps))
            print(rows[-1], flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(["config", "step (ms)", "one save (ms)", "checkpoint (bytes)", "every N steps", "overhead"], rows))


def _write_base(base: str, data_dir: str) -> None:
    """A base checkpoint for a fine-tune (random weights of the right net: the costs do not depend on them)."""
    args = ["-c", str(REPO / "configs" / f"{base}.yaml"), "--trainer.logger", "false"]
    if not base.startswith("shift"):
        args += ["--data.data_dir", data_dir]
    cli = LoRACLI(NetModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=args, run=False, auto_configure_optimizers=False, save_config_callback=None)  # fmt: skip
    torch.save({"state_dict": cli.model.state_dict()}, Path("runs", base, "checkpoints", "last.ckpt"))


if __name__ == "__main__":
    main()
