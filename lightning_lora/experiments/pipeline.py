"""The README's experiments as commands run in order, timed, and recorded.

``python -m lightning_lora.experiments.pipeline demo`` (what ``make demo`` runs) prints each
``lightning-lora`` command before running it, lets its progress bar show, prints how long each
stage took, and at the end writes a record: the commands, the stage times, the machine and
library versions, and the report's summary. A user's run writes it under ``runs/records/``
(git-ignored), so running the demo changes no tracked file; ``make results`` runs every experiment
with ``--results benchmarks/results``, the committed records from which the README's tables are
generated (:mod:`~lightning_lora.experiments.readme`), never typed.

``demo-seeds`` runs the demo once per seed in :data:`SEEDS` (training and data seed both, each
seed's runs under ``runs/seeds/seed_S/``) and records each headline number's mean and range: exact
digits depend on the CPU and the torch build, so the README publishes the spread, and ``make
demo`` prints where its own result falls against it.
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

import yaml

from lightning_lora.core.safe_io import atomic_file

RESULTS = Path("benchmarks/results")
"""The committed records (the README is generated from them); only ``make results`` writes here."""

RUN_RECORDS = Path("runs/records")
"""Where a user's run of an experiment writes its record (git-ignored, beside the runs)."""

SEEDS = (42, 1, 2, 3, 4)
"""The seeds of the demo's spread; 42 is the configs' own, the published run's."""

SPREAD = "demo-seeds"


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


def write_record(name: str, record: dict[str, Any], results: Path = RUN_RECORDS) -> Path:
    """Write ``<results>/<name>.json`` atomically (the README is generated from those in :data:`RESULTS`)."""
    path = results / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def latest_report(run: str) -> dict[str, Any]:
    """The summary the report wrote into the run's latest version (``report/summary.json``)."""
    from lightning_lora.integration.checkpoint_reader import describe_run, resolve_checkpoint

    folder = Path(describe_run(resolve_checkpoint(run)))
    return json.loads((folder / "report" / "summary.json").read_text())


def run_pipeline(name: str, data_dir: str, results: Path = RUN_RECORDS) -> Path:
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
    if name == "demo":
        for line in against_the_spread(record["summary"]):
            print(line, flush=True)
    return path


HEADLINES = {
    "base accuracy": lambda s: s["base"]["accuracy"],
    "adapter accuracy": lambda s: s["adapter_on"]["accuracy"],
    "base mistakes on the trained digit": lambda s: s["base"]["wrong_per_digit"][_digit(s)],
    "adapter mistakes on the trained digit": lambda s: s["adapter_on"]["wrong_per_digit"][_digit(s)],
    "adapter accuracy on the other digits": lambda s: s["adapter_on"]["retain_accuracy"],
}
"""The demo's headline numbers, read from a report summary (the spread records each)."""


def _digit(summary: dict[str, Any]) -> int:
    (digit,) = summary["trained_digits"]
    return digit


def headline_values(summary: dict[str, Any]) -> dict[str, float]:
    return {name: read(summary) for name, read in HEADLINES.items()}


def shown_value(name: str, value: float) -> str:
    return f"{100 * value:.2f}%" if "accuracy" in name else f"{value:g}"


def against_the_spread(summary: dict[str, Any], results: Path = RESULTS) -> list[str]:
    """Where a demo's headline numbers fall against the published spread over :data:`SEEDS`."""
    path = results / f"{SPREAD}.json"
    if not path.is_file():
        return [f"(no published spread in {path} to compare with: `make results` records it)"]
    spread = json.loads(path.read_text())
    env = spread["environment"]
    lines = [f"Against the published spread over seeds {spread['seeds']} ({env['cpu']}, torch {env['torch']}):"]
    for name, value in headline_values(summary).items():
        stats = spread["headlines"].get(name)
        if stats is None:
            continue
        low, high = stats["min"], stats["max"]
        where = "inside" if low <= value <= high else ("below" if value < low else "above")
        lines.append(
            f"  {name}: {shown_value(name, value)}, {where} the range {shown_value(name, low)} to "
            f"{shown_value(name, high)} (mean {shown_value(name, stats['mean'])})"
        )
    lines.append("Exact digits depend on the CPU and the torch build; the range is what the seeds alone move.")
    return lines


def seeded(stage: list[str], seed: int, root: str) -> list[str]:
    """A demo stage run with ``seed`` (training and data seed) into ``root`` instead of ``runs/``.

    Every run path under ``runs/`` moves under ``root``: in the arguments, in the run's log folder and
    in the config's ``base_checkpoint``, so each seed fine-tunes its own base.
    """
    args = [_moved(arg, root) for arg in stage]
    if args[0] not in ("fit", "test"):
        return args
    args += ["--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.logger.init_args.save_dir", root]
    config = yaml.safe_load(Path(args[args.index("-c") + 1]).read_text())
    base = (config.get("model", {}).get("init_args") or {}).get("base_checkpoint")
    if isinstance(base, str) and base.startswith("runs/"):
        args += ["--model.init_args.base_checkpoint", _moved(base, root)]
    return args


def _moved(arg: str, root: str) -> str:
    return root + arg[len("runs") :] if arg.startswith("runs/") else arg


def run_spread(data_dir: str, results: Path = RUN_RECORDS, seeds: tuple[int, ...] = SEEDS) -> Path:
    """Run the demo once per seed and record each headline number's values, mean and range."""
    command = str(Path(sys.executable).parent / "lightning-lora")
    pipeline, started, per_seed = PIPELINES["demo"], time.perf_counter(), []
    for seed in seeds:
        root = f"runs/seeds/seed_{seed}"
        print(f"== {SPREAD}: seed {seed} into {root}/", flush=True)
        for stage in pipeline.stages:
            args = seeded([a.replace("{data}", data_dir) for a in stage], seed, root)
            print("lightning-lora " + " ".join(args), flush=True)
            result = subprocess.run([command, *args], check=False, stdout=subprocess.DEVNULL)
            if result.returncode != 0:
                raise SystemExit(result.returncode)
        summary = latest_report(_moved(pipeline.report_run, root))
        per_seed.append({"seed": seed, **headline_values(summary)})
    headlines = {}
    for name in HEADLINES:
        values = [row[name] for row in per_seed]
        headlines[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    record = {
        "experiment": SPREAD,
        "seeds": list(seeds),
        "per_seed": per_seed,
        "headlines": headlines,
        "total_seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }
    path = write_record(SPREAD, record, results)
    print(f"== {SPREAD} done in {duration(record['total_seconds'])}; record written to {path}", flush=True)
    return path


def time_test_suite(results: Path = RUN_RECORDS) -> Path:
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
    parser.add_argument("experiment", choices=[*sorted(PIPELINES), SPREAD, "test-suite"])
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (default: %(default)s)")
    parser.add_argument(
        "--results",
        default=str(RUN_RECORDS),
        help=f"where the record goes (default: %(default)s; `make results` gives {RESULTS}, the committed records)",
    )
    opts = parser.parse_args(argv)
    if opts.experiment == "test-suite":
        time_test_suite(Path(opts.results))
    elif opts.experiment == SPREAD:
        run_spread(opts.data_dir, Path(opts.results))
    else:
        run_pipeline(opts.experiment, opts.data_dir, Path(opts.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
