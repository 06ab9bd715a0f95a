"""Fine-tuning through the command line on a GPU: mixed precision, DDP, FSDP with ``configure_model()``.

Each run is a separate process (DDP and FSDP set up a process group), fine-tunes a few steps on
the synthetic MNIST, and is then resumed from its adapter-only checkpoint. A run passes when the
adapters trained and stayed fp32, the checkpoint holds only them, the frozen base it
fingerprinted while training is bit for bit the base it started from, the resumed run starts
training from exactly the checkpoint's adapters (a probe callback saves them at train start)
and continues from the checkpoint's step to its own ``max_steps``. The ``cpu`` variants run the same
checks everywhere, so this file is exercised without a GPU too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_base_checkpoint

from lightning_lora.core.fingerprint import fingerprint
from lightning_lora.demo.nets import RichBoyNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
GPU = ["-c", str(CONFIGS / "gpu.yaml")]
SHORT = ["--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false"]

FINETUNE_VARIANTS = {
    "cpu": (["--trainer.accelerator", "cpu"], False),
    "bf16-mixed": ([*GPU, "-c", str(CONFIGS / "bf16.yaml")], True),
    "16-mixed": ([*GPU, "--trainer.precision", "16-mixed"], True),
    "ddp-1-device": ([*GPU, "--trainer.strategy", "ddp", "--trainer.devices", "1"], True),
}

# A user's module that builds its network in configure_model() (Lightning's pattern for FSDP).
LATE_MODULE = textwrap.dedent(
    """
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lightning_lora import LoRACheckpointMixin


    def make_net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


    class LateNetModule(LoRACheckpointMixin, pl.LightningModule):
        def __init__(self, base_seed: int = 0, lr: float = 0.01):
            super().__init__()
            self.save_hyperparameters()
            self.net = None

        def configure_model(self):
            if self.net is None:
                self.net = make_net(self.hparams.base_seed)
            super().configure_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
    """
)


# Saves the adapters as the resumed run starts training (restored from the checkpoint by then).
PROBE = textwrap.dedent(
    """
    import os

    import lightning.pytorch as pl
    import torch


    class AdaptersAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            state = {k: v.detach().float().cpu() for k, v in pl_module.state_dict().items() if ".lora_" in k}
            torch.save(state, os.environ["LORA_PROBE_FILE"])
    """
)


def late_config(data_dir: Path, strategy: str, accelerator: str, precision: str) -> str:
    return textwrap.dedent(
        f"""
        seed_everything: 0
        trainer:
          accelerator: {accelerator}
          devices: 1
          strategy: {strategy}
          precision: {precision}
          max_steps: 4
          enable_progress_bar: false
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {{save_dir: runs, name: late}}
          callbacks:
            - class_path: lightning_lora.integration.resumable_checkpoint.ResumableCheckpoint
              init_args: {{every_n_steps: 2}}
        lora: {{rank: 2, alpha: 4, target_modules: all-linear}}
        model:
          class_path: late_module.LateNetModule
        data:
          class_path: lightning_lora.demo.mnist_datamodule.MNISTDataModule
          init_args: {{data_dir: {data_dir}, batch_size: 16}}
        """
    )


LATE_VARIANTS = {
    "cpu": ("auto", "cpu", "32-true", False),
    "fsdp": ("fsdp", "gpu", "32-true", True),
    "fsdp-bf16-mixed": ("fsdp", "gpu", "bf16-mixed", True),
}


def needs_gpu(on_gpu: bool):
    return [pytest.mark.gpu] if on_gpu else []


def run_cli(cwd: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["LORA_PROBE_FILE"] = str(cwd / "adapters_at_start.pt")
    code = "import sys; from lightning_lora.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "fit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def newest_last_checkpoint(root: Path) -> Path:
    found = sorted(root.glob("runs/*/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert found, f"no last.ckpt under {root / 'runs'}"
    return found[-1]


def resume_with_probe(cwd: Path, *args: str) -> None:
    """Resume, and check that training started from exactly the checkpoint's adapters."""
    (cwd / "lora_probe.py").write_text(PROBE)
    run_cli(cwd, *args, "--trainer.callbacks+=lora_probe.AdaptersAtStart")
    checkpoint = Path(args[args.index("--ckpt_path") + 1])
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    at_start = torch.load(cwd / "adapters_at_start.pt", weights_only=True)
    assert set(at_start) == set(saved)
    for key, value in saved.items():
        assert torch.equal(at_start[key], value.float()), f"{key} was not restored from the checkpoint"


def check_adapter_only_checkpoint(path: Path, base: torch.nn.Module) -> int:
    """The checkpoint's adapters trained and are fp32, it holds nothing else, and the base is untouched."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state, record = saved["state_dict"], saved["lightning_lora"]
    assert state and all(".lora_" in key for key in state), sorted(state)
    assert all(value.dtype == torch.float32 for value in state.values())
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())
    recorded = sorted(entry["sha256"] for entry in record["base_fingerprint"].values())
    assert recorded == sorted(entry["sha256"] for entry in fingerprint(base.state_dict()).values())
    return int(saved["global_step"])


@pytest.mark.parametrize(
    "variant", [pytest.param(name, marks=needs_gpu(gpu)) for name, (_, gpu) in FINETUNE_VARIANTS.items()]
)
def test_finetune_trains_only_adapters_and_resumes(tmp_path, fake_mnist, variant):
    torch.manual_seed(0)
    base = RichBoyNet()
    write_base_checkpoint(tmp_path / "runs/pretrain/checkpoints/last.ckpt", base)
    common = ["-c", str(CONFIGS / "finetune_lora.yaml"), *FINETUNE_VARIANTS[variant][0], "--data.data_dir"]
    common += [str(fake_mnist), *SHORT]
    run_cli(tmp_path, *common, "--trainer.max_steps", "4")
    first = newest_last_checkpoint(tmp_path)
    assert check_adapter_only_checkpoint(first, base) == 4
    resume_with_probe(tmp_path, *common, "--trainer.max_steps", "7", "--ckpt_path", str(first))
    resumed = newest_last_checkpoint(tmp_path)
    assert resumed != first and check_adapter_only_checkpoint(resumed, base) == 7


@pytest.mark.parametrize(
    "variant", [pytest.param(name, marks=needs_gpu(gpu)) for name, (*_, gpu) in LATE_VARIANTS.items()]
)
def test_a_net_built_in_configure_model_trains_and_resumes(tmp_path, fake_mnist, variant):
    strategy, accelerator, precision, _ = LATE_VARIANTS[variant]
    (tmp_path / "late_module.py").write_text(LATE_MODULE)
    (tmp_path / "late.yaml").write_text(late_config(fake_mnist, strategy, accelerator, precision))
    sys.path.insert(0, str(tmp_path))
    try:
        from late_module import make_net
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("late_module", None)
    run_cli(tmp_path, "-c", "late.yaml")
    first = newest_last_checkpoint(tmp_path)
    assert check_adapter_only_checkpoint(first, make_net(0)) == 4
    resume_with_probe(tmp_path, "-c", "late.yaml", "--trainer.max_steps", "6", "--ckpt_path", str(first))
    resumed = newest_last_checkpoint(tmp_path)
    assert resumed != first and check_adapter_only_checkpoint(resumed, make_net(0)) == 6
