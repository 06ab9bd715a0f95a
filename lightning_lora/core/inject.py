"""Model surgery: inject adapters, freeze, merge, disable, and read the adapter back out.

Everything here works on any ``nn.Module`` and never imports Lightning, so it serves a
notebook, a plain training loop or the Lightning callback alike. Models wrapped by
``torch.compile``, DDP or Fabric are unwrapped first, so keys are always the plain model's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.layers import LoRALayer, ModuleToSave, keep_base_bias, kept_biases, lora_class_for
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.targets import TargetPlan, log, log_skipped, plan_targets, refuse_oversized

_CONFIG_ATTR = "lora_config"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile``, DDP/DataParallel and Fabric wrappers."""
    while True:
        # torch.compile's wrapper keeps the module it compiled as ``_orig_mod`` and offers no public
        # name for it: the one private attribute of torch this package reads.
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or _is_fabric_wrapper(model):
            model = model.module
        else:
            return model


def _is_fabric_wrapper(model: nn.Module) -> bool:
    """Whether Lightning Fabric wrapped ``model`` (``fabric.setup``); its public ``.module`` is the original.

    Only asked of Fabric when Fabric is loaded already, as it must be to have wrapped anything: the
    core never imports Lightning.
    """
    wrappers = sys.modules.get("lightning.fabric.wrappers")
    return wrappers is not None and isinstance(model, nn.Module) and wrappers.is_wrapped(model)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Every adapted layer, by qualified name (an attention's ``out_proj`` is one of its own)."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModuleToSave]]:
    """Every module trained fully beside the adapters, by qualified name."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, ModuleToSave):
            yield name, module


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config the model's adapters were made with, or ``None`` for a plain model."""
    return getattr(unwrap_model(model), _CONFIG_ATTR, None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


def inject_checked(model: nn.Module, config: LoRAConfig, where: str) -> TargetPlan:
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
    inject_lora(model, config, plan=plan)
    return plan


def inject_lora(model: nn.Module, config: LoRAConfig, *, plan: TargetPlan | None = None) -> nn.Module:
    """Freeze ``model`` and wrap its target layers with adapters, in place.

    Idempotent: a model already adapted with an equal config is returned unchanged, which is
    what lets a Lightning callback inject in ``setup()`` for every stage. On any error the model
    is left as it was.

    Args:
        model: The model to adapt (wrappers are seen through).
        config: What to adapt and how.
        plan: :func:`~lightning_lora.core.targets.plan_targets` of this model and config, when the
            caller made it already (to check the adapter's size, say): targets are planned once.

    Returns:
        The same ``model``, adapted.

    Raises:
        ValueError: bad targets (see :func:`~lightning_lora.core.targets.plan_targets`), a layer that
            cannot take this config (DoRA on an embedding, say), or the model already holds
            adapters made with a different config.
    """
    outer, model = model, unwrap_model(model)
    existing = get_lora_config(model)
    if existing is not None:
        if existing == config:
            return outer
        raise ValueError(
            f"model already holds adapters made with {existing}; refusing to inject {config}. "
            "Use merge_and_unload(model) or start from the plain base model."
        )
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already holds LoRA layers that inject_lora did not make")
    if lora_class_for(model) is not None:
        kind = type(model).__name__
        raise ValueError(f"inject_lora needs a container module, got a bare {kind}; wrap it, e.g. nn.Sequential(layer)")
    plan = plan if plan is not None else plan_targets(model, config)
    layers = {
        name: lora_class_for(module)(module, config.for_layer(*plan.names[name]))
        for name, module in plan.targets.items()
    }
    model.requires_grad_(False)
    for name, layer in layers.items():
        layer.train(plan.targets[name].training)
        for alias in plan.names[name]:
            _set_submodule(model, alias, layer)
    for module in plan.to_save.values():
        saved = ModuleToSave(module)
        for alias in _names_of(model, module):
            _set_submodule(model, alias, saved)
    if config.bias != "none":
        for _, layer in lora_layers(model):
            for bias in layer.bias_names():
                keep_base_bias(layer, bias)
    if config.bias == "all":
        for module in _modules_outside_adapters(model):
            for name, param in list(module.named_parameters(recurse=False)):
                if "bias" in name and param is not None:
                    keep_base_bias(module, name)
    _guard_transformer_fast_paths(model)
    setattr(model, _CONFIG_ATTR, config)
    log_skipped(plan)
    _warn_running_statistics(model)
    return outer


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


def _modules_outside_adapters(model: nn.Module) -> list[nn.Module]:
    """Modules that are neither LoRA layers nor inside one or inside a ModuleToSave."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, (LoRALayer, ModuleToSave)):
            inside.update(id(m) for m in module.modules())
    return [m for m in model.modules() if id(m) not in inside]


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


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (fp32 arithmetic, never into a tied tensor). Idempotent."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Put every merged layer's base weight back exactly. Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _unload(model: nn.Module, merge: bool) -> None:
    """Replace every LoRA layer by its original module (merged or not) and drop the LoRA state."""
    for module, param, _ in kept_biases(model):  # first: some live on the LoRA layers about to leave
        if not merge:
            with torch.no_grad():
                getattr(module, param).copy_(getattr(module, BASE_PREFIX + param))
        delattr(module, BASE_PREFIX + param)
    for _, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        plain = layer.to_base()
        for alias in _names_of(model, layer):
            _set_submodule(model, alias, plain)
    for _, saved in list(saved_modules(model)):
        replacement = saved.trained_module if merge else saved.original_module
        for alias in _names_of(model, saved):
            _set_submodule(model, alias, replacement)
    _restore_transformer_fast_paths(model)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the original layers back holding the merged weights.

    The result contains no lightning_lora types, so it runs (and pickles) without this package;
    a module in ``modules_to_save`` is replaced by its trained copy, and trained biases stay.
    A weight tied to another module is never changed: the merged layer gets its own copy.
    """
    _unload(unwrap_model(model), merge=True)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_lora` entirely: the base model again, adapters and trained biases dropped."""
    _unload(unwrap_model(model), merge=False)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside, outputs equal the un-adapted model's bit for bit.

    Works on merged layers too (they keep the base weight aside), restores trained biases' base
    values for the duration, and puts everything back on exit, also when the block raises.
    """
    plain = unwrap_model(model)
    switches = [m for _, m in lora_layers(plain)] + [m for _, m in saved_modules(plain)]
    before = [m.enabled for m in switches]
    outside = {id(m) for m in _modules_outside_adapters(plain)}
    swapped = [(module, param) for module, param, _ in kept_biases(plain) if id(module) in outside]
    trained = [getattr(module, param).detach().clone() for module, param in swapped]
    try:
        for module in switches:
            module.enabled = False
        with torch.no_grad():
            for module, param in swapped:
                getattr(module, param).copy_(getattr(module, BASE_PREFIX + param))
        yield model
    finally:
        for module, was_enabled in zip(switches, before, strict=True):
            module.enabled = was_enabled
        with torch.no_grad():
            for (module, param), values in zip(swapped, trained, strict=True):
                getattr(module, param).copy_(values)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that make up the adapter, by state-dict key (not copies).

    These are the factors (and DoRA magnitudes) of every adapted layer, every trained bias, and
    the full state of every ``modules_to_save`` copy. Selection is structural, never by
    substring, so a base module that happens to be called ``lora_head`` is not swept in.
    """
    model = unwrap_model(model)
    if get_lora_config(model) is None:
        raise ValueError("model holds no adapters; call inject_lora(model, config) first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        for attr in layer.adapter_names:
            if hasattr(layer, attr):
                tensors[f"{name}.{attr}"] = getattr(layer, attr)
    for module, param, qualified in kept_biases(model):
        tensors[qualified] = getattr(module, param)
    for name, saved in saved_modules(model):
        for key, tensor in saved.trained_module.state_dict(keep_vars=True).items():
            tensors[f"{name}.trained_module.{key}"] = tensor
    return tensors


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, detached: all that must be saved to rebuild it on the same base."""
    return {k: v.detach() for k, v in adapter_tensors(model).items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state as it was before injection, by the plain model's keys.

    Merged weights, trained biases and ``modules_to_save`` copies are all seen through: this is
    what a fingerprint of the base is taken of, and what "the base is unchanged" means.
    """
    model = unwrap_model(model)
    state = dict(model.state_dict())  # merged layers already report their base weights
    if get_lora_config(model) is None:
        return state
    for key in adapter_tensors(model):
        state.pop(key, None)
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
