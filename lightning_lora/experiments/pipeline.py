"""The README's experiments as commands run in order, timed, and recorded.

``python -m lightning_lora.experiments.pipeline demo`` (what ``make demo`` runs) prints each
``lightning-lora`` command before running it, lets its progress bar show, prints how long each
stage took, and at the end writes a record (``benchmarks/results/<experiment>.json``): the
commands, the stage times, the machine and library versions, and the report's summary. The
README's results tables are generated from these records (:mod:`~lightning_lora.experiments.readme`),
never typed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_lora.core.safe_io import atomic_file

RESULTS = Path("benchmarks/results")
"""Where the records live (committed: the README is generated from them)."""


@dataclass(frozen=True)
class Pipeline:
    """An experiment: ``lightning-lora`` commands (``{data}`` is the data folder) and the run its report is in."""

    title: str
    stages: list[list[str]]
    report_run: str


PIPELINES = {
    "demo": Pipeline(
        "Fix the digit the base gets wrong",
        [
            ["fit", "-c", "configs/pretrain.yaml", "--data.data_dir", "{data}"],
            ["fit", "-c", "configs/finetune_lora.yaml", "--data.data_dir", "{data}"],
            [
                "test",
                "-c",
                "configs/finetune_lora.yaml",
                "--data.data_dir",
                "{data}",
                "--ckpt_path",
                "runs/finetune_lora",
            ],
            ["report", "--finetuned", "runs/finetune_lora", "--data-dir", "{data}"],
        ],  # fmt: skip
        "runs/finetune_lora",
    ),
    "demo-mlp": Pipeline(
        "LoRA on a small MLP, merged and unmerged",
        [
            ["fit", "-c", "configs/mlp_pretrain.yaml", "--data.data_dir", "{data}"],
            ["fit", "-c", "configs/mlp_finetune_lora.yaml", "--data.data_dir", "{data}"],
            ["merge", "--ckpt", "runs/mlp_finetune_lora", "--out", "runs/mlp_finetune_lora/merged.safetensors"],
            [
                "report",
                "--finetuned",
                "runs/mlp_finetune_lora",
                "--data-dir",
                "{data}",
                "--merged",
                "runs/mlp_finetune_lora/merged.safetensors",
            ],
        ],  # fmt: skip
        "runs/mlp_finetune_lora",
    ),
    "demo-shift": Pipeline(
        "A low-rank shift, recovered exactly",
        [
            ["fit", "-c", "configs/shift_pretrain.yaml"],
            ["fit", "-c", "configs/shift_finetune_lora.yaml"],
            ["report", "--finetuned", "runs/shift_finetune_lora"],
        ],
        "runs/shift_finetune_lora",
    ),
}


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import lightning
    import torch

    cpu = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def duration(seconds: float) -> str:
    """``1 min 35 s`` or ``43 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def write_record(name: str, record: dict[str, Any], results: Path = RESULTS) -> Path:
    """Write ``<results>/<name>.json`` atomically (the README is generated from it)."""
    path = results / f"{name}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def latest_report(run: str) -> dict[str, Any]:
    """The summary the report wrote into the run's latest version (``report/summary.json``)."""
    from lightning_lora.integration.checkpoint_reader import describe_run, resolve_checkpoint

    folder = Path(describe_run(resolve_checkpoint(run)))
    return json.loads((folder / "report" / "summary.json").read_text())


def run_pipeline(name: str, data_dir: str, results: Path = RESULTS) -> Path:
    """Run an experiment's commands, print and time each stage, and write its record."""
    pipeline = PIPELINES[name]
    command = str(Path(sys.executable).parent / "lightning-lora")
    stages, started = [], time.perf_counter()
    print(f"== {name}: {pipeline.title} ({len(pipeline.stages)} stages)", flush=True)
    for i, stage in enumerate(pipeline.stages, 1):
        args = [a.replace("{data}", data_dir) for a in stage]
        shown = " ".join(["lightning-lora", *args])
        print(f"\n[{i}/{len(pipeline.stages)}] {shown}", flush=True)
        begin = time.perf_counter()
        result = subprocess.run([command, *args], check=False)
        seconds = time.perf_counter() - begin
        if result.returncode != 0:
            print(f"[{i}/{len(pipeline.stages)}] failed after {duration(seconds)} (exit code {result.returncode})")
            raise SystemExit(result.returncode)
        print(f"[{i}/{len(pipeline.stages)}] done in {duration(seconds)}", flush=True)
        stages.append({"command": " ".join(["lightning-lora", *stage]).replace("{data}", "DATA_DIR"),
                       "seconds": round(seconds, 1)})  # fmt: skip
    total = time.perf_counter() - started
    record = {
        "experiment": name,
        "title": pipeline.title,
        "stages": stages,
        "total_seconds": round(total, 1),
        "environment": environment(),
        "summary": latest_report(pipeline.report_run),
    }
    path = write_record(name, record, results)
    print(f"\n== {name} done in {duration(total)}; record written to {path}", flush=True)
    return path


def time_test_suite(results: Path = RESULTS) -> Path:
    """Run the test suite as ``make test`` does and record how long it took (the README states it)."""
    began = time.perf_counter()
    env = {**os.environ, "LIGHTNING_LORA_REQUIRE_EXTRAS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q"], env=env, check=False)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(result.returncode)
    record = {"experiment": "test-suite", "total_seconds": round(seconds, 1), "environment": environment()}
    path = write_record("test-suite", record, results)
    print(f"test suite passed in {duration(seconds)}; record written to {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora.experiments.pipeline", description=__doc__)
    parser.add_argument("experiment", choices=[*sorted(PIPELINES), "test-suite"])
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (default: %(default)s)")
    parser.add_argument("--results", default=str(RESULTS), help="where the record goes (default: %(default)s)")
    opts = parser.parse_args(argv)
    if opts.experiment == "test-suite":
        time_test_suite(Path(opts.results))
    else:
        run_pipeline(opts.experiment, opts.data_dir, Path(opts.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
