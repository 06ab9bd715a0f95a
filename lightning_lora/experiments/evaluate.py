"""The numbers of a report: a pretrained model against its LoRA fine-tune, adapter on, off and merged.

Nothing here writes or formats; :mod:`~lightning_lora.experiments.render` does that.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_lora.core.active_adapters import disable_lora
from lightning_lora.core.adapter_tensors import count_parameters
from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.inject import get_lora_config, lora_layers, merge_and_unload

EVAL_BATCH = 1000


@torch.no_grad()
def outputs(net: nn.Module, inputs: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """``net``'s outputs for all ``inputs``, in eval mode, in batches."""
    net.eval()
    return torch.cat([net(chunk) for chunk in inputs.split(batch)])


def digit_counts(preds: torch.Tensor, labels: torch.Tensor, trained: list[int] | None = None) -> dict[str, Any]:
    """Accuracy, the number of mistakes per true digit, and accuracy on the digits not trained on."""
    wrong = [int(((preds != labels) & (labels == d)).sum()) for d in range(10)]
    counts: dict[str, Any] = {"accuracy": float((preds == labels).float().mean()), "wrong_per_digit": wrong}
    if trained is not None:
        retain = ~torch.isin(labels, torch.tensor(trained))
        counts["retain_accuracy"] = float((preds[retain] == labels[retain]).float().mean()) if retain.any() else None
        counts["target_wrong"] = sum(wrong[d] for d in trained)
    return counts


def confusion(preds: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Counts by (true digit, predicted digit)."""
    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    return matrix.tolist()


def evaluate_classifier(
    base: nn.Module,
    tuned: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    merged: nn.Module | None = None,
    trained: list[int] | None = None,
) -> dict[str, Any]:
    """Base, adapter on, adapter off (same model) and merged, on the same images.

    ``merged``, a model loaded from a ``lightning-lora merge`` file, takes raw images: it is
    given ``images`` de-normalised back to pixels, as a user would pass them. ``trained``: the
    digits fine-tuned on, for the accuracy on all the others (what was retained).
    """
    base_logits, on_logits = outputs(base, images), outputs(tuned, images)
    with disable_lora(tuned):
        off_logits = outputs(tuned, images)
    merged_logits = outputs(merge_and_unload(copy.deepcopy(tuned)), images)
    predictions = {"base": base_logits, "adapter_on": on_logits, "adapter_off": off_logits, "merged": merged_logits}
    runs: dict[str, Any] = {n: digit_counts(logits.argmax(1), labels, trained) for n, logits in predictions.items()}
    if merged is not None:
        from lightning_lora.demo.mnist_files import MNIST_MEAN, MNIST_STD

        pixels = ((images * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
        file_preds = torch.cat([merged.predict(chunk) for chunk in pixels.split(EVAL_BATCH)])
        runs["merged_file"] = digit_counts(file_preds, labels, trained)
        runs["merged_file_predictions_equal_unmerged"] = bool(torch.equal(file_preds, on_logits.argmax(1)))
    count = count_parameters(tuned)
    return {
        **runs,
        "test_samples": len(labels),
        "confusion": {
            "base": confusion(base_logits.argmax(1), labels),
            "adapter_on": confusion(on_logits.argmax(1), labels),
        },
        "adapter_off_identical_to_base": bool(torch.equal(off_logits, base_logits)),
        "merged_predictions_equal_unmerged": bool(torch.equal(merged_logits.argmax(1), on_logits.argmax(1))),
        "merged_max_abs_logit_difference": float((merged_logits - on_logits).abs().max()),
        "parameters": {"trainable": count.trainable, "total": count.total, "trainable_percent": count.percent},
        "lora_config": get_lora_config(tuned).to_dict(),
    }


def evaluate_shift(base: nn.Module, tuned: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, shift: float):
    """The low-rank-shift experiment: does the one adapter's update equal the true shift?"""
    layers = dict(lora_layers(tuned))
    if len(layers) != 1:
        raise ValueError(f"the low-rank-shift report expects one adapted layer, found {sorted(layers)}")
    ((name, layer),) = layers.items()

    def mse(net: nn.Module) -> float:
        return float(((outputs(net, inputs) - targets) ** 2).mean())

    delta = layer.delta_weight()
    merged = merge_and_unload(copy.deepcopy(tuned))
    return {
        "adapted_layer": name,
        "shift": shift,
        "delta_mean": float(delta.mean()),
        "delta_std": float(delta.std()),
        "delta_max_abs_deviation": float((delta - shift).abs().max()),
        "mse_base_on_new_data": mse(base),
        "mse_finetuned": mse(tuned),
        "mse_merged_plain_model": mse(merged),
        "merged_model_types": sorted({type(m).__name__ for m in merged.modules()}),
        "adapter_rank": layer.rank,
        "lora_config": LoRAConfig.to_dict(get_lora_config(tuned)),
    }
