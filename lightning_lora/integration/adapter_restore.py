"""Re-creating a LoRA run's adapters from its checkpoint, without Lightning.

A LoRA checkpoint (written by ``LoRACheckpointMixin``) holds a ``lightning_lora`` section: where the
adapters live in the module, the LoRA config, a fingerprint of the frozen base, and which keys its
state holds. :func:`restore_adapters` re-injects the adapters into a module built from its own
``__init__``, checks the base against the fingerprint (naming the first tensor that differs) and
the saved keys against the adapter's, and fills the state with the module's own base tensors, so
that a strict ``load_state_dict`` restores the run. The mixin's ``on_load_checkpoint`` and the
commands that rebuild a run without Lightning (``export``, ``merge``, ``report``) both use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lora.core.active_adapters import set_active_adapters
from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.fingerprint import fingerprint, first_difference
from lightning_lora.core.inject import get_lora_config, inject_checked, inject_lora
from lightning_lora.core.layers import DEFAULT_ADAPTER, LoRAAdapter, kept_biases
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.model_state import active_adapter_names, adapter_configs, primary_adapter_name
from lightning_lora.core.safe_io import non_finite_names
from lightning_lora.errors import DataError, NonFiniteWeightsError, UsageError

CHECKPOINT_KEY = "lightning_lora"
FORMAT_VERSION = 1
LEGACY_CONFIG_KEY = "lora_config"  # full checkpoints of the first release held the config here


def resolve_module_path(root: nn.Module, path: str | None) -> tuple[str, nn.Module | None]:
    """The module that holds (or will hold) the adapters, and its path from ``root``.

    Default: ``root.net`` when ``root`` has a ``net`` attribute (built or still ``None``, for a
    net built in ``configure_model``), else ``root`` itself. ``None`` means "not built yet".

    Raises:
        UsageError: a path segment does not exist, or names something that is not a module.
    """
    if path is None:
        return ("net", root.net) if hasattr(root, "net") else ("", root)
    module: Any = root
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if module is None or not hasattr(module, part):
            where = ".".join(parts[:i]) or type(root).__name__
            children = [n for n, _ in module.named_children()] if isinstance(module, nn.Module) else []
            raise UsageError(
                f"module_path {path!r}: {where} has no attribute {part!r}; its submodules are {children}. "
                "Set module_path to the dotted attribute path of the network to adapt, e.g. 'net' or 'model.backbone'"
            )
        module = getattr(module, part)
    if module is not None and not isinstance(module, nn.Module):
        raise UsageError(f"module_path {path!r} names a {type(module).__name__}, not an nn.Module")
    return path, module


def adapted_submodule(root: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of the submodule holding LoRA adapters, or ``None``."""
    for name, module in root.named_modules():
        if get_lora_config(module) is not None:
            return name, module
    return None


def frozen_parameter_keys(root: nn.Module) -> list[str]:
    """The base's parameters: frozen ones that belong to no adapter (an inactive adapter is frozen too)."""
    adapters = {id(p) for m in root.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()}
    return [
        n for n, p in root.named_parameters(remove_duplicate=False) if not p.requires_grad and id(p) not in adapters
    ]


def base_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint leaves to the module itself: frozen parameters (base values while merged)
    and the base values of trained biases."""
    state = root.state_dict(keep_vars=True)  # merged layers report their base weights here
    tensors = {k: state[k].detach() for k in frozen_parameter_keys(root) if k in state}
    for module, param, qualified in kept_biases(root):
        tensors[qualified] = getattr(module, BASE_PREFIX + param).detach()
    return tensors


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights that hold NaN or infinity (the message names them)."""
    bad = non_finite_names(state)
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:5])}). "
            "The last checkpoint written before this one is intact; resume from it with a lower learning rate "
            "(lightning-lora: --ckpt_path <that checkpoint> --model.lr_on_resume <lower lr>)."
        )


def restore_adapters(root: nn.Module, checkpoint: dict[str, Any], base_hint: str) -> None:
    """Prepare ``root`` (and the checkpoint) so that a strict ``load_state_dict`` restores the run.

    LoRA checkpoints: re-inject, and check the base against the fingerprint. Adapter-only ones:
    check the saved keys are exactly the adapter's and fill the checkpoint's state with the base
    tensors from ``root`` itself. Full ones (written under a strategy that loads the state itself,
    FSDP) are loaded by that strategy strictly, before this hook, so the keys the state holds are
    checked there. Checkpoints without a LoRA section: inject from a first-release config if there
    is one, and refuse a pretraining checkpoint for a model that already holds adapters.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        _restore_full(root, checkpoint)
        return
    meta = _checked_meta(meta)
    path, target = resolve_module_path(root, meta["module_path"])
    if target is None:
        raise UsageError(f"the checkpoint's adapters live in '{path}', which this module has not built")
    _inject(target, LoRAConfig.from_dict(meta["lora_config"]), meta.get("primary_adapter", DEFAULT_ADAPTER), meta)
    _inject_further_adapters(target, meta)
    problem = first_difference(meta["base_fingerprint"], _fingerprint_of(root))
    if problem:
        raise UsageError(
            f"this base model is not the one the checkpoint's adapters were trained on: {problem}. {base_hint}"
        )
    state = checkpoint.get("state_dict")
    if state is None:  # the strategy loaded it (strictly) before this hook: FSDP and its kind
        if meta.get("adapter_only", True):
            raise UsageError(
                "this checkpoint holds adapters only, but the strategy loads a checkpoint's state before the module "
                "can add the frozen base to it (FSDP, DeepSpeed): resume it with the strategy that wrote it"
            )
        _refuse_non_finite({k: v for k, v in root.state_dict().items() if k in set(meta["saved_keys"])})
        return
    if not meta.get("adapter_only", True):
        return  # a full checkpoint: Lightning's strict load_state_dict compares every key
    frozen = set(frozen_parameter_keys(root))
    live = root.state_dict()
    expected = {k for k in live if k not in frozen}
    saved, values = set(state), state
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise DataError(
            f"the checkpoint's saved tensors do not match this model's adapters: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}. Resume with the same module and LoRA settings."
        )
    wrong = [
        f"{k} {tuple(v.shape)} in the checkpoint, {tuple(live[k].shape)} in the model"
        for k, v in values.items()
        if torch.is_tensor(v) and tuple(v.shape) != tuple(live[k].shape)
    ]
    if wrong:
        raise DataError(
            f"the checkpoint's saved tensors do not fit this model's adapters: {'; '.join(wrong[:4])}. It was altered "
            "after it was written, or comes from other LoRA settings; use another checkpoint of the run"
        )
    _refuse_non_finite(values)
    state.update({k: live[k] for k in frozen if k in live})


def _refuse_non_finite(values: dict[str, Any]) -> None:
    bad = non_finite_names(values)
    if bad:
        raise DataError(
            f"the checkpoint holds NaN or infinite values in {', '.join(bad[:5])}: it was damaged after it was "
            "written (lightning-lora never writes such a checkpoint); use another checkpoint of the run"
        )


def _restore_full(root: nn.Module, checkpoint: dict[str, Any]) -> None:
    """A full checkpoint: a pretraining one, or a LoRA one from the first release (config top-level)."""
    legacy = checkpoint.get(LEGACY_CONFIG_KEY)
    _, target = resolve_module_path(root, None)
    if legacy is not None:
        _inject(target, LoRAConfig.from_dict(legacy))
    elif adapted_submodule(root) is not None:
        raise UsageError(
            "this checkpoint holds no LoRA adapters, but the model has them: it looks like a pretraining "
            "checkpoint passed as --ckpt_path to a LoRA run. ckpt_path resumes an interrupted run of the same "
            "kind; to start fine-tuning from pretrained weights, pass them as --model.base_checkpoint instead."
        )


def _fingerprint_of(root: nn.Module) -> dict[str, dict[str, Any]]:
    cached = getattr(root, "base_fingerprint", None)  # LoRACheckpointMixin hashes the frozen base once
    return cached() if callable(cached) else fingerprint(base_tensors(root))


def refuse_other_lora_settings(recorded: LoRAConfig, current: LoRAConfig, adapter: str | None = None) -> None:
    """Refuse a resume whose LoRA settings differ from the checkpoint's, naming each field and both values."""
    differences = ", ".join(
        f"{name} {getattr(recorded, name)!r} in the checkpoint, {getattr(current, name)!r} now"
        for name in LoRAConfig.field_names()
        if getattr(recorded, name) != getattr(current, name)
    )
    if differences:
        whose = f"'s adapter {adapter!r}" if adapter else ""
        raise UsageError(
            f"the checkpoint{whose} was trained with other LoRA settings "
            f"({differences}); use the LoRA settings of the "
            "run that wrote it (the --lora options, e.g. --lora.rank, and the same folders in --lora.load_adapters), "
            "or start a new run without --ckpt_path"
        )


def further_adapters_record(target: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of a network's adapters beyond its primary one (nothing for one adapter)."""
    primary = primary_adapter_name(target)
    others = {n: c.to_dict() for n, c in adapter_configs(target).items() if n != primary}
    if not others and primary == DEFAULT_ADAPTER:
        return {}
    return {"primary_adapter": primary, "further_adapters": others, "active_adapters": active_adapter_names(target)}


def _inject_further_adapters(target: nn.Module, meta: dict[str, Any]) -> None:
    """Re-create the adapters a checkpoint holds beside its primary one, and which were active."""
    further, active = meta.get("further_adapters", {}), meta.get("active_adapters")
    if not isinstance(further, dict) or not all(isinstance(v, dict) for v in further.values()):
        raise DataError(f"the checkpoint's '{CHECKPOINT_KEY}' section is damaged: further_adapters is not a mapping")
    held = adapter_configs(target)
    try:
        for name, config in further.items():
            if name in held:  # made by the callback: its settings must be the checkpoint's
                refuse_other_lora_settings(LoRAConfig.from_dict(config), held[name], name)
                continue
            inject_lora(target, LoRAConfig.from_dict(config), adapter_name=name)
        if active is not None:
            set_active_adapters(target, active)
    except (TypeError, ValueError) as err:
        raise UsageError(f"the checkpoint's adapters do not fit this model: {err}") from err


def _other_adapters(meta: dict[str, Any], names: list[str]) -> str:
    """Why a model's adapters are not the checkpoint's, with the options that rebuild them."""
    primary = meta.get("primary_adapter", DEFAULT_ADAPTER)
    held = [primary, *(meta.get("further_adapters") or {})]
    if len(held) == 1:
        return (
            f"the checkpoint's adapter is named {primary!r}, this model's are {names}: use the adapter name it was "
            f"trained under (--lora.adapter_name {primary}), or start a new run"
        )
    trained = meta.get("active_adapters") or held[-1:]
    loaded = [n for n in held if n not in trained]
    return (
        f"the checkpoint holds adapters {held} ({trained} trained, {loaded} loaded), this model's are {names}: use "
        f"the run's own --lora.adapter_name {trained[0]} and --lora.load_adapters naming {loaded} (the same "
        "folders), or start a new run"
    )


def _inject(
    target: nn.Module, config: LoRAConfig, name: str = DEFAULT_ADAPTER, meta: dict[str, Any] | None = None
) -> None:
    names = adapter_configs(target)
    meta = meta or {"primary_adapter": name}
    if names and set(names) != {name, *(meta.get("further_adapters") or {})}:
        raise UsageError(_other_adapters(meta, list(names)))
    existing = names.get(name)
    if existing is not None:
        refuse_other_lora_settings(config, existing, name if len(names) > 1 else None)
        return
    try:
        inject_checked(target, config, "the checkpoint's LoRA config", adapter_name=name)
    except ValueError as err:
        raise UsageError(f"the checkpoint's LoRA config does not fit this model: {err}") from err


def _checked_meta(meta: Any) -> dict[str, Any]:
    """The checkpoint's LoRA section, every field present and of the right type."""
    shape = {
        "format_version": int,
        "module_path": str,
        "lora_config": dict,
        "base_fingerprint": dict,
        "saved_keys": list,
    }
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in shape.items()):
        raise DataError(f"the checkpoint's '{CHECKPOINT_KEY}' section is damaged; expected the fields {sorted(shape)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise UsageError(
            f"the checkpoint's LoRA section has format version {meta['format_version']}, newer than this "
            f"lightning-lora reads ({FORMAT_VERSION}); upgrade lightning-lora"
        )
    return meta
