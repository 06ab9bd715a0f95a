"""Biases trained beside the adapters (``LoRAConfig.bias``), their base values kept aside for ``disable_lora``."""

from __future__ import annotations

from torch import nn

BASE_PREFIX = "lora_base_"
"""Buffers named ``lora_base_<param>`` hold a trained bias's original values."""


def keep_base_bias(module: nn.Module, name: str) -> None:
    """Make ``module.<name>`` trainable, keeping its present values aside as the base's."""
    param = getattr(module, name)
    if param is None or hasattr(module, BASE_PREFIX + name):
        return
    module.register_buffer(BASE_PREFIX + name, param.detach().clone(), persistent=False)
    param.requires_grad_(True)


def kept_biases(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(module, parameter name, qualified name)`` for every bias trained beside a kept base value."""
    found = []
    for module_name, module in model.named_modules():
        for buffer_name, _ in module.named_buffers(recurse=False):
            if buffer_name.startswith(BASE_PREFIX):
                param = buffer_name[len(BASE_PREFIX) :]
                found.append((module, param, f"{module_name}.{param}" if module_name else param))
    return found
