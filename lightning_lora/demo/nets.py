"""Base networks as plain ``nn.Module``s: no LoRA, no Lightning.

Each records its constructor arguments in ``init_args`` so a checkpoint can name the class and
arguments needed to rebuild it (``LitClassifier.load_from_checkpoint`` works without a config).
"""

from __future__ import annotations

import torch
from torch import nn


class RichBoyNet(nn.Module):
    """The classic LoRA-tutorial network: 784-1000-2000-10 with ReLU (2,807,010 parameters).

    Deliberately oversized for MNIST, so that the trainable share of a rank-1 adapter (0.24%)
    makes the point of LoRA.
    """

    def __init__(
        self, hidden_size_1: int = 1000, hidden_size_2: int = 2000, num_features: int = 784, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.init_args = {
            "hidden_size_1": hidden_size_1,
            "hidden_size_2": hidden_size_2,
            "num_features": num_features,
            "num_classes": num_classes,
        }
        self.linear1 = nn.Linear(num_features, hidden_size_1)
        self.linear2 = nn.Linear(hidden_size_1, hidden_size_2)
        self.linear3 = nn.Linear(hidden_size_2, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)  # (batch, 1, 28, 28) -> (batch, 784)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


class MLP(nn.Module):
    """A configurable multilayer perceptron: Linear + ReLU per hidden size, then a linear head.

    The default 784-128-256-10 has 136,074 parameters.
    """

    def __init__(self, hidden_sizes: list[int] | None = None, num_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        hidden_sizes = [128, 256] if hidden_sizes is None else list(hidden_sizes)
        if not hidden_sizes or any(not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"MLP.hidden_sizes must be a non-empty list of positive integers, got {hidden_sizes!r}")
        self.init_args = {"hidden_sizes": hidden_sizes, "num_features": num_features, "num_classes": num_classes}
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(start_dim=1))


class LinearModel(nn.Module):
    """One linear layer, ``y = W x`` (no bias by default): the smallest model LoRA can adapt.

    Used by the low-rank-shift experiment, where a rank-1 adapter must recover a shift of the
    true weights by a matrix of ones exactly.
    """

    def __init__(self, num_features: int = 1001, num_outputs: int = 1000, bias: bool = False) -> None:
        super().__init__()
        self.init_args = {"num_features": num_features, "num_outputs": num_outputs, "bias": bias}
        self.linear = nn.Linear(num_features, num_outputs, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
