"""Reading Lightning checkpoints without Lightning: safely, and by run name.

The ``export``, ``merge`` and ``report`` commands work on checkpoints but train nothing, so they
should not pay for importing Lightning. This module reads a checkpoint with
``torch.load(weights_only=True)`` (no pickle code can run), checks every class path in it
against :mod:`lightning_lora.integration.class_allowlist` before importing anything, rebuilds the network from the
recorded ``net`` spec, takes the base weights from the recorded (or a given) base checkpoint,
and restores the adapters exactly as ``LoRACheckpointMixin`` does for a LightningModule.

Runs are found by name: ``runs/finetune_lora`` means the latest version's ``last.ckpt``,
``runs/finetune_lora/version_3`` that version's.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from lightning_lora.core.inject import get_lora_config
from lightning_lora.errors import UsageError
from lightning_lora.integration import class_allowlist as trust
from lightning_lora.integration.checkpoint_mixin import CHECKPOINT_KEY, LEGACY_CONFIG_KEY, restore_adapters

LAST = "last.ckpt"


def resolve_checkpoint(reference: str | Path, what: str = "checkpoint") -> Path:
    """A checkpoint file from a file path, a run version folder, or a run folder (its latest version).

    The latest version is the one whose ``checkpoints/last.ckpt`` was written last.

    Raises:
        FileNotFoundError: nothing there, or a folder without checkpoints (the message lists what is).
    """
    path = Path(reference)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; check the path (a .ckpt file or a run folder)")
    for candidate in (path / LAST, path / "checkpoints" / LAST):
        if candidate.is_file():
            return candidate
    versions = sorted(
        (p / "checkpoints" / LAST for p in path.iterdir() if (p / "checkpoints" / LAST).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if not versions:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(
            f"{what} {path} is a folder without checkpoints/{LAST} in it or in a version folder (it holds {found})"
        )
    return versions[-1]


def describe_resolution(reference: str | Path, resolved: Path) -> str | None:
    """For a run folder given where a checkpoint is expected: which checkpoint it means, and what it skipped."""
    folder = Path(reference)
    if not folder.is_dir():
        return None
    version = resolved.parent.parent if resolved.parent.name == "checkpoints" else resolved.parent
    newer = sorted(
        (p.name for p in folder.iterdir() if _version_number(p) > _version_number(version) and p.is_dir()),
        key=lambda name: _version_number(folder / name),
    )
    note = f"{folder} means its newest checkpoint, {resolved}"
    if newer:
        note += (
            f"; the newer run folders {', '.join(newer[:5])} hold no checkpoint (test or predict runs, or runs "
            "stopped before their first checkpoint)"
        )
    return note


def _version_number(path: Path) -> int:
    name = path.name
    return int(name.removeprefix("version_")) if name.startswith("version_") and name[8:].isdigit() else -1


def read_checkpoint_state(path: str | Path | IO[bytes], what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``, with one clear error per failure.

    Args:
        path: A file path, an fsspec URL (``s3://...``, ``file://...``), or an open binary file.
        what: How the messages name it.
        mmap: Map the tensors instead of reading them (local files): to look at shapes cheaply.
    """
    source: Any = path
    name = str(path) if isinstance(path, (str, Path)) else str(getattr(path, "name", "the given file object"))
    if isinstance(path, (str, Path)) and "://" in str(path):
        import fsspec  # Lightning's own dependency for remote checkpoints

        try:
            with fsspec.open(str(path), "rb") as remote:
                source = io.BytesIO(remote.read())
        except (OSError, ValueError, ImportError) as err:
            raise FileNotFoundError(f"{what} {path} cannot be opened ({err})") from err
        mmap = False
    elif isinstance(path, (str, Path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path} does not exist; check the path")
    else:
        mmap = False
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap or None)
    except RecursionError as err:
        raise ValueError(f"{what} {name} is nested too deeply to be a checkpoint; it was refused unread") from err
    except Exception as err:  # truncated zip, a pickle with code, plain garbage: all refused
        if isinstance(path, (str, Path)) and not _looks_like_a_checkpoint(Path(path)):
            raise ValueError(
                f"{what} {name} is not a PyTorch checkpoint at all (neither a zip archive nor a pickle: a text "
                "file?); pass a .ckpt file written by Lightning"
            ) from err
        raise ValueError(
            f"{what} {name} is not a readable checkpoint ({_reason(err)}). It may be truncated or not a Lightning "
            ".ckpt; only weights-only checkpoints are loaded (tensors and plain values, never code)."
        ) from err
    if not isinstance(path, (str, Path)) and hasattr(path, "seek"):
        path.seek(0)  # the caller may hand the same file object on
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{what} {name} has no 'state_dict'; pass a .ckpt file written by Lightning")
    bad = [k for k, v in checkpoint["state_dict"].items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{what} {name} has a damaged 'state_dict' (entries that are not tensors: {bad[:5]})")
    return checkpoint


def _looks_like_a_checkpoint(path: Path) -> bool:
    """Whether the file starts as torch.save's output does: a zip archive, or a pickle (protocol 2 or later)."""
    with path.open("rb") as file:
        head = file.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _reason(err: Exception) -> str:
    """torch's load error in one line, without its advice to load untrusted files with weights_only=False."""
    text = str(err).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds Python objects besides tensors and plain values, which could run code, so it was refused"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"


def check_net_fits(spec: Any, shapes: dict[str, torch.Size], where: str) -> None:
    """Refuse a net spec from a file whose weights would not be the file's, before allocating them.

    The net is built on the meta device (no memory) and its state-dict shapes compared with the
    tensors the file holds: a crafted ``hidden_sizes`` of 100,000 is refused, not allocated.
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
    cls = trust.resolve_class(spec["class_path"], nn.Module, where)
    init_args = spec.get("init_args", {})
    if not isinstance(init_args, dict):
        raise ValueError(f"{where}: init_args must be a mapping, got {str(init_args)[:200]!r}")
    return cls, init_args


def build_net(spec: Any, where: str = "net spec", shapes: dict[str, torch.Size] | None = None) -> nn.Module:
    """Rebuild a net from :func:`net_spec` output; its class must be trusted (``class_allowlist``).

    Args:
        shapes: The weights the net is for (from the file that names it): checked on the meta
            device first, so a spec that does not fit them is refused before anything is allocated.
    """
    if shapes is not None:
        check_net_fits(spec, shapes, where)
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
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
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
    trust.check_class_paths(checkpoint, f"checkpoint {path}")  # before anything is imported
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
    shapes = base_shapes(base) if adapter_only else None  # what the net must fit, before it is built
    net = build_net(hparams.get("net"), f"checkpoint {path}: net", shapes)
    base_path = load_base_checkpoint(net, base) if adapter_only else None
    holder = _Holder(net)
    hint = "Pass the pretraining checkpoint the fine-tune started from with --base."
    state = dict(checkpoint["state_dict"])
    restore_adapters(holder, {**checkpoint, "state_dict": state}, hint)
    problems = _state_dict_mismatch(holder, state)
    if problems:
        raise ValueError(f"checkpoint {path} does not fit its own net spec: " + "; ".join(problems))
    holder.load_state_dict(state, strict=True)
    module_class = checkpoint.get(trust.MODULE_CLASS_KEY) or "lightning_lora.demo.net_module.LitClassifier"
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


def describe_run(path: Path) -> str:
    """``runs/finetune_lora/version_3`` from ``runs/finetune_lora/version_3/checkpoints/last.ckpt``."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return str(Path(*parts[:-2]))
    return str(path)
