"""One named adapter's tensors inside one layer, and the names PEFT gives adapters."""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.core.config import LoRAConfig

DEFAULT_ADAPTER = "default"
"""The name an adapter gets when none is given (PEFT's; its files keep this one at the folder's root)."""

BASE_SAMPLE = "__base__"
"""In a per-sample adapter list, a sample that runs the base alone (PEFT's name)."""


class LoRAAdapter(nn.Module):
    """One named adapter inside one layer: its factors, scale, dropout and (DoRA) magnitude.

    Registered under the layer's ``lora_adapters``, so its tensors are the keys
    ``<layer>.lora_adapters.<name>.lora_A`` (and ``lora_B``, ``lora_magnitude``). Adapter tensors
    are fp32 whatever the base dtype, so small updates are not lost to rounding.
    """

    def __init__(
        self,
        config: LoRAConfig,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        magnitude_shape: tuple[int, ...],
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.empty(shapes[0], device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(shapes[1], device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(magnitude_shape, device=device, dtype=torch.float32))

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def use_dora(self) -> bool:
        return self.config.use_dora

    def extra_repr(self) -> str:
        return f"{'DoRA' if self.use_dora else 'LoRA'} rank={self.rank}, scale={self.scale:g}"


class SampleRouting:
    """Which rows of a batch each adapter serves (``adapter_per_sample``), the row indices made once per device."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(self.names):
            if name != BASE_SAMPLE:
                groups.setdefault(name, []).append(row)
        self._rows = {name: torch.tensor(rows) for name, rows in groups.items()}
        self._on: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def rows(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Adapter name -> the rows it serves (not the base's), as index tensors on ``device``."""
        if ("rows", device) not in self._on:
            self._on["rows", device] = {name: rows.to(device) for name, rows in self._rows.items()}
        return self._on["rows", device]

    def masks(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Adapter name -> a float32 vector over the batch, 1 at the rows it serves and 0 elsewhere."""
        if ("masks", device) not in self._on:
            masks = {}
            for name, rows in self._rows.items():
                masks[name] = torch.zeros(len(self.names), dtype=torch.float32).index_fill_(0, rows, 1.0).to(device)
            self._on["masks", device] = masks
        return self._on["masks", device]
