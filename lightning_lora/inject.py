"""Model surgery: choose targets, inject adapters, freeze, merge, disable, count.

Everything here works on any ``nn.Module`` and never imports Lightning, so it serves a
notebook, a plain training loop or the Lightning callback alike.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_lora._version import __version__
from lightning_lora.files import (
    atomic_directory,
    read_json,
    read_safetensors,
    tensor_sha256,
    write_json,
    write_safetensors,
)
from lightning_lora.lora import ALL_LINEAR, LoRAConfig, LoRALinear, ModuleToSave

_CONFIG_ATTR = "lora_config"

# Parents that read a child Linear's weight directly instead of calling it (MultiheadAttention's
# out_proj goes through F.multi_head_attention_forward; the Transformer layers have a fused
# inference fast path). An adapter there would be silently ignored, so it is refused.
_FUNCTIONAL_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def matches(name: str, pattern: str) -> bool:
    """Whether a module's qualified ``name`` matches a target ``pattern``.

    A pattern matches the full name exactly, as a dot-suffix (``"fc1"`` matches
    ``"net.fc1"``), or as a glob on either (``"layers.*"`` matches ``"net.layers.0"``).
    """
    if name == pattern or name.endswith("." + pattern):
        return True
    return _is_glob(pattern) and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]


def _modules_matching(model: nn.Module, patterns: list[str], field: str) -> dict[str, nn.Module]:
    """Modules matched by any pattern; each pattern must match at least one module."""
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {n: m for n, m in model.named_modules() if n and matches(n, pattern)}
        if not hits:
            raise ValueError(
                f"LoRAConfig.{field} pattern {pattern!r} matches no module. "
                f"Linear layers in this model: {_linear_names(model) or 'none'}"
            )
        found.update(hits)
    return found


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.{child}" if name else child: module
        for name, module in model.named_modules()
        for child, _ in module.named_children()
    }


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers ``config`` adapts, by qualified name, without changing anything.

    Raises:
        ValueError: a pattern matches nothing (the message lists the linear layers), a pattern
            names a module that is not an ``nn.Linear``, or a target's parent reads its weight
            without calling it (``nn.MultiheadAttention.out_proj``).
    """
    to_save = _modules_matching(model, config.modules_to_save, "modules_to_save")
    saved_or_inside = lambda n: any(n == s or n.startswith(s + ".") for s in to_save)  # noqa: E731
    if config.target_modules == ALL_LINEAR:
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    else:
        candidates = _modules_matching(model, config.target_modules, "target_modules")
    excluded = _modules_matching(model, config.exclude_modules, "exclude_modules")
    parents = _parents(model)
    targets: dict[str, nn.Linear] = {}
    for name, module in candidates.items():
        if name in excluded or saved_or_inside(name):
            continue
        if not isinstance(module, nn.Linear):
            if _swept_by_glob(name, module, config):
                continue
            raise ValueError(
                f"LoRA target '{name}' is a {type(module).__name__}, not an nn.Linear; "
                f"LoRA here adapts nn.Linear layers only. Linear layers: {_linear_names(model)}"
            )
        if isinstance(parents.get(name), _FUNCTIONAL_PARENTS):
            if config.target_modules == ALL_LINEAR:
                continue  # "all-linear" means every Linear that can be adapted
            raise ValueError(
                f"LoRA target '{name}' belongs to a {type(parents[name]).__name__}, which uses "
                "its weight directly instead of calling it, so an adapter there would be "
                "silently ignored. Add it to exclude_modules or target other layers."
            )
        targets[name] = module
    if not targets:
        raise ValueError(
            f"LoRAConfig selects no nn.Linear to adapt (targets {config.target_modules!r}, "
            f"excluded {config.exclude_modules!r}). Linear layers: {_linear_names(model)}"
        )
    return targets


def _swept_by_glob(name: str, module: nn.Module, config: LoRAConfig) -> bool:
    """A glob sweeps over containers and parameter-free modules (ReLU, Dropout) harmlessly."""
    by_name = [p for p in config.target_modules if not _is_glob(p) and matches(name, p)]
    has_own_params = any(True for _ in module.parameters(recurse=False))
    return not by_name and (not has_own_params or any(True for _ in module.children()))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every adapted layer, by qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModuleToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModuleToSave):
            yield name, module


def get_lora_config(model: nn.Module) -> LoRAConfig | None:
    """The config the model's adapters were made with, or ``None`` for a plain model."""
    return getattr(model, _CONFIG_ATTR, None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and wrap its target layers with adapters, in place.

    Idempotent: a model already adapted with an equal config is returned unchanged, which is
    what lets a Lightning callback inject in ``setup()`` for every stage.

    Returns:
        The same ``model``, adapted.

    Raises:
        ValueError: bad targets (see :func:`find_targets`), or the model already holds
            adapters made with a different config.
    """
    existing = get_lora_config(model)
    if existing is not None:
        if existing == config:
            return model
        raise ValueError(
            f"model already holds adapters made with {existing}; refusing to inject {config}. "
            "Use merge_and_unload(model) or start from the plain base model."
        )
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already holds LoRA layers that inject_lora did not make")
    if isinstance(model, nn.Linear):
        raise ValueError("inject_lora needs a container module; wrap the nn.Linear, e.g. nn.Sequential(layer)")
    targets = find_targets(model, config)
    to_save = _modules_matching(model, config.modules_to_save, "modules_to_save")
    model.requires_grad_(False)
    for name, linear in targets.items():
        layer = LoRALinear(
            linear,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            init=config.init,
        )
        layer.train(linear.training)
        _set_submodule(model, name, layer)
        if config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                param.requires_grad_(True)
    for name in sorted(to_save, key=len):
        if not any(name.startswith(outer + ".") for outer in to_save if outer != name):
            _set_submodule(model, name, ModuleToSave(to_save[name]))
    setattr(model, _CONFIG_ATTR, config)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (fp32 arithmetic). Idempotent."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight exactly. Idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _plain_linear(layer: LoRALinear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s current weight and bias Parameters."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight, plain.bias = layer.weight, layer.bias
    plain.train(layer.training)
    return plain


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapted layer by a plain ``nn.Linear`` holding the merged weight.

    The result contains no lightning_lora types, so it runs (and pickles) without this
    package; a module in ``modules_to_save`` is replaced by its trained copy.
    """
    for name, layer in list(lora_layers(model)):
        layer.merge()
        _set_submodule(model, name, _plain_linear(layer))
    for name, saved in list(_saved_modules(model)):
        _set_submodule(model, name, saved.trained_module)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside, outputs equal the un-adapted model's bit for bit.

    Works on merged layers too (they keep the pre-merge weight aside). The previous state is
    restored on exit, also when the block raises.
    """
    switches = [m for _, m in lora_layers(model)] + [m for _, m in _saved_modules(model)]
    before = [m.enabled for m in switches]
    try:
        for module in switches:
            module.enabled = False
        yield model
    finally:
        for module, was_enabled in zip(switches, before, strict=True):
            module.enabled = was_enabled


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that make up the adapter, by state-dict key (not copies).

    These are the ``lora_*`` tensors of every adapted layer, the biases the config trains, and
    the full state of every ``modules_to_save`` copy. Selection is structural, never by
    substring, so a base module that happens to be called ``lora_head`` is not swept in.
    """
    config = get_lora_config(model)
    if config is None:
        raise ValueError("model holds no adapters; call inject_lora(model, config) first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        for key in ("lora_A", "lora_B", "lora_magnitude"):
            if hasattr(layer, key):
                tensors[f"{name}.{key}"] = getattr(layer, key)
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias" and ".original_module." not in f".{name}":
                tensors[name] = param
    for name, saved in _saved_modules(model):
        for key, tensor in saved.trained_module.state_dict(keep_vars=True).items():
            tensors[f"{name}.trained_module.{key}"] = tensor
    return tensors


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, detached: all that must be saved to rebuild it on the same base."""
    return {k: v.detach() for k, v in adapter_tensors(model).items()}


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable and total parameters, printed like PEFT's ``print_trainable_parameters``."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return ParameterCount(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FORMAT = "lightning-lora-adapter"
ADAPTER_FORMAT_VERSION = 1


def _fingerprint(weights: dict[str, torch.Tensor], saved: dict[str, nn.Module]) -> dict:
    return {
        "layers": {n: {"shape": list(w.shape), "sha256": tensor_sha256(w)} for n, w in sorted(weights.items())},
        "modules_to_save": {
            n: {k: tensor_sha256(v) for k, v in sorted(m.state_dict().items())} for n, m in sorted(saved.items())
        },
    }


def base_fingerprint(model: nn.Module, config: LoRAConfig | None = None) -> dict:
    """Shapes and hashes of the base weights an adapter touches.

    Works on an adapted model (hashing the pre-merge weights and the original copies of
    ``modules_to_save``) or, given ``config``, on the plain base the adapter is meant for.
    """
    if get_lora_config(model) is not None:
        weights = {n: layer._base_weight() for n, layer in lora_layers(model)}
        saved = {n: m.original_module for n, m in _saved_modules(model)}
        return _fingerprint(weights, saved)
    if config is None:
        raise ValueError("base_fingerprint of a plain model needs the LoRAConfig that selects its targets")
    weights = {n: linear.weight for n, linear in find_targets(model, config).items()}
    return _fingerprint(weights, _modules_matching(model, config.modules_to_save, "modules_to_save"))


def _fingerprint_mismatch(expected: dict, actual: dict) -> list[str]:
    problems = []
    for section in ("layers", "modules_to_save"):
        want, have = expected.get(section, {}), actual.get(section, {})
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"'{name}' is adapted by the file but not by this model")
            elif name not in want:
                problems.append(f"'{name}' is not in the file's fingerprint")
            elif want[name] != have[name]:
                w_shape, h_shape = want[name].get("shape"), have[name].get("shape")
                detail = f"shape {w_shape} vs {h_shape}" if w_shape != h_shape else "different weights"
                problems.append(f"'{name}': {detail}")
    return problems


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter as a folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

    The JSON holds the :class:`LoRAConfig`, the package version and a fingerprint of the base
    weights, so :func:`load_adapter` can refuse a base the adapter was not made for. The
    folder is written under a temporary name and renamed into place.

    Returns:
        The folder written.
    """
    config = get_lora_config(model)
    if config is None:
        raise ValueError("model holds no adapters to save; call inject_lora(model, config) first")
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lightning_lora_version": __version__,
        "lora_config": config.to_dict(),
        "base_fingerprint": base_fingerprint(model),
    }
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS_NAME, lora_state_dict(model))
        write_json(tmp / ADAPTER_CONFIG_NAME, meta)
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> tuple[LoRAConfig, dict]:
    """Read and validate an adapter folder's JSON: the config and the whole metadata."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"adapter folder {folder} {what}; expected a folder holding "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} (written by save_adapter)"
        )
    missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter folder {folder} lacks {', '.join(missing)}; re-export the adapter")
    meta = read_json(folder / ADAPTER_CONFIG_NAME, "adapter config")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{folder / ADAPTER_CONFIG_NAME} is not a lightning-lora adapter config")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"adapter {folder} has format version {version!r}, newer than this lightning-lora "
            f"{__version__} reads (up to {ADAPTER_FORMAT_VERSION}); upgrade lightning-lora"
        )
    if not isinstance(meta.get("lora_config"), dict):
        raise ValueError(f"{folder / ADAPTER_CONFIG_NAME} has no 'lora_config' object; re-export the adapter")
    return LoRAConfig.from_dict(meta["lora_config"]), meta


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Inject the adapter saved at ``path`` into ``model`` and load its tensors.

    ``model`` must be the plain base (or already hold adapters with the same config). On any
    error the model is left as it was. Nothing is ever unpickled.

    Args:
        model: The base model.
        path: A folder written by :func:`save_adapter`.
        check_base: Refuse a base whose weights differ from the fingerprint in the file.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a broken or foreign file, a newer format, another base, or mismatched
            tensors; the message says which.
    """
    config, meta = read_adapter_config(path)
    tensors = read_safetensors(Path(path) / ADAPTER_WEIGHTS_NAME, "adapter weights")
    existing = get_lora_config(model)
    if existing is not None and existing != config:
        raise ValueError(f"model already holds adapters made with {existing}; the file has {config}")
    if check_base:
        problems = _fingerprint_mismatch(meta.get("base_fingerprint", {}), base_fingerprint(model, config))
        if problems:
            raise ValueError(
                f"adapter {path} was made for another base model: "
                + "; ".join(problems[:10])
                + ". Load the base it was trained on, or pass check_base=False to load it anyway."
            )
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    injected_here = existing is None
    if injected_here:
        inject_lora(model, config)
    try:
        _copy_into(adapter_tensors(model), tensors, path)
    except Exception:
        if injected_here:
            _remove_lora(model, grad_flags)
        raise
    return model


def _copy_into(live: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], path) -> None:
    missing, unexpected = sorted(set(live) - set(loaded)), sorted(set(loaded) - set(live))
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not fit this model: missing {missing}, unexpected {unexpected}")
    bad = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
        for k, v in live.items()
        if v.shape != loaded[k].shape
    ]
    if bad:
        raise ValueError(f"adapter {path} has tensors of the wrong shape: {bad}")
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(loaded[key])


def _remove_lora(model: nn.Module, grad_flags: dict[int, bool]) -> None:
    """Undo :func:`inject_lora` without merging (used to roll back a failed load)."""
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        _set_submodule(model, name, _plain_linear(layer))
    for name, saved in list(_saved_modules(model)):
        _set_submodule(model, name, saved.original_module)
    delattr(model, _CONFIG_ATTR)
    for param in model.parameters():
        param.requires_grad_(grad_flags.get(id(param), param.requires_grad))
