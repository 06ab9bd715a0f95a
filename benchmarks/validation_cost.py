"""What the live target/retain validation costs the demo's fine-tune: the target is < 10% extra time.

    python benchmarks/validation_cost.py --data-dir data --rounds 7 --results benchmarks/results

Times the whole ``lightning-lora fit -c configs/finetune_lora.yaml`` command (start-up included,
as a user waits for it) with its validation (every 10 steps: target and retain sets, adapter on
and off) and with validation switched off, interleaved round by round; medians and their ratio go
to ``--results`` (``benchmarks/results/validation-cost.json`` is the committed record the README states).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from timing import add_results_option, interleaved  # noqa: E402

from lightning_lora.experiments.pipeline import environment, write_record  # noqa: E402

CLI = str(Path(sys.executable).parent / "lightning-lora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--rounds", type=int, default=7)
    add_results_option(parser)
    opts = parser.parse_args()
    fit = [CLI, "fit", "-c", "configs/finetune_lora.yaml", "--data.data_dir", opts.data_dir,
           "--trainer.logger.init_args.name", "validation_cost", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    commands = {"with validation": fit, "without validation": [*fit, "--trainer.limit_val_batches", "0"]}
    medians = interleaved(
        {name: (lambda c=c: subprocess.run(c, check=True, capture_output=True)) for name, c in commands.items()},
        rounds=opts.rounds,
        sample_seconds=0,
        warmup=1,
    )
    extra = medians["with validation"] / medians["without validation"] - 1
    for name, seconds in medians.items():
        print(f"{seconds:6.2f} s  {name}")
    print(f"validation adds {extra:.1%}")
    seconds = {name: round(value, 2) for name, value in medians.items()}
    record = {"experiment": "validation-cost", "rounds": opts.rounds, "seconds": seconds, "extra": round(extra, 4)}
    write_record("validation-cost", {**record, "environment": environment()}, Path(opts.results))


if __name__ == "__main__":
    main()
