"""Interleaved timing: every candidate runs once per round, rounds repeat, medians are kept.

Shared machines drift by 10-25% between runs; timing candidates side by side in one process,
round after round, keeps their ratios stable even when absolute times move.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def checked_device(parser, name: str) -> torch.device:
    """``--device`` as a torch device that exists here, or the parser's one-line error (exit 2)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r}: these benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return device


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """What to call before reading the clock: a CUDA device runs its kernels asynchronously."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int = 15,
    sample_seconds: float = 0.03,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
):
    """Median seconds per call for each candidate, measured round-robin.

    Each sample repeats a candidate enough times to last about ``sample_seconds`` (as judged
    from the warm-up), so fast and slow candidates are timed with similar precision. ``sync``
    (see :func:`synchronizer`) runs before each clock reading.
    """
    repeats = {}
    for name, fn in candidates.items():
        sync()
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        sync()
        per_call = (time.perf_counter() - start) / warmup
        repeats[name] = max(1, min(200, round(sample_seconds / max(per_call, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(repeats[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (so results paste straight into RESULTS.md)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_results_option(parser) -> None:
    """``--results``: where a benchmark's record goes; by default a git-ignored folder, so a run by hand never
    rewrites the committed records (``benchmarks/results``, given explicitly)."""
    from lightning_lora.experiments.pipeline import RESULTS, RUN_RECORDS

    parser.add_argument(
        "--results",
        default=str(RUN_RECORDS),
        help=f"where the record goes (default: %(default)s, ignored by git; {RESULTS}: the committed record)",
    )
