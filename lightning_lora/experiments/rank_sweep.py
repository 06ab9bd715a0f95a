"""``make demo-rank-sweep``: "LoRA learns less and forgets less" (Biderman et al., 2024), on MNIST.

The pretrained RichBoyNet (the latest ``runs/pretrain``) is fine-tuned on all ten digits rotated
by 45 degrees, a new task for the same network: with LoRA at ranks 1, 2, 4, 8, 16 and 64 and with
full fine-tuning, the same number of steps each and a learning rate tuned for each: the best on
the rotated validation split of a grid of four, widened by half-decade steps (1, 3, 10, ...) while
the best lies at the grid's edge, so that every setting's best rate has a worse one on each side.
Every rate's scores are kept in the record. For each: rotated test accuracy (what was learned),
upright test accuracy (what was kept), trainable parameters and wall time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from lightning_lora.experiments import figures
from lightning_lora.experiments.pipeline import RUN_RECORDS, duration
from lightning_lora.experiments.sweep import command_line, ensure_base, finish, fit, predictions, say, shown

NAME = "demo-rank-sweep"
ROTATION = 45.0
STEPS = 300
BATCH = 64
RANKS = (1, 2, 4, 8, 16, 64)
LORA_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
FULL_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
MAX_WIDENING = 4
"""At most this many rates are added beyond a grid's edge (a best rate still at the edge is then recorded so)."""


def neighbour(rate: float, up: bool) -> float:
    """The next rate of the half-decade grid (1, 3, 10, 30, ...) above or below ``rate``."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = round(rate / 10**exponent)
    if up:
        return 3 * 10**exponent if mantissa < 3 else 10 ** (exponent + 1)
    return 10**exponent if mantissa >= 3 else 3 * 10 ** (exponent - 1)


def common() -> list[str]:
    """Every setting: rotated digits, the same steps and batch, no validation or checkpoints during the
    fit (the learning rate is chosen on the validation split afterwards)."""
    return [
        "--data.train_digits", "null", "--data.rotation", str(ROTATION), "--data.batch_size", str(BATCH),
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.logger.init_args.name", "rank_sweep",
    ]  # fmt: skip


def settings(base: Path) -> list[tuple[str, list[str], tuple[float, ...]]]:
    """(label, fit options, learning rates to try) for each rank and for full fine-tuning."""
    lora = [
        (f"r={r}", ["-c", "configs/finetune_lora.yaml", "--lora.rank", str(r), "--lora.alpha", str(2 * r)], LORA_RATES)
        for r in RANKS
    ]
    full = ("full", ["-c", "configs/pretrain.yaml", "--model.base_checkpoint", str(base)], FULL_RATES)
    return [*lora, full]


def _accuracy(net, data) -> float:
    return float((predictions(net, data.inputs) == data.targets).float().mean())


def _score(rate: float, options: list[str], rotated: Any, upright: Any) -> dict[str, Any]:
    """One fit at learning rate ``rate``: its scores, trainable parameters, time and command."""
    from lightning_lora.core.adapter_tensors import count_parameters

    args = [*options, "--model.optimizer.init_args.lr", f"{rate:g}"]
    cli, seconds = fit(args)
    net = cli.model.net
    return {
        "lr": rate,
        "seconds": round(seconds, 1),
        "rotated_val_accuracy": _accuracy(net, rotated.val_set),
        "rotated_accuracy": _accuracy(net, rotated.test_set),
        "upright_accuracy": _accuracy(net, upright.test_set),
        "trainable": count_parameters(net).trainable,
        "command": shown(["fit", *args]),
    }


def run(data_dir: str, results: Path = RUN_RECORDS) -> Path:
    from lightning_lora.demo.mnist_datamodule import MNISTDataModule
    from lightning_lora.demo.run_loading import load_base_net

    started = time.perf_counter()
    base_path = ensure_base(NAME, data_dir)
    rotated, upright = MNISTDataModule(data_dir=data_dir, rotation=ROTATION), MNISTDataModule(data_dir=data_dir)
    for data in (rotated, upright):
        data.setup("fit")
        data.setup("test")
    base_net = load_base_net(base_path)
    base = {
        "rotated_accuracy": _accuracy(base_net, rotated.test_set),
        "upright_accuracy": _accuracy(base_net, upright.test_set),
    }
    say(
        NAME,
        f"base {base_path}: upright {100 * base['upright_accuracy']:.2f}%, "
        f"rotated {100 * base['rotated_accuracy']:.2f}%",
    )
    rows = []
    for label, options, rates in settings(base_path):
        tried: list[dict[str, Any]] = []

        def score(rate: float, options: list[str] = options, label: str = label, tried: list = tried) -> None:
            tried.append(_score(rate, [*options, "--data.data_dir", data_dir, "--model.base_checkpoint",
                                       str(base_path), *common()], rotated, upright))  # fmt: skip
            say(NAME, f"{label}, lr {rate:g}: rotated validation {100 * tried[-1]['rotated_val_accuracy']:.2f}% "
                      f"({duration(tried[-1]['seconds'])})")  # fmt: skip

        for rate in rates:
            score(rate)
        for _ in range(MAX_WIDENING):
            best = max(tried, key=lambda t: t["rotated_val_accuracy"])
            lowest, highest = min(t["lr"] for t in tried), max(t["lr"] for t in tried)
            if lowest < best["lr"] < highest:
                break
            say(NAME, f"{label}: the best rate {best['lr']:g} is at the grid's edge; widening it")
            for up in [up for up, edge in ((False, lowest), (True, highest)) if best["lr"] == edge]:
                score(neighbour(best["lr"], up))
        tried.sort(key=lambda t: t["lr"])
        best = max(tried, key=lambda t: t["rotated_val_accuracy"])
        rates_tried = [t["lr"] for t in tried]
        inside = rates_tried[0] < best["lr"] < rates_tried[-1]
        scores = [{k: t[k] for k in ("lr", "rotated_val_accuracy", "rotated_accuracy", "upright_accuracy")}
                  for t in tried]  # fmt: skip
        rows.append({"label": label, **best, "learning_rates_tried": rates_tried, "best_inside_grid": inside,
                     "scores": scores})  # fmt: skip
        say(NAME, f"{label}: lr {best['lr']:g} -> rotated {100 * best['rotated_accuracy']:.2f}%, upright "
                  f"{100 * best['upright_accuracy']:.2f}% ({best['trainable']:,} trainable)")  # fmt: skip
    figure = figures.learning_vs_forgetting(
        rows, base, results / f"{NAME}.png", f"Learning {ROTATION:g}-degree digits vs forgetting upright ones"
    )
    record: dict[str, Any] = {
        "rotation": ROTATION,
        "steps": STEPS,
        "batch_size": BATCH,
        "base": {"checkpoint": str(base_path), **base},
        "settings": rows,
    }
    return finish(NAME, record, started, figure, results)


main = command_line("lightning_lora.experiments.rank_sweep", __doc__, run)


if __name__ == "__main__":
    raise SystemExit(main())
