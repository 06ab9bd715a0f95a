"""Which adapters run: one or several active, a block that switches for its duration, the base alone, or
one adapter per sample of a batch.

Switching never copies a weight: it sets which of a layer's adapters forward adds (and which get
gradients), so it is free to do per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_lora.core.layers import BASE_SAMPLE, SampleRouting, kept_biases
from lightning_lora.core.layers.base import BASE_PREFIX
from lightning_lora.core.model_state import (
    ACTIVE_ATTR,
    active_adapter_names,
    adapter_configs,
    lora_layers,
    modules_outside_adapters,
    owner_adapter_name,
    saved_modules,
    unwrap_model,
)

log = logging.getLogger("lightning_lora")


def lora_adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added (empty for a plain model)."""
    return list(adapter_configs(model))


def _as_known_names(model: nn.Module, names: str | list[str] | tuple[str, ...]) -> list[str]:
    listed = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else None
    known = adapter_configs(model)
    if not known:
        raise ValueError("model holds no adapters; call inject_lora(model, config) first")
    if not listed or not all(isinstance(n, str) for n in listed):
        raise ValueError(f"name one adapter or a non-empty list of them (the model's: {list(known)}), got {names!r}")
    unknown = [n for n in listed if n not in known]
    if unknown:
        raise ValueError(f"model holds no adapter named {unknown[0]!r}; its adapters are {list(known)}")
    if len(set(listed)) != len(listed):
        raise ValueError(f"adapter names are listed twice in {listed}; name each once")
    return listed


def set_active_adapters(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the adapters forward adds (several: their updates add, as PEFT's ``set_adapter([...])``).

    Only the active adapters' tensors require grad afterwards, so an optimizer over
    ``requires_grad`` parameters trains exactly them; trained biases and ``modules_to_save``
    copies stay trainable. A merged adapter that is not among ``names`` is unmerged first, with a
    warning (PEFT's ``set_adapter`` unmerges too): a merged update would otherwise act whatever is active.

    Raises:
        ValueError: an unknown name, a name given twice, or no name.
    """
    plain = unwrap_model(model)
    names = _as_known_names(plain, names)
    owner = owner_adapter_name(plain)
    if owner not in names and (kept_biases(plain) or any(True for _ in saved_modules(plain))):
        raise ValueError(
            f"adapter {owner!r} trains biases or modules_to_save that every forward runs with, so it cannot be "
            f"switched off: keep it active (set_active_adapters(model, {[owner, *names]})), or inject it with "
            "bias='none' and no modules_to_save"
        )
    layers = [layer for _, layer in lora_layers(plain)]
    if any(layer.sample_adapters is not None for layer in layers):
        raise ValueError("set_active_adapters inside an adapter_per_sample block; leave the block first")
    leaving = sorted({n for layer in layers for n in layer.merged_adapters if n not in names})
    if leaving:
        log.warning("set_active_adapters: unmerging adapters %s, which are merged but not made active", leaving)
        for layer in layers:
            layer.unmerge(leaving)
    for layer in layers:
        layer.active_adapters = list(names)
        for key, adapter in layer.lora_adapters.items():
            adapter.requires_grad_(key in names)
    setattr(plain, ACTIVE_ATTR, list(names))
    return model


@contextmanager
def use_adapters(model: nn.Module, names: str | list[str]) -> Iterator[nn.Module]:
    """Run with ``names`` active for the block's duration; the previous active set and gradient flags return on
    exit, also when the block raises; adapters unmerged for the block are merged again.

    Where the block deleted adapters that were active before, the rest of them become active again
    (or, with none left, the model's first adapter, as :func:`~lightning_lora.core.inject.delete_adapter`
    does), with the gradient flags :func:`set_active_adapters` gives.
    """
    plain = unwrap_model(model)
    _as_known_names(plain, names)
    before = active_adapter_names(plain)
    flags = [(p, p.requires_grad) for _, layer in lora_layers(plain) for p in layer.lora_adapters.parameters()]
    merged = [(layer, list(layer.merged_adapters)) for _, layer in lora_layers(plain) if layer.merged_adapters]
    set_active_adapters(plain, names)
    try:
        yield model
    finally:
        left = adapter_configs(plain)
        remaining = [n for n in before if n in left]
        if before and remaining == before:
            set_active_adapters(plain, before)
            for param, flag in flags:
                param.requires_grad_(flag)
        elif left:
            set_active_adapters(plain, remaining or [next(iter(left))])
        for layer, names_merged in merged:  # what set_active_adapters unmerged for the block is merged again
            layer.merge(names_merged)


@contextmanager
def adapter_per_sample(model: nn.Module, names: list[str]) -> Iterator[nn.Module]:
    """Inside, each sample of a batch runs with its own adapter: ``names[i]`` for sample ``i``, ``"__base__"``
    for the base alone (PEFT's ``adapter_names=`` in forward).

    Every sample gets what it would get alone with its adapter active; the base runs once on the
    whole batch and each adapter once on its own samples, without a weight copied per sample.
    Adapters need not be active; none may be merged (a merged update would reach every sample).

    Raises:
        ValueError: an unknown name, a merged model, or (at forward) a batch of another length.
    """
    plain = unwrap_model(model)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_per_sample takes a non-empty list of adapter names, one per sample; got {names!r}")
    known = adapter_configs(plain)
    unknown = sorted({n for n in names if n != BASE_SAMPLE and n not in known})
    if unknown:
        raise ValueError(
            f"adapter_per_sample: model holds no adapter named {unknown[0]!r}; its adapters are {list(known)} "
            f"(and {BASE_SAMPLE!r} for the base alone)"
        )
    layers = [layer for _, layer in lora_layers(plain)]
    if kept_biases(plain) or any(True for _ in saved_modules(plain)):
        raise ValueError(
            "adapter_per_sample on a model that trains biases or modules_to_save: those would reach every sample, "
            "the base ones too. Serve such an adapter per batch (set_active_adapters)"
        )
    if any(layer.merged for layer in layers):
        raise ValueError("adapter_per_sample on a merged model: call unmerge_lora(model) first")
    if any(layer.lora_original_weight is not None for layer in layers):
        raise ValueError(
            "adapter_per_sample on a model whose first adapter rewrote the base (init='pissa' or 'olora'): a "
            "'__base__' sample would run the residual, not the base. Serve it per batch (set_active_adapters)"
        )
    if any(layer.sample_adapters is not None for layer in layers):
        raise ValueError("adapter_per_sample blocks do not nest: the model is inside one already")
    routing = SampleRouting(names)
    try:
        for layer in layers:
            layer.sample_adapters = routing
        yield model
    finally:
        for layer in layers:
            layer.sample_adapters = None


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside, outputs equal the un-adapted model's bit for bit.

    Works on merged layers too (they keep the base weight aside), restores trained biases' base
    values for the duration, and puts everything back on exit, also when the block raises.
    """
    plain = unwrap_model(model)
    switches = [m for _, m in lora_layers(plain)] + [m for _, m in saved_modules(plain)]
    before = [m.enabled for m in switches]
    outside = {id(m) for m in modules_outside_adapters(plain)}
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
