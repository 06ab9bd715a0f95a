"""``make demo-forgetting``: fixing one digit without breaking the others, by replay and distillation.

On the demo's base and digit (the latest ``runs/pretrain``, digit 9), the demo's fine-tune is
repeated with each setting below, each one ``lightning-lora fit -c configs/finetune_lora.yaml``
plus a few options. For each: the target digit's test mistakes, overall and retained (other
digits') test accuracy, and the fit's wall time; a table and the trade-off plot (overall accuracy
against target mistakes) go into the record that the README is generated from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning_lora.experiments import figures
from lightning_lora.experiments.evaluate import digit_counts
from lightning_lora.experiments.pipeline import RUN_RECORDS, duration
from lightning_lora.experiments.sweep import (
    command_line,
    ensure_base,
    finish,
    fit,
    predictions,
    say,
    shown,
    test_split,
)

NAME = "demo-forgetting"
DIGIT = 9  # the demo's: configs/finetune_lora.yaml trains on it
FINETUNE = ["-c", "configs/finetune_lora.yaml"]
LONGER = {500: ["--trainer.max_steps", "500", "--trainer.val_check_interval", "50"],
          1000: ["--trainer.max_steps", "1000", "--trainer.val_check_interval", "100"]}  # fmt: skip
"""More steps, validated 10 times as the demo is."""
SETTINGS: list[tuple[str, list[str]]] = [
    ("plain (the demo)", []),
    ("replay 0.1", ["--data.replay_fraction", "0.1"]),
    ("replay 0.25", ["--data.replay_fraction", "0.25"]),
    ("replay 0.5", ["--data.replay_fraction", "0.5"]),
    ("distill 1", ["--model.distill_weight", "1", "--model.distill_on", "all"]),
    ("distill 4", ["--model.distill_weight", "4", "--model.distill_on", "all"]),
    ("replay 0.25 + distill 1", ["--data.replay_fraction", "0.25", "--model.distill_weight", "1"]),
    ("replay 0.5 + distill 1", ["--data.replay_fraction", "0.5", "--model.distill_weight", "1"]),
    ("plain, 1000 steps", LONGER[1000]),
    ("replay 0.25 + distill 1, 500 steps", ["--data.replay_fraction", "0.25", "--model.distill_weight", "1",
                                            *LONGER[500]]),
    ("replay 0.5, 1000 steps", ["--data.replay_fraction", "0.5", *LONGER[1000]]),
    ("replay 0.5 + distill 1, 1000 steps", ["--data.replay_fraction", "0.5", "--model.distill_weight", "1",
                                            *LONGER[1000]]),
]  # fmt: skip
"""(label, the options added to the demo's fine-tune). Distillation without replay has no other
digits in its batches, so it distils on every sample (``distill_on: all``); with replay, on the
replayed ones (the default, ``retain``)."""


def run(data_dir: str, results: Path = RUN_RECORDS) -> Path:
    from lightning_lora.demo.run_loading import load_base_net

    started = time.perf_counter()
    base_path = ensure_base(NAME, data_dir)
    images, labels = test_split(data_dir)
    base_net = load_base_net(base_path)
    base = digit_counts(predictions(base_net, images), labels, [DIGIT])
    say(NAME, f"base {base_path}: {100 * base['accuracy']:.2f}%, digit {DIGIT}: {base['target_wrong']} wrong")
    rows = []
    for i, (label, options) in enumerate(SETTINGS, 1):
        args = [*FINETUNE, "--data.data_dir", data_dir, "--model.base_checkpoint", str(base_path),
                "--trainer.logger.init_args.name", "forgetting", *options]  # fmt: skip
        say(NAME, f"[{i}/{len(SETTINGS)}] {label}: {shown(['fit', *args])}")
        cli, seconds = fit(args)
        counts = digit_counts(predictions(cli.model.net, images), labels, [DIGIT])
        rows.append({"label": label, "options": options, "seconds": round(seconds, 1),
                     "run": str(Path(cli.trainer.log_dir)), **counts})  # fmt: skip
        say(
            NAME,
            f"[{i}/{len(SETTINGS)}] {label}: digit {DIGIT} {counts['target_wrong']} wrong, overall "
            f"{100 * counts['accuracy']:.2f}%, other digits {100 * counts['retain_accuracy']:.2f}% "
            f"({duration(seconds)})",
        )
    figure = figures.tradeoff(
        [{"label": r["label"], "accuracy": r["accuracy"], "target_wrong": r["target_wrong"]} for r in rows],
        {"accuracy": base["accuracy"], "target_wrong": base["target_wrong"]},
        results / f"{NAME}.png",
        f"Fine-tuning on digit {DIGIT}: learning it vs keeping the rest",
    )
    record: dict[str, Any] = {
        "digit": DIGIT,
        "base": {"checkpoint": str(base_path), **base},
        "settings": rows,
    }
    return finish(NAME, record, started, figure, results)


main = command_line("lightning_lora.experiments.forgetting", __doc__, run)


if __name__ == "__main__":
    raise SystemExit(main())
