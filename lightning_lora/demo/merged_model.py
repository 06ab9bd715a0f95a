"""Merged models as one safetensors file: loads without unpickling anything, states its input contract.

``lightning-lora merge`` folds a run's adapter into its base and writes the plain network's
weights (safetensors: tensors and a JSON header, no code) with metadata naming the network's
class and constructor arguments, and, for MNIST classifiers, the input contract: what images
the model expects and how they are normalised. :func:`load_merged` checks the class against
:mod:`lightning_lora.integration.class_allowlist` before importing it, rebuilds the network and loads it strictly; for a
classifier it returns a :class:`MergedClassifier` that accepts the images a user has (uint8
0-255 or floats 0-1, with or without the channel dimension) and refuses anything else.

The file's bytes depend only on the weights and metadata, so merging the same run twice writes
the same file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora._version import __version__
from lightning_lora.core.safe_io import atomic_file, non_finite_names, read_safetensors, write_safetensors
from lightning_lora.errors import DataError, UsageError
from lightning_lora.integration import class_allowlist

METADATA_KEY = "lightning_lora_merged"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageContract:
    """What a merged image classifier takes: one-channel ``side`` x ``side`` images, normalised inside."""

    side: int = 28
    mean: float = 0.1307
    std: float = 0.3081

    def __post_init__(self) -> None:
        if isinstance(self.side, bool) or not isinstance(self.side, int) or not 1 <= self.side <= 4096:
            raise ValueError(f"side must be an image size in pixels, got {self.side!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")


class MergedClassifier(nn.Module):
    """A merged network behind its input contract: raw images in, logits out.

    Accepts ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` images as ``uint8`` (0-255) or floats in [0, 1],
    normalises them as training did, and refuses anything else with a message (wrong shape,
    another dtype, or floats outside [0, 1], which are most likely normalised already).
    """

    def __init__(self, net: nn.Module, contract: ImageContract) -> None:
        super().__init__()
        self.net = net
        self.contract = contract

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        side = self.contract.side
        if not torch.is_tensor(images):
            raise TypeError(f"expected a tensor of images, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, side, side):
            raise ValueError(
                f"expected images shaped (N, {side}, {side}) or (N, 1, {side}, {side}), got {tuple(images.shape)}"
            )
        dtype = self.compute_dtype()
        if images.dtype == torch.uint8:
            images = images.to(dtype) / 255
        elif images.is_floating_point():
            if images.numel():
                _check_pixel_range(images)
            images = images.to(dtype)
        else:
            raise ValueError(f"expected uint8 or float images, got {images.dtype}")
        return (images - self.contract.mean) / self.contract.std

    def compute_dtype(self) -> torch.dtype:
        """The network's own floating dtype (after ``.half()`` or ``.double()``, say), else float32."""
        first = next((p for p in self.net.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The predicted digit of each image."""
        return self(images).argmax(dim=-1)


def _check_pixel_range(images: torch.Tensor) -> None:
    """Float images must be raw pixels in [0, 1]; say what they look like otherwise."""
    if not torch.isfinite(images).all():
        raise ValueError("the images hold NaN or infinite values; pass raw pixels (uint8 0-255, or floats 0-1)")
    low, high = float(images.min()), float(images.max())
    if 0 <= low and high <= 1:
        return
    if low >= 0 and high <= 255:
        hint = "they look like 0-255 pixels stored as floats: divide by 255, or pass them as uint8"
    elif low < 0:
        hint = "values below 0 look normalised already (the network normalises itself): pass the raw pixels"
    else:
        hint = "pass raw pixels (uint8 0-255, or floats 0-1)"
    raise ValueError(f"float images must hold pixels in [0, 1]; these range from {low!r} to {high!r}: {hint}")


def is_merged_file(path: Path) -> bool:
    """Whether ``path`` is a file this module wrote (so ``merge`` may replace it)."""
    try:
        _, metadata = read_safetensors(path, "merged model")
    except (ValueError, FileNotFoundError):
        return False
    return METADATA_KEY in metadata


def write_merged(path: str | os.PathLike, net: nn.Module, spec: dict[str, Any], contract: ImageContract | None) -> Path:
    """Write a merged plain network and what rebuilds it; refuses to replace a file it did not write."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "lightning_lora_version": __version__,
        "net": spec,
        "input": None if contract is None else asdict(contract),
    }
    with atomic_file(path, replaceable=is_merged_file) as tmp:
        write_safetensors(tmp, net.state_dict(), {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return Path(path)


def load_merged(path: str | os.PathLike, allow_classes: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Load a file written by ``lightning-lora merge``, in eval mode, without unpickling anything.

    Args:
        path: The ``.safetensors`` file.
        allow_classes: Your own network classes the file may name (this package's are trusted).

    Returns:
        A :class:`MergedClassifier` for an image classifier, else the plain network.
    """
    from lightning_lora.demo.run_loading import build_net  # the run loader builds on this package's checkpoints

    path = Path(path)
    tensors, metadata = read_safetensors(path, "merged model")
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a merged model written by lightning-lora merge")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{path}: its metadata is not valid JSON ({err}); merge the run again") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise ValueError(f"{path}: its metadata is damaged; merge the run again")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}; upgrade lightning-lora to read it")
    class_allowlist.allow_classes(allow_classes)
    try:
        net = build_net(meta.get("net"), f"merged model {path}", {k: v.shape for k, v in tensors.items()})
    except UsageError:  # an untrusted or unknown class: its own message says what to do
        raise
    except ValueError as err:
        raise DataError(f"{err}; merge the run again") from err
    own = net.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise ValueError(f"{path}: its weights do not fit the network its metadata names; merge the run again")
    bad = non_finite_names(tensors)
    if bad:
        raise ValueError(f"{path} holds NaN or infinite weights ({bad[:5]}); merge a good run again")
    net.load_state_dict(tensors, strict=True)
    net.eval()
    contract = meta.get("input")
    if contract is None:
        return net
    fields = set(ImageContract.__dataclass_fields__)
    if not isinstance(contract, dict) or set(contract) - fields:
        raise ValueError(f"{path}: its input contract is damaged (expected the fields {sorted(fields)}); merge again")
    try:
        return MergedClassifier(net, ImageContract(**contract)).eval()
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: its input contract is damaged ({err}); merge the run again") from err
