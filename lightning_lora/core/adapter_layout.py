"""PEFT's multi-adapter folder layout: ``"default"`` at a folder's root, every other adapter in a subfolder
of its name; which adapters a folder holds, where one of them lives, and writing them all at once.

Kept apart from what the files hold (:mod:`~lightning_lora.core.adapter_folder`), which this
module never reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lightning_lora.core.layers import DEFAULT_ADAPTER
from lightning_lora.core.model_state import check_adapter_name
from lightning_lora.core.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lightning_lora.core.safe_io import ADAPTER_FILES, atomic_directory, write_json, write_safetensors

AdapterFiles = tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]
"""One adapter's ``adapter_config.json`` contents, tensors and safetensors metadata."""


def write_adapter_folder(path: str | os.PathLike, adapters: dict[str, AdapterFiles]) -> Path:
    """Write adapters into a folder in PEFT's layout, all of them or nothing.

    ``adapters`` maps a subfolder to one adapter's files: ``""`` for the folder itself (PEFT's
    ``"default"``), a name for a further adapter's subfolder. Each holds ``adapter_config.json`` +
    ``adapter_model.safetensors``. The adapters an existing folder holds besides these stay as they
    are (copied into the new folder before the swap), as PEFT's ``save_pretrained`` keeps them.
    """
    path = Path(path)
    with atomic_directory(path, ADAPTER_FILES, "adapter", nested=True) as tmp:
        kept = [subfolder_of(name) for name in folder_adapter_names(path)]
        for sub in (s for s in kept if s not in adapters):
            (tmp / sub).mkdir(exist_ok=True)
            for name in ADAPTER_FILES:
                if (path / sub / name).is_file():
                    shutil.copy2(path / sub / name, tmp / sub / name)
        for sub, (config, tensors, metadata) in adapters.items():
            folder = tmp / sub if sub else tmp
            folder.mkdir(exist_ok=True)
            write_safetensors(folder / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt", **metadata})
            write_json(folder / ADAPTER_CONFIG_NAME, config)
    return path


def subfolder_of(adapter_name: str) -> str:
    """Where PEFT's layout keeps adapter ``adapter_name``: ``""`` (the root) for ``"default"``, else its name."""
    return "" if adapter_name == DEFAULT_ADAPTER else adapter_name


def folder_adapter_names(path: str | os.PathLike) -> list[str]:
    """The adapters a folder in PEFT's layout holds: ``"default"`` for one at its root, then its subfolders'
    (sorted); empty for a folder that holds none (or no folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    root = [DEFAULT_ADAPTER] if (folder / ADAPTER_CONFIG_NAME).is_file() else []
    subs = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir() and p.name != DEFAULT_ADAPTER and (p / ADAPTER_CONFIG_NAME).is_file()
    )
    return root + subs


def adapter_subfolder(
    path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER, subfolder: str | None = None
) -> Path:
    """The folder holding adapter ``adapter_name`` of the folder ``path``.

    ``path/subfolder`` when ``subfolder`` is given (``""``: ``path`` itself). Without it:
    ``path/<adapter_name>`` where that exists (PEFT's layout of a further adapter), else ``path``
    for ``"default"`` or for a folder holding a single adapter at its root. A folder of several
    adapters none of which is ``adapter_name`` is refused, listing them, rather than read from its
    root.

    Raises:
        ValueError: a bad name or subfolder, or a folder that holds other adapters only.
    """
    check_adapter_name(adapter_name)
    root = Path(path)
    if subfolder is not None:
        if not isinstance(subfolder, str) or any(c in subfolder for c in "/\\") or subfolder in (".", ".."):
            raise ValueError(f"subfolder must be an adapter's folder name or '' for the root, got {subfolder!r}")
        folder = root / subfolder
    elif adapter_name != DEFAULT_ADAPTER and (root / adapter_name).is_dir():
        folder = root / adapter_name
    else:
        folder = root
        held = folder_adapter_names(root)
        if adapter_name != DEFAULT_ADAPTER and len(held) > 1:
            raise ValueError(
                f"{root} holds adapters {held}, none named {adapter_name!r}: name one of those, or give the folder of "
                f"the one to load as {adapter_name!r} itself ({root}/<name>; in Python also subfolder='<name>', '' "
                "for the root's)"
            )
        if DEFAULT_ADAPTER not in held and held:
            raise ValueError(
                f"{root} holds no adapter at its root, only {held} in subfolders: pass one of those as adapter_name"
            )
    return folder
