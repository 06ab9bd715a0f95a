"""Crashes and NaN: a run killed at any point resumes to the very same adapter; no checkpoint holds NaN.

Runs go through the real command line in subprocesses (SIGKILL leaves no chance to clean up)
on synthetic MNIST, with the settings that used to break exactness: adapter dropout, gradient
accumulation, ``limit_train_batches``, and two DDP processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import write_base_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_lora.demo.classifiers import LitClassifier
from lightning_lora.demo.mnist_datamodule import MNISTDataModule
from lightning_lora.demo.nets import MLP, RichBoyNet
from lightning_lora.errors import NonFiniteWeightsError
from lightning_lora.integration.callback import LoRAInjectionCallback
from lightning_lora.integration.exact_resume import ExactResume
from lightning_lora.integration.resumable_checkpoint import ResumableCheckpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "finetune_lora.yaml")
CLI = str(Path(sys.executable).parent / "lightning-lora")
ODD = [
    "--lora.dropout", "0.3",
    "--trainer.accumulate_grad_batches", "2",
    "--trainer.limit_train_batches", "6",
    "--trainer.limit_val_batches", "2",
    "--trainer.val_check_interval", "1.0",
    "--data.train_digits", "null",
    "--trainer.max_steps", "9",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def prepared(folder: Path, fake_mnist: Path, slow: float = 0.0, every: int = 2, writer: str = "resumable") -> list[str]:
    """A working folder with a base, and the command for the odd-settings fine-tune in it.

    ``writer``: the shipped ``ResumableCheckpoint``, or a user's own ``ModelCheckpoint`` overlaid on the
    shipped config (``"model"``; ``"model-on-exception"`` also saves at a crash or SIGTERM).
    """
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    write_base_checkpoint(folder / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
    if writer == "resumable":
        callbacks = [{"class_path": "lightning_lora.integration.resumable_checkpoint.ResumableCheckpoint",
                      "init_args": {"every_n_steps": every}}]  # fmt: skip
    else:
        callbacks = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": every, "save_last": True, "save_top_k": -1, "filename": "{step}",
                           "save_on_exception": writer == "model-on-exception"}},
        ]  # fmt: skip
    if slow:
        callbacks.append({"class_path": "helpers.SlowSteps", "init_args": {"seconds": slow}})
    overlay = folder / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [CLI, "fit", "-c", CONFIG, "-c", str(overlay), "--data.data_dir", str(fake_mnist), *ODD]


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "PYTHONUNBUFFERED": "1"}
    env.pop("MASTER_PORT", None)
    return env


def run(args: list[str], folder: Path) -> None:
    result = subprocess.run(args, cwd=folder, env=environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


def adapter(folder: Path, version: str) -> dict[str, torch.Tensor]:
    return load_file(folder / "runs/finetune_lora" / version / "adapter/adapter_model.safetensors")


def kill_after(args: list[str], folder: Path, checkpoint: str, delay: float) -> None:
    """Start the run, wait for ``checkpoint`` to appear, wait ``delay`` more, SIGKILL every process."""
    process = subprocess.Popen(args, cwd=folder, env=environment(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    target = folder / "runs/finetune_lora/version_0/checkpoints" / checkpoint
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not target.exists() and process.poll() is None:
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)  # DDP's second rank too: no handler, no cleanup
    process.wait(timeout=60)
    assert not (folder / "runs/finetune_lora/version_0/adapter").exists(), "killed before it finished"


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys() and len(expected) == 6
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_adapter(tmp_path, fake_mnist):
    straight = tmp_path / "straight"
    run(prepared(straight, fake_mnist), straight)
    expected = adapter(straight, "version_0")
    for i, delay in enumerate((0.05, 0.5)):  # killed at two different points of the run
        folder = tmp_path / f"killed_{i}"
        args = prepared(folder, fake_mnist, slow=0.25)
        kill_after(args, folder, "epoch=0-step=2.ckpt", delay)
        run([*args, "--ckpt_path", "runs/finetune_lora"], folder)  # the run folder: its latest checkpoint
        assert_same(expected, adapter(folder, "version_1"))


def test_two_process_ddp_killed_then_resumed_gives_the_uninterrupted_adapter(tmp_path, fake_mnist):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    straight = tmp_path / "straight"
    run([*prepared(straight, fake_mnist), *ddp], straight)
    folder = tmp_path / "killed"
    args = [*prepared(folder, fake_mnist, slow=0.3), *ddp]
    kill_after(args, folder, "epoch=0-step=2.ckpt", 0.1)
    run([*args, "--ckpt_path", "runs/finetune_lora"], folder)
    assert_same(adapter(straight, "version_0"), adapter(folder, "version_1"))


def test_a_resume_refused_under_ddp_is_said_once_and_leaves_no_version_folder(tmp_path, fake_mnist):
    """Every process refuses alike (a mid-epoch checkpoint of one process, resumed with two); one prints it."""
    folder = tmp_path / "run"
    args = prepared(folder, fake_mnist)
    run([*args, "--trainer.max_steps", "3"], folder)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = subprocess.run([*args, *ddp, "--ckpt_path", "runs/finetune_lora"], cwd=folder, env=environment(),
                            capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: resume refused") == 1, result.stderr[-3000:]
    assert "trainer.world_size (processes: devices x num_nodes): 1 in the checkpoint, 2 now" in result.stderr
    assert sorted(p.name for p in (folder / "runs/finetune_lora").iterdir()) == ["version_0"]


def test_when_ddps_first_process_is_killed_the_second_says_so_not_that_it_is_a_bug(tmp_path, fake_mnist):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    folder = tmp_path / "run"
    args = [*prepared(folder, fake_mnist, slow=0.3), *ddp, "--trainer.max_steps", "1000"]
    first = subprocess.Popen(args, cwd=folder, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    checkpoints = folder / "runs/finetune_lora/version_0/checkpoints"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list(checkpoints.glob("*.ckpt")) and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the second process, its child, lives on and fails in its next collective
    _, stderr = first.communicate(timeout=120)  # until the second process, which shares the pipe, has exited too
    assert f"error: the first process of this run (pid {first.pid}, rank 0) stopped first" in stderr, stderr[-3000:]
    assert "This is a bug" not in stderr and "Traceback" not in stderr


def signalled(args: list[str], folder: Path, sig: int) -> tuple[subprocess.Popen, str]:
    """Start a fit, send ``sig`` once it is training, and return the process and its stderr."""
    process = subprocess.Popen(args, cwd=folder, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 200
    events = folder / "runs/finetune_lora/version_0"
    while time.monotonic() < deadline and not list(events.glob("events.out.tfevents.*")):
        time.sleep(0.1)
    time.sleep(1.5)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process, stderr


@pytest.mark.parametrize("checkpointing", ["at the signal", "every step only", "none"])
def test_sigterm_says_truthfully_whether_a_checkpoint_was_saved(tmp_path, fake_mnist, checkpointing):
    writer = "model-on-exception" if checkpointing == "at the signal" else "model"
    args = [*prepared(tmp_path / "run", fake_mnist, slow=0.2, writer=writer)]
    args += ["--trainer.max_steps", "10000"]
    if checkpointing == "none":
        args += ["--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    process, stderr = signalled(args, tmp_path / "run", signal.SIGTERM)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    stopped = int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0]) if checkpointing != "none" else 0
    if checkpointing == "at the signal" or "a checkpoint of that step was saved" in stderr:
        saved = stderr.split("a checkpoint of that step was saved to ")[1].split(":")[0]
        assert torch.load(tmp_path / "run" / saved, weights_only=True)["global_step"] == stopped
    elif checkpointing == "every step only":  # the signal fell between two every-2-steps checkpoints
        assert "no checkpoint was written at the signal" in stderr
        newest = stderr.split("The newest checkpoint of this run is ")[1].split(", from step")[0]
        step = torch.load(tmp_path / "run" / newest, weights_only=True)["global_step"]
        assert f"from step {step}: resuming" in stderr and step < stopped
    else:
        assert "before any checkpoint of this run could be saved" in stderr


def test_ctrl_c_exits_130_after_lightnings_clean_shutdown(tmp_path, fake_mnist):
    args = [*prepared(tmp_path / "run", fake_mnist, slow=0.2), "--trainer.max_steps", "10000"]
    process, stderr = signalled(args, tmp_path / "run", signal.SIGINT)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_nan_stops_before_any_bad_checkpoint_and_its_advice_works(tmp_path, fake_mnist):
    folder = tmp_path / "run"
    args = prepared(folder, fake_mnist, every=1)
    run([*args, "--trainer.max_steps", "3"], folder)
    # Resuming with a rate that diverges: step 4 applies it, step 5's forward is not finite.
    result = subprocess.run([*args, "--ckpt_path", "runs/finetune_lora", "--model.lr_on_resume", "1e30"],
                            cwd=folder, env=environment(), capture_output=True, text=True, timeout=400)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the training loss became" in result.stderr and "--model.lr_on_resume <lower lr>" in result.stderr
    advised = result.stderr.split(" --model.lr_on_resume <lower lr>")[0].rsplit("--ckpt_path ", 1)[1]
    assert torch.load(folder / advised, weights_only=True)["global_step"] == 3  # not step 4's diverged weights
    for path in (folder / "runs/finetune_lora").rglob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values()), path
        assert state["global_step"] <= 4, f"{path}: the state that gave NaN was checkpointed"
    run([*args, "--ckpt_path", advised, "--model.lr_on_resume", "0.001"], folder)  # the advice, as written
    assert all(torch.isfinite(t).all() for t in adapter(folder, "version_2").values())


def test_weights_that_turn_non_finite_are_never_checkpointed(tmp_path, fake_mnist):
    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.net.layers[0].lora_B.fill_(float("inf"))

    write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16]))
    model = LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=str(tmp_path / "base.ckpt"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=6, logger=False, enable_progress_bar=False, limit_val_batches=0,
        callbacks=[LoRAInjectionCallback(rank=2), Poison(), checkpoints],
    )  # fmt: skip
    with pytest.raises(NonFiniteWeightsError, match="refusing to write a checkpoint.*lora_B"):
        trainer.fit(model, MNISTDataModule(data_dir=str(fake_mnist), batch_size=16))
    written = sorted((tmp_path / "ck").glob("*.ckpt"))
    assert [p.name for p in written] == ["step=1.ckpt", "step=2.ckpt"]
    for path in written:
        assert all(torch.isfinite(t).all() for t in torch.load(path, weights_only=True)["state_dict"].values())


def test_a_mid_epoch_resume_that_cannot_be_exact_is_refused_at_start(tmp_path):
    """A plain DataLoader restarts its epoch on resume; Lightning only warns, this refuses."""
    from lightning_lora.errors import ResumeError

    class PlainData(pl.LightningDataModule):
        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            images, labels = torch.randn(64, 1, 28, 28, generator=generator), torch.arange(64) % 10
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)

    write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16]))

    def fit(max_steps: int, ckpt_path: str | None = None) -> None:
        model = LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=str(tmp_path / "base.ckpt"))
        checkpoints = ResumableCheckpoint(dirpath=tmp_path / "ck", every_n_steps=3, keep=20)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, max_steps=max_steps, logger=False, enable_progress_bar=False,
            limit_val_batches=0, callbacks=[ExactResume(), LoRAInjectionCallback(rank=2), checkpoints],
        )  # fmt: skip
        trainer.fit(model, PlainData(), ckpt_path=ckpt_path)

    fit(3)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(ResumeError, match="middle of an epoch.*cannot continue where the run stopped"):
        fit(6, str(tmp_path / "ck/epoch=0-step=3.ckpt"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before  # the refused resume wrote nothing
    fit(24)  # 8 batches per epoch: a checkpoint written by the epoch's last batch resumes
    fit(27, str(tmp_path / "ck/epoch=2-step=24.ckpt"))


class SaveAtBatch(pl.Callback):
    """Writes a checkpoint after a given batch, as SIGTERM's save_on_exception could at any batch."""

    def __init__(self, batch: int, path: Path) -> None:
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.batch:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_between_accumulated_batches_is_refused(tmp_path, fake_mnist):
    """Written inside an accumulated step (a user's callback, or a ModelCheckpoint validating there), it
    lacks the step's earlier gradients: the resume is refused, before anything trains."""
    from lightning_lora.errors import ResumeError

    write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16]))

    def fit(callbacks, ckpt_path=None, **kwargs):
        model = LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=str(tmp_path / "base.ckpt"))
        options = dict(
            default_root_dir=tmp_path, max_steps=4, logger=False, enable_progress_bar=False, limit_val_batches=1,
            accumulate_grad_batches=2, callbacks=[ExactResume(), LoRAInjectionCallback(rank=2), *callbacks],
        )  # fmt: skip
        trainer = pl.Trainer(**{**options, **kwargs})
        trainer.fit(model, MNISTDataModule(data_dir=str(fake_mnist), batch_size=8), ckpt_path=ckpt_path)

    fit([SaveAtBatch(3, tmp_path / "odd.ckpt"), SaveAtBatch(4, tmp_path / "even.ckpt")], enable_checkpointing=False)
    with pytest.raises(ResumeError, match="the end of a training batch in the middle of an accumulated"):
        fit([], str(tmp_path / "odd.ckpt"), enable_checkpointing=False)
    fit([], str(tmp_path / "even.ckpt"), enable_checkpointing=False)  # between steps: resumes
    fit([ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, filename="{step}")], val_check_interval=3)
    with pytest.raises(ResumeError, match="the end of a validation in the middle of an accumulated"):
        fit([], str(tmp_path / "ck/step=1.ckpt"), enable_checkpointing=False)


def test_a_resumed_run_writes_no_checkpoint_before_its_first_step(tmp_path, fake_mnist):
    write_base_checkpoint(tmp_path / "base.ckpt", MLP(hidden_sizes=[16]))

    def fit(folder: str, max_steps: int, ckpt_path=None):
        model = LitClassifier(MLP(hidden_sizes=[16]), base_checkpoint=str(tmp_path / "base.ckpt"))
        every_step = ResumableCheckpoint(dirpath=tmp_path / folder, every_n_steps=1, keep=20)
        trainer = pl.Trainer(
            default_root_dir=tmp_path, max_steps=max_steps, logger=False, enable_progress_bar=False,
            limit_val_batches=0, accumulate_grad_batches=2,
            callbacks=[ExactResume(), LoRAInjectionCallback(rank=2), every_step],
        )  # fmt: skip
        trainer.fit(model, MNISTDataModule(data_dir=str(fake_mnist), batch_size=8), ckpt_path=ckpt_path)

    fit("first", 3)
    fit("resumed", 5, str(tmp_path / "first/last.ckpt"))
    written = sorted(p.name for p in (tmp_path / "resumed").glob("*.ckpt"))
    assert written == ["epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]  # not step 3 again, mid-step
    fit("again", 6, str(tmp_path / "resumed/epoch=0-step=4.ckpt"))  # and each of them resumes
