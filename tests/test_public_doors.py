"""Lightning, torch and torchmetrics through public doors only: a scan of the package's source.

Fails on any read, write or override of a private name the package does not own itself (``x._y``,
``getattr(x, "_y")``, ``x.__dict__["_y"]``), on a private name of ours that shadows one of theirs
(overriding it without saying so), and on Lightning's loop internals (``trainer.fit_loop``, a
checkpoint's ``"loops"``). The exceptions are listed in ``ALLOWED``, each with its reason beside
the code that needs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Sampler

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lora"

ALLOWED = {
    # torch.compile's wrapper exposes the compiled module only as _orig_mod (no public accessor).
    ("core/model_state.py", "_orig_mod"),
    # Not ours to read: the name nn.TransformerEncoderLayer reads of its self_attn (set False, so no
    # fused kernel bypasses the adapter).
    ("core/layers/attention.py", "_qkv_same_embed_dim"),
}
LOOP_INTERNALS = {"fit_loop", "epoch_loop", "batch_progress", "epoch_progress", "val_loop", "test_loop"}
NAME_READERS = {"getattr", "hasattr", "setattr", "delattr"}


def sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every private name the package itself defines: functions, classes, assigned names and attributes."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if is_private(n)}


def their_private_names() -> set[str]:
    """Private names on instances and classes of what the package builds on."""
    objects = [
        nn.Linear(1, 1),
        nn.Conv2d(1, 1, 1),
        nn.Embedding(2, 1),
        nn.MultiheadAttention(4, 1),
        pl.LightningModule(),
        pl.LightningDataModule(),
        pl.Callback(),
        ProgressBar(),
        ModelCheckpoint(),
        Checkpoint,
        LightningCLI,
        pl.Trainer,
        DataLoader(torch.utils.data.TensorDataset(torch.zeros(2))),
        Sampler,
        torch.zeros(1),
    ]
    names = set()
    for obj in objects:
        names.update(dir(obj))
        names.update(vars(obj) if not isinstance(obj, type) else ())
    return {n for n in names if is_private(n)}


def findings() -> list[str]:
    trees = sources()
    ours, theirs = defined_names(trees), their_private_names()
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                if node.attr in theirs or node.attr not in ours:
                    name = node.attr
            elif isinstance(node, ast.Attribute) and node.attr in LOOP_INTERNALS:
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in NAME_READERS
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and (is_private(node.args[1].value) or node.args[1].value in LOOP_INTERNALS)
                and (node.args[1].value in theirs or node.args[1].value not in ours)
            ):
                name = node.args[1].value
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
                on_dict = isinstance(node.value, ast.Attribute) and node.value.attr == "__dict__"
                if key == "loops" or (on_dict and isinstance(key, str) and is_private(key)):
                    name = str(key)
            elif isinstance(node, ast.ClassDef) and node.bases:
                for item in node.body:  # a method or class attribute of one of their private names overrides it
                    names = [item.name] if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
                    if isinstance(item, (ast.Assign, ast.AnnAssign)):
                        targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                        names = [t.id for t in targets if isinstance(t, ast.Name)]
                    for overridden in names:
                        if is_private(overridden) and overridden in theirs and (path, overridden) not in ALLOWED:
                            found.append(f"lightning_lora/{path}:{item.lineno}: {overridden}")
            if name is not None and (path, name) not in ALLOWED:
                found.append(f"lightning_lora/{path}:{node.lineno}: {name}")
    return found


def test_the_package_uses_no_private_name_of_lightning_torch_or_torchmetrics():
    found = findings()
    assert not found, "private names or loop internals of another library:\n" + "\n".join(found)


def test_every_allowed_exception_is_still_needed_and_explained():
    trees = sources()
    for path, name in ALLOWED:
        text = (PACKAGE / path).read_text()
        assert name in text, f"{path} no longer uses {name}: drop it from ALLOWED"
        line = next(i for i, line in enumerate(text.splitlines()) if name in line)
        nearby = "\n".join(text.splitlines()[max(0, line - 6) : line + 1])
        assert "#" in nearby, f"{path}: say beside {name} why no public door serves"
    assert trees


def test_the_scan_catches_what_it_is_for():
    """Each form the scan must catch, in a module it is shown."""
    probe = PACKAGE / "integration" / "_public_doors_probe.py"
    probe.write_text(
        "def f(trainer, module, checkpoint, tensor):\n"
        "    trainer.fit_loop.epoch_loop.batch_progress\n"
        "    trainer._logger_connector.should_update_logs\n"
        "    getattr(module, '_parameters')\n"
        "    module.__dict__['_buffers']\n"
        "    checkpoint['loops']\n"
        "    tensor._version\n"
        "class P(object):\n"
        "    def _parse_ckpt_path(self):\n"
        "        pass\n"
    )
    try:
        found = [f for f in findings() if "_public_doors_probe" in f]
    finally:
        probe.unlink()
    names = {f.rsplit(": ", 1)[1] for f in found}
    assert {"fit_loop", "epoch_loop", "batch_progress", "_logger_connector", "_parameters", "_buffers", "loops",
            "_version", "_parse_ckpt_path"} <= names  # fmt: skip
