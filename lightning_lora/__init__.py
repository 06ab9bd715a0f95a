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

# Every name loads on first use: `import lightning_lora` (and the command line's --help) costs
# nothing, the core never pulls in Lightning, and the Lightning pieces load only when asked for.
_LAZY = {
    "load_adapter": "lightning_lora.adapter_files",
    "save_adapter": "lightning_lora.adapter_files",
    "LoRAConfig": "lightning_lora.config",
    "ParameterCount": "lightning_lora.inject",
    "base_state_dict": "lightning_lora.inject",
    "count_parameters": "lightning_lora.inject",
    "disable_lora": "lightning_lora.inject",
    "get_lora_config": "lightning_lora.inject",
    "inject_lora": "lightning_lora.inject",
    "lora_layers": "lightning_lora.inject",
    "lora_state_dict": "lightning_lora.inject",
    "merge_and_unload": "lightning_lora.inject",
    "merge_lora": "lightning_lora.inject",
    "remove_lora": "lightning_lora.inject",
    "unmerge_lora": "lightning_lora.inject",
    "unwrap_model": "lightning_lora.inject",
    "LoRAConv": "lightning_lora.layers",
    "LoRAConv1D": "lightning_lora.layers",
    "LoRAEmbedding": "lightning_lora.layers",
    "LoRALayer": "lightning_lora.layers",
    "LoRALinear": "lightning_lora.layers",
    "LoRAMultiheadAttention": "lightning_lora.layers",
    "ModuleToSave": "lightning_lora.layers",
    "load_merged": "lightning_lora.merged",
    "MLP": "lightning_lora.models",
    "RichBoyNet": "lightning_lora.models",
    "find_targets": "lightning_lora.targets",
    "plan_targets": "lightning_lora.targets",
    "allow_classes": "lightning_lora.trust",
    "LoRACheckpointMixin": "lightning_lora.checkpointing",
    "LitClassifier": "lightning_lora.module",
    "LoRAInjectionCallback": "lightning_lora.callbacks",
    "MNISTDataModule": "lightning_lora.data",
    "RunRecord": "lightning_lora.run_record",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_LAZY)]
