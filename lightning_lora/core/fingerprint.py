"""Fingerprints of base weights: which base an adapter (or an adapter-only checkpoint) was trained on.

A fingerprint maps each state-dict key to its shape, dtype and the sha256 of its values (taken in
fp32, so the device and memory layout do not matter). Full-precision tensors also record the
hashes of their bfloat16 and float16 roundings: the same base deployed in half precision is
still recognised as the same base.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lightning_lora.core.adapter_tensors import base_state_dict
from lightning_lora.core.config import FROM_WEIGHT_INITS, LoRAConfig
from lightning_lora.core.model_state import (
    adapter_configs,
    owner_adapter_name,
    primary_adapter_name,
    saved_modules,
    unwrap_model,
)
from lightning_lora.core.peft_format import top_level_targets
from lightning_lora.core.targets import TargetPlan, plan_targets


def tensor_sha256(tensor: torch.Tensor) -> str:
    """A hash of a tensor's values, taken in fp32 so it does not depend on device or layout."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


_HALF_TYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _entry(tensor: torch.Tensor) -> dict[str, Any]:
    entry = {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "sha256": tensor_sha256(tensor),
    }
    if tensor.dtype in (torch.float32, torch.float64):
        # The same base deployed in half precision is still the same base: record its rounded hashes too.
        entry.update({f"sha256_{name}": tensor_sha256(tensor.to(dtype)) for dtype, name in _HALF_TYPES.items()})
    return entry


def fingerprint(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{key: {"shape", "dtype", "sha256", ...}}`` of a state dict's tensors (all, or the given keys).

    Full-precision tensors also record the hashes of their bfloat16 and float16 roundings, so a
    base cast to half precision after training is recognised as the same base.
    """
    chosen = sorted(state) if keys is None else sorted(keys)
    return {k: _entry(state[k]) for k in chosen}


def _same_tensor(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    if actual.get("dtype") in _HALF_TYPES.values() and f"sha256_{actual['dtype']}" in expected:
        return expected[f"sha256_{actual['dtype']}"] == actual["sha256"]
    return expected.get("sha256") == actual.get("sha256")


def first_difference(expected: dict[str, dict], actual: dict[str, dict]) -> str | None:
    """The first tensor in which two fingerprints differ, described, or ``None`` if they agree."""
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            return f"'{key}' is in the recorded base but not in this model"
        if key not in expected:
            return f"'{key}' is in this model but not in the recorded base"
        if not isinstance(expected[key], dict):
            return f"'{key}' has a damaged fingerprint entry"
        shapes = expected[key].get("shape"), actual[key].get("shape")
        if shapes[0] != shapes[1]:
            return f"'{key}' differs (shape {shapes[0]} vs {shapes[1]})"
        if not _same_tensor(expected[key], actual[key]):
            return f"'{key}' differs (different values)"
    return None


def _touched_keys(state: dict[str, torch.Tensor], modules: list[str]) -> list[str]:
    return [k for k in state if any(k.startswith(m + ".") for m in modules)]


def touched_fingerprint(
    model: nn.Module, config: LoRAConfig | None = None, plan: TargetPlan | None = None, adapter_name: str | None = None
) -> dict[str, dict[str, Any]]:
    """Fingerprint of the base tensors an adapter touches (adapted layers, ``modules_to_save``).

    Works on an adapted model for one of its adapters (the primary one by default), or, given
    ``config`` (and its ``plan`` if made already), for the adapter that config makes. The base is
    the weights the adapter runs on: a PiSSA/OLoRA adapter's is the original weight, a plain
    adapter's beside one is the residual that adapter left in the layer.
    """
    model = unwrap_model(model)
    name = adapter_name or primary_adapter_name(model)
    own = config if config is not None else adapter_configs(model).get(name)
    state = base_state_dict(model, residuals=own is not None and own.init not in FROM_WEIGHT_INITS)
    if plan is None and config is None:
        modules = [n for n, layer in top_level_targets(model) if name in layer.lora_adapters]
        if name == owner_adapter_name(model):
            modules += [n for n, _ in saved_modules(model)]
    else:
        plan = plan if plan is not None else plan_targets(model, config)
        modules = list(plan.targets) + list(plan.to_save)
    return fingerprint(state, _touched_keys(state, modules))
