"""lightning-lora: LoRA fine-tuning for PyTorch Lightning.

The core (:mod:`lightning_lora.core.config`, :mod:`lightning_lora.core.layers`, :mod:`lightning_lora.core.inject`,
:mod:`lightning_lora.core.adapter_folder`) is pure PyTorch and never imports Lightning; the Lightning
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
    "load_adapter": "lightning_lora.core.adapter_folder",
    "save_adapter": "lightning_lora.core.adapter_folder",
    "LoRAConfig": "lightning_lora.core.config",
    "ParameterCount": "lightning_lora.core.adapter_tensors",
    "base_state_dict": "lightning_lora.core.adapter_tensors",
    "count_parameters": "lightning_lora.core.adapter_tensors",
    "disable_lora": "lightning_lora.core.active_adapters",
    "adapter_per_sample": "lightning_lora.core.active_adapters",
    "lora_adapter_names": "lightning_lora.core.active_adapters",
    "set_active_adapters": "lightning_lora.core.active_adapters",
    "use_adapters": "lightning_lora.core.active_adapters",
    "delete_adapter": "lightning_lora.core.inject",
    "get_lora_config": "lightning_lora.core.inject",
    "inject_lora": "lightning_lora.core.inject",
    "lora_layers": "lightning_lora.core.inject",
    "lora_state_dict": "lightning_lora.core.adapter_tensors",
    "merge_and_unload": "lightning_lora.core.inject",
    "merge_lora": "lightning_lora.core.inject",
    "remove_lora": "lightning_lora.core.inject",
    "unmerge_lora": "lightning_lora.core.inject",
    "unwrap_model": "lightning_lora.core.inject",
    "lora_plus_param_groups": "lightning_lora.core.lora_plus",
    "add_weighted_adapter": "lightning_lora.core.weighted_merge",
    "hotswap_adapter": "lightning_lora.core.hotswap",
    "prepare_hotswap": "lightning_lora.core.hotswap",
    "AdapterStats": "lightning_lora.core.diagnostics",
    "adapter_stats": "lightning_lora.core.diagnostics",
    "LoRAConv": "lightning_lora.core.layers",
    "LoRAConv1D": "lightning_lora.core.layers",
    "LoRAEmbedding": "lightning_lora.core.layers",
    "LoRALayer": "lightning_lora.core.layers",
    "LoRALinear": "lightning_lora.core.layers",
    "LoRAMultiheadAttention": "lightning_lora.core.layers",
    "ModuleToSave": "lightning_lora.core.layers",
    "load_merged": "lightning_lora.demo.merged_model",
    "MLP": "lightning_lora.demo.nets",
    "RichBoyNet": "lightning_lora.demo.nets",
    "find_targets": "lightning_lora.core.targets",
    "plan_targets": "lightning_lora.core.targets",
    "allow_classes": "lightning_lora.integration.class_allowlist",
    "LoRACheckpointMixin": "lightning_lora.integration.checkpoint_mixin",
    "LitClassifier": "lightning_lora.demo.classifiers",
    "LoRAInjectionCallback": "lightning_lora.integration.callback",
    "MNISTDataModule": "lightning_lora.demo.mnist_datamodule",
    "RunRecord": "lightning_lora.integration.run_record",
    "ExactResume": "lightning_lora.integration.exact_resume",
    "ResumableCheckpoint": "lightning_lora.integration.resumable_checkpoint",
    "ResumableDataLoader": "lightning_lora.integration.resumable_loader",
    "EpochShuffle": "lightning_lora.integration.resumable_loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_LAZY)]
