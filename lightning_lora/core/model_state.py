"""What an adapted model holds: its adapters by name, which are active, its adapted layers.

The one place that knows where a model keeps this (plain attributes of the unwrapped model, set by
:mod:`~lightning_lora.core.inject`), and how ``torch.compile``, DDP and Fabric wrappers are seen
through, so keys are always the plain model's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.layers import DEFAULT_ADAPTER, LoRALayer, ModuleToSave

CONFIGS_ATTR = "lora_configs"
"""A model's adapters, name -> config, in the order they were added (a plain attribute of the model)."""
ACTIVE_ATTR = "lora_active_adapters"


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


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """Every adapter of the model by name, in the order they were added (empty for a plain model)."""
    return dict(getattr(unwrap_model(model), CONFIGS_ATTR, {}))


def record_adapter_config(model: nn.Module, name: str, config: LoRAConfig) -> None:
    """Record (or update) adapter ``name``'s config on the model, keeping the order adapters were added in."""
    plain = unwrap_model(model)
    if CONFIGS_ATTR not in plain.__dict__:
        setattr(plain, CONFIGS_ATTR, {})
    getattr(plain, CONFIGS_ATTR)[name] = config


def get_lora_config(model: nn.Module, adapter_name: str | None = None) -> LoRAConfig | None:
    """The config adapter ``adapter_name`` was made with, or ``None`` when the model holds no such adapter.

    Without a name: the primary adapter's (``"default"``, or the first added), ``None`` for a plain model.
    """
    return adapter_configs(model).get(primary_adapter_name(model) if adapter_name is None else adapter_name)


def primary_adapter_name(model: nn.Module) -> str | None:
    """``"default"`` if the model holds it, else the first adapter added (``None`` for a plain model): the
    adapter that single-adapter paths (a PEFT folder, ``get_lora_config(model)``) mean."""
    configs = adapter_configs(model)
    return DEFAULT_ADAPTER if DEFAULT_ADAPTER in configs else next(iter(configs), None)


def owner_adapter_name(model: nn.Module) -> str | None:
    """The first adapter added: the one trained biases and ``modules_to_save`` belong to."""
    return next(iter(adapter_configs(model)), None)


def active_adapter_names(model: nn.Module) -> list[str]:
    """The adapters forward adds, in order (empty for a plain model)."""
    return list(getattr(unwrap_model(model), ACTIVE_ATTR, []))


def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter (a key of a ``ModuleDict``, a folder of PEFT's layout); else a ValueError."""
    if not isinstance(name, str) or not name or "." in name or "/" in name or "\\" in name or name.startswith("__"):
        raise ValueError(
            f"adapter name {name!r} cannot name an adapter: use a non-empty string without '.', '/' or '\\' "
            "that does not start with '__' (e.g. 'default', 'digit9')"
        )
    if hasattr(nn.ModuleDict, name) or name in _MODULE_DICT_FIELDS:
        raise ValueError(
            f"adapter name {name!r} is the name of a torch.nn.Module attribute, which a layer's adapters cannot be "
            f"keyed by; pick another (e.g. '{name}_adapter')"
        )
    return name


_MODULE_DICT_FIELDS = frozenset(vars(nn.ModuleDict()))
"""The instance attributes every ``ModuleDict`` has (``training``, ``_modules``, ...): no adapter key may shadow one."""


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module and n]


def modules_outside_adapters(model: nn.Module) -> list[nn.Module]:
    """Modules that are neither LoRA layers nor inside one or inside a ModuleToSave."""
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, (LoRALayer, ModuleToSave)):
            inside.update(id(m) for m in module.modules())
    return [m for m in model.modules() if id(m) not in inside]
