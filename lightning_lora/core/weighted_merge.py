"""Combining adapters into a new one with weights, as PEFT's ``add_weighted_adapter`` does.

Three combinations, PEFT's definitions, per adapted layer (``s_i`` an adapter's scale, ``w_i`` its
weight):

- ``"cat"``: exact. ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so
  ``B A = sum_i w_i s_i B_i A_i``; the rank is the sum of the ranks.
- ``"svd"``: the weighted sum of the updates, ``sum_i w_i s_i B_i A_i``, truncated to ``svd_rank``
  (the largest rank by default) by its SVD: exact when the sum's rank fits.
- ``"linear"``: a rough, cheap approximation PEFT keeps for compatibility:
  ``A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i`` and ``B = sum_i sqrt(|w_i s_i|) B_i`` (same ranks only).

The new adapter has scale 1 (``alpha = rank``, as PEFT sets it), is added inactive and frozen like
any further adapter, and its sources stay as they are. A grouped convolution is combined group by
group, so the result still lives in the grouped weight.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from lightning_lora.core.config import DEFAULT_INIT
from lightning_lora.core.layers import LoRAAdapter, LoRAConv1D, LoRAEmbedding, LoRALayer
from lightning_lora.core.model_state import (
    adapter_configs,
    check_adapter_name,
    lora_layers,
    record_adapter_config,
    unwrap_model,
)

COMBINATIONS = ("svd", "linear", "cat")


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    combination: str = "svd",
    svd_rank: int | None = None,
) -> nn.Module:
    """Add adapter ``new_name``, a weighted combination of ``adapters`` (PEFT's ``add_weighted_adapter``).

    Args:
        model: A model holding the source adapters (wrappers are seen through).
        adapters: The adapters to combine; each must adapt exactly the same layers.
        weights: One weight per adapter (negative subtracts).
        new_name: The new adapter's name (not in use yet).
        combination: ``"svd"`` (PEFT's default), ``"cat"`` or ``"linear"``; one adapter is always ``"linear"``.
        svd_rank: The rank of an ``"svd"`` combination (default: the largest source rank).

    Returns:
        The same ``model``, holding ``new_name`` inactive (``set_active_adapters`` picks it).

    Raises:
        ValueError: an unknown or DoRA adapter, adapters on different layers, ``linear`` over
            different ranks, weights of the wrong number or not finite, a taken name, or a bad
            ``svd_rank``. The model is unchanged then.
    """
    plain = unwrap_model(model)
    configs = adapter_configs(plain)
    adapters, weights = _as_list(adapters, "adapters"), [_as_weight(w) for w in _as_list(weights, "weights")]
    _check(configs, adapters, weights, new_name, combination, svd_rank)
    combination = "linear" if len(adapters) == 1 else combination
    layers = [(name, layer) for name, layer in lora_layers(plain) if any(a in layer.lora_adapters for a in adapters)]
    for name, layer in layers:
        missing = [a for a in adapters if a not in layer.lora_adapters]
        if missing:
            raise ValueError(
                f"add_weighted_adapter: adapter {missing[0]!r} does not adapt layer {name!r} that "
                f"{[a for a in adapters if a not in missing][0]!r} adapts; combine adapters of the same targets"
            )
        exact = sum(layer.lora_adapters[a].rank for a in adapters)
        if combination == "svd" and svd_rank is not None and svd_rank > exact:
            raise ValueError(
                f"add_weighted_adapter: svd_rank={svd_rank} exceeds {exact}, the ranks the adapters add up to at layer "
                f"{name!r}, where 'svd' is exact already; give svd_rank <= {exact}"
            )
        ranks = {layer.lora_adapters[a].rank for a in adapters}
        if combination == "linear" and len(ranks) > 1:
            raise ValueError(
                f"add_weighted_adapter: combination 'linear' needs one rank, but layer {name!r} has ranks "
                f"{sorted(ranks)}; use combination='cat' or 'svd'"
            )
    first = configs[adapters[0]]
    built = {name: _combined(layer, adapters, weights, combination, svd_rank, first) for name, layer in layers}
    for name, layer in layers:
        layer.add_adapter(new_name, built[name])
    new_ranks = {name: adapter.rank for name, adapter in built.items()}
    rank = max(new_ranks.values())
    record_adapter_config(
        plain,
        new_name,
        replace(
            first,
            rank=rank,
            alpha=float(rank),
            use_dora=False,
            use_rslora=False,
            init=DEFAULT_INIT,  # plain factors, on whatever base the sources ran on (a PiSSA residual too)
            bias="none",
            modules_to_save=[],
            rank_pattern={n: r for n, r in new_ranks.items() if r != rank},
            alpha_pattern={n: float(r) for n, r in new_ranks.items() if r != rank},
        ),
    )
    return model


def _as_list(values, what: str) -> list:
    """``values`` as a list (a numpy array or tensor too); a lone string or number is refused, not split."""
    values = values.tolist() if hasattr(values, "tolist") else values
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"add_weighted_adapter: {what} must be a list (one entry per adapter), got {values!r}")
    return list(values)


def _as_weight(weight):
    """A weight as a Python float when it is a real number of any kind (numpy scalar, 0-d tensor), else as given."""
    if isinstance(weight, bool) or isinstance(weight, str):
        return weight
    try:
        return float(weight) if isinstance(weight, numbers.Real) or getattr(weight, "ndim", None) == 0 else weight
    except (TypeError, ValueError):
        return weight


def _check(configs, adapters, weights, new_name, combination, svd_rank) -> None:
    check_adapter_name(new_name)
    if new_name in configs:
        raise ValueError(f"add_weighted_adapter: the model already holds an adapter named {new_name!r}; pick another")
    if combination not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination must be one of {COMBINATIONS}, got {combination!r}")
    if not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"add_weighted_adapter: name each adapter to combine once, got {adapters}")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise ValueError(f"add_weighted_adapter: no adapter named {unknown[0]!r}; the model's are {list(configs)}")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; give one each")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights}")
    dora = [a for a in adapters if configs[a].use_dora]
    if dora:
        raise ValueError(
            f"add_weighted_adapter: {dora[0]!r} is a DoRA adapter, whose magnitudes do not combine; "
            "merge it into the weights instead (merge_lora)"
        )
    bad_rank = svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1)
    if bad_rank or (svd_rank is not None and combination != "svd"):
        raise ValueError(f"add_weighted_adapter: svd_rank must be an integer >= 1, with 'svd' only; got {svd_rank!r}")


def _combined(
    layer: LoRALayer, names: list[str], weights: list[float], combination: str, svd_rank: int | None, first
) -> LoRAAdapter:
    """The new adapter of one layer, its factors set (not attached), frozen."""
    sources = [layer.lora_adapters[n] for n in names]
    if combination == "linear":
        rank = sources[0].rank
    elif combination == "cat":
        rank = sum(s.rank for s in sources)
    else:
        rank = svd_rank or max(s.rank for s in sources)
    config = replace(
        first, rank=rank, alpha=float(rank), use_dora=False, use_rslora=False, bias="none",
        modules_to_save=[], rank_pattern={}, alpha_pattern={},
    )  # fmt: skip
    adapter = layer.new_adapter(config)
    with torch.no_grad():
        if combination == "linear":
            factors = [math.sqrt(abs(w * s.scale)) for w, s in zip(weights, sources, strict=True)]
            signs = [1.0 if w * s.scale >= 0 else -1.0 for w, s in zip(weights, sources, strict=True)]
            lora_A = sum(sign * f * s.lora_A.float() for sign, f, s in zip(signs, factors, sources, strict=True))
            lora_B = sum(f * s.lora_B.float() for f, s in zip(factors, sources, strict=True))
        elif combination == "cat":
            lora_A, lora_B = _concatenated(layer, sources, weights)
        else:
            update = sum(w * layer.delta_weight(n) for w, n in zip(weights, names, strict=True))
            lora_A, lora_B = _truncated_svd(layer, update, rank)
        adapter.lora_A.copy_(lora_A)
        adapter.lora_B.copy_(lora_B)
    return adapter.requires_grad_(False)


def _concatenated(layer: LoRALayer, sources: list[LoRAAdapter], weights: list[float]):
    """``[w_i s_i A_i]`` stacked over ranks and ``[B_i]`` side by side, group by group."""
    groups = layer.factor_groups()
    a_parts = [
        (w * s.scale * s.lora_A.float()).reshape(groups, s.rank, -1) for w, s in zip(weights, sources, strict=True)
    ]
    b_parts = [s.lora_B.float().reshape(groups, -1, s.rank) for s in sources]
    rank = sum(s.rank for s in sources)
    lora_A = torch.cat(a_parts, dim=1).reshape(groups * rank, *sources[0].lora_A.shape[1:])
    lora_B = torch.cat(b_parts, dim=2).reshape(-1, rank, *sources[0].lora_B.shape[2:])
    return lora_A, lora_B


def _truncated_svd(layer: LoRALayer, update: torch.Tensor, rank: int):
    """Factors ``A``, ``B`` (the layer's shapes) whose product is ``update`` truncated to ``rank`` per group."""
    if isinstance(layer, (LoRAConv1D, LoRAEmbedding)):
        update = update.t()  # those store the weight transposed: B A is its transpose
    groups = layer.factor_groups()
    per_group = update.reshape(groups, update.shape[0] // groups, -1)  # (g, out/g, in/g * kernel)
    a_blocks, b_blocks = [], []
    for block in per_group:
        u, s, vh = torch.linalg.svd(block, full_matrices=False)
        kept = min(rank, s.numel())
        b_block = block.new_zeros(block.shape[0], rank)
        a_block = block.new_zeros(rank, block.shape[1])
        b_block[:, :kept] = u[:, :kept] * s[:kept]
        a_block[:kept] = vh[:kept]
        a_blocks.append(a_block)
        b_blocks.append(b_block)
    shape_a, shape_b = layer.factor_shapes(rank)
    return torch.cat(a_blocks).reshape(shape_a), torch.cat(b_blocks).reshape(shape_b)
