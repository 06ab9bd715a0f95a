"""Safe file I/O: atomic writes and validated reads that never unpickle.

Every file lightning_lora writes goes to a temporary name beside its destination and is
renamed into place, so an interrupted write leaves the previous output intact and no
half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask-based mode."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _give_default_permissions(tmp_path)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder ``path``.

    An existing ``path`` is moved aside first and removed only after the new folder is in
    place, so at every moment either the old or the new folder is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        for child in (tmp, *tmp.iterdir()):
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
            _give_default_permissions(child)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (caller provides atomicity where needed)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, turning every way it can be broken into one clear ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); re-create it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU. A truncated file or a pickle is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{what} {path} is not a valid safetensors file ({err}); it may be truncated, "
            "corrupted or a pickle. lightning-lora reads adapters only as safetensors: re-export it."
        ) from err


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write contiguous CPU copies (safetensors refuses views and shared storage)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """A hash of a tensor's values, taken in fp32 so it does not depend on device or layout."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
