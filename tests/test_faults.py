"""Reliability: untrusted files on every loading path, interrupted writes, SIGTERM mid-fit."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_base_checkpoint

from lightning_lora.cli import main
from lightning_lora.models import RichBoyNet

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "finetune_lora.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]


class Exploit:
    """Unpickling this would write a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture
def trained(tmp_path_factory, fake_mnist):
    """A real, short LoRA fine-tune through the CLI: its checkpoint and working folder."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "argv", ["lightning-lora"])
        torch.manual_seed(0)
        write_base_checkpoint(root / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
        main(["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "1.0", *QUIET])  # fmt: skip
    return root, root / "runs/finetune_lora/checkpoints/last.ckpt"


def test_a_crafted_pickle_is_refused_on_every_loading_path(trained, tmp_path, monkeypatch, fake_mnist, capsys):
    root, good = trained
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Exploit(marker)}))
    attempts = [
        (["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--ckpt_path", str(evil)], 2),
        (["test", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--ckpt_path", str(evil)], 2),
        (["fit", "-c", CONFIG, "--data.data_dir", str(fake_mnist), "--model.base_checkpoint", str(evil)], 2),
        (["export", "--ckpt", str(evil), "--out", str(tmp_path / "a")], 1),
        (["merge", "--ckpt", str(evil), "--out", str(tmp_path / "m.pt2")], 1),
        (["report", "--base", str(good), "--finetuned", str(evil), "--out", str(tmp_path / "r")], 1),
    ]
    for args, code in attempts:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == code, args
        assert "not a readable checkpoint" in capsys.readouterr().err, args
    assert not marker.exists()


def test_an_interrupted_export_or_merge_leaves_the_previous_output_intact(trained, tmp_path, monkeypatch, capsys):
    _, ckpt = trained
    adapter, merged = tmp_path / "adapter", tmp_path / "merged.pt2"
    for verb, out in (("export", adapter), ("merge", merged)):
        with pytest.raises(SystemExit):
            main([verb, "--ckpt", str(ckpt), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}, merged.read_bytes()

    def half_written(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, os.PathLike)))
        Path(path).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("lightning_lora.files.write_safetensors", half_written)
    monkeypatch.setattr(torch.export, "save", half_written)
    for verb, out in (("export", adapter), ("merge", merged)):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--ckpt", str(ckpt), "--out", str(out)])
        assert exit_info.value.code == 1
        assert "No space left on device" in capsys.readouterr().err
    assert ({p.name: p.read_bytes() for p in adapter.iterdir()}, merged.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged.pt2"]  # no temporaries left


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path, fake_mnist):
    torch.manual_seed(0)
    write_base_checkpoint(tmp_path / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
    cli = str(Path(sys.executable).parent / "lightning-lora")
    args = ["-c", CONFIG, "--data.data_dir", str(fake_mnist), "--trainer.val_check_interval", "1.0", *QUIET]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [cli, "fit", *args, "--trainer.max_steps", "100000"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    events = tmp_path / "runs" / "finetune_lora"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(events.glob("version_*/events.out.tfevents.*")):
        time.sleep(0.2)
    time.sleep(3)  # well into training
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM after saving a checkpoint" in stderr and "Traceback" not in stderr
    last = tmp_path / "runs/finetune_lora/checkpoints/last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert step > 0
    resumed = subprocess.run(
        [cli, "fit", *args, "--trainer.max_steps", str(step + 3), "--ckpt_path", str(last)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == step + 3


def resumable_overlay(folder: Path) -> str:
    import yaml

    callbacks = [
        {"class_path": "lightning_lora.callbacks.LoRAInjectionCallback",
         "init_args": {"rank": 1, "alpha": 1, "adapter_dir": "adapter"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ck", "filename": "{step}", "every_n_train_steps": 3, "save_top_k": -1}},
        {"class_path": "helpers.SlowSteps", "init_args": {"seconds": 0.15}},
    ]  # fmt: skip
    path = folder / "resumable.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "deterministic": True}}))
    return str(path)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(tmp_path, fake_mnist):
    from safetensors.torch import load_file

    cli = str(Path(sys.executable).parent / "lightning-lora")
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    runs = {}
    for name in ("straight", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        torch.manual_seed(0)
        write_base_checkpoint(folder / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
        args = [cli, "fit", "-c", CONFIG, "-c", resumable_overlay(folder), "--data.data_dir", str(fake_mnist),
                "--trainer.max_steps", "24", "--trainer.val_check_interval", "1.0", *QUIET]  # fmt: skip
        runs[name] = (folder, args)
    folder, args = runs["straight"]
    subprocess.run(args, cwd=folder, env=env, check=True, capture_output=True, timeout=300)

    folder, args = runs["killed"]
    process = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (folder / "ck" / "step=12.ckpt").exists():
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait(timeout=30)
    assert not (folder / "adapter").exists(), "the run must have been killed before it finished"
    resume_from = folder / "ck" / "step=9.ckpt"  # complete for sure: step=12 was being written or done
    subprocess.run([*args, "--ckpt_path", str(resume_from)], cwd=folder, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    straight = load_file(runs["straight"][0] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and len(straight) == 6
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
