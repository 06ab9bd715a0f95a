"""One pass per fact: targets are planned once per injection, a checkpoint is read once per resume or load.

Counted with a profiler hook on the functions' code objects, so that no import path (``from x import
f`` binds its own name) escapes the count.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, load_adapter, save_adapter
from lightning_lora.cli import main
from lightning_lora.core.targets import plan_targets
from lightning_lora.demo.classifiers import LitClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@contextmanager
def calls_of(function: Callable, argument: str | None = None) -> Iterator[list]:
    """Every call of ``function`` while the block runs: its ``argument``'s value (or ``None``) per call."""
    code, seen = function.__code__, []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is code:
            seen.append(frame.f_locals.get(argument) if argument else None)

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(previous)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_targets_are_planned_once_per_injection_and_per_load(tmp_path):
    with calls_of(plan_targets) as planned:
        model = inject_lora(net(), LoRAConfig(rank=2, rank_pattern={"2": 3}))
    assert len(planned) == 1
    save_adapter(model, tmp_path / "adapter")
    with calls_of(plan_targets) as planned:
        load_adapter(net(), tmp_path / "adapter")
    assert len(planned) == 1


def test_inspect_plans_the_targets_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with calls_of(plan_targets) as planned, pytest.raises(SystemExit) as done:
        main(["inspect", "-c", str(CONFIGS / "finetune_lora.yaml")])
    assert done.value.code == 0 and len(planned) == 1, capsys.readouterr()


@pytest.fixture
def fine_tuned(workdir, fake_mnist):
    """A short fine-tune through the command line: its options and ``last.ckpt``."""
    common = ["-c", str(CONFIGS / "finetune_lora.yaml"), "--data.data_dir", str(fake_mnist)]
    common += ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_steps", "2"])
    return common, workdir / "runs/finetune_lora/version_0/checkpoints/last.ckpt"


def test_a_resume_reads_its_checkpoint_once(fine_tuned):
    common, last = fine_tuned
    with calls_of(torch.serialization.load, "f") as loaded:
        main(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", str(last)])
    checkpoints = [f for f in loaded if isinstance(f, (str, Path)) and Path(f).resolve() == last.resolve()]
    assert len(checkpoints) == 1, loaded


def test_load_from_checkpoint_reads_once_and_writes_nothing(fine_tuned):
    _, last = fine_tuned
    with calls_of(torch.serialization.load, "f") as loaded:
        LitClassifier.load_from_checkpoint(last)
    with calls_of(torch.serialization.save) as saved:  # (one profiler hook at a time)
        LitClassifier.load_from_checkpoint(last)
    targets = [f for f in loaded if isinstance(f, (str, Path)) and Path(f).resolve() == last.resolve()]
    assert len(targets) == 1 and saved == [], (loaded, saved)
