"""lightning-lora: LoRA fine-tuning for PyTorch Lightning.

The core (:mod:`lightning_lora.config`, :mod:`lightning_lora.layers`, :mod:`lightning_lora.inject`,
:mod:`lightning_lora.adapter_files`) is pure PyTorch and never imports Lightning; the Lightning
pieces (``LitClassifier``, ``LoRAInjectionCallback``, ``LoRACheckpointMixin``,
``MNISTDataModule``) and the ``lightning-lora`` command build on it::

    from lightning_lora import LoRAConfig, inject_lora, disable_lora, merge_and_unload

    inject_lora(model, LoRAConfig(rank=4, alpha=8, target_modules="all-linear"))
    ...  # train: only the adapters have requires_grad
    with disable_lora(model):
        base_logits = model(x)  # the base model's outputs, bit for bit
    plain = merge_and_unload(model)  # the original layer types again, no lightning_lora needed
"""

from lightning_lora._version import __version__
from lightning_lora.adapter_files import load_adapter, save_adapter
from lightning_lora.config import LoRAConfig
from lightning_lora.inject import (
    ParameterCount,
    base_state_dict,
    count_parameters,
    disable_lora,
    get_lora_config,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    remove_lora,
    unmerge_lora,
    unwrap_model,
)
from lightning_lora.layers import (
    LoRAConv,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMultiheadAttention,
    ModuleToSave,
)
from lightning_lora.models import MLP, RichBoyNet
from lightning_lora.targets import find_targets, plan_targets

# The Lightning pieces load on first use, so the core can be imported without Lightning's
# import cost (or in an environment where only torch is wanted).
_LAZY = {
    "LitClassifier": "lightning_lora.module",
    "LoRACheckpointMixin": "lightning_lora.checkpointing",
    "LoRAInjectionCallback": "lightning_lora.callbacks",
    "MNISTDataModule": "lightning_lora.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = [
    "MLP",
    "LitClassifier",
    "LoRACheckpointMixin",
    "LoRAConfig",
    "LoRAConv",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRAInjectionCallback",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "MNISTDataModule",
    "ModuleToSave",
    "ParameterCount",
    "RichBoyNet",
    "__version__",
    "base_state_dict",
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
    "plan_targets",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
    "unwrap_model",
]
