"""Which classes a file may name: nothing read from a file chooses the code that runs.

Checkpoints, the configs stored in them, and merged-model files name classes by dotted path
(``net.class_path``, Lightning's ``_class_path``/``_instantiator``). Importing such a path runs the
named module's top-level code, so a crafted file could run anything. Every path read from a
file is checked here *before* any import: it must be one of this package's own classes, or a
class the user named themselves (on the command line with ``--allow-class``, in their own YAML
config, or through :func:`allow_classes` in Python).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterable, Iterator
from typing import Any

from lightning_lora.errors import UsageError

PACKAGE_CLASSES = frozenset(
    {
        "lightning_lora.demo.nets.RichBoyNet",
        "lightning_lora.demo.nets.MLP",
        "lightning_lora.demo.nets.LinearModel",
        "lightning_lora.demo.classifiers.LitClassifier",
        "lightning_lora.demo.classifiers.LitRegressor",
        "lightning_lora.demo.mnist_datamodule.MNISTDataModule",
        "lightning_lora.demo.shift_datamodule.LinearShiftDataModule",
    }
)
"""This package's classes that files may name."""

LIGHTNING_INSTANTIATORS = frozenset({"lightning.pytorch.cli.instantiate_module"})
"""Lightning's own helper that LightningCLI records in checkpoints (it imports the classes it is given)."""

MODULE_CLASS_KEY = "lightning_lora_module"
"""Where a NetModule checkpoint records its module class."""

CLASS_PATH_KEYS = ("class_path", "_class_path", "_instantiator", MODULE_CLASS_KEY)
"""Keys under which checkpoints and configs store class paths."""

_allowed_by_user: set[str] = set()


class UntrustedClassError(UsageError):
    """A file names a class that is neither this package's nor one the user allowed."""


def allow_classes(paths: Iterable[str]) -> None:
    """Trust these dotted class paths when files name them (the user's own classes)."""
    _allowed_by_user.update(p for p in paths if isinstance(p, str))


def allowed(path: str) -> bool:
    return path in PACKAGE_CLASSES or path in _allowed_by_user or path in LIGHTNING_INSTANTIATORS


MAX_DEPTH = 64
"""Settings stored in files nest a few levels; deeper structures are refused, not walked."""


def _walk(value: Any, where: str = "the file") -> Iterator[tuple[Any, Any]]:
    """Every ``(key, value)`` at any depth of dicts and lists (key ``None`` in lists), without recursion."""
    stack = [(None, value, 0)]
    while stack:
        key, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep; it was refused")
        yield key, item
        if isinstance(item, dict):
            stack.extend((k, v, depth + 1) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((None, v, depth + 1) for v in item)


def class_paths_in(value: Any, where: str = "the file") -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` stored under a class-path key, at any depth of dicts and lists."""
    for key, item in _walk(value, where):
        if key in CLASS_PATH_KEYS:
            yield key, item


def check_class_paths(data: Any, where: str) -> None:
    """Refuse ``data`` (a checkpoint, a stored config) if it names any class not allowed. Imports nothing."""
    for key, path in class_paths_in(data, where):
        if not isinstance(path, str) or not allowed(path):
            raise UntrustedClassError(
                f"{where} names the class {path!r} (under {key!r}), which is not one of lightning-lora's; "
                "nothing was imported. If that class is yours and you trust the file, allow it: "
                "--allow-class <dotted.path> on the command line, or lightning_lora.allow_classes([...]) in Python"
            )


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _importable(text: str) -> bool:
    """Whether ``text`` reads as a dotted path into a module that exists (found without importing it)."""
    if not _DOTTED.fullmatch(text):
        return False
    try:
        return importlib.util.find_spec(text.split(".", 1)[0]) is not None  # a top-level lookup runs no code
    except (ImportError, ValueError):
        return False


def check_importable_strings(data: Any, where: str) -> None:
    """Refuse ``data`` if any string in it, at any depth, is an importable dotted path not allowed.

    For stored hyper-parameters that Lightning hands to jsonargparse (``_instantiator``): it
    imports any string given for a parameter typed as a class or a callable, whatever its key,
    and reads such a string as YAML first (so ``"{class_path: x.Y}"`` names ``x.Y`` too).
    """
    for _, item in _walk(data, where):
        if not isinstance(item, str):
            continue
        if _importable(item) and not allowed(item):
            raise UntrustedClassError(
                f"{where} holds the string {item[:200]!r}, which names importable code that is not one of "
                "lightning-lora's; nothing was imported. If it is yours and you trust the file, allow it: "
                "--allow-class <dotted.path> on the command line, or lightning_lora.allow_classes([...]) in Python"
            )
        parsed = _as_yaml(item)
        if isinstance(parsed, (dict, list)):
            check_class_paths(parsed, where)
            check_importable_strings(parsed, where)


def _as_yaml(text: str) -> Any:
    if len(text) > 100_000 or not any(mark in text for mark in ":[{-"):
        return None
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return None


def resolve_class(path: str, base: type, where: str) -> type:
    """Import an allowed dotted class path and check it is a subclass of ``base``."""
    check_class_paths({"class_path": path}, where)
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name, None)
    except ImportError as err:
        raise UsageError(f"{where}: cannot import {path!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"{where}: {path!r} is not a {base.__name__} class")
    return cls
