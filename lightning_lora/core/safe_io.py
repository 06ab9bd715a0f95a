"""Safe file I/O: writers that never lose or half-write anything, readers that never unpickle.

Writers:
- write under a temporary name beside the destination (``.<name>.<pid>.<random>.tmp``) and
  rename into place, so an interrupted write leaves the previous output intact;
- replace a folder by swapping it with the new one in a single rename (``RENAME_EXCHANGE``),
  so the output path never disappears, not even for a moment (where the filesystem cannot swap,
  files are replaced one by one inside the existing folder);
- refuse to replace anything that is not their own kind of output, and say what is in the way;
- sweep the temporary files an interrupted run (a dead process) left beside the destination;
- turn a failed write into an error that names the file and its cause (``core/write_errors.py``).

Readers check sizes and structure before trusting anything.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_lora.core.write_errors import WRITE_CAUSES, disk_errors, write_failure
from lightning_lora.errors import DataError, WriteError

MAX_JSON_BYTES = 1 << 20
"""Adapter and run configs are a few KB; anything past 1 MB is refused unread."""

ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})
"""What an adapter folder holds, and so all its writer may replace (a README.md, as PEFT writes, is someone's)."""


class OutputInTheWay(FileExistsError):
    """The destination holds something the writer did not make; nothing was touched."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask-based mode."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _fsync(path: Path) -> None:
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


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _temporary_parts(entry: str) -> tuple[str, int] | None:
    """``(output name, writer pid)`` of a temporary ``.<name>.<pid>.<random>.tmp`` (or ``.old``), else ``None``."""
    parts = entry[1:].rsplit(".", 3) if entry.startswith(".") else []  # name (may hold dots), pid, random, suffix
    if len(parts) != 4 or not parts[1].isdigit() or parts[3] not in ("tmp", "old"):
        return None
    return parts[0], int(parts[1])


def output_of(path: Path) -> Path:
    """The output a temporary of this module's writers becomes (``path`` itself for any other path)."""
    parts = _temporary_parts(path.name)
    return path.parent / parts[0] if parts else path


def explain_os_error(err: OSError, where: Path | None = None) -> WriteError | None:
    """A library's bare ``OSError`` of a write cause as a :class:`WriteError` naming its file (a temporary's
    output), else ``where`` (the folder being written into), else the cause alone."""
    if isinstance(err, WriteError) or err.errno not in WRITE_CAUSES:
        return None
    if err.filename:
        return write_failure(output_of(Path(err.filename)), err.errno, "")
    error = WriteError(f"cannot write {'into ' + str(where) if where else 'a file'}: {WRITE_CAUSES[err.errno]}")
    error.errno = err.errno
    return error


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries of writers that no longer run: ``.<name>.<pid>.<random>.tmp`` (or ``.old``).

    Only entries of that exact form whose process is gone are touched: for one output ``name``,
    or, with ``name=None``, for every output in ``parent`` (a checkpoint folder).
    """
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.glob(f".{name}.*" if name else ".*"):
        parts = _temporary_parts(entry.name)
        if parts is None or (name is not None and parts[0] != name):
            continue
        if not _pid_alive(parts[1]):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextmanager
def atomic_file(path: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    Args:
        path: The destination file.
        replaceable: Called with an existing ``path``; it is replaced only if this returns True
            (default: any existing file may be replaced).

    Raises:
        OutputInTheWay: ``path`` exists and may not be replaced (nothing is written).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputInTheWay(f"{path} is a folder; pass a file name")
    if path.exists() and replaceable is not None and not replaceable(path):
        raise OutputInTheWay(f"{path} exists and was not written by this command; choose another name or move it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the file asked for, not the temporary one beside it
        raise write_failure(path, err.errno, f"cannot write there ({err.strerror})") from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_errors(path, tmp_path):
            yield tmp_path
            _fsync(tmp_path)
        _give_default_permissions(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux ``renameat2``); False where that is unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _is_nested_of_kind(path: Path, allowed: set[str]) -> bool:
    """A real folder (not a link) holding only ``allowed`` plain files: one adapter of a multi-adapter folder."""
    return (
        path.is_dir()
        and not path.is_symlink()
        and all(p.name in allowed and p.is_file() and not p.is_symlink() for p in path.iterdir())
    )


def check_folder_kind(path: Path, allowed: Iterable[str], what: str, nested: bool = False) -> None:
    """Refuse an existing ``path`` that holds anything but ``allowed`` entries (naming them).

    With ``nested``, a subfolder that itself holds only ``allowed`` files (PEFT's folder of a
    further adapter) is of the kind too.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputInTheWay(f"{path} exists and is not a folder; choose another output path for the {what}")
    allowed = set(allowed)

    def foreign_entry(p: Path) -> bool:
        # Hidden entries count (a .git or .env is someone's), and an allowed name must be a plain file.
        if nested and not p.name.startswith(".") and _is_nested_of_kind(p, allowed):
            return False
        return p.name not in allowed or p.is_symlink() or not p.is_file()

    def named(p: Path) -> list[str]:  # an adapter's subfolder but for some files: name those files
        adapter = nested and p.is_dir() and not p.is_symlink() and any(c.name in allowed for c in p.iterdir())
        return [f"{p.name}/{c.name}" for c in sorted(p.iterdir()) if c.name not in allowed] if adapter else [p.name]

    foreign = sorted(name for p in path.iterdir() if foreign_entry(p) for name in named(p))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputInTheWay(
            f"{path} is not {'an' if what[0] in 'aeiou' else 'a'} {what} folder: it holds {shown}. Nothing was "
            f"written or removed; choose a new or empty folder for the {what}"
        )


@contextmanager
def atomic_directory(
    path: str | os.PathLike, allowed: Iterable[str], what: str, nested: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it takes the place of the folder ``path``.

    An existing ``path`` must hold only ``allowed`` entries (its own kind of output) and is
    swapped with the new folder in one rename, then removed; where the filesystem cannot swap,
    the new files replace the old ones one by one inside the existing folder. Either way
    ``path`` exists at every moment and each file in it is complete.
    """
    path = Path(path)
    allowed = set(allowed)
    check_folder_kind(path, allowed, what, nested)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    except OSError as err:  # name the folder asked for, not the temporary one beside it
        raise write_failure(path, err.errno, f"cannot write there ({err.strerror})") from err
    try:
        with disk_errors(path):
            yield tmp
            for child in (tmp, *tmp.iterdir(), *(c for d in tmp.iterdir() if d.is_dir() for c in d.iterdir())):
                if child.is_file():
                    _fsync(child)
                _give_default_permissions(child)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            pass  # tmp now holds the old folder and is removed below
        else:
            new = {child.name for child in tmp.iterdir()}
            for child in tmp.iterdir():
                if child.is_dir() and (path / child.name).is_dir():
                    shutil.rmtree(path / child.name)  # an adapter subfolder: checked above to be of the kind
                os.replace(child, path / child.name)
            for stale in path.iterdir():
                if stale.name in allowed and stale.name not in new and stale.is_file():
                    stale.unlink()
                elif nested and stale.name not in new and _is_nested_of_kind(stale, allowed):
                    shutil.rmtree(stale)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (caller provides atomicity where needed)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a JSON object, turning every way it can be broken into one clear ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what} {path} is {size:,} bytes, far more than such a file holds; refusing to read it")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{what} {path} is not valid JSON ({err}); re-create it") from err
    except RecursionError as err:
        raise DataError(f"{what} {path} is nested too deeply to be a real {what}; re-create it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file on CPU: its tensors and its metadata. Never unpickles anything."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    _refuse_duplicate_names(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise DataError(
            f"{what} {path} is not a valid safetensors file ({err}); it may be truncated, "
            "corrupted or a pickle. lightning-lora reads tensors only as safetensors: re-export it."
        ) from err
    return tensors, metadata


def _refuse_duplicate_names(path: Path, what: str) -> None:
    """A header naming one tensor (or metadata key) twice is refused: JSON readers keep the last silently.

    The header is read on its own (its length is the file's first 8 bytes), so a file whose header
    claims to be larger than the file is left to the safetensors library's own error.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < size <= min(path.stat().st_size - 8, 100_000_000):
            return
        header = f.read(size)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise DataError(
                    f"{what} {path} names {key!r} twice in its safetensors header: one of the two would be dropped "
                    "without a word. The file was altered or badly written; re-export it."
                )
            seen.add(key)
        return dict(items)

    try:
        json.loads(header, object_pairs_hook=pairs)
    except DataError:
        raise
    except ValueError:  # not JSON: the safetensors library reports it
        pass


def non_finite_names(tensors: dict[str, Any]) -> list[str]:
    """The keys whose value is a floating-point tensor holding NaN or infinity (other values are skipped)."""
    return [
        key
        for key, value in tensors.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes depend only on its contents.

    The header is JSON with sorted keys and the tensors follow in key order. (The safetensors
    library builds its header from a hash map, so the same tensors can come out in different
    bytes; that would make "the same merge writes the same file" false.)
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {tensor.dtype} in safetensors")
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
