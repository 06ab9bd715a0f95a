"""What an adapter has learned, per layer: how large its update is beside the base weight, and its spectrum.

Two failures no loss curve shows: an adapter that collapses to one direction (its singular values
fall to one large and ``r - 1`` near zero: a rank-r adapter doing rank-1 work), and one that grows
past its base (``delta_norm_ratio`` near or above 1: the fine-tune rewrites rather than adapts).

The update is ``scale * B A``; its singular values come from the factors (a QR of each and the SVD
of an ``r x r`` product), so a 4096 x 4096 layer costs what its rank costs, not a full SVD. For
DoRA the magnitude's rescaling is not part of it: the numbers describe the low-rank direction
update. A grouped convolution's update is block-diagonal over its groups; its singular values are
those of every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_lora.core.inject import lora_layers
from lightning_lora.core.layers.base import LoRAAdapter, LoRALayer


@dataclass(frozen=True)
class AdapterStats:
    """One adapted layer's numbers (:func:`adapter_stats`).

    Attributes:
        name: The layer's qualified name in the model.
        adapter: The adapter's name.
        rank: The adapter's rank ``r``.
        delta_norm_ratio: ``||scale B A||_F / ||W||_F`` (0 at initialisation; inf for a zero base weight).
        singular_values: The update's singular values, largest first (``rank`` of them per group).
    """

    name: str
    adapter: str
    rank: int
    delta_norm_ratio: float
    singular_values: list[float]

    @property
    def effective_rank(self) -> float:
        """``exp`` of the entropy of the normalised singular values (Roy and Vetterli, 2007): ``rank`` when
        every direction weighs alike, 1 for an adapter collapsed to one direction, 0 before training."""
        values = torch.tensor(self.singular_values, dtype=torch.float64)
        total = values.sum()
        if not total > 0:
            return 0.0
        shares = values[values > 0] / total
        return float(torch.exp(-(shares * shares.log()).sum()))


def update_singular_values(layer: LoRALayer, adapter: LoRAAdapter | None = None) -> torch.Tensor:
    """The singular values of ``scale * B A`` (of ``adapter``, the layer's primary one by default),
    largest first, in fp32, from the factors alone."""
    adapter = adapter if adapter is not None else layer.primary
    groups = layer.factor_groups()
    with torch.no_grad():
        a = adapter.lora_A.detach().float().reshape(groups, adapter.rank, -1)  # (g, r, in)
        b = adapter.lora_B.detach().float().reshape(groups, -1, adapter.rank)  # (g, out, r)
        r_b = torch.linalg.qr(b, mode="r").R  # (g, r, r): B = Q_b R_b
        r_a = torch.linalg.qr(a.transpose(1, 2), mode="r").R  # (g, r, r): A^T = Q_a R_a
        values = torch.linalg.svdvals(r_b @ r_a.transpose(1, 2)).flatten() * abs(adapter.scale)
    return values.sort(descending=True).values


def adapter_stats(model: nn.Module) -> list[AdapterStats]:
    """Per adapted layer and adapter: its rank, how large its update is beside the base weight, its spectrum.

    Args:
        model: A model with adapters (``inject_lora``), merged or not.

    Returns:
        One :class:`AdapterStats` per adapted layer and adapter it holds, in module order (an
        attention's ``out_proj`` is a layer of its own), adapters in the order they were added.
    """
    stats = []
    for name, layer in lora_layers(model):
        base_norm = float(torch.linalg.vector_norm(layer.base_weight().detach().float()))
        for adapter_name, adapter in layer.lora_adapters.items():
            values = update_singular_values(layer, adapter)
            update_norm = float(torch.linalg.vector_norm(values))
            ratio = update_norm / base_norm if base_norm > 0 else (0.0 if update_norm == 0 else float("inf"))
            stats.append(AdapterStats(name, adapter_name, adapter.rank, ratio, values.tolist()))
    return stats
