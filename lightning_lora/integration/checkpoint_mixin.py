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

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_lora.core.fingerprint import fingerprint
from lightning_lora.core.inject import get_lora_config
from lightning_lora.errors import DataError, UsageError
from lightning_lora.integration import class_allowlist
from lightning_lora.integration.adapter_restore import (
    CHECKPOINT_KEY,
    FORMAT_VERSION,
    adapted_submodule,
    base_tensors,
    check_finite,
    frozen_parameter_keys,
    further_adapters_record,
    restore_adapters,
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

    def configure_model(self) -> None:
        """Inject the adapters into a network built in ``configure_model()``, before the strategy wraps it.

        Lightning calls ``configure_model`` after the callbacks' ``setup`` and before it restores a
        checkpoint, wraps the model (DDP, FSDP) and builds the optimizer: the one public moment for
        a network built there. Build your network in your own ``configure_model`` and end it with
        ``super().configure_model()``. A no-op without a ``LoRAInjectionCallback`` (pretraining), or
        when the network was built in ``__init__`` (then the callback injected in ``setup``).
        """
        trainer = _attached_trainer(self)
        if trainer is None:
            return
        for callback in trainer.callbacks:
            inject_into = getattr(callback, "inject_into", None)  # LoRAInjectionCallback's (it imports this module)
            if callable(inject_into):
                inject_into(self)

    def base_hint(self) -> str:
        """How to give the module the base the adapters were trained on (for the mismatch error)."""
        return f"Build {type(self).__name__} with the base weights the adapters were trained on."

    def base_fingerprint(self) -> dict[str, dict[str, Any]]:
        """The frozen base's fingerprint, hashed once per set of base tensors (the base does not train).

        The cache key is each tensor's storage, shape and dtype: a base replaced or reloaded into new
        tensors is hashed again. (Values written in place into a frozen tensor are not noticed; nothing
        in a LoRA run does that.)
        """
        tensors = base_tensors(self)
        identity = tuple((k, v.data_ptr(), tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        cached = getattr(self, "_lora_fingerprint_cache", None)
        if cached is None or cached[0] != identity:
            cached = (identity, fingerprint(tensors))
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
        adapter_only = not _strategy_loads_state_itself(self)
        if adapter_only:
            for key in frozen_parameter_keys(self):  # the frozen base is fingerprinted, not written
                state.pop(key, None)
        check_finite(state, "a checkpoint")
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "module_path": path,
            "lora_config": get_lora_config(target).to_dict(),
            **further_adapters_record(target),
            "base_fingerprint": self.base_fingerprint(),
            "saved_keys": sorted(state),
            "adapter_only": adapter_only,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_adapters(self, checkpoint, self.base_hint())

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO[bytes],
        map_location: Any = None,
        strict: bool | None = None,
        allow_classes: Iterable[str] = (),
        **kwargs: Any,
    ):
        """Rebuild the module from a checkpoint, reading the file once and trusting nothing in it.

        As Lightning's ``load_from_checkpoint`` does, with its public pieces: the stored
        hyper-parameters (updated by ``kwargs``) build the module (through the instantiator
        LightningCLI recorded, which must be Lightning's own), ``configure_model`` runs, then
        ``on_load_checkpoint`` (the adapters are re-created on the module's own base) and a strict
        ``load_state_dict``. Every class path the file names is checked first (:mod:`.class_allowlist`).

        Args:
            checkpoint_path: A ``.ckpt`` file (path, URL or open binary file).
            map_location: Where the loaded module goes (``module.to(map_location)``); tensors are read
                onto the CPU.
            strict: Lightning's ``strict`` (default: the module's ``strict_loading``).
            allow_classes: Your own classes the checkpoint may name (for example the net's), trusted.
            kwargs: Constructor arguments that replace the stored ones.
        """
        from lightning_lora.integration.checkpoint_reader import read_checkpoint_state  # it builds on this module

        class_allowlist.allow_classes(allow_classes)
        checkpoint = read_checkpoint_state(checkpoint_path)
        where = f"checkpoint {checkpoint_path}"
        hyper_parameters = dict(checkpoint.get("hyper_parameters") or {})
        try:
            class_allowlist.check_class_paths(checkpoint, where)
            if "_instantiator" in hyper_parameters:  # jsonargparse would import strings in class-typed fields
                class_allowlist.check_importable_strings(hyper_parameters, where)
        except RecursionError as err:
            raise DataError(f"{where} is nested too deeply to be a checkpoint") from err
        module = _build_from_hyper_parameters(cls, {**hyper_parameters, **kwargs}, where)
        if is_overridden("configure_model", module):
            module.configure_model()
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading if strict is None else strict)
        return module.to(map_location) if map_location is not None else module


def _build_from_hyper_parameters(cls: type, hyper_parameters: dict[str, Any], where: str) -> Any:
    """``cls(**hyper_parameters)``, or through LightningCLI's recorded instantiator (Lightning's own only).

    A class whose ``hyper_parameters_are_plain`` is true is always built directly.
    """
    instantiator = hyper_parameters.pop("_instantiator", None)
    if getattr(cls, "hyper_parameters_are_plain", False):
        instantiator = None
    stored = hyper_parameters.pop("_class_path", None)
    own = f"{cls.__module__}.{cls.__qualname__}"
    if stored is not None and stored != own:
        raise UsageError(f"{where} was written by {stored}, not {own}; load it with that class")
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hyper_parameters = {k: v for k, v in hyper_parameters.items() if k in parameters and k != "self"}
    if instantiator is None:
        return cls(**hyper_parameters)
    if instantiator not in class_allowlist.LIGHTNING_INSTANTIATORS:
        raise UsageError(f"{where} names the instantiator {instantiator!r}, which is not Lightning's; nothing was run")
    from lightning.pytorch.cli import instantiate_module

    return instantiate_module(cls, hyper_parameters)


def _attached_trainer(module: Any) -> pl.Trainer | None:
    """The module's Trainer, or ``None`` outside one (``LightningModule.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def _strategy_loads_state_itself(module: Any) -> bool:
    """Whether the module's strategy loads a checkpoint's state before the module's hooks run (FSDP,
    DeepSpeed, model parallel: Lightning's ``restore_checkpoint_after_setup``). Those get full
    checkpoints, which their own strict load checks key for key; the others adapter-only ones."""
    trainer = _attached_trainer(module)
    return trainer is not None and bool(trainer.strategy.restore_checkpoint_after_setup)
