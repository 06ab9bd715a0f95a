"""Reading Lightning checkpoints without Lightning: safely, and by run name.

Checkpoints are read with ``torch.load(weights_only=True)`` (no pickle code can run), and every way
a file can be broken (truncated, a pickle with code, a text file, no state dict) is one clear error
naming it. Runs are found by name: ``runs/finetune_lora`` means the latest version's ``last.ckpt``,
``runs/finetune_lora/version_3`` that version's. Lightning is never imported here, so the commands
that train nothing start fast.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, Any

import torch

from lightning_lora.errors import DataError

LAST = "last.ckpt"


RUNS = Path("runs")
"""Where the shipped configs' runs go (``trainer.logger.init_args.save_dir``); a bare run name is looked up there."""


def resolve_checkpoint(reference: str | Path, what: str = "checkpoint") -> Path:
    """A checkpoint file from a file path, a run version folder, or a run folder (its latest version).

    The latest version is the one whose ``checkpoints/last.ckpt`` was written last.

    Raises:
        FileNotFoundError: nothing there, or a folder without checkpoints (the message lists what is).
    """
    path = Path(reference)
    if path.is_file():
        return path
    if not path.exists() and len(path.parts) == 1 and (RUNS / path).is_dir():
        path = RUNS / path  # a run's name, as the configs' logger names it: runs/<name>
    if not path.exists():
        hint = f" (no run of that name in {RUNS}/ either)" if len(path.parts) == 1 else ""
        raise FileNotFoundError(
            f"{what} {path} does not exist{hint}; check the path (a .ckpt file, a run folder such as "
            f"{RUNS}/finetune_lora, or a run's name)"
        )
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
        raise DataError(f"{what} {name} is nested too deeply to be a checkpoint; it was refused unread") from err
    except Exception as err:  # truncated zip, a pickle with code, plain garbage: all refused
        if isinstance(path, (str, Path)) and not _looks_like_a_checkpoint(Path(path)):
            raise DataError(
                f"{what} {name} is not a PyTorch checkpoint at all (neither a zip archive nor a pickle: a text "
                "file?); pass a .ckpt file written by Lightning"
            ) from err
        raise DataError(
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


def describe_run(path: Path) -> str:
    """``runs/finetune_lora/version_3`` from ``runs/finetune_lora/version_3/checkpoints/last.ckpt``."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return str(Path(*parts[:-2]))
    return str(path)
