"""Two adapters on one base: a "digit 9" and a "digit 4" adapter, served per sample in one batch, and merged.

    python -m lightning_lora.experiments.two_adapters --data-dir data     (make demo-two-adapters)

On the demo's base (the latest ``runs/pretrain``), two fine-tunes as the demo's (100 steps of batch
10), each on one digit: ``digit9``, then ``digit4`` trained beside it (``--lora.load_adapters``:
the first is loaded frozen and inactive). Then, on the whole test split, the per-digit mistakes of
the base, of each adapter alone, of one mixed batch in which every image of a 9 goes through
``digit9``, every 4 through ``digit4`` and the rest through the base (``adapter_per_sample``; the
router is told the true digit, as a per-customer server is told the customer), and of the two
combined into one adapter (``add_weighted_adapter``, ``cat``, weights 1 and 1), which needs no
router.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lightning_lora.experiments.evaluate import digit_counts, outputs
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

NAME = "demo-two-adapters"
DIGITS = {"digit9": 9, "digit4": 4}
FINETUNE = ["-c", "configs/finetune_lora.yaml"]


def run(data_dir: str, results: Path = RUN_RECORDS) -> Path:
    from lightning_lora.core.active_adapters import disable_lora, set_active_adapters
    from lightning_lora.core.adapter_folder import load_adapter
    from lightning_lora.core.weighted_merge import add_weighted_adapter
    from lightning_lora.demo.run_loading import load_base_net
    from lightning_lora.experiments import figures

    started = time.perf_counter()
    base_path = ensure_base(NAME, data_dir)
    images, labels = test_split(data_dir)
    stages, folder = [], None
    for name, digit in DIGITS.items():
        args = [*FINETUNE, "--data.data_dir", data_dir, "--model.base_checkpoint", str(base_path),
                "--data.train_digits", f"[{digit}]", "--lora.adapter_name", name,
                "--trainer.logger.init_args.name", "two_adapters"]  # fmt: skip
        if folder is not None:
            args += ["--lora.load_adapters", "{" + ", ".join(f"{n}: {folder}" for n in DIGITS if n != name) + "}"]
        say(NAME, f"{name}: {shown(['fit', *args])}")
        cli, seconds = fit(args)
        folder = Path(cli.trainer.log_dir) / "adapter"  # holds every adapter of the run (PEFT's layout)
        stages.append({"adapter": name, "command": shown(["fit", *args]), "seconds": round(seconds, 1)})
        say(NAME, f"{name}: done in {duration(seconds)}; adapters in {folder}")
    net = load_base_net(base_path)
    for name in DIGITS:
        load_adapter(net, folder, adapter_name=name)
    rows: dict[str, dict[str, Any]] = {}
    logits: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with disable_lora(net):
            logits["__base__"] = outputs(net, images)
        for name in DIGITS:
            set_active_adapters(net, name)
            logits[name] = outputs(net, images)
        routing = [next((n for n, d in DIGITS.items() if d == int(y)), "__base__") for y in labels]
        mixed = torch.cat(
            [
                _per_sample(net, chunk, names)
                for chunk, names in zip(images.split(1000), _chunks(routing, 1000), strict=True)
            ]
        )
    alone = torch.stack([logits[name][i] for i, name in enumerate(routing)])
    gap = float((mixed - alone).abs().max())  # each sample in the mixed batch against its adapter alone
    rows["base"] = digit_counts(logits["__base__"].argmax(dim=1), labels, list(DIGITS.values()))
    for name in DIGITS:
        rows[f"{name} alone"] = digit_counts(logits[name].argmax(dim=1), labels, list(DIGITS.values()))
    rows["per sample, one batch"] = digit_counts(mixed.argmax(dim=1), labels, list(DIGITS.values()))
    add_weighted_adapter(net, list(DIGITS), [1.0, 1.0], "both", combination="cat")
    set_active_adapters(net, "both")
    rows["weighted merge (cat, 1 + 1)"] = digit_counts(predictions(net, images), labels, list(DIGITS.values()))
    for label, counts in rows.items():
        wrong = counts["wrong_per_digit"]
        say(NAME, f"{label}: {100 * counts['accuracy']:.2f}%, 9s wrong {wrong[9]}, 4s wrong {wrong[4]}")
    figure = figures.grouped_mistakes(rows, results / f"{NAME}.png", "Mistakes per digit: two adapters, one base")
    record = {"digits": DIGITS, "base": str(base_path), "adapters": str(folder), "stages": stages,
              "test_samples": len(labels), "per_sample_max_difference": gap,
              "rows": [{"label": k, **v} for k, v in rows.items()]}  # fmt: skip
    return finish(NAME, record, started, figure, results)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _per_sample(net: torch.nn.Module, images: torch.Tensor, names: list[str]) -> torch.Tensor:
    from lightning_lora.core.active_adapters import adapter_per_sample

    with adapter_per_sample(net, names):
        return outputs(net, images, batch=len(images))


main = command_line("lightning_lora.experiments.two_adapters", __doc__, run)


if __name__ == "__main__":
    raise SystemExit(main())
