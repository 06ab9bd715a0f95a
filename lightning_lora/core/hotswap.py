"""Hot-swapping: an adapter's values replaced in place from a folder, so a compiled model keeps its code.

``torch.compile`` keys its compiled code on tensor shapes and on plain Python numbers it reads. A
swap that keeps every shape and turns no number into another leaves the code valid: the factors
are copied into the existing tensors, and a smaller rank is zero-padded into them (the padding adds
nothing to ``B A``). :func:`prepare_hotswap`, run once before compiling (PEFT's
``prepare_model_for_compiled_hotswap``), makes that possible for adapters of other ranks and
scales: it pads every adapter's factors to ``max_rank`` and turns each scale into a tensor that a
swap updates in place. A grouped convolution is padded group by group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
from torch import nn

from lightning_lora.core.adapter_folder import FLOAT_DTYPES, check_base_fingerprint, read_adapter_folder
from lightning_lora.core.config import FROM_WEIGHT_INITS
from lightning_lora.core.inject import base_view
from lightning_lora.core.layers import DEFAULT_ADAPTER, LoRAAdapter, LoRALayer
from lightning_lora.core.model_state import (
    adapter_configs,
    lora_layers,
    owner_adapter_name,
    record_adapter_config,
    unwrap_model,
)
from lightning_lora.core.peft_format import config_from_peft, peft_keys

log = logging.getLogger("lightning_lora")


def _pad_into(layer: LoRALayer, adapter: LoRAAdapter, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Copy factors of rank ``r <= adapter``'s into it, the rows and columns beyond ``r`` zero (per group)."""
    groups = layer.factor_groups()
    rank, new_rank = adapter.lora_A.shape[0] // groups, lora_B.shape[1]
    with torch.no_grad():
        a = adapter.lora_A.view(groups, rank, *adapter.lora_A.shape[1:])
        a.zero_()
        a[:, :new_rank].copy_(lora_A.reshape(groups, new_rank, *adapter.lora_A.shape[1:]))
        adapter.lora_B.zero_()
        adapter.lora_B[:, :new_rank].copy_(lora_B)


def _scale_as_tensor(adapter: LoRAAdapter) -> None:
    if isinstance(adapter.scale, torch.Tensor):
        return
    value = adapter.scale
    delattr(adapter, "scale")
    adapter.register_buffer("scale", torch.tensor(value, dtype=torch.float32, device=adapter.lora_A.device), False)


def prepare_hotswap(model: nn.Module, max_rank: int | None = None) -> nn.Module:
    """Make every adapter swappable under ``torch.compile``: factors padded to ``max_rank``, scales tensors.

    Call it once, before compiling, with the largest rank any adapter swapped in later will have.
    Outputs do not change (the padding is zeros).

    Raises:
        ValueError: the model holds no adapters, or an adapter's rank exceeds ``max_rank``.
    """
    plain = unwrap_model(model)
    if not adapter_configs(plain):
        raise ValueError("prepare_hotswap: the model holds no adapters; inject or load one first")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"prepare_hotswap: max_rank must be an integer >= 1, got {max_rank!r}")
    pairs = [(layer, n, a) for _, layer in lora_layers(plain) for n, a in layer.lora_adapters.items()]
    too_big = [(n, a.rank) for _, n, a in pairs if max_rank is not None and a.lora_B.shape[1] > max_rank]
    if too_big:
        raise ValueError(
            f"prepare_hotswap: adapter {too_big[0][0]!r} has rank {too_big[0][1]}, above max_rank={max_rank}; "
            "give the largest rank of any adapter to be swapped in"
        )
    for layer, _, adapter in pairs:
        _scale_as_tensor(adapter)
        rank = adapter.lora_B.shape[1]
        if max_rank is not None and rank < max_rank:
            lora_A, lora_B = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
            shape_a, shape_b = layer.factor_shapes(max_rank)
            adapter.lora_A = nn.Parameter(lora_A.new_zeros(shape_a), requires_grad=adapter.lora_A.requires_grad)
            adapter.lora_B = nn.Parameter(lora_B.new_zeros(shape_b), requires_grad=adapter.lora_B.requires_grad)
            _pad_into(layer, adapter, lora_A, lora_B)
            # The same adapter at a larger rank: alpha follows so that config.scale is still its scale.
            adapter.config = replace(adapter.config, rank=max_rank, alpha=_alpha_for(adapter.config, max_rank))
    return model


def _alpha_for(config, rank: int) -> float:
    return config.scale * (rank**0.5 if config.use_rslora else rank)


def hotswap_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    check_base: bool = True,
    subfolder: str | None = None,
) -> nn.Module:
    """Replace adapter ``adapter_name``'s values with the adapter in folder ``path``, in place.

    The folder must adapt exactly the layers the adapter does, with the same options (DoRA or
    not), at a rank no larger than the adapter's tensors hold (after :func:`prepare_hotswap`, its
    ``max_rank``). Nothing is re-created, so a ``torch.compile``\\ d model gives the new adapter's
    outputs without compiling again; a scale that differs while the model was not prepared is set
    anyway (eager code is right at once; compiled code compiles again) and says so. A merged
    adapter is unmerged, swapped and merged again, so the weight then holds the new update.
    ``subfolder`` picks the folder's adapter as in :func:`~lightning_lora.core.adapter_folder.load_adapter`.

    Raises:
        ValueError: no such adapter, or a folder whose targets, options or ranks do not fit; the model
            is unchanged then.
    """
    plain = unwrap_model(model)
    configs = adapter_configs(plain)
    if adapter_name not in configs:
        raise ValueError(
            f"hotswap_adapter: the model holds no adapter named {adapter_name!r}; its adapters are {list(configs)}"
        )
    folder, data, tensors, meta = read_adapter_folder(path, adapter_name, subfolder)
    where = str(folder)
    with base_view(plain):
        config, plan = config_from_peft(data, plain, where)
        if check_base:
            check_base_fingerprint(plain, config, plan, meta, folder)
    current = configs[adapter_name]
    if config.use_dora != current.use_dora:
        kinds = ["DoRA" if c.use_dora else "plain LoRA" for c in (config, current)]
        raise ValueError(
            f"hotswap_adapter: {where} is a {kinds[0]} adapter and {adapter_name!r} a {kinds[1]} one; swap in an "
            "adapter of the same kind"
        )
    for field in ("dropout", "use_rslora"):
        if getattr(config, field) != getattr(current, field):
            raise ValueError(
                f"hotswap_adapter: {where} has {field}={getattr(config, field)!r} and adapter {adapter_name!r} "
                f"{field}={getattr(current, field)!r}; a swap keeps the layers' modules, so swap in an adapter with "
                f"the same {field}, or load_adapter it under another name"
            )
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(f"hotswap_adapter: {where} trains biases or modules_to_save; hot-swapping swaps factors only")
    if current.init in FROM_WEIGHT_INITS and config.init != current.init:
        raise ValueError(
            f"hotswap_adapter: {where} is a {config.init} adapter and {adapter_name!r} a {current.init} one: the "
            "residual the layers run on depends on the method; swap in a folder of the same init, or load_adapter it "
            "into the plain base"
        )
    if (config.init in FROM_WEIGHT_INITS) != (current.init in FROM_WEIGHT_INITS):
        raise ValueError(
            f"hotswap_adapter: {where} has init={config.init!r} and the adapter init={current.init!r}: PiSSA/OLoRA "
            "adapters run on the base's residual, others on the base itself; swap in an adapter of the same kind"
        )
    keys = peft_keys(plain, adapter_name)
    if adapter_name == owner_adapter_name(plain):
        keys = {k: v for k, v in keys.items() if ".lora_adapters." in k}
    wanted = set(keys.values())
    if wanted != set(tensors):
        extra, missing = sorted(set(tensors) - wanted), sorted(wanted - set(tensors))
        raise ValueError(
            f"hotswap_adapter: {where} does not adapt the layers adapter {adapter_name!r} adapts (missing "
            f"{missing[:5]}, unexpected {extra[:5]}); swap in an adapter of the same targets"
        )
    swaps = []
    for name, layer in lora_layers(plain):
        if adapter_name not in layer.lora_adapters:
            continue
        adapter = layer.lora_adapters[adapter_name]
        prefix = f"{name}.lora_adapters.{adapter_name}."
        lora_A, lora_B = tensors[keys[prefix + "lora_A"]], tensors[keys[prefix + "lora_B"]]
        rank = lora_B.shape[1] if lora_B.dim() >= 2 else -1
        held = adapter.lora_B.shape[1]
        if rank < 1 or (lora_A.shape, lora_B.shape) != tuple(map(torch.Size, layer.factor_shapes(rank))):
            raise ValueError(f"hotswap_adapter: {where} holds factors of the wrong shape for layer {name!r}")
        initial = getattr(adapter, "lora_A_init", None)
        if initial is not None and rank != initial.shape[0]:
            raise ValueError(
                f"hotswap_adapter: {where} has rank {rank} at layer {name!r} and adapter {adapter_name!r} "
                f"({current.init}) rank {initial.shape[0]}: the residual the layer runs on depends on the rank; swap "
                "in a folder of the same ranks, or load_adapter it into the plain base"
            )
        if rank != config.for_layer(name).rank:
            raise ValueError(
                f"hotswap_adapter: {where} holds rank-{rank} factors at layer {name!r}, but its config says rank "
                f"{config.for_layer(name).rank}; the folder is damaged: re-export the adapter"
            )
        odd = [t.dtype for t in (lora_A, lora_B) if t.dtype not in FLOAT_DTYPES]
        if odd:
            raise ValueError(f"hotswap_adapter: {where} holds {odd[0]} factors at layer {name!r}, not a float type")
        if rank > held:
            raise ValueError(
                f"hotswap_adapter: {where} has rank {rank} at layer {name!r}, above the {held} the adapter holds; "
                f"call prepare_hotswap(model, max_rank={rank}) before compiling"
            )
        magnitude = tensors.get(keys.get(prefix + "lora_magnitude", ""))
        if magnitude is not None and magnitude.shape != adapter.lora_magnitude.shape:
            raise ValueError(f"hotswap_adapter: {where} holds a DoRA magnitude of the wrong shape for layer {name!r}")
        bad = [t for t in (lora_A, lora_B, magnitude) if t is not None and not torch.isfinite(t.float()).all()]
        if bad:
            raise ValueError(f"hotswap_adapter: {where} holds NaN or infinite values at layer {name!r}")
        swaps.append((layer, adapter, lora_A, lora_B, magnitude, config.for_layer(name)))
    recompiles = False
    merged = [(layer, list(layer.merged_adapters)) for layer, *_ in swaps if adapter_name in layer.merged_adapters]
    for layer, _ in merged:
        layer.unmerge()  # merged again below, in the order they were
    for layer, adapter, lora_A, lora_B, magnitude, layer_config in swaps:
        scale, held = layer_config.scale, adapter.lora_B.shape[1]
        _pad_into(layer, adapter, lora_A.to(adapter.lora_A.dtype), lora_B.to(adapter.lora_B.dtype))
        if magnitude is not None:
            with torch.no_grad():
                adapter.lora_magnitude.copy_(magnitude)
        if isinstance(adapter.scale, torch.Tensor):
            with torch.no_grad():
                adapter.scale.fill_(scale)
        elif adapter.scale != scale:
            adapter.scale, recompiles = scale, True
        adapter.config = replace(layer_config, rank=held, alpha=_alpha_for(layer_config, held))
    for layer, names in merged:
        layer.merge(names)
    record_adapter_config(plain, adapter_name, config)
    if recompiles:
        log.warning(
            "hotswap_adapter: the new adapter's scale differs and the model was not prepared, so compiled code "
            "compiles again; call prepare_hotswap(model, max_rank=...) before compiling to avoid it"
        )
    return model
