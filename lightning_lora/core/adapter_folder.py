"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, folder)`` loads a folder written by :func:`save_adapter`,
and :func:`load_adapter` reads one written by PEFT's ``save_pretrained``. The fingerprint of the
base weights the adapter was trained on rides in the safetensors metadata, which PEFT ignores;
a folder without one (PEFT's own) loads with a one-line notice.

Reading trusts nothing: every field the adapter needs must be present, PEFT features this
package does not implement are refused by name, tensors must be finite floats of the expected
shapes, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._version import __version__
from lightning_lora.core.config import ALL_LINEAR, LoRAConfig
from lightning_lora.core.inject import (
    adapter_tensors,
    base_state_dict,
    get_lora_config,
    inject_lora,
    lora_layers,
    remove_lora,
    saved_modules,
    unwrap_model,
)
from lightning_lora.core.layers import LoRAConv, LoRAConv1D, LoRALayer, kept_biases
from lightning_lora.core.safe_io import read_json, read_safetensors, tensor_sha256, write_adapter_folder
from lightning_lora.core.targets import plan_targets, refuse_oversized

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


# -- the mapping between our keys and PEFT's ---------------------------------------------------


def _peft_path(model: nn.Module, name: str) -> str:
    """A module's path in PEFT's model: ``base_layer`` appears wherever a path enters an adapted layer."""
    parts, here, out = name.split("."), model, []
    for part in parts:
        if isinstance(here, LoRALayer):
            out.append("base_layer")
        here = getattr(here, part)
        out.append(part)
    return ".".join(out)


def peft_keys(model: nn.Module) -> dict[str, str]:
    """Our state-dict key -> PEFT's file key, for every adapter tensor of an adapted ``model``."""
    model = unwrap_model(model)
    keys: dict[str, str] = {}
    for name, layer in lora_layers(model):
        path = _peft_path(model, name)
        for attr, peft_name in layer.adapter_names.items():
            if hasattr(layer, attr):
                keys[f"{name}.{attr}"] = f"{PEFT_PREFIX}{path}.{peft_name}"
    for module, param, qualified in kept_biases(model):
        module_name = qualified.rpartition(".")[0]
        path = _peft_path(model, module_name) if module_name else ""
        inner = "base_layer." if isinstance(module, LoRALayer) else ""
        keys[qualified] = f"{PEFT_PREFIX}{path + '.' if path else ''}{inner}{param}"
    for name, saved in saved_modules(model):
        for key in saved.trained_module.state_dict():
            keys[f"{name}.trained_module.{key}"] = f"{PEFT_PREFIX}{_peft_path(model, name)}.{key}"
    return keys


def _top_level_targets(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Adapted layers that were targeted themselves (not an attention's out_proj)."""
    inner = {id(layer.out_proj) for _, layer in lora_layers(model) if hasattr(layer, "out_proj")}
    return [(n, layer) for n, layer in lora_layers(model) if id(layer) not in inner]


def peft_config(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT needs to rebuild exactly these layers."""
    model = unwrap_model(model)
    config = get_lora_config(model)
    layers = _top_level_targets(model)
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
        "modules_to_save": sorted(n for n, _ in saved_modules(model)) or None,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        # Anchored: PEFT matches a pattern against the end of a module's name, so a bare "fc" would also
        # claim "sub.fc"; "^fc" is that one layer only.
        "rank_pattern": {f"^{re.escape(n)}": layer.rank for n, layer in layers if layer.rank != config.rank},
        "alpha_pattern": {
            f"^{re.escape(n)}": layer.config.alpha for n, layer in layers if layer.config.alpha != config.alpha
        },
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }


# -- fingerprints ----------------------------------------------------------------------------


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


def touched_fingerprint(model: nn.Module, config: LoRAConfig | None = None) -> dict[str, dict[str, Any]]:
    """Fingerprint of the base tensors an adapter touches (adapted layers, ``modules_to_save``).

    Works on an adapted model or, given ``config``, on the plain base the adapter is meant for.
    """
    model = unwrap_model(model)
    state = base_state_dict(model)
    if get_lora_config(model) is not None:
        modules = [n for n, _ in _top_level_targets(model)] + [n for n, _ in saved_modules(model)]
    else:
        plan = plan_targets(model, config)
        modules = list(plan.targets) + list(plan.to_save)
    return fingerprint(state, _touched_keys(state, modules))


# -- writing ---------------------------------------------------------------------------------


def _warn_where_peft_differs(model: nn.Module) -> None:
    """Say when PEFT cannot reproduce a layer from this folder (its LoRA conv ignores these settings)."""
    odd = [
        name
        for name, layer in lora_layers(model)
        if isinstance(layer, LoRAConv)
        and (layer.groups > 1 or layer.padding_mode != "zeros" or any(d != 1 for d in layer.dilation))
    ]
    if odd:
        log.warning(
            "adapter layers %s use groups, dilation or a padding mode that PEFT's LoRA conv ignores: lightning-lora "
            "loads this folder exactly; PEFT would refuse it or compute something else",
            odd,
        )


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are the plain model's, whatever wraps it (``torch.compile``, DDP, Fabric). The folder is
    written under a temporary name and swapped into place; an existing folder at ``path`` is
    replaced only if it is an adapter folder itself.

    Returns:
        The folder written.

    Raises:
        ValueError: the model holds no adapters, or an adapter tensor is NaN or infinite.
    """
    model = unwrap_model(model)
    if get_lora_config(model) is None:
        raise ValueError("model holds no adapters to save; call inject_lora(model, config) first")
    keys = peft_keys(model)
    tensors = {keys[k]: v.detach() for k, v in adapter_tensors(model).items()}
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"refusing to save an adapter with NaN or infinite values in {bad[:5]}")
    _warn_where_peft_differs(model)
    metadata = {
        "format_version": FORMAT_VERSION,
        "lightning_lora_version": __version__,
        "base_fingerprint": touched_fingerprint(model),
    }
    return write_adapter_folder(
        path,
        config=peft_config(model),
        tensors=tensors,
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)},
    )


# -- reading ---------------------------------------------------------------------------------


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
    if init not in (True, False, "gaussian"):
        used.append(f"init_lora_weights={init!r}")
    if used:
        raise ValueError(f"{where} uses PEFT features lightning-lora does not implement: {used}")
    return data


def _peft_names(names: list[str], patterns: Any, where: str, field: str) -> list[str] | None:
    """What PEFT's ``target_modules``/``exclude_modules`` select: a regex (full match) or names (exact or suffix)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        try:
            return [n for n in names if re.fullmatch(patterns, n)]
        except re.error as err:
            raise ValueError(f"{where}: {field} {patterns!r} is not a valid regex ({err})") from err
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: {field} must be a regex or a list of module names, got {patterns!r}")
    return [n for n in names if any(n == p or n.endswith("." + p) for p in patterns)]


def _peft_per_layer(patterns: Any, targets: list[str], default: Any, where: str, field: str) -> dict[str, Any]:
    """PEFT's ``rank_pattern``/``alpha_pattern`` (first regex matching the end of the name) for every target.

    Every target gets its own exact entry, longest names first, so that in this package's
    pattern syntax (exact or dot-suffix, first match wins) each layer finds its own value.
    """
    if not isinstance(patterns, dict):
        raise ValueError(f"{where}: {field} must be a mapping, got {patterns!r}")
    resolved = {}
    for name in sorted(targets, key=lambda n: (-len(n), n)):
        try:
            hit = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
        except re.error as err:
            raise ValueError(f"{where}: {field} holds an invalid regex ({err})") from err
        resolved[name] = patterns[hit] if hit is not None else default
    return resolved


def config_from_peft(data: dict[str, Any], model: nn.Module, where: str = "adapter config") -> LoRAConfig:
    """A :class:`LoRAConfig` selecting exactly the layers PEFT would, by PEFT's matching rules."""
    data = {**LATER_FIELDS, **data}
    model = unwrap_model(model)
    names = [n for n, _ in model.named_modules() if n]
    targets: list[str] | str = data["target_modules"]
    if targets != ALL_LINEAR:
        targets = _peft_names(names, targets, where, "target_modules")
        if not targets:
            raise ValueError(f"{where}: target_modules {data['target_modules']!r} matches no module of this model")
    excluded = _peft_names(names, data["exclude_modules"], where, "exclude_modules") or []
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
            init="gaussian" if data.get("init_lora_weights") == "gaussian" else "kaiming",
            bias=data["bias"],
            modules_to_save=saved,
        )
        if get_lora_config(model) is not None:  # loading into existing adapters: same layers, checked later
            adapted = [n for n, _ in _top_level_targets(model)]
        else:
            adapted = list(plan_targets(model, config).targets)
        return replace(
            config,
            rank_pattern=_peft_per_layer(data["rank_pattern"], adapted, config.rank, where, "rank_pattern"),
            alpha_pattern=_peft_per_layer(data["alpha_pattern"], adapted, config.alpha, where, "alpha_pattern"),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def _read_metadata(raw: dict[str, str], where: Path) -> dict[str, Any] | None:
    if METADATA_KEY not in raw:
        return None
    try:
        meta = json.loads(raw[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{where}: the lightning_lora metadata is not valid JSON ({err}); re-export") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("base_fingerprint"), dict):
        raise ValueError(f"{where}: the lightning_lora metadata lacks a base fingerprint; re-export the adapter")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {version!r}, newer than this lightning-lora {__version__} reads "
            f"(up to {FORMAT_VERSION}); upgrade lightning-lora"
        )
    return meta


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Inject the adapter saved at ``path`` into ``model`` and load its tensors.

    ``model`` is the plain base, or holds adapters of the same config (their values are
    replaced; merged layers are unmerged first and merged again with the new values). On any
    error the model is left as it was. Nothing is ever unpickled.

    Args:
        model: The base model (wrappers such as ``torch.compile`` are seen through).
        path: A folder written by :func:`save_adapter` or by PEFT's ``save_pretrained``.
        check_base: Refuse a base whose weights differ from the fingerprint in the file.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a broken, incomplete or foreign file, another base, or tensors that do not
            fit; the message says which.
    """
    outer, model = model, unwrap_model(model)
    folder = Path(path)
    data = read_adapter_config(folder)
    tensors, raw_meta = read_safetensors(folder / ADAPTER_WEIGHTS_NAME, "adapter weights")
    meta = _read_metadata(raw_meta, folder / ADAPTER_WEIGHTS_NAME)
    config = config_from_peft(data, model, str(folder / ADAPTER_CONFIG_NAME))
    existing = get_lora_config(model)
    if existing is not None and not _same_layers(model, config, tensors):
        raise ValueError(
            f"model already holds adapters other than the ones in {folder} (other layers, ranks, scales or "
            "options); load into the plain base, or call remove_lora(model) first"
        )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are still on the meta device; load the base weights before the adapter")
    if existing is None:
        refuse_oversized(model, config, f"adapter {folder}")
    if check_base:
        _check_fingerprint(model, config, meta, folder)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if existing is None:
        inject_lora(model, config)
    try:
        for layer in merged:
            layer.unmerge()
        _copy_into(model, tensors, folder)
    except Exception:
        if existing is None:
            remove_lora(model)
            for param in model.parameters():
                param.requires_grad_(grad_flags.get(id(param), param.requires_grad))
        raise
    finally:
        for layer in merged:
            layer.merge()
    return outer


def _same_layers(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a folder (``config``, ``tensors``) holds the adapters the model already has:
    the same adapted layers (by tensor names), options, ranks and scales."""
    if set(peft_keys(model).values()) != set(_peft_aliases(tensors, Path("."))):
        return False
    existing = get_lora_config(model)
    if any(getattr(existing, f) != getattr(config, f) for f in ("use_dora", "use_rslora", "bias", "dropout")):
        return False
    for name, layer in _top_level_targets(model):
        wanted = config.for_layer(name)
        if wanted.rank != layer.rank or wanted.scale != layer.scale:
            return False
    return True


def _check_fingerprint(model: nn.Module, config: LoRAConfig, meta: dict | None, folder: Path) -> None:
    if meta is None:
        log.warning(
            "adapter %s has no base fingerprint (written by PEFT?): loading it without checking that this is "
            "the base it was trained on",
            folder,
        )
        return
    actual = touched_fingerprint(model) if get_lora_config(model) is not None else touched_fingerprint(model, config)
    problem = first_difference(meta["base_fingerprint"], actual)
    if problem:
        raise ValueError(
            f"adapter {folder} was made for another base model: {problem}. Load the base it was trained on, "
            "or pass check_base=False to load it anyway."
        )


def _peft_aliases(loaded: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's files may name a ``modules_to_save`` tensor twice (``head.bias`` and, with
    ``bias="all"``, ``head.modules_to_save.bias``) and carry the frozen originals: one name each."""
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in loaded.items():
        if ".original_module." in key:
            continue
        name = key.replace(".modules_to_save.", ".")
        if name in tensors and not torch.equal(tensors[name], tensor):
            raise ValueError(f"adapter {folder} holds two different values for {name}")
        tensors[name] = tensor
    return tensors


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _copy_into(model: nn.Module, loaded: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy file tensors into the live adapter, checking names, dtypes, values and shapes first."""
    loaded = _peft_aliases(loaded, folder)
    keys = peft_keys(model)
    live = adapter_tensors(model)
    expected = {keys[k]: k for k in live}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {folder} does not fit this model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    problems = []
    for file_key, key in expected.items():
        tensor, target = loaded[file_key], live[key]
        if target.is_floating_point() and tensor.dtype not in _FLOAT_DTYPES:
            problems.append(f"{file_key} has dtype {tensor.dtype}, not a float type this package reads")
        elif not target.is_floating_point() and tensor.dtype != target.dtype:
            problems.append(f"{file_key} has dtype {tensor.dtype}; this model's tensor is {target.dtype}")
        elif tensor.shape != target.shape:
            problems.append(f"{file_key}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}")
        elif target.is_floating_point() and not torch.isfinite(tensor.to(target.dtype)).all():
            problems.append(f"{file_key} holds NaN or infinite values (as {target.dtype})")
    if problems:
        raise ValueError(f"adapter {folder} has unusable tensors: " + "; ".join(problems[:10]))
    with torch.no_grad():
        for file_key, key in expected.items():
            live[key].copy_(loaded[file_key])
