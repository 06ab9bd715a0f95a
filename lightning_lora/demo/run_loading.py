"""The networks of this package's runs, rebuilt from their checkpoints without Lightning.

A ``NetModule`` checkpoint records its network as a ``{"class_path", "init_args"}`` spec and, for a
fine-tune, the pretraining checkpoint its base came from. :func:`load_run` rebuilds the network from
the spec (the class checked against :mod:`~lightning_lora.integration.class_allowlist` first, its
sizes checked against the weights on the meta device before anything is allocated), takes the base
weights from the recorded (or a given) base checkpoint, and restores the adapters exactly as
``LoRACheckpointMixin`` does for a LightningModule. ``export``, ``merge`` and ``report`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.core.inject import get_lora_config
from lightning_lora.core.safe_io import non_finite_names
from lightning_lora.errors import UsageError
from lightning_lora.integration import class_allowlist
from lightning_lora.integration.adapter_restore import CHECKPOINT_KEY, LEGACY_CONFIG_KEY, restore_adapters
from lightning_lora.integration.checkpoint_reader import read_checkpoint_state, resolve_checkpoint


def check_net_fits(spec: Any, shapes: dict[str, torch.Size], where: str, adapted: bool = False) -> None:
    """Refuse a net spec from a file whose weights would not be the file's, before allocating them.

    The net is built on the meta device (no memory) and its state-dict shapes compared with the
    tensors the file holds: a crafted ``hidden_sizes`` of 100,000 is refused, not allocated.
    ``adapted``: ``shapes`` are a fine-tune's full state (adapter tensors beside the base's, a
    ``modules_to_save`` copy under other names), so only the names both hold are compared, and
    the plain net may not be far larger than every tensor the file holds together.
    """
    cls, init_args = _trusted_spec(spec, where)
    try:
        with torch.device("meta"):
            probe = cls(**init_args)
    except TypeError as err:
        raise UsageError(f"{where}: {spec['class_path']} does not take these arguments ({err})") from err
    except Exception:  # a class that cannot be built on the meta device: its weights are checked after loading
        return
    own = {k: v.shape for k, v in probe.state_dict().items()}
    if adapted:
        common = sorted(set(own) & set(shapes))
        problems = _shape_mismatch({k: own[k] for k in common}, {k: shapes[k] for k in common})
        needed, held = sum(s.numel() for s in own.values()), sum(s.numel() for s in shapes.values())
        if needed > 2 * held + 1_000_000:
            problems.append(f"it has {needed:,} weights, the file holds {held:,}")
    else:
        problems = _shape_mismatch(own, shapes)
    if problems:
        raise ValueError(f"{where}: the network it names does not fit its weights: " + "; ".join(problems))


def net_spec(net: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` for a net that records its ``init_args``, else ``None``."""
    init_args = getattr(net, "init_args", None)
    if not isinstance(init_args, dict):
        return None
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def _trusted_spec(spec: Any, where: str) -> tuple[type, dict[str, Any]]:
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or "." not in spec["class_path"]:
        raise ValueError(f"{where} needs a dotted 'class_path' and 'init_args', got {str(spec)[:200]!r}")
    cls = class_allowlist.resolve_class(spec["class_path"], nn.Module, where)
    init_args = spec.get("init_args", {})
    if not isinstance(init_args, dict):
        raise ValueError(f"{where}: init_args must be a mapping, got {str(init_args)[:200]!r}")
    return cls, init_args


def build_net(
    spec: Any, where: str = "net spec", shapes: dict[str, torch.Size] | None = None, adapted: bool = False
) -> nn.Module:
    """Rebuild a net from :func:`net_spec` output; its class must be trusted (``class_allowlist``).

    Args:
        shapes: The weights the net is for (from the file that names it): checked on the meta
            device first, so a spec that does not fit them is refused before anything is allocated.
        adapted: ``shapes`` are a fine-tune's full state (:func:`check_net_fits`).
    """
    if shapes is not None:
        check_net_fits(spec, shapes, where, adapted)
    cls, init_args = _trusted_spec(spec, where)
    try:
        return cls(**init_args)
    except TypeError as err:
        raise UsageError(f"{where}: {spec['class_path']} does not take these arguments ({err})") from err


def _shape_mismatch(own: dict[str, torch.Size], state: dict[str, torch.Size]) -> list[str]:
    problems = []
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing keys {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}")
    shapes = [f"{k}: file {tuple(state[k])} vs net {tuple(v)}" for k, v in own.items() if k in state and state[k] != v]
    if shapes:
        problems.append("shape mismatches " + "; ".join(shapes[:5]))
    return problems


def _state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    return _shape_mismatch({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()})


def base_shapes(path: str | Path) -> dict[str, torch.Size]:
    """The shapes of a pretraining checkpoint's net weights (keys without ``net.``), read without loading them."""
    checkpoint = read_checkpoint_state(resolve_checkpoint(path, "base_checkpoint"), "base_checkpoint", mmap=True)
    return {k.removeprefix("net."): v.shape for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


def load_base_checkpoint(net: nn.Module, path: str | Path) -> Path:
    """Load pretrained weights into a plain ``net`` from a pretraining checkpoint (file or run), strictly."""
    path = resolve_checkpoint(path, "base_checkpoint")
    checkpoint = read_checkpoint_state(path, "base_checkpoint")
    if checkpoint.get(CHECKPOINT_KEY) is not None or checkpoint.get(LEGACY_CONFIG_KEY) is not None:
        raise ValueError(
            f"base_checkpoint {path} holds a LoRA fine-tuned model; a base checkpoint must be a plain "
            "(pretraining) checkpoint. To continue a LoRA run, pass it as --ckpt_path instead."
        )
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    problems = _state_dict_mismatch(net, state)
    if problems:
        raise ValueError(
            f"base_checkpoint {path} does not fit the net {type(net).__name__}: "
            + "; ".join(problems)
            + ". Use the same net and sizes as the pretraining run."
        )
    bad = non_finite_names(state)
    if bad:
        raise ValueError(f"base_checkpoint {path} holds NaN or infinite weights ({bad[:5]}); it cannot be a base")
    net.load_state_dict(state, strict=True)
    return path


class _Holder(nn.Module):
    """The ``net`` of a LightningModule without the LightningModule: the same state-dict keys."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


@dataclass
class LoadedRun:
    """A run's network restored from its checkpoint, and what the checkpoint said about it."""

    net: nn.Module
    checkpoint: Path
    base_checkpoint: Path | None
    hyper_parameters: dict[str, Any]
    datamodule_hyper_parameters: dict[str, Any]
    module_class: str
    trained_digits: list[int] | None = None  # as the run decided them (train_digits: weakest)
    global_step: int | None = None

    @property
    def adapted(self) -> bool:
        return get_lora_config(self.net) is not None


def load_base_net(path: str | Path) -> nn.Module:
    """The plain net of a pretraining run (or its ``.ckpt``), built from the spec it recorded, with its weights."""
    net = build_net(load_run(path).hyper_parameters["net"], "the base's net")
    load_base_checkpoint(net, path)
    return net


def load_run(reference: str | Path, base_checkpoint: str | Path | None = None) -> LoadedRun:
    """Restore the network of a lightning-lora run (a checkpoint file or a run folder), in eval mode.

    Args:
        reference: A ``.ckpt`` file, a run version folder or a run folder (its latest version).
        base_checkpoint: Where the base weights come from for an adapter-only checkpoint
            (default: the path the run recorded).

    Raises:
        UsageError: a class path in the file is not trusted, or the base is not the one the
            adapters were trained on (the message names the first differing tensor).
        ValueError, FileNotFoundError: a missing, broken or foreign file.
    """
    path = resolve_checkpoint(reference)
    checkpoint = read_checkpoint_state(path)
    class_allowlist.check_class_paths(checkpoint, f"checkpoint {path}")  # before anything is imported
    if "pytorch-lightning_version" not in checkpoint:
        raise ValueError(
            f"checkpoint {path} was not written by a Lightning run (it holds only weights); pass a .ckpt "
            "from a lightning-lora fit, or its run folder (e.g. runs/finetune_lora)"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    base = base_checkpoint if base_checkpoint is not None else hparams.get("base_checkpoint")
    adapter_only = checkpoint.get(CHECKPOINT_KEY) is not None
    if adapter_only and base is None:
        raise UsageError(f"checkpoint {path} holds adapters only and records no base; pass --base <pretraining run>")
    # What the net must fit, before it is built: the base's weights, or this full checkpoint's own.
    own = {k.removeprefix("net."): v.shape for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    shapes = base_shapes(base) if adapter_only else own
    against = f" (checked against its base {base})" if adapter_only else ""
    net = build_net(hparams.get("net"), f"checkpoint {path}: net{against}", shapes, adapted=not adapter_only)
    base_path = load_base_checkpoint(net, base) if adapter_only else None
    holder = _Holder(net)
    hint = "Pass the pretraining checkpoint the fine-tune started from with --base."
    state = dict(checkpoint["state_dict"])
    restore_adapters(holder, {**checkpoint, "state_dict": state}, hint)
    problems = _state_dict_mismatch(holder, state)
    if problems:
        raise ValueError(f"checkpoint {path} does not fit its own net spec: " + "; ".join(problems))
    holder.load_state_dict(state, strict=True)
    module_class = checkpoint.get(class_allowlist.MODULE_CLASS_KEY) or "lightning_lora.demo.classifiers.LitClassifier"
    data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    data_class = str(data_hparams.get("_class_path") or "MNISTDataModule").rsplit(".", 1)[-1]
    data_state = checkpoint.get(data_class)  # Lightning stores a DataModule's state_dict() under its class name
    digits = data_state.get("train_digits") if isinstance(data_state, dict) else None
    trained = [int(d) for d in digits] if isinstance(digits, list) and all(isinstance(d, int) for d in digits) else None
    step = checkpoint.get("global_step")
    return LoadedRun(
        net.eval(), path, base_path, dict(hparams), dict(data_hparams), str(module_class), trained,
        step if isinstance(step, int) else None,
    )  # fmt: skip
