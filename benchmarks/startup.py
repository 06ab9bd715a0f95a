"""How long the command line takes to start: the verbs that train nothing within 0.2 s of importing torch.

    python benchmarks/startup.py --runs 7 --ckpt runs/finetune_lora --results benchmarks/results

Times whole processes from outside (start to exit, median of ``--runs`` rounds after one warm-up,
interleaved):
``import lightning.pytorch`` alone (what every training command pays), ``import torch`` alone (the
floor for any verb that reads tensors), then ``lightning-lora --help``, ``--version``, and the
verbs that train nothing (``inspect``, ``export``, ``merge``; the last two need a fine-tuning
run). Writes the table to ``--results`` (``benchmarks/results/startup.json`` is the committed record).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from timing import add_results_option, interleaved  # noqa: E402

from lightning_lora.experiments.pipeline import environment, write_record  # noqa: E402

CLI = str(Path(sys.executable).parent / "lightning-lora")


def commands(ckpt: str | None, out: Path) -> dict[str, list[str]]:
    measured = {
        "python -c 'import lightning.pytorch' (the yardstick)": [sys.executable, "-c", "import lightning.pytorch"],
        "python -c 'import torch' (the floor)": [sys.executable, "-c", "import torch"],
        "lightning-lora --help": [CLI, "--help"],
        "lightning-lora --version": [CLI, "--version"],
        "lightning-lora inspect -c configs/finetune_lora.yaml": [CLI, "inspect", "-c", "configs/finetune_lora.yaml"],
    }
    if ckpt:
        export, merge = f"export --ckpt {ckpt} --out adapter/", f"merge --ckpt {ckpt} --out merged.safetensors"
        measured[f"lightning-lora {export}"] = [CLI, "export", "--ckpt", ckpt, "--out", str(out / "a")]
        measured[f"lightning-lora {merge}"] = [CLI, "merge", "--ckpt", ckpt, "--out", str(out / "m.st")]
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ckpt", help="a fine-tuning run for export and merge (e.g. runs/finetune_lora)")
    add_results_option(parser)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        measured = commands(opts.ckpt, Path(out))
        medians = interleaved(  # round by round, so a drifting machine moves every command alike
            {name: (lambda c=c: subprocess.run(c, check=True, capture_output=True)) for name, c in measured.items()},
            rounds=opts.runs,
            sample_seconds=0,
            warmup=1,
        )
        rows = [{"command": name, "seconds": round(medians[name], 2)} for name in measured]
    yardstick, floor = rows[0]["seconds"], rows[1]["seconds"]
    for row in rows:
        row["ratio"] = round(row["seconds"] / yardstick, 2)
        row["over_torch"] = round(row["seconds"] - floor, 2)
        print(f"{row['seconds']:6.2f} s  {row['ratio']:5.2f}x  {row['over_torch']:+6.2f} s  {row['command']}")
    write_record(
        "startup",
        {"experiment": "startup", "runs": opts.runs, "rows": rows, "environment": environment()},
        Path(opts.results),
    )


if __name__ == "__main__":
    main()
