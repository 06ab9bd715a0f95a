"""The pictures of the experiments, as PNG files: they draw numbers computed elsewhere.

Each function takes a summary (or a list of sweep results) and writes one figure atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_lora.files import atomic_file
from lightning_lora.metrics import draw_confusion, draw_mistake_bars


def _save(figure, path: Path) -> Path:
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})  # no version stamp: same bytes
    return path


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def mistakes_per_digit(summary: dict[str, Any], path: Path) -> Path:
    """Mistakes per digit on the test set, the base beside the adapter (trained digits marked)."""
    figure = _figure(7.5, 3.8)
    axes = figure.subplots()
    trained = summary["trained_digits"]
    title = f"Test mistakes per digit (trained on {trained}; {summary['test_samples']:,} images)"
    draw_mistake_bars(axes, summary["adapter_on"]["wrong_per_digit"], summary["base"]["wrong_per_digit"], title)
    if len(trained) < 10:
        axes.set_xticks(range(10), [f"{d}\n(trained)" if d in trained else str(d) for d in range(10)])
        for d in trained:
            axes.axvspan(d - 0.5, d + 0.5, color="tab:green", alpha=0.08, zorder=0)
    return _save(figure, path)


def confusion_pair(summary: dict[str, Any], path: Path) -> Path:
    """The base's and the adapter's confusion matrices side by side (rows: true digit)."""
    figure = _figure(10.5, 5.0)
    left, right = figure.subplots(1, 2)
    draw_confusion(left, np.asarray(summary["confusion"]["base"]), f"base: {100 * summary['base']['accuracy']:.2f}%")
    accuracy = 100 * summary["adapter_on"]["accuracy"]
    draw_confusion(right, np.asarray(summary["confusion"]["adapter_on"]), f"adapter on: {accuracy:.2f}%")
    return _save(figure, path)


def tradeoff(points: list[dict[str, Any]], base: dict[str, Any], path: Path, title: str) -> Path:
    """Overall test accuracy (x) against the target digit's test mistakes (y): lower right is better.

    ``points``: ``{"label", "accuracy", "target_wrong"}`` per setting; ``base`` the same for the base.
    """
    figure = _figure(7.5, 5.0)
    axes = figure.subplots()
    axes.scatter([100 * p["accuracy"] for p in points], [p["target_wrong"] for p in points], color="tab:orange")
    for p in points:
        axes.annotate(p["label"], (100 * p["accuracy"], p["target_wrong"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)  # fmt: skip
    axes.scatter([100 * base["accuracy"]], [base["target_wrong"]], color="tab:blue", marker="s", s=60)
    axes.annotate("base", (100 * base["accuracy"], base["target_wrong"]), textcoords="offset points",
                  xytext=(5, 4), fontsize=9, color="tab:blue")  # fmt: skip
    axes.axvline(100 * base["accuracy"] - 0.3, color="grey", linestyle=":", linewidth=1)
    axes.text(100 * base["accuracy"] - 0.3, axes.get_ylim()[1], " base - 0.3 points", fontsize=7, color="grey",
              va="top")  # fmt: skip
    axes.set(xlabel="overall test accuracy (%)", ylabel="target digit: test mistakes", title=title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def learning_vs_forgetting(points: list[dict[str, Any]], base: dict[str, Any], path: Path, title: str) -> Path:
    """Upright test accuracy (x: what is kept) against rotated test accuracy (y: what is learned).

    ``points``: ``{"label", "upright_accuracy", "rotated_accuracy"}``; ``base`` the same, untrained.
    """
    figure = _figure(7.5, 5.0)
    axes = figure.subplots()
    lora = [p for p in points if p["label"] != "full"]
    xs, ys = [100 * p["upright_accuracy"] for p in lora], [100 * p["rotated_accuracy"] for p in lora]
    axes.plot(xs, ys, "-o", color="tab:orange", label="LoRA, rank r")
    for p, x, y in zip(lora, xs, ys, strict=True):
        axes.annotate(p["label"], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    for p in points:
        if p["label"] == "full":
            x, y = 100 * p["upright_accuracy"], 100 * p["rotated_accuracy"]
            axes.scatter([x], [y], color="tab:red", marker="D", s=50, label="full fine-tuning")
    axes.scatter([100 * base["upright_accuracy"]], [100 * base["rotated_accuracy"]], color="tab:blue", marker="s",
                 s=60, label="base (no fine-tuning)")  # fmt: skip
    axes.set(xlabel="upright test accuracy (%): what is kept", ylabel="rotated test accuracy (%): what is learned",
             title=title)  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    return _save(figure, path)
