"""Reading the adapters back out of a model: their live tensors, the base's state, parameter counts.

Selection is structural (the layer family's own tensors, the biases kept beside a base value, the
trained copies of ``modules_to_save``), never by substring, so checkpoints, files and fingerprints
all agree on which tensors are the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_lora.core.layers import kept_biases
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.model_state import adapter_configs, lora_layers, saved_modules, unwrap_model


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The live tensors that make up the adapters, by state-dict key (not copies).

    These are the factors (and DoRA magnitudes) of every adapted layer, every trained bias, and
    the full state of every ``modules_to_save`` copy. Selection is structural, never by
    substring, so a base module that happens to be called ``lora_head`` is not swept in.

    Args:
        adapter_name: Only this adapter's tensors (the biases and modules it trains belong to the
            model's first adapter). ``None``: every adapter's, as a checkpoint holds them.
    """
    model = unwrap_model(model)
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("model holds no adapters; call inject_lora(model, config) first")
    if adapter_name is not None and adapter_name not in configs:
        raise ValueError(f"model holds no adapter named {adapter_name!r}; its adapters are {list(configs)}")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        for key, adapter in layer.lora_adapters.items():
            if adapter_name in (None, key):
                for attr in layer.adapter_names:
                    if hasattr(adapter, attr):
                        tensors[f"{name}.lora_adapters.{key}.{attr}"] = getattr(adapter, attr)
    if adapter_name not in (None, next(iter(configs))):
        return tensors
    for module, param, qualified in kept_biases(model):
        tensors[qualified] = getattr(module, param)
    for name, saved in saved_modules(model):
        for key, tensor in saved.trained_module.state_dict(keep_vars=True).items():
            tensors[f"{name}.trained_module.{key}"] = tensor
    return tensors


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors (or one adapter's), detached: all that must be saved to rebuild them on the same base."""
    return {k: v.detach() for k, v in adapter_tensors(model, adapter_name).items()}


def base_state_dict(model: nn.Module, residuals: bool = False) -> dict[str, torch.Tensor]:
    """The base model's state as it was before injection, by the plain model's keys.

    Merged weights, PiSSA/OLoRA residuals, trained biases and ``modules_to_save`` copies are all seen through: this is
    what a fingerprint of the base is taken of, and what "the base is unchanged" means. With ``residuals``, a
    PiSSA/OLoRA layer reports the residual it runs on instead: the base a further, plain adapter beside it is made on.
    """
    model = unwrap_model(model)
    state = dict(model.state_dict())  # merged layers already report their base weights
    if not adapter_configs(model):
        return state
    for key in adapter_tensors(model):
        state.pop(key, None)
    for name, layer in lora_layers(model):
        if layer.lora_original_weight is not None and not residuals:  # PiSSA / OLoRA: the layer runs a residual
            state[f"{name}.{layer.weight_name}" if name else layer.weight_name] = layer.lora_original_weight
    for module, param, qualified in kept_biases(model):
        state[qualified] = getattr(module, BASE_PREFIX + param).detach()
    for name, _ in saved_modules(model):
        prefix = f"{name}.original_module."
        for key in [k for k in state if k.startswith(f"{name}.")]:
            value = state.pop(key)
            if key.startswith(prefix):
                state[f"{name}.{key[len(prefix) :]}"] = value
    return state


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters, printed like PEFT's ``print_trainable_parameters``."""
    params = list(unwrap_model(model).parameters())  # deduplicated by nn.Module
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )
