"""MNIST's IDX files, read and checked, and the images' preprocessing.

Each file is checked once, when read: magic number, dimensions (28x28), sizes, image and label
counts, labels 0-9; one error names the file and what is wrong. Normalisation is exactly
torchvision's ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from lightning_lora.errors import DataError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """Read an uncompressed IDX file of MNIST ``"images"`` (N, 28, 28) or ``"labels"`` (N,), checked.

    Raises:
        DataError: the file is truncated, has trailing bytes, has the wrong magic number or
            image size; the message names the file and what is wrong.
    """
    data = path.read_bytes()
    want = _IDX_MAGIC[kind]
    if len(data) < 8:
        raise DataError(f"{path} is {len(data)} bytes, too short for an IDX header: truncated, or not an MNIST file")
    magic = int.from_bytes(data[:4], "big")
    if magic != want:
        raise DataError(
            f"{path} starts with magic number 0x{magic:08x}, not 0x{want:08x} (IDX {kind}): it is not an MNIST "
            f"{kind} file (a compressed .gz, or the images and labels swapped?)"
        )
    ndim = want & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is {len(data)} bytes, shorter than its own header: truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if kind == "images" and dims[1:] != (28, 28):
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images; MNIST's are 28x28")
    expected = math.prod(dims)
    if expected == 0:
        raise DataError(f"{path} holds no {kind} (its header announces {' x '.join(map(str, dims))}); copy it again")
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "followed by extra bytes"
        raise DataError(
            f"{path}: its header announces {' x '.join(map(str, dims))} = {expected:,} bytes of data, but it holds "
            f"{len(data) - header:,}: the file is {what}; copy it again"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def read_mnist_split(raw: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (N, 28, 28) and int64 labels of one split, checked against each other."""
    prefix = "train" if train else "t10k"
    images_path, labels_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels; "
            "the two files must come from the same split"
        )
    bad = (labels > 9).nonzero()
    if len(bad):
        first = int(bad[0])
        raise DataError(
            f"{labels_path} holds labels outside 0-9 ({sorted(set(labels[labels > 9].tolist()))[:5]}, first at "
            f"index {first}); MNIST labels are digits"
        )
    return images, labels.long()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), exactly as ``ToTensor`` + ``Normalize`` do."""
    return images.float().div(255).sub(MNIST_MEAN).div(MNIST_STD).unsqueeze(1)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """uint8 images (N, 28, 28) rotated counter-clockwise about their centre (bilinear, black corners)."""
    from torchvision.transforms.v2.functional import InterpolationMode
    from torchvision.transforms.v2.functional import rotate as rotate_images

    rotated = rotate_images(images.unsqueeze(1), degrees, interpolation=InterpolationMode.BILINEAR)
    return rotated.squeeze(1)
