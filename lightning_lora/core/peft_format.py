"""PEFT's adapter format: its key names, its ``adapter_config.json``, and its matching rules.

The translation both ways between this package's adapted model and what PEFT's
``save_pretrained`` writes and ``PeftModel.from_pretrained`` reads: state-dict keys (PEFT adds
``base_model.model.`` and a ``base_layer`` wherever a path enters an adapted layer), the config
fields, and PEFT's rules for ``target_modules``, ``exclude_modules``, ``modules_to_save`` and the
per-layer ``rank_pattern`` / ``alpha_pattern``. Reading trusts nothing: every field the adapter
needs must be present, and PEFT features this package does not implement are refused by name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from lightning_lora.core.bounded_regex import MatchBudget, UnsupportedPattern, compile_bounded
from lightning_lora.core.config import ALL_LINEAR, LoRAConfig
from lightning_lora.core.layers import DEFAULT_ADAPTER, LoRAConv1D, LoRALayer, LoRAMultiheadAttention, kept_biases
from lightning_lora.core.model_state import (
    adapter_configs,
    get_lora_config,
    lora_layers,
    owner_adapter_name,
    primary_adapter_name,
    saved_modules,
    unwrap_model,
)
from lightning_lora.core.safe_io import read_json
from lightning_lora.core.targets import TargetPlan, plan_targets
from lightning_lora.errors import DataError

log = logging.getLogger("lightning_lora")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_KEY = "lightning_lora"
FORMAT_VERSION = 2
PEFT_PREFIX = "base_model.model."

REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save")
"""What an adapter folder must state: every field PEFT has always written that shapes the adapter."""

LATER_FIELDS = {
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
}
"""Fields PEFT added later (0.5-0.13): absent only from folders written before they existed, so absent means off."""

UNSUPPORTED_FEATURES = (
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "lora_bias",
    "use_qalora",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "megatron_config",
)
"""PEFT settings that change what the adapter computes and that this package does not implement."""


INIT_IN_PEFT: dict[str, bool | str] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
"""``LoRAConfig.init`` -> PEFT's ``init_lora_weights`` (``False``, PEFT's "no init", reads as ``kaiming``: the
file's tensors replace the factors anyway)."""


def peft_path(model: nn.Module, name: str) -> str:
    """A module's path in PEFT's model: ``base_layer`` appears wherever a path enters an adapted layer."""
    parts, here, out = name.split("."), model, []
    for part in parts:
        if isinstance(here, LoRALayer):
            out.append("base_layer")
        here = getattr(here, part)
        out.append(part)
    return ".".join(out)


def peft_keys(model: nn.Module, adapter_name: str | None = None) -> dict[str, str]:
    """Our state-dict key -> PEFT's file key, for every tensor of one adapter (the primary one by default).

    PEFT's file keys do not name the adapter (its folder does), so one map is one adapter's.
    """
    model = unwrap_model(model)
    configs = adapter_configs(model)
    adapter_name = adapter_name or (DEFAULT_ADAPTER if DEFAULT_ADAPTER in configs else next(iter(configs), None))
    keys: dict[str, str] = {}
    for name, layer in lora_layers(model):
        path = peft_path(model, name)
        adapter = layer.lora_adapters[adapter_name] if adapter_name in layer.lora_adapters else None
        for attr, peft_name in layer.adapter_names.items():
            if hasattr(adapter, attr):
                keys[f"{name}.lora_adapters.{adapter_name}.{attr}"] = f"{PEFT_PREFIX}{path}.{peft_name}"
    if adapter_name != next(iter(configs), None):
        return keys
    for module, param, qualified in kept_biases(model):
        module_name = qualified.rpartition(".")[0]
        path = peft_path(model, module_name) if module_name else ""
        inner = "base_layer." if isinstance(module, LoRALayer) else ""
        keys[qualified] = f"{PEFT_PREFIX}{path + '.' if path else ''}{inner}{param}"
    for name, saved in saved_modules(model):
        for key in saved.trained_module.state_dict():
            keys[f"{name}.trained_module.{key}"] = f"{PEFT_PREFIX}{peft_path(model, name)}.{key}"
    return keys


def top_level_targets(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Adapted layers that were targeted themselves (not an attention's out_proj)."""
    inner = {id(layer.out_proj) for _, layer in lora_layers(model) if hasattr(layer, "out_proj")}
    return [(n, layer) for n, layer in lora_layers(model) if id(layer) not in inner]


def peft_config(model: nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT needs to rebuild exactly one adapter's layers (the primary one by default)."""
    model = unwrap_model(model)
    name = adapter_name or primary_adapter_name(model)
    config = get_lora_config(model, name)
    layers = [(n, layer) for n, layer in top_level_targets(model) if name in layer.lora_adapters]
    owner = name == owner_adapter_name(model)
    adapters = {n: layer.lora_adapters[name] for n, layer in layers}
    attention = [n for n, layer in layers if isinstance(layer, LoRAMultiheadAttention)]
    if attention:
        log.warning(
            "the adapter of MultiheadAttention %s is written in PEFT's layout, which lightning-lora loads exactly; "
            "PEFT itself (0.21) adds out_proj's update twice in such a layer, so its outputs differ from this "
            "model's. Use lightning_lora.load_adapter to serve it, not PEFT",
            ", ".join(attention),
        )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(n for n, _ in layers),
        "exclude_modules": None,
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for _, layer in layers),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": (sorted(n for n, _ in saved_modules(model)) if owner else []) or None,
        "init_lora_weights": INIT_IN_PEFT[config.init],
        # Anchored: PEFT matches a pattern against the end of a module's name, so a bare "fc" would also
        # claim "sub.fc"; "^fc" is that one layer only.
        "rank_pattern": {f"^{re.escape(n)}": a.rank for n, a in adapters.items() if a.rank != config.rank},
        "alpha_pattern": {
            f"^{re.escape(n)}": a.config.alpha for n, a in adapters.items() if a.config.alpha != config.alpha
        },
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter folder's JSON: present, well formed, complete, and supported."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"adapter folder {folder} {what}; expected a folder holding {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME} (written by save_adapter or PEFT's save_pretrained)"
        )
    missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter folder {folder} lacks {', '.join(missing)}; re-export the adapter")
    data = read_json(folder / ADAPTER_CONFIG_NAME, "adapter config")
    where = folder / ADAPTER_CONFIG_NAME
    absent = [f for f in REQUIRED_FIELDS if f not in data]
    if absent:
        raise ValueError(
            f"{where} lacks {absent}, which the adapter needs (PEFT always writes them); the file is "
            "incomplete or damaged: re-export the adapter"
        )
    if data["peft_type"] != "LORA":
        raise ValueError(f"{where} describes a {data['peft_type']!r} adapter; lightning-lora reads LoRA adapters only")
    used = [f for f in UNSUPPORTED_FEATURES if data.get(f) not in (None, False, [], {})]
    init = data.get("init_lora_weights", True)
    if init is not False and init not in INIT_IN_PEFT.values():
        used.append(f"init_lora_weights={init!r}")
    if used:
        raise ValueError(f"{where} uses PEFT features lightning-lora does not implement: {used}")
    return data


def _peft_names(names: list[str], patterns: Any, where: str, field: str, budget: MatchBudget) -> list[str] | None:
    """What PEFT's ``target_modules``/``exclude_modules`` select: a regex (full match) or names (exact or suffix)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        matches = _bounded(patterns, where, f"{field} {patterns!r}", budget)
        return [n for n in names if matches(n)]
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: {field} must be a regex or a list of module names, got {patterns!r}")
    return [n for n in names if any(n == p or n.endswith("." + p) for p in patterns)]


def _peft_per_layer(
    patterns: Any, targets: list[str], default: Any, where: str, field: str, budget: MatchBudget
) -> dict[str, Any]:
    """PEFT's ``rank_pattern``/``alpha_pattern`` (first regex matching the end of the name) for every target.

    Every target gets its own exact entry, longest names first, so that in this package's
    pattern syntax (exact or dot-suffix, first match wins) each layer finds its own value.
    """
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: {field} must be a mapping, got {patterns!r}")
    keys = [(key, _bounded(rf"(?:.*\.)?(?:{key})", where, f"{field} key {key!r}", budget)) for key in patterns]
    resolved = {}
    for name in sorted(targets, key=lambda n: (-len(n), n)):
        hit = next((key for key, matches in keys if matches(name)), None)
        resolved[name] = patterns[hit] if hit is not None else default
    return resolved


def _bounded(pattern: str, where: str, field: str, budget: MatchBudget) -> Callable[[str], bool]:
    """PEFT's regex as a matcher that cannot hang on a hostile file (:mod:`~lightning_lora.core.bounded_regex`):
    each alone is linear in the name, and the ``budget`` every matcher of one file shares bounds them together."""
    try:
        fullmatch = compile_bounded(pattern, budget)
    except re.error as err:
        raise DataError(f"{where}: {field} is not a valid regex ({err})") from err
    except UnsupportedPattern as err:
        raise DataError(f"{where}: {field}: {err}") from err

    def matches(name: str) -> bool:
        try:
            return fullmatch(name)
        except UnsupportedPattern as err:
            raise DataError(f"{where}: {field}: {err}") from err

    return matches


def config_from_peft(
    data: dict[str, Any], model: nn.Module, where: str = "adapter config"
) -> tuple[LoRAConfig, TargetPlan | None]:
    """A :class:`LoRAConfig` selecting exactly the layers PEFT would, by PEFT's matching rules.

    Returns:
        The config, and for a model without adapters the plan of its targets (made once, here).
    """
    data = {**LATER_FIELDS, **data}
    model = unwrap_model(model)
    names = [n for n, _ in model.named_modules() if n]
    targets: list[str] | str = data["target_modules"]
    budget = MatchBudget()  # for every pattern of this file together
    if targets != ALL_LINEAR:
        targets = _peft_names(names, targets, where, "target_modules", budget)
        if not targets:
            raise ValueError(f"{where}: target_modules {data['target_modules']!r} matches no module of this model")
    excluded = _peft_names(names, data["exclude_modules"], where, "exclude_modules", budget) or []
    saved = data["modules_to_save"] or []
    if not isinstance(saved, list) or not all(isinstance(k, str) for k in saved):
        raise ValueError(f"{where}: modules_to_save must be a list of names or null, got {saved!r}")
    saved = sorted({n for n in names for key in saved if n.endswith(key)})  # PEFT's rule: a plain suffix
    try:
        config = LoRAConfig(
            rank=data["r"],
            alpha=data["lora_alpha"],
            dropout=data["lora_dropout"],
            target_modules=targets,
            exclude_modules=excluded,
            use_dora=data["use_dora"],
            use_rslora=data["use_rslora"],
            init=next(
                (k for k, v in INIT_IN_PEFT.items() if v == data.get("init_lora_weights") and v is not True), "kaiming"
            ),  # fmt: skip
            bias=data["bias"],
            modules_to_save=saved,
        )
        plan = None
        if any(True for _ in lora_layers(model)):  # loading into existing adapters: same layers, checked later
            adapted = [n for n, _ in top_level_targets(model)]
        else:
            plan = plan_targets(model, config)  # rank and alpha patterns select no layers: the same plan
            adapted = list(plan.targets)
        config = replace(
            config,
            rank_pattern=_peft_per_layer(data["rank_pattern"], adapted, config.rank, where, "rank_pattern", budget),
            alpha_pattern=_peft_per_layer(data["alpha_pattern"], adapted, config.alpha, where, "alpha_pattern", budget),
        )
        return config, plan
    except DataError:
        raise  # names the file already
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: {err}") from err
