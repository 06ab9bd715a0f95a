"""Adapter-only Lightning checkpoints: ``LoRACheckpointMixin`` for any LightningModule.

A LoRA run's checkpoint needs what the run trains (adapters, trained biases,
``modules_to_save`` copies, and buffers), the optimizer, loop and RNG state Lightning adds, the
LoRA config, and a fingerprint of the frozen base - not the frozen base itself, which the
module's own ``__init__`` (or ``configure_model``) provides again. For RichBoyNet at rank 1 that
is about 1% of the full checkpoint.

On load (``Trainer.fit(ckpt_path=...)``, ``Module.load_from_checkpoint``) the mixin re-creates
the adapters, checks that the base is the one they were trained on (naming the first tensor that
differs), checks the saved keys are exactly the adapter's (strict, never ``strict=False``), and
hands Lightning's strict ``load_state_dict`` the base tensors from the module itself.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_lora.core.config import LoRAConfig
from lightning_lora.core.fingerprint import fingerprint, first_difference
from lightning_lora.core.inject import get_lora_config, inject_lora
from lightning_lora.core.layers import kept_biases
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.targets import refuse_oversized
from lightning_lora.errors import NonFiniteWeightsError, UsageError
from lightning_lora.integration import class_allowlist as trust

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


def _frozen_parameter_keys(root: nn.Module) -> list[str]:
    return [n for n, p in root.named_parameters(remove_duplicate=False) if not p.requires_grad]


def base_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint leaves to the module itself: frozen parameters (base values while merged)
    and the base values of trained biases."""
    state = root.state_dict(keep_vars=True)  # merged layers report their base weights here
    tensors = {k: state[k].detach() for k in _frozen_parameter_keys(root) if k in state}
    for module, param, qualified in kept_biases(root):
        tensors[qualified] = getattr(module, BASE_PREFIX + param).detach()
    return tensors


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights that hold NaN or infinity (the message names them)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:5])}). "
            "The last checkpoint written before this one is intact; resume from it with a lower learning rate "
            "(lightning-lora: --ckpt_path <that checkpoint> --model.lr_on_resume <lower lr>)."
        )


class LoRACheckpointMixin:
    """Adapter-only checkpoints for a LightningModule; inherit it before ``LightningModule``.

    ::

        class MyModule(LoRACheckpointMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = build_pretrained_net()  # the base comes from here on load, too

    If your module overrides ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()``.
    Without adapters (pretraining) checkpoints stay full.
    """

    @property
    def strict_loading(self) -> bool:
        """Lightning's flag, except while an FSDP strategy restores a module that holds adapters.

        FSDP loads a checkpoint's state in the strategy's ``load_checkpoint``, before
        ``on_load_checkpoint`` can fill in the frozen base that an adapter-only checkpoint leaves
        out (the base is in the module already). That load is therefore not strict; right after
        it ``on_load_checkpoint`` checks that the saved keys are exactly the adapter's and that
        the base matches its fingerprint, which is what a strict load would have ensured.
        """
        return super().strict_loading and not _loads_state_before_hooks(self)

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        super(LoRACheckpointMixin, type(self)).strict_loading.__set__(self, value)

    def base_hint(self) -> str:
        """How to give the module the base the adapters were trained on (for the mismatch error)."""
        return f"Build {type(self).__name__} with the base weights the adapters were trained on."

    def _base_fingerprint(self) -> dict[str, dict[str, Any]]:
        tensors = base_tensors(self)
        version = tuple((k, v.data_ptr(), v._version, tuple(v.shape)) for k, v in sorted(tensors.items()))
        cached = getattr(self, "_lora_fingerprint_cache", None)
        if cached is None or cached[0] != version:  # the base is frozen: hash it once per change
            cached = (version, fingerprint(tensors))
            self._lora_fingerprint_cache = cached
        return cached[1]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        found = adapted_submodule(self)
        if found is None:
            check_finite(state, "a checkpoint")
            return
        path, target = found
        for key in _frozen_parameter_keys(self):  # the frozen base is fingerprinted, not written
            state.pop(key, None)
        check_finite(state, "a checkpoint")
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "module_path": path,
            "lora_config": get_lora_config(target).to_dict(),
            "base_fingerprint": self._base_fingerprint(),
            "saved_keys": sorted(state),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_adapters(self, checkpoint, self.base_hint())

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, allow_classes: Iterable[str] = (), **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, after checking that no class path in the file is untrusted.

        Args:
            allow_classes: Your own classes the checkpoint may name (for example the net's), trusted.
        """
        from lightning_lora.integration.checkpoint_reader import read_checkpoint_state  # it builds on this module

        trust.allow_classes(allow_classes)
        checkpoint = read_checkpoint_state(checkpoint_path)
        try:
            trust.check_class_paths(checkpoint, f"checkpoint {checkpoint_path}")
            hyper_parameters = checkpoint.get("hyper_parameters") or {}
            if "_instantiator" in hyper_parameters:  # jsonargparse would import strings in class-typed fields
                trust.check_importable_strings(hyper_parameters, f"checkpoint {checkpoint_path}")
        except RecursionError as err:
            raise ValueError(f"checkpoint {checkpoint_path} is nested too deeply to be a checkpoint") from err
        buffer = io.BytesIO()  # Lightning reads exactly what was checked, not the path a second time
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, *args, **kwargs)


def _loads_state_before_hooks(module: nn.Module) -> bool:
    """Whether ``module``'s Trainer restores it in an FSDP strategy while it holds adapters."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = getattr(module, "_trainer", None)
    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy) and adapted_submodule(module) is not None


def restore_adapters(root: nn.Module, checkpoint: dict[str, Any], base_hint: str) -> None:
    """Prepare ``root`` (and the checkpoint) so that a strict ``load_state_dict`` restores the run.

    Adapter-only checkpoints: re-inject, check the base against the fingerprint, check the saved
    keys are exactly the adapter's, and fill the checkpoint's state with the base tensors from
    ``root`` itself. Where the strategy has taken the state out and loaded it already (FSDP),
    the keys the checkpoint recorded are checked, and the loaded adapter values. Full checkpoints:
    inject from a first-release config if there is one, and refuse a pretraining checkpoint for a
    model that already holds adapters.
    """
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        _restore_full(root, checkpoint)
        return
    meta = _checked_meta(meta)
    path, target = resolve_module_path(root, meta["module_path"])
    if target is None:
        raise UsageError(f"the checkpoint's adapters live in '{path}', which this module has not built")
    _inject(target, LoRAConfig.from_dict(meta["lora_config"]))
    problem = first_difference(meta["base_fingerprint"], _fingerprint_of(root))
    if problem:
        raise UsageError(
            f"this base model is not the one the checkpoint's adapters were trained on: {problem}. {base_hint}"
        )
    state = checkpoint.get("state_dict")
    frozen = set(_frozen_parameter_keys(root))
    live = root.state_dict()
    expected = {k for k in live if k not in frozen}
    if state is None:  # an FSDP strategy has loaded it into the module already (see strict_loading)
        saved, values = set(meta["saved_keys"]), {k: live[k] for k in expected}
    else:
        saved, values = set(state), state
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's saved tensors do not match this model's adapters: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}. Resume with the same module and LoRA settings."
        )
    bad = [k for k, v in values.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"the checkpoint holds NaN or infinite values in {', '.join(bad[:5])}: it was damaged after it was "
            "written (lightning-lora never writes such a checkpoint); use another checkpoint of the run"
        )
    if state is not None:
        state.update({k: live[k] for k in frozen if k in live})


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
    if isinstance(root, LoRACheckpointMixin):
        return root._base_fingerprint()
    return fingerprint(base_tensors(root))


def _inject(target: nn.Module, config: LoRAConfig) -> None:
    existing = get_lora_config(target)
    if existing is not None and existing != config:
        differences = ", ".join(
            f"{name} {getattr(config, name)!r} in the checkpoint, {getattr(existing, name)!r} now"
            for name in LoRAConfig.field_names()
            if getattr(config, name) != getattr(existing, name)
        )
        raise UsageError(
            f"the checkpoint was trained with other LoRA settings ({differences}); "
            "resume with the same LoRA settings (e.g. --lora.rank), or start a new run without --ckpt_path"
        )
    try:
        if existing is None:
            refuse_oversized(target, config, "the checkpoint's LoRA config")
        inject_lora(target, config)
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
        raise ValueError(f"the checkpoint's '{CHECKPOINT_KEY}' section is damaged; expected the fields {sorted(shape)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"the checkpoint's LoRA section has format version {meta['format_version']}, newer than this "
            f"lightning-lora reads ({FORMAT_VERSION}); upgrade lightning-lora"
        )
    return meta
