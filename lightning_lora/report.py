"""What an adapter changed: base versus fine-tuned, adapter on, off and merged.

:func:`classification_report` evaluates a pretrained classifier and its LoRA fine-tune on the
whole test split; :func:`regression_report` does the same for the low-rank-shift experiment.
Both return a JSON-ready dict and write ``summary.json`` and ``summary.md`` (atomically).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.adapter_files import ADAPTER_WEIGHTS_NAME, save_adapter
from lightning_lora.data import LinearShiftDataModule, MNISTDataModule
from lightning_lora.files import atomic_file
from lightning_lora.inject import (
    count_parameters,
    disable_lora,
    get_lora_config,
    lora_layers,
    merge_and_unload,
)
from lightning_lora.module import MODULE_CLASS_KEY, LitClassifier, LitRegressor, load_trained, read_checkpoint_state


def _batches(x: torch.Tensor, size: int = 1000) -> Iterator[torch.Tensor]:
    yield from x.split(size)


@torch.no_grad()
def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return torch.cat([net(chunk) for chunk in _batches(x)])


def _datamodule_args(checkpoint_path: str | Path) -> dict[str, Any]:
    hparams = read_checkpoint_state(checkpoint_path).get("datamodule_hyper_parameters") or {}
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def _write(out_dir: str | Path, summary: dict[str, Any], markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_file(out / "summary.md") as tmp:
        tmp.write_text(markdown)


def _adapter_sizes(model: nn.Module, checkpoint: str | Path, out_dir: str | Path) -> dict[str, int]:
    folder = save_adapter(model, Path(out_dir) / "adapter")
    return {
        "adapter_bytes": sum(f.stat().st_size for f in folder.iterdir()),
        "adapter_weights_bytes": (folder / ADAPTER_WEIGHTS_NAME).stat().st_size,
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
    }


def _digit_counts(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    wrong = [int(((preds != labels) & (labels == d)).sum()) for d in range(10)]
    return {"accuracy": float((preds == labels).float().mean()), "wrong_per_digit": wrong}


def classification_report(
    base_checkpoint: str | Path,
    finetuned_checkpoint: str | Path,
    out_dir: str | Path,
    data_dir: str | None = None,
    merged_file: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the base and the fine-tune on all ten test digits, adapter on, off and merged.

    ``merged_file``, a program written by ``lightning-lora merge``, is checked too.
    """
    base, tuned = load_trained(base_checkpoint), load_trained(finetuned_checkpoint)
    if not (isinstance(base, LitClassifier) and isinstance(tuned, LitClassifier)):
        raise ValueError("classification_report needs two LitClassifier checkpoints")
    if get_lora_config(tuned.net) is None:
        raise ValueError(f"{finetuned_checkpoint} holds no LoRA adapters; pass the fine-tuning checkpoint")
    data_args = _datamodule_args(finetuned_checkpoint)
    if data_dir is not None:
        data_args["data_dir"] = data_dir
    data = MNISTDataModule(**data_args)
    data.setup("test")
    images, labels = data.test_set.images, data.test_set.labels

    base_logits = _outputs(base.net, images)
    on_logits = _outputs(tuned.net, images)
    with disable_lora(tuned.net):
        off_logits = _outputs(tuned.net, images)
    merged_logits = _outputs(merge_and_unload(copy.deepcopy(tuned.net)), images)

    runs = {
        "base": _digit_counts(base_logits.argmax(1), labels),
        "adapter_on": _digit_counts(on_logits.argmax(1), labels),
        "adapter_off": _digit_counts(off_logits.argmax(1), labels),
        "merged": _digit_counts(merged_logits.argmax(1), labels),
    }
    if merged_file is not None:
        program = torch.export.load(str(merged_file)).module()
        file_logits = torch.cat([program(chunk) for chunk in _batches(images)]).detach()
        runs["merged_file"] = _digit_counts(file_logits.argmax(1), labels)
        runs["merged_file_predictions_equal_unmerged"] = bool(torch.equal(file_logits.argmax(1), on_logits.argmax(1)))
    count = count_parameters(tuned.net)
    trained = data.train_digits or list(range(10))
    summary = {
        "kind": "classification",
        "base_checkpoint": str(base_checkpoint),
        "finetuned_checkpoint": str(finetuned_checkpoint),
        "lora_config": get_lora_config(tuned.net).to_dict(),
        "trained_digits": trained,
        "test_samples": len(labels),
        **runs,
        "adapter_off_identical_to_base": bool(torch.equal(off_logits, base_logits)),
        "merged_predictions_equal_unmerged": bool(torch.equal(merged_logits.argmax(1), on_logits.argmax(1))),
        "merged_max_abs_logit_difference": float((merged_logits - on_logits).abs().max()),
        "parameters": {"trainable": count.trainable, "total": count.total, "trainable_percent": count.percent},
        **_adapter_sizes(tuned.net, finetuned_checkpoint, out_dir),
    }
    markdown = _classification_markdown(summary)
    _write(out_dir, summary, markdown)
    return summary


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _classification_markdown(s: dict[str, Any]) -> str:
    rows = [("pretrained base", "base"), ("adapter on", "adapter_on"), ("adapter off", "adapter_off")]
    rows.append(("merged", "merged"))
    if "merged_file" in s:
        rows.append(("merged file (lightning-lora merge)", "merged_file"))
    lines = [
        "# LoRA fine-tune: what the adapter changed",
        "",
        f"Trained on digits {s['trained_digits']}; tested on all {s['test_samples']:,} test images.",
        "",
        "| model | accuracy | " + " | ".join(f"wrong {d}" for d in range(10)) + " |",
        "|---|---|" + "---|" * 10,
    ]
    for title, key in rows:
        wrong = " | ".join(str(w) for w in s[key]["wrong_per_digit"])
        lines.append(f"| {title} | {_pct(s[key]['accuracy'])} | {wrong} |")
    p = s["parameters"]
    lines += [
        "",
        f"- Trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.2f}%).",
        f"- Adapter folder: {s['adapter_bytes']:,} bytes; full checkpoint: {s['checkpoint_bytes']:,} bytes "
        f"({s['checkpoint_bytes'] / s['adapter_bytes']:.0f}x larger).",
        "- Adapter off: "
        + (
            "outputs identical to the pretrained model's, bit for bit."
            if s["adapter_off_identical_to_base"]
            else "**outputs differ from the pretrained model's** (this should never happen)."
        ),
        "- Merged: "
        + ("same predictions as unmerged" if s["merged_predictions_equal_unmerged"] else "**predictions differ**")
        + f" (largest logit difference {s['merged_max_abs_logit_difference']:.2e}).",
        *(
            [
                "- Merged file: "
                + ("same predictions as unmerged." if s["merged_file_predictions_equal_unmerged"] else "**differs**.")
            ]
            if "merged_file" in s
            else []
        ),
        *_effect_lines(s),
        "",
    ]
    return "\n".join(lines)


def _effect_lines(s: dict[str, Any]) -> list[str]:
    before, after = s["base"]["wrong_per_digit"], s["adapter_on"]["wrong_per_digit"]
    trained = s["trained_digits"]
    weakest = max(range(10), key=lambda d: before[d])
    lines = [f"- The base gets digit {weakest} wrong most ({before[weakest]} mistakes)."]
    for d in trained if len(trained) < 10 else []:
        change = (before[d] - after[d]) / before[d] if before[d] else 0.0
        lines.append(f"- Digit {d} (trained): {before[d]} wrong -> {after[d]} ({change:.0%} fewer mistakes).")
    others = [d for d in range(10) if d not in trained]
    if others:
        extra = sum(after[d] - before[d] for d in others)
        worst = sorted(others, key=lambda d: after[d] - before[d], reverse=True)[:3]
        detail = ", ".join(f"{d}: {before[d]} -> {after[d]}" for d in worst)
        verb = "more" if extra > 0 else "fewer"
        lines.append(f"- Digits not trained on: {abs(extra)} {verb} mistakes in total (largest changes {detail}).")
    delta = s["adapter_on"]["accuracy"] - s["base"]["accuracy"]
    if delta < 0 and others:
        lines.append(
            f"- The trade-off: fine-tuning on digits {trained} alone cost {_pct(-delta)} of overall accuracy "
            f"({_pct(s['base']['accuracy'])} -> {_pct(s['adapter_on']['accuracy'])}): the adapter learned to "
            "favour the trained digits, and digits that resemble them pay for it."
        )
    else:
        lines.append(
            f"- Overall accuracy {_pct(s['base']['accuracy'])} -> {_pct(s['adapter_on']['accuracy'])} "
            f"({'+' if delta >= 0 else '-'}{_pct(abs(delta))})."
        )
    return lines


def regression_report(
    base_checkpoint: str | Path, finetuned_checkpoint: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """The low-rank-shift experiment: does the adapter's delta equal the true shift?"""
    base, tuned = load_trained(base_checkpoint), load_trained(finetuned_checkpoint)
    if not (isinstance(base, LitRegressor) and isinstance(tuned, LitRegressor)):
        raise ValueError("regression_report needs two LitRegressor checkpoints")
    layers = dict(lora_layers(tuned.net))
    if len(layers) != 1:
        raise ValueError(f"expected one adapted layer in {finetuned_checkpoint}, found {sorted(layers)}")
    ((name, layer),) = layers.items()
    data = LinearShiftDataModule(**_datamodule_args(finetuned_checkpoint))
    data.setup("test")
    x, y = data.splits["test"].images, data.splits["test"].labels

    def mse(net: nn.Module) -> float:
        return float(((_outputs(net, x) - y) ** 2).mean())

    delta = layer.delta_weight()
    deviation = delta - data.shift
    merged = merge_and_unload(copy.deepcopy(tuned.net))
    summary = {
        "kind": "regression",
        "base_checkpoint": str(base_checkpoint),
        "finetuned_checkpoint": str(finetuned_checkpoint),
        "lora_config": get_lora_config(tuned.net).to_dict(),
        "adapted_layer": name,
        "shift": data.shift,
        "delta_mean": float(delta.mean()),
        "delta_std": float(delta.std()),
        "delta_max_abs_deviation": float(deviation.abs().max()),
        "mse_base_on_new_data": mse(base.net),
        "mse_finetuned": mse(tuned.net),
        "mse_merged_plain_model": mse(merged),
        "merged_model_types": sorted({type(m).__name__ for m in merged.modules()}),
        "adapter_rank": layer.rank,
        **_adapter_sizes(tuned.net, finetuned_checkpoint, out_dir),
    }
    s = summary
    markdown = "\n".join(
        [
            "# Low-rank shift: what the adapter learned",
            "",
            f"New data come from `theta + {s['shift']:g}`: a rank-1 change of the true weights.",
            "",
            "| | value |",
            "|---|---|",
            f"| learned delta, mean (target {s['shift']:g}) | {s['delta_mean']:.6f} |",
            f"| learned delta, std (target 0) | {s['delta_std']:.2e} |",
            f"| learned delta, max abs deviation from {s['shift']:g} | {s['delta_max_abs_deviation']:.2e} |",
            f"| MSE of the base on the new data | {s['mse_base_on_new_data']:.4g} |",
            f"| MSE with the adapter | {s['mse_finetuned']:.3e} |",
            f"| MSE of the merged plain model | {s['mse_merged_plain_model']:.3e} |",
            "",
            f"A rank-{s['adapter_rank']} adapter ({s['adapter_weights_bytes']:,} bytes of weights) recovered the "
            "shift; merged into the weights, the plain linear model reaches the low MSE alone.",
            "",
        ]
    )
    _write(out_dir, summary, markdown)
    return summary


def report(
    base_checkpoint: str | Path,
    finetuned_checkpoint: str | Path,
    out_dir: str | Path,
    data_dir: str | None = None,
    merged_file: str | Path | None = None,
) -> tuple[dict[str, Any], str]:
    """The right report for the checkpoints' kind; returns the summary and the path of summary.md."""
    kind = str(read_checkpoint_state(finetuned_checkpoint).get(MODULE_CLASS_KEY, ""))
    if kind.endswith(".LitRegressor"):
        summary = regression_report(base_checkpoint, finetuned_checkpoint, out_dir)
    else:
        summary = classification_report(base_checkpoint, finetuned_checkpoint, out_dir, data_dir, merged_file)
    return summary, str(Path(out_dir) / "summary.md")
