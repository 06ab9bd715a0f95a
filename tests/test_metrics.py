"""Per-digit metrics and the confusion-matrix image."""

from __future__ import annotations

import torch

from lightning_lora.demo.digit_metrics import DigitMetrics, confusion_image


def test_micro_accuracy_and_per_digit_counts_on_a_one_digit_subset():
    metrics = DigitMetrics()
    targets = torch.full((20,), 9)
    preds = targets.clone()
    preds[:5] = 4
    metrics.update(torch.tensor(0.5), preds, targets)
    metrics.update(torch.tensor(1.5), torch.tensor([9, 9]), torch.tensor([9, 9]))  # weighted by batch size
    values, confusion = metrics.compute()
    assert values["acc"] == 17 / 22  # micro; the macro average would be far lower
    assert values["wrong_digit_9"] == 5 and values["acc_digit_9"] == 17 / 22
    assert not any(k.endswith("_4") for k in values)  # digit 4 has no support: not reported
    assert torch.isclose(values["loss"], torch.tensor((0.5 * 20 + 1.5 * 2) / 22))
    assert confusion[9, 4] == 5 and confusion.sum() == 22
    metrics.reset()
    metrics.update(torch.tensor(0.0), torch.tensor([1]), torch.tensor([1]))
    assert metrics.compute()[0]["acc"] == 1


def test_confusion_image_is_rgb():
    confusion = torch.randint(0, 50, (10, 10))
    image = confusion_image(confusion, "test/confusion_matrix")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert image.min() < image.max()
