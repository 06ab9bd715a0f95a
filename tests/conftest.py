"""Shared fixtures: a fixed seed for every test, the gpu marker's skip, synthetic MNIST, a working folder
with pretraining checkpoints, a trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_lora.integration import benign_warnings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _seed_and_known_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed seed for every test (torch's and the run seed seed_everything would set); the benign
    warnings of real runs silenced, as the CLI does.

    Every other warning fails the test (pyproject's filterwarnings): it must be looked at.
    """
    torch.manual_seed(0)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    benign_warnings.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The CPU, and a CUDA GPU where there is one (the core invariants run on both).

    On the GPU, TF32 is off (cuDNN turns it on for convolutions by default), so fp32 tolerances
    test fp32 arithmetic: with TF32 the base layer itself is only accurate to about 1e-3.
    """
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return torch.device(request.param)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder holding the pretraining checkpoints the fine-tune configs point at."""
    import sys

    from helpers import write_base_checkpoint

    from lightning_lora.demo.nets import MLP, LinearModel, RichBoyNet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    torch.manual_seed(0)
    write_base_checkpoint(tmp_path / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
    write_base_checkpoint(tmp_path / "runs/mlp_pretrain/checkpoints/last.ckpt", MLP())
    write_base_checkpoint(tmp_path / "runs/shift_pretrain/checkpoints/last.ckpt", LinearModel())
    return tmp_path


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory):
    """A folder holding a tiny synthetic MNIST (400 train / 100 test images) in torchvision's layout."""
    from helpers import write_fake_mnist

    return write_fake_mnist(tmp_path_factory.mktemp("fake_mnist"))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, fake_mnist):
    """A real, short LoRA fine-tune through the command line: (its working folder, its checkpoint).

    The base is a pretraining-style checkpoint of a seeded RichBoyNet at runs/pretrain/checkpoints.
    """
    import sys

    from helpers import write_base_checkpoint

    from lightning_lora.cli import main
    from lightning_lora.demo.nets import RichBoyNet

    root = tmp_path_factory.mktemp("lora_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["lightning-lora"])
        torch.manual_seed(0)
        write_base_checkpoint(root / "runs/pretrain/checkpoints/last.ckpt", RichBoyNet())
        main(["fit", "-c", str(CONFIGS / "finetune_lora.yaml"), "--data.data_dir", str(fake_mnist),
              "--trainer.max_steps", "2", "--trainer.val_check_interval", "1.0",
              "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return root, root / "runs/finetune_lora/version_0/checkpoints/last.ckpt"
