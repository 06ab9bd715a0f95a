"""Writers for the reports: they format numbers computed elsewhere, never compute them."""

from __future__ import annotations

from typing import Any


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _how_trained(training: dict[str, Any]) -> str:
    """What besides the digits shaped the fine-tune: replay of the others, distillation to the base."""
    parts = []
    if training.get("replay_per_batch"):
        parts.append(
            f"{training['replay_per_batch']} of every {training['batch_size']} samples replayed from the other digits"
        )
    if training.get("distill_weight"):
        parts.append(f"distilled to the base (weight {training['distill_weight']:g}, on {training['distill_on']})")
    return f", with {' and '.join(parts)}" if parts else ""


def _rotated(training: dict[str, Any]) -> str:
    return f", rotated {training['rotation']:g} degrees as in training" if training.get("rotation") else ""


def _which_adapters(s: dict[str, Any]) -> str:
    """Where a run holds several adapters: which one "adapter on" is, and what the folder holds besides."""
    names = s.get("adapters") or []
    if len(names) < 2:
        return ""
    others = [n for n in names if n != s["trained_adapter"]]
    return f' (adapters {names}; "adapter on" is the trained {s["trained_adapter"]!r}, {others} stay off)'


def classification_markdown(s: dict[str, Any]) -> str:
    rows = [("pretrained base", "base"), ("adapter on", "adapter_on"), ("adapter off", "adapter_off")]
    rows.append(("merged", "merged"))
    if "merged_file" in s:
        rows.append(("merged file (lightning-lora merge)", "merged_file"))
    lines = [
        "# LoRA fine-tune: what the adapter changed",
        "",
        f"Trained on digits {s['trained_digits']} (in bold){_how_trained(s.get('training') or {})}; tested on all "
        f"{s['test_samples']:,} test images{_rotated(s.get('training') or {})}; *other digits*: accuracy on the "
        "digits not trained on.",
        "",
        "| model | accuracy | other digits | " + " | ".join(f"wrong {d}" for d in range(10)) + " |",
        "|---|---|---|" + "---|" * 10,
    ]
    for title, key in rows:
        wrong = " | ".join(
            f"**{w}**" if d in s["trained_digits"] and len(s["trained_digits"]) < 10 else str(w)
            for d, w in enumerate(s[key]["wrong_per_digit"])
        )
        retain = s[key].get("retain_accuracy")
        lines.append(
            f"| {title} | {_pct(s[key]['accuracy'])} | {_pct(retain) if retain is not None else '-'} | {wrong} |"
        )
    p = s["parameters"]
    lines += [
        "",
        f"- Trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.2f}%).",
        f"- Adapter folder: {s['adapter_bytes']:,} bytes{_which_adapters(s)}; the run's adapter-only checkpoint: "
        f"{s['checkpoint_bytes']:,} bytes; the whole model: {s['model_bytes']:,} bytes.",
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
            f"- The trade-off: fine-tuning on digits {trained} cost {100 * -delta:.2f} points of overall accuracy "
            f"({_pct(s['base']['accuracy'])} -> {_pct(s['adapter_on']['accuracy'])}): the adapter learned to "
            "favour the trained digits, and digits that resemble them pay for it."
        )
    else:
        lines.append(
            f"- Overall accuracy {_pct(s['base']['accuracy'])} -> {_pct(s['adapter_on']['accuracy'])} "
            f"({'+' if delta >= 0 else '-'}{_pct(abs(delta))})."
        )
    return lines


def regression_markdown(s: dict[str, Any]) -> str:
    return "\n".join(
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
