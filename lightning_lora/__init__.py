"""lightning-lora: LoRA fine-tuning for PyTorch Lightning.

The core (:mod:`lightning_lora.lora`, :mod:`lightning_lora.inject`) is pure PyTorch::

    from lightning_lora import LoRAConfig, inject_lora, disable_lora, merge_and_unload

    inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules="all-linear"))
    ...  # train: only the adapters have requires_grad
    with disable_lora(model):
        base_logits = model(x)  # the base model's outputs, bit for bit
    plain = merge_and_unload(model)  # plain nn.Linear layers, no lightning_lora needed
"""

from lightning_lora._version import __version__
from lightning_lora.inject import (
    ParameterCount,
    base_fingerprint,
    count_parameters,
    disable_lora,
    find_targets,
    get_lora_config,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lightning_lora.lora import LoRAConfig, LoRALinear, ModuleToSave

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "ModuleToSave",
    "ParameterCount",
    "__version__",
    "base_fingerprint",
    "count_parameters",
    "disable_lora",
    "find_targets",
    "get_lora_config",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "save_adapter",
    "unmerge_lora",
]
