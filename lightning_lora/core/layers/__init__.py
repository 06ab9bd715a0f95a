"""The LoRA layer family: one shared base, one short class per layer type."""

from __future__ import annotations

from torch import nn

from lightning_lora.core.layers.attention import LoRAMultiheadAttention
from lightning_lora.core.layers.base import (
    BASE_SAMPLE,
    DEFAULT_ADAPTER,
    LoRAAdapter,
    LoRALayer,
    SampleRouting,
    keep_base_bias,
    kept_biases,
)
from lightning_lora.core.layers.conv import LoRAConv
from lightning_lora.core.layers.embedding import LoRAEmbedding
from lightning_lora.core.layers.linear import LoRAConv1D, LoRALinear
from lightning_lora.core.layers.to_save import ModuleToSave

LAYER_TYPES: tuple[type[LoRALayer], ...] = (
    LoRALinear,
    LoRAConv1D,
    LoRAConv,
    LoRAEmbedding,
    LoRAMultiheadAttention,
)
"""Every layer type LoRA can adapt, in the order they are tried."""


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA class that adapts ``module``, or ``None`` if its type cannot be adapted."""
    if isinstance(module, (LoRALayer, ModuleToSave)):
        return None
    return next((cls for cls in LAYER_TYPES if cls.adapts(module)), None)


__all__ = [
    "BASE_SAMPLE",
    "DEFAULT_ADAPTER",
    "LAYER_TYPES",
    "LoRAAdapter",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "ModuleToSave",
    "SampleRouting",
    "keep_base_bias",
    "kept_biases",
    "lora_class_for",
]
