"""Model surgery: inject adapters (one or several, by name), freeze, merge, unload and delete them.

Everything here works on any ``nn.Module`` and never imports Lightning, so it serves a
notebook, a plain training loop or the Lightning callback alike. Models wrapped by
``torch.compile``, DDP or Fabric are unwrapped first (:mod:`~lightning_lora.core.model_state`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_lora.core.active_adapters import set_active_adapters
from lightning_lora.core.config import FROM_WEIGHT_INITS, LoRAConfig
from lightning_lora.core.layers import (
    DEFAULT_ADAPTER,
    LoRAAdapter,
    LoRALayer,
    ModuleToSave,
    keep_base_bias,
    kept_biases,
    lora_class_for,
)
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.model_state import (
    ACTIVE_ATTR,
    CONFIGS_ATTR,
    active_adapter_names,
    adapter_configs,
    check_adapter_name,
    get_lora_config,
    lora_layers,
    modules_outside_adapters,
    names_of,
    record_adapter_config,
    saved_modules,
    set_submodule,
    unwrap_model,
)
from lightning_lora.core.targets import TargetPlan, log, log_skipped, plan_targets, refuse_oversized

__all__ = [  # the model-state names re-exported here are the ones the rest of the package has always imported
    "base_view",
    "delete_adapter",
    "get_lora_config",
    "inject_checked",
    "inject_lora",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "remove_lora",
    "saved_modules",
    "unmerge_lora",
    "unwrap_model",
]


def inject_checked(model: nn.Module, config: LoRAConfig, where: str, adapter_name: str = DEFAULT_ADAPTER) -> TargetPlan:
    """:func:`inject_lora` for a config from outside the code (a file, a command line): targets
    planned once, and a config that would outgrow the model refused before anything is allocated.

    Args:
        where: How the refusal names the config (``"these LoRA settings"``, ``"adapter <folder>"``).

    Returns:
        The plan the adapters were injected by (what was skipped, and why).

    Raises:
        ValueError: as :func:`inject_lora`, or the adapter would hold more numbers than the model.
    """
    plan = plan_targets(model, config)
    refuse_oversized(model, config, where, plan=plan)
    inject_lora(model, config, adapter_name=adapter_name, plan=plan)
    return plan


def inject_lora(
    model: nn.Module, config: LoRAConfig, *, adapter_name: str = DEFAULT_ADAPTER, plan: TargetPlan | None = None
) -> nn.Module:
    """Freeze ``model`` and wrap its target layers with an adapter named ``adapter_name``, in place.

    The first adapter is active and trainable. Injecting again under another name adds a second
    adapter (same or other targets, other rank) that is inactive and frozen until
    :func:`~lightning_lora.core.active_adapters.set_active_adapters` picks it, as PEFT's
    ``add_adapter`` does. Idempotent per name: an adapter of this name with an equal config is
    left as it is, which is what lets a Lightning callback inject in ``setup()`` for every stage.
    On any error the model is left as it was.

    Args:
        model: The model to adapt (wrappers are seen through).
        config: What to adapt and how.
        adapter_name: The new adapter's name.
        plan: :func:`~lightning_lora.core.targets.plan_targets` of this model and config, when the
            caller made it already (to check the adapter's size, say): targets are planned once.

    Returns:
        The same ``model``, adapted.

    Raises:
        ValueError: bad targets (see :func:`~lightning_lora.core.targets.plan_targets`), a layer that
            cannot take this config (DoRA on an embedding, say), an adapter of this name made with
            a different config, or a second adapter that would train biases or whole modules.
    """
    outer, model = model, unwrap_model(model)
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    existing = configs.get(adapter_name)
    if existing is not None:
        if existing == config:
            return outer
        raise ValueError(
            f"model already holds an adapter named {adapter_name!r} made with {existing}; refusing to inject "
            f"{config} under that name. Pick another adapter_name, delete_adapter(model, {adapter_name!r}) first, "
            "or start from the plain base model."
        )
    if configs:
        _add_named_adapter(model, config, adapter_name, plan)
        return outer
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already holds LoRA layers that inject_lora did not make")
    if lora_class_for(model) is not None:
        kind = type(model).__name__
        raise ValueError(f"inject_lora needs a container module, got a bare {kind}; wrap it, e.g. nn.Sequential(layer)")
    plan = plan if plan is not None else plan_targets(model, config)
    layers = {
        name: lora_class_for(module)(module, config.for_layer(*plan.names[name]), adapter_name)
        for name, module in plan.targets.items()
    }
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.train(plan.targets[name].training)
        for alias in plan.names[name]:
            set_submodule(model, alias, layer)
    for module in plan.to_save.values():
        saved = ModuleToSave(module)
        for alias in names_of(model, module):
            set_submodule(model, alias, saved)
    if config.bias != "none":
        for _, layer in lora_layers(model):
            for bias in layer.bias_names():
                keep_base_bias(layer, bias)
    if config.bias == "all":
        for module in modules_outside_adapters(model):
            for name, param in list(module.named_parameters(recurse=False)):
                if "bias" in name and param is not None:
                    keep_base_bias(module, name)
    _guard_transformer_fast_paths(model)
    record_adapter_config(model, adapter_name, config)
    setattr(model, ACTIVE_ATTR, [adapter_name])
    log_skipped(plan)
    _warn_running_statistics(model)
    return outer


@contextmanager
def base_view(model: nn.Module) -> Iterator[None]:
    """Inside, the model's adapted layers are their base modules again (the same tensors), so targets
    are planned for a second adapter exactly as for the first; put back on exit."""
    outer = [(name, layer) for name, layer in lora_layers(model) if not _inside_lora(model, name)]
    swapped = [(alias, layer) for _, layer in outer for alias in names_of(model, layer)]
    try:
        for alias, layer in swapped:
            set_submodule(model, alias, layer.base_layer)
        yield
    finally:
        for alias, layer in swapped:
            set_submodule(model, alias, layer)


def _inside_lora(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), LoRALayer) for i in range(1, len(parts)))


def _add_named_adapter(model: nn.Module, config: LoRAConfig, name: str, plan: TargetPlan | None) -> None:
    """Add adapter ``name`` beside the model's others: inactive and frozen, the model otherwise untouched."""
    first_name, first = next(iter(adapter_configs(model).items()))
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(
            f"adapter {name!r} would train biases or whole modules (bias={config.bias!r}, modules_to_save="
            f"{list(config.modules_to_save)}); those belong to the model's first adapter ({first_name!r}). Give a "
            "further adapter bias='none' and no modules_to_save"
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError(f"adding adapter {name!r} to a merged model; call unmerge_lora(model) first")
    if config.init in FROM_WEIGHT_INITS:
        raise ValueError(
            f"adapter {name!r} has init={config.init!r}, which rewrites the base weight the model's other adapters "
            "were made against; only a model's first adapter may use it: inject or load it into the plain base, "
            "give a further adapter init='kaiming', or (a saved one) save it with convert_to_lora=True for a plain one"
        )
    if plan is None:
        with base_view(model):
            plan = plan_targets(model, config)
    fresh: dict[str, LoRALayer] = {}
    pending: list[tuple[LoRALayer, LoRAAdapter]] = []
    for target, module in plan.targets.items():
        layer_config = config.for_layer(*plan.names[target])
        live = model.get_submodule(target)
        if isinstance(live, LoRALayer):
            pending += [(part, part.new_adapter(layer_config)) for part in (live, *live.companion_layers())]
        else:
            fresh[target] = lora_class_for(module)(module, layer_config, name)
    active = active_adapter_names(model)
    for layer, adapter in pending:
        adapter.requires_grad_(False)
        layer.add_adapter(name, adapter)
    for target, layer in fresh.items():
        layer.requires_grad_(False)
        layer.train(plan.targets[target].training)
        for part in (layer, *layer.companion_layers()):
            part.active_adapters = list(active)
        for alias in plan.names[target]:
            set_submodule(model, alias, layer)
    _guard_transformer_fast_paths(model)
    record_adapter_config(model, name, config)
    log_skipped(plan)


def _warn_running_statistics(model: nn.Module) -> None:
    """Normalisation layers that track running statistics change the frozen base in train mode."""
    tracking = [
        name
        for name, module in model.named_modules()
        if getattr(module, "track_running_stats", False)
        and getattr(module, "running_mean", None) is not None
        and not any(name.startswith(saved + ".") or name == saved for saved, _ in saved_modules(model))
    ]
    if tracking:
        log.warning(
            "LoRA: %d normalisation layer(s) (%s) update their running statistics in train mode, which changes the "
            "frozen base (disable_lora would no longer give it back): keep them in eval mode while training, or "
            "list them in modules_to_save",
            len(tracking),
            ", ".join(tracking[:4]) + (", ..." if len(tracking) > 4 else ""),
        )


_FAST_PATH_FLAGS = {nn.TransformerEncoderLayer: "activation_relu_or_gelu", nn.TransformerEncoder: "use_nested_tensor"}
_SAVED_FLAG = "_lora_fast_path_flag"


def _guard_transformer_fast_paths(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoderLayer``'s inference fast path away from adapted layers.

    That path (and ``nn.TransformerEncoder``'s nested-tensor path built on it) reads
    ``self_attn``, ``linear1`` and ``linear2`` weights directly and would skip an unmerged adapter
    silently. They check plain flags nothing else reads (the layer's
    ``activation_relu_or_gelu``, the encoder's ``use_nested_tensor``; the slow path calls
    ``activation`` itself), so those are cleared while adapters are inside and restored when
    they leave: per module, exception-safe, and it compiles whole.
    """
    for parent in model.modules():
        flag = next((f for t, f in _FAST_PATH_FLAGS.items() if isinstance(parent, t)), None)
        if flag and _SAVED_FLAG not in parent.__dict__ and any(isinstance(m, LoRALayer) for m in parent.modules()):
            parent.__dict__[_SAVED_FLAG] = getattr(parent, flag)
            setattr(parent, flag, False)


def _restore_transformer_fast_paths(model: nn.Module) -> None:
    for parent in model.modules():
        if _SAVED_FLAG in parent.__dict__:
            flag = next(f for t, f in _FAST_PATH_FLAGS.items() if isinstance(parent, t))
            setattr(parent, flag, parent.__dict__.pop(_SAVED_FLAG))


def merge_lora(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold adapters (the active ones by default) into their layers' weights (fp32 arithmetic, never into a
    tied tensor). Idempotent."""
    names = _known_names(model, adapter_names)
    for _, layer in lora_layers(model):
        layer.merge(names)
    return model


def unmerge_lora(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Take merged adapters (all by default) out of the weights again; with none left, every base weight is
    back exactly. Idempotent."""
    names = None if adapter_names is None else _known_names(model, adapter_names)
    for _, layer in lora_layers(model):
        layer.unmerge(names)
    return model


def _known_names(model: nn.Module, names: list[str] | str | None) -> list[str]:
    """``names`` (the active adapters when ``None``), each checked to be one of the model's adapters."""
    if names is None:
        return active_adapter_names(model)
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_configs(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"model holds no adapter named {unknown[0]!r}; its adapters are {list(known)}")
    return names


def _unload(model: nn.Module, merge: bool, adapter_names: list[str] | None = None) -> None:
    """Replace every LoRA layer by its original module (merged or not) and drop the LoRA state."""
    for module, param, _ in kept_biases(model):  # first: some live on the LoRA layers about to leave
        if not merge:
            with torch.no_grad():
                getattr(module, param).copy_(getattr(module, BASE_PREFIX + param))
        delattr(module, BASE_PREFIX + param)
    names = _known_names(model, adapter_names) if merge and adapter_configs(model) else []
    for _, layer in list(lora_layers(model)):
        layer.unmerge()
        if merge:
            layer.merge(names)
        else:
            layer.restore_original_weight()  # PiSSA / OLoRA left the layer a residual
        plain = layer.to_base()
        for alias in names_of(model, layer):
            set_submodule(model, alias, plain)
    for _, saved in list(saved_modules(model)):
        replacement = saved.trained_module if merge else saved.original_module
        for alias in names_of(model, saved):
            set_submodule(model, alias, replacement)
    _restore_transformer_fast_paths(model)
    for attr in (CONFIGS_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge adapters (the active ones by default), then put the original layers back holding the merged weights.

    The result contains no lightning_lora types, so it runs (and pickles) without this package;
    a module in ``modules_to_save`` is replaced by its trained copy, and trained biases stay.
    A weight tied to another module is never changed: the merged layer gets its own copy.
    """
    _unload(unwrap_model(model), merge=True, adapter_names=adapter_names)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_lora` entirely: the base model again, adapters and trained biases dropped."""
    _unload(unwrap_model(model), merge=False)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` from every layer; a layer left with none is its base module again.

    If it was active, the first remaining adapter becomes active (PEFT's rule). Deleting the
    model's only adapter is :func:`remove_lora`. Nothing changes on an error.

    Raises:
        ValueError: no adapter of that name, it is merged, or it trains biases or whole modules
            while other adapters remain.
    """
    model = unwrap_model(model)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"model holds no adapter named {adapter_name!r}; its adapters are {list(configs)}")
    if any(adapter_name in layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_lora(model) before deleting it")
    if len(configs) == 1:
        return remove_lora(model)
    config = configs[adapter_name]
    if config.init in FROM_WEIGHT_INITS:
        raise ValueError(
            f"adapter {adapter_name!r} (init={config.init!r}) left the layers their residual weights, which the "
            "model's other adapters were made against; delete the others first, or remove_lora(model)"
        )
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(
            f"adapter {adapter_name!r} trains biases or whole modules that the model's other adapters run with; "
            "delete the others first, or remove_lora(model)"
        )
    if any(layer.sample_adapters is not None for _, layer in lora_layers(model)):
        raise ValueError(f"deleting adapter {adapter_name!r} inside an adapter_per_sample block; leave the block first")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        if adapter_name in layer.lora_adapters:
            layer.delete_adapter(adapter_name)
    emptied = [(name, layer) for name, layer in lora_layers(model) if not layer.lora_adapters]
    for name, layer in emptied:
        if not _inside_lora(model, name):  # an attention's out_proj goes with its attention
            plain = layer.to_base()
            for alias in names_of(model, layer):
                set_submodule(model, alias, plain)
    del getattr(model, CONFIGS_ATTR)[adapter_name]
    active = [n for n in active_adapter_names(model) if n != adapter_name] or [next(iter(adapter_configs(model)))]
    set_active_adapters(model, active)
    return model
