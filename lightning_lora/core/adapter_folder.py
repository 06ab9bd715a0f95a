"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, folder)`` loads a folder written by :func:`save_adapter`,
and :func:`load_adapter` reads one written by PEFT's ``save_pretrained``
(:mod:`~lightning_lora.core.peft_format` translates). The fingerprint of the base weights the
adapter was trained on (:mod:`~lightning_lora.core.fingerprint`) rides in the safetensors
metadata, which PEFT ignores; a folder without one (PEFT's own) loads with a one-line notice.

Reading trusts nothing: tensors must be finite floats of the expected shapes, and nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._version import __version__
from lightning_lora.core.adapter_layout import (
    AdapterFiles,
    adapter_subfolder,
    subfolder_of,
    write_adapter_folder,
)
from lightning_lora.core.adapter_tensors import adapter_tensors, base_state_dict
from lightning_lora.core.config import FROM_WEIGHT_INITS, LoRAConfig
from lightning_lora.core.fingerprint import first_difference, touched_fingerprint
from lightning_lora.core.inject import base_view, delete_adapter, inject_lora
from lightning_lora.core.layers import DEFAULT_ADAPTER, LoRAConv, LoRAMultiheadAttention
from lightning_lora.core.model_state import (
    adapter_configs,
    get_lora_config,
    lora_layers,
    unwrap_model,
)
from lightning_lora.core.peft_format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    config_from_peft,
    peft_config,
    peft_keys,
    read_adapter_config,
    top_level_targets,
)
from lightning_lora.core.safe_io import read_safetensors
from lightning_lora.core.targets import TargetPlan, refuse_oversized
from lightning_lora.errors import DataError

log = logging.getLogger("lightning_lora")


METADATA_KEY = "lightning_lora"
FORMAT_VERSION = 2


def _conv_settings_peft_ignores(model: nn.Module) -> list[str]:
    return [
        name
        for name, layer in lora_layers(model)
        if isinstance(layer, LoRAConv)
        and (layer.groups > 1 or layer.padding_mode != "zeros" or any(d != 1 for d in layer.dilation))
    ]


def layers_peft_gets_wrong(model: nn.Module) -> list[str]:
    """The adapted layers whose folder PEFT (0.21) would refuse or compute differently from this model."""
    attention = [name for name, layer in lora_layers(model) if isinstance(layer, LoRAMultiheadAttention)]
    return attention + _conv_settings_peft_ignores(model)


def _warn_where_peft_differs(model: nn.Module) -> None:
    """Say when PEFT cannot reproduce a layer from this folder (its LoRA conv ignores these settings)."""
    odd = _conv_settings_peft_ignores(model)
    if odd:
        log.warning(
            "adapter layers %s use groups, dilation or a padding mode that PEFT's LoRA conv ignores: lightning-lora "
            "loads this folder exactly; PEFT would refuse it or compute something else",
            odd,
        )


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_names: list[str] | None = None, convert_to_lora: bool = False
) -> Path:
    """Write adapters as a PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors`` each.

    PEFT's multi-adapter layout: ``"default"`` at the folder's root, every other adapter in a
    subfolder of its name (what PEFT's ``save_pretrained`` writes and ``load_adapter`` reads).
    Keys are the plain model's, whatever wraps it (``torch.compile``, DDP, Fabric). The folder is
    written under a temporary name and swapped into place, all adapters at once; an existing
    folder at ``path`` is replaced only if it is an adapter folder itself, and the adapters it holds
    that are not written now stay as they were (PEFT's ``save_pretrained`` keeps them too): nothing
    saved earlier is lost.

    Args:
        model: A model holding adapters.
        path: The folder to write.
        adapter_names: The adapters to write (default: all of them).
        convert_to_lora: Write a PiSSA/OLoRA adapter as the plain LoRA adapter of twice the rank that
            gives the same model on the *original* base, ``W + scale (B A - B_0 A_0)`` (PEFT's
            ``path_initial_model_for_weight_conversion``): ``A' = [A; A_0]``, ``B' = [B, -B_0]``.
            Other adapters are written as they are.

    Returns:
        The folder written.

    Raises:
        ValueError: the model holds no adapters (or not the ones named), or an adapter tensor is
            NaN or infinite.
    """
    model = unwrap_model(model)
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("model holds no adapters to save; call inject_lora(model, config) first")
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    if adapter_names is not None and (
        not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names)
    ):
        raise ValueError(f"save_adapter: adapter_names must be a list of adapter names, got {adapter_names!r}")
    names = list(configs) if adapter_names is None else list(dict.fromkeys(adapter_names))
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise ValueError(f"save_adapter: no adapter named {unknown[0]!r}; the model's are {list(configs)}"
                         if unknown else "save_adapter: adapter_names is empty; name at least one adapter")  # fmt: skip
    rewriting = [n for n, c in configs.items() if c.init in FROM_WEIGHT_INITS]
    on_residual = [n for n in names if configs[n].init not in FROM_WEIGHT_INITS]
    if convert_to_lora and rewriting and on_residual:
        raise ValueError(
            f"save_adapter: adapters {on_residual} ran on the residual {rewriting[0]!r} ({configs[rewriting[0]].init}) "
            "left in the layers, which a converted folder no longer has; save them without convert_to_lora (they "
            f"load after {rewriting[0]!r} does), e.g. save_adapter(model, folder, adapter_names={rewriting}, "
            "convert_to_lora=True) into one folder and the others into another"
        )
    folders = {subfolder_of(name): _adapter_files(model, name, convert_to_lora) for name in names}
    _warn_where_peft_differs(model)
    return write_adapter_folder(path, folders)


def _adapter_files(model: nn.Module, name: str, convert_to_lora: bool = False) -> AdapterFiles:
    keys = peft_keys(model, name)
    tensors = {keys[k]: v.detach() for k, v in adapter_tensors(model, name).items()}
    config = peft_config(model, name)
    if convert_to_lora and config["init_lora_weights"] in ("pissa", "olora"):
        config, tensors = _as_plain_lora(model, name, keys, config, tensors)
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"refusing to save adapter {name!r}: NaN or infinite values in {bad[:5]}")
    metadata = {
        "format_version": FORMAT_VERSION,
        "lightning_lora_version": __version__,
        "base_fingerprint": touched_fingerprint(model, adapter_name=name),
    }
    return config, tensors, {METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def _as_plain_lora(
    model: nn.Module, name: str, keys: dict[str, str], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter's files as a plain LoRA adapter for the original base (rank doubled, scale kept)."""
    tensors = dict(tensors)
    for layer_name, layer in lora_layers(model):
        if name not in layer.lora_adapters:
            continue
        adapter, prefix = layer.lora_adapters[name], f"{layer_name}.lora_adapters.{name}."
        a_key, b_key = keys[prefix + "lora_A"], keys[prefix + "lora_B"]
        tensors[a_key] = torch.cat([adapter.lora_A.detach(), adapter.lora_A_init], dim=0)
        tensors[b_key] = torch.cat([adapter.lora_B.detach(), -adapter.lora_B_init], dim=1)
    growth = 2**0.5 if config["use_rslora"] else 2  # alpha / sqrt(r) or alpha / r: the same scale at rank 2r
    config = {
        **config,
        "r": 2 * config["r"],
        "lora_alpha": growth * config["lora_alpha"],
        "rank_pattern": {k: 2 * v for k, v in config["rank_pattern"].items()},
        "alpha_pattern": {k: growth * v for k, v in config["alpha_pattern"].items()},
        "init_lora_weights": True,
    }
    return config, tensors


def _read_metadata(raw: dict[str, str], where: Path) -> dict[str, Any] | None:
    if METADATA_KEY not in raw:
        return None
    try:
        meta = json.loads(raw[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{where}: the lightning_lora metadata is not valid JSON ({err}); re-export") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("base_fingerprint"), dict):
        raise ValueError(f"{where}: the lightning_lora metadata lacks a base fingerprint; re-export the adapter")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {version!r}, newer than this lightning-lora {__version__} reads "
            f"(up to {FORMAT_VERSION}); upgrade lightning-lora"
        )
    return meta


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    check_base: bool = True,
    subfolder: str | None = None,
) -> nn.Module:
    """Load the adapter saved at ``path`` into ``model`` under ``adapter_name``.

    ``path`` is an adapter folder; where it holds a subfolder of ``adapter_name`` (PEFT's layout
    of a further adapter), that subfolder is read. ``model`` is the plain base (the adapter
    becomes its first), or holds other adapters (it is added beside them, inactive, as
    :func:`~lightning_lora.core.inject.inject_lora` adds one), or holds ``adapter_name`` with the
    same layers and settings (its values are replaced; merged layers are unmerged first and
    merged again with the new values). On any error the model is left as it was. Nothing is ever
    unpickled.

    Args:
        model: The base model (wrappers such as ``torch.compile`` are seen through).
        path: A folder written by :func:`save_adapter` or by PEFT's ``save_pretrained``.
        adapter_name: The name the adapter gets (and the subfolder looked for).
        check_base: Refuse a base whose weights differ from the fingerprint in the file.
        subfolder: Read ``path/subfolder`` (``""``: the root) whatever ``adapter_name`` is, e.g. to
            load a folder's ``"b"`` as ``"digit4"``; by default, see :func:`read_adapter_folder`.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a broken, incomplete or foreign file, another base, or tensors that do not
            fit; the message says which.
    """
    outer, model = model, unwrap_model(model)
    folder, data, tensors, meta = read_adapter_folder(path, adapter_name, subfolder)
    with base_view(model):
        config, plan = config_from_peft(data, model, str(folder / ADAPTER_CONFIG_NAME))
    configs = adapter_configs(model)
    replacing = adapter_name in configs
    if replacing and not _same_layers(model, config, tensors, adapter_name):
        raise ValueError(
            f"model already holds an adapter {adapter_name!r} other than the one in {folder} (other layers, ranks, "
            "scales or options); load it under another adapter_name, or into the plain base"
        )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are still on the meta device; load the base weights before the adapter")
    if replacing:
        log.info("load_adapter: adapter %r takes the values of %s (the same layers and settings)", adapter_name, folder)
    else:
        refuse_oversized(model, config, f"adapter {folder}", plan=plan)
    if check_base:
        check_base_fingerprint(model, config, plan, meta, folder)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    merged = [(layer, list(layer.merged_adapters)) for _, layer in lora_layers(model) if layer.merged]
    if not replacing:
        inject_lora(model, config, adapter_name=adapter_name, plan=plan)
    try:
        for layer, _ in merged:
            layer.unmerge()
        _copy_into(model, tensors, folder, adapter_name)
    except Exception:
        if not replacing:
            delete_adapter(model, adapter_name)
            for param in model.parameters():
                param.requires_grad_(grad_flags.get(id(param), param.requires_grad))
        raise
    finally:
        for layer, names in merged:
            layer.merge(names)
    return outer


def read_adapter_folder(
    path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER, subfolder: str | None = None
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """One adapter's files, checked: its folder (:func:`~lightning_lora.core.adapter_layout.adapter_subfolder`
    picks it), its config JSON, its tensors (one name each) and the lightning_lora metadata (``None`` in PEFT's
    own files)."""
    folder = adapter_subfolder(path, adapter_name, subfolder)
    data = read_adapter_config(folder)
    tensors, raw_meta = read_safetensors(folder / ADAPTER_WEIGHTS_NAME, "adapter weights")
    meta = _read_metadata(raw_meta, folder / ADAPTER_WEIGHTS_NAME)
    return folder, data, _peft_aliases(tensors, folder), meta


def _same_layers(model: nn.Module, config: LoRAConfig, tensors: dict[str, torch.Tensor], name: str) -> bool:
    """Whether a folder (``config``, ``tensors``) holds adapter ``name`` as the model has it:
    the same adapted layers (by tensor names), options, ranks and scales."""
    if set(peft_keys(model, name).values()) != set(_peft_aliases(tensors, Path("."))):
        return False
    existing = get_lora_config(model, name)
    if any(getattr(existing, f) != getattr(config, f) for f in ("use_dora", "use_rslora", "bias", "dropout")):
        return False
    for layer_name, layer in top_level_targets(model):
        if name not in layer.lora_adapters:
            continue
        wanted, adapter = config.for_layer(layer_name), layer.lora_adapters[name]
        if wanted.rank != adapter.rank or wanted.scale != adapter.scale:
            return False
    return True


def check_base_fingerprint(
    model: nn.Module, config: LoRAConfig, plan: TargetPlan | None, meta: dict | None, folder: Path
) -> None:
    """Refuse a base other than the one the folder's adapter was trained on (a notice if the folder has no record)."""
    if meta is None:
        log.warning(
            "adapter %s has no base fingerprint (written by PEFT?): loading it without checking that this is "
            "the base it was trained on",
            folder,
        )
        return
    actual = touched_fingerprint(model, config, plan)
    recorded = meta["base_fingerprint"]
    if set(recorded) != set(actual) and set(recorded) <= set(base_state_dict(model)):  # it has every recorded tensor
        layers = sorted({k.rpartition(".")[0] for k in recorded}), sorted({k.rpartition(".")[0] for k in actual})
        raise ValueError(
            f"adapter {folder}: its {ADAPTER_CONFIG_NAME} targets layers {layers[1][:5]}, but the adapter was saved "
            f"for layers {layers[0][:5]}: the config was edited or damaged (restore it, or re-export the adapter), or "
            "this base has other layers than the one it was made for (load the base it was trained on)"
        )
    problem = first_difference(recorded, actual)
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


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""The tensor types an adapter file may hold (each is read into the model's own dtype)."""


def _copy_into(model: nn.Module, loaded: dict[str, torch.Tensor], folder: Path, name: str) -> None:
    """Copy file tensors into the live adapter ``name``, checking names, dtypes, values and shapes first."""
    loaded = _peft_aliases(loaded, folder)
    keys = peft_keys(model, name)
    live = adapter_tensors(model, name)
    expected = {keys[k]: k for k in live}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {folder} does not fit this model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    problems = []
    for file_key, key in expected.items():
        tensor, target = loaded[file_key], live[key]
        if target.is_floating_point() and tensor.dtype not in FLOAT_DTYPES:
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
