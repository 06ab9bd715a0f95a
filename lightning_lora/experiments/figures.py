"""The pictures of the experiments, as PNG files: they draw numbers computed elsewhere.

Each function takes a summary (or a list of sweep results) and writes one figure atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lightning_lora.core.safe_io import atomic_file
from lightning_lora.demo.digit_metrics import draw_confusion, draw_mistake_bars


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


def grouped_mistakes(rows: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Mistakes per true digit for several models, one bar per model in each digit's group."""
    figure = _figure(9.0, 3.8)
    axes = figure.subplots()
    width = 0.8 / len(rows)
    for i, (label, counts) in enumerate(rows.items()):
        offsets = np.arange(10) - 0.4 + width * (i + 0.5)
        axes.bar(offsets, counts["wrong_per_digit"], width=width, label=label)
    axes.set_xticks(range(10), [str(d) for d in range(10)])
    axes.set_xlabel("true digit")
    axes.set_ylabel("test mistakes")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return _save(figure, path)


def confusion_pair(summary: dict[str, Any], path: Path) -> Path:
    """The base's and the adapter's confusion matrices side by side (rows: true digit)."""
    figure = _figure(10.5, 5.0)
    left, right = figure.subplots(1, 2)
    draw_confusion(left, np.asarray(summary["confusion"]["base"]), f"base: {100 * summary['base']['accuracy']:.2f}%")
    accuracy = 100 * summary["adapter_on"]["accuracy"]
    draw_confusion(right, np.asarray(summary["confusion"]["adapter_on"]), f"adapter on: {accuracy:.2f}%")
    figure.suptitle("Test confusion matrices (rows: true digit; colour: share of the row; numbers: counts)")
    return _save(figure, path)


def tradeoff(points: list[dict[str, Any]], base: dict[str, Any], path: Path, title: str) -> Path:
    """Overall test accuracy (x) against the target digit's test mistakes (y): lower right is better.

    ``points``: ``{"label", "accuracy", "target_wrong"}`` per setting; ``base`` the same for the base.
    Each point is numbered on the plot and named in the legend (the labels would overlap); a
    setting more than 5 points below the base is named in a box instead, so the rest stay legible.
    """
    figure = _figure(9.5, 5.0)
    axes = figure.subplots()
    far = []
    for i, p in enumerate(points, 1):
        x, y = 100 * p["accuracy"], p["target_wrong"]
        color, marker = f"C{(i - 1) % 10}", "o^sDv"[(i - 1) // 10 % 5]  # ten colours, then another shape
        if x < 100 * base["accuracy"] - 5:
            far.append(f"{i}: {p['label']}: {x:.1f}%, {y} mistakes")
            continue
        axes.scatter([x], [y], color=color, marker=marker, s=45, label=f"{i}: {p['label']}", zorder=3)
        axes.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    axes.scatter([100 * base["accuracy"]], [base["target_wrong"]], color="black", marker="s", s=55, label="base")
    axes.axvline(100 * base["accuracy"] - 0.3, color="grey", linestyle=":", linewidth=1,
                 label="base accuracy - 0.3 points")  # fmt: skip
    axes.axhline(0.2 * base["target_wrong"], color="grey", linestyle="--", linewidth=1,
                 label="80% fewer target mistakes")  # fmt: skip
    if far:
        axes.text(0.02, 0.97, "off the chart (left):\n" + "\n".join(far), transform=axes.transAxes, va="top",
                  fontsize=7, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"})  # fmt: skip
    axes.set(xlabel="overall test accuracy (%)", ylabel="target digit: test mistakes", title=title)
    axes.margins(x=0.1, y=0.1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(figure, path)


def learning_vs_forgetting(points: list[dict[str, Any]], base: dict[str, Any], path: Path, title: str) -> Path:
    """Upright test accuracy (x: what is kept) against rotated test accuracy (y: what is learned).

    ``points``: ``{"label", "upright_accuracy", "rotated_accuracy"}``; ``base`` the same, untrained.
    The base lies far from the fine-tuned points, so it is stated in a box instead of drawn.
    """
    figure = _figure(7.5, 5.0)
    axes = figure.subplots()
    lora = [p for p in points if p["label"] != "full"]
    xs, ys = [100 * p["upright_accuracy"] for p in lora], [100 * p["rotated_accuracy"] for p in lora]
    axes.plot(xs, ys, "-o", color="tab:orange", label="LoRA, rank r (in order of rank)")
    for i, (p, x, y) in enumerate(zip(lora, xs, ys, strict=True)):
        axes.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, -12 if i % 2 else 6), fontsize=8)
    for p in points:
        if p["label"] == "full":
            x, y = 100 * p["upright_accuracy"], 100 * p["rotated_accuracy"]
            axes.scatter([x], [y], color="tab:red", marker="D", s=50, label="full fine-tuning", zorder=3)
    note = (
        f"base (no fine-tuning):\nupright {100 * base['upright_accuracy']:.1f}%, "
        f"rotated {100 * base['rotated_accuracy']:.1f}%"
    )
    axes.text(0.98, 0.04, note, transform=axes.transAxes, ha="right", va="bottom", fontsize=8,
              bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "grey"})  # fmt: skip
    axes.set(xlabel="upright test accuracy (%): what is kept", ylabel="rotated test accuracy (%): what is learned",
             title=title)  # fmt: skip
    axes.margins(x=0.15, y=0.15)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    return _save(figure, path)
