"""Test helpers: synthetic MNIST in the real IDX format, base checkpoints, a per-rank recorder."""

from __future__ import annotations

import struct
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_lora.core.adapter_tensors import lora_state_dict


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x08 = unsigned byte, big-endian sizes)."""
    header = struct.pack(">HBB", 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.contiguous().numpy().tobytes())


def write_fake_mnist(root: Path, train_per_digit: int = 40, test_per_digit: int = 10, seed: int = 0) -> Path:
    """A learnable fake MNIST: each digit is a fixed random pattern plus noise, 28x28 uint8.

    Returns ``root``, which then holds ``MNIST/raw/`` as torchvision expects.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (10, 28, 28), generator=generator)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, per_digit in (("train", train_per_digit), ("t10k", test_per_digit)):
        labels = torch.arange(10).repeat_interleave(per_digit)
        labels = labels[torch.randperm(len(labels), generator=generator)]
        noise = torch.randint(-60, 61, (len(labels), 28, 28), generator=generator)
        images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def write_base_checkpoint(path: Path, net: nn.Module) -> Path:
    """A minimal Lightning-style checkpoint of a plain net (what a pretraining run leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


class RecordAdapters(pl.Callback):
    """Saves each rank's adapter tensors at the end of training, to compare ranks afterwards."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.cpu().clone() for k, v in lora_state_dict(pl_module.net).items()}
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class SlowSteps(pl.Callback):
    """Sleeps after every training step, so a test can kill a run midway (no effect on numerics)."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


class Conv1DLike(nn.Module):
    """transformers' ``Conv1D`` (GPT-2), written out so the core tests need no transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Single(nn.Module):
    """One layer in a container (LoRA targets are named inside a model); attention is self-attention."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.attention = isinstance(layer, nn.MultiheadAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention:
            return self.layer(x, x, x)[0]
        return self.layer(x)


LAYER_ZOO = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(9, 12)),
    "linear_3d_no_bias": (lambda: nn.Linear(12, 7, bias=False), lambda: torch.randn(2, 4, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 10)),
    "conv2d_strided": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_dilated_reflect": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
        lambda: torch.randn(2, 4, 8, 8),
    ),
    "conv2d_same_circular": (
        lambda: nn.Conv2d(4, 6, 4, padding="same", padding_mode="circular", bias=False),
        lambda: torch.randn(2, 4, 8, 8),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), lambda: torch.randn(2, 2, 5, 5, 5)),
    "embedding": (lambda: nn.Embedding(30, 6, padding_idx=0), lambda: torch.randint(0, 30, (3, 5))),
    "conv1d_transformers": (lambda: Conv1DLike(7, 12), lambda: torch.randn(2, 4, 12)),
    "attention_batch_first": (
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: torch.randn(2, 5, 8),
    ),
    "attention_sequence_first": (
        lambda: nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=False),
        lambda: torch.randn(5, 2, 8),
    ),
}
"""Every layer type LoRA adapts, with an input: (factory of a fresh layer, factory of an input)."""

DORA_KINDS = [k for k in LAYER_ZOO if not k.startswith(("embedding", "attention"))]


def zoo_model(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A frozen-base reference of one zoo layer in a container, and an input for it."""
    torch.manual_seed(seed)
    make_layer, make_input = LAYER_ZOO[kind]
    return Single(make_layer()).requires_grad_(False), make_input()


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """Move the adapter away from its start, as training would (SGD on the outputs' mean square)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


def require(module: str):
    """Import an optional test dependency (``peft``, ``transformers``, ``torchvision``).

    ``make test`` installs them (the ``test`` extra) and sets ``LIGHTNING_LORA_REQUIRE_EXTRAS=1``,
    so there a missing one fails the run; elsewhere its tests are skipped with the reason.
    """
    import importlib
    import os

    import pytest

    if os.environ.get("LIGHTNING_LORA_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {module} (pip install -e '.[test]')")


class RecordingLogger(pl.loggers.Logger):
    """Keeps every logged scalar in memory: ``metrics[name] == [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> None:
        return None  # nothing to draw images or layouts into

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))


def move_adapters(model: nn.Module, seed: int = 1, std: float = 0.3) -> nn.Module:
    """Every adapter tensor of every adapter moved away from its start, as training would (seeded)."""
    from lightning_lora import lora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for param in layer.lora_adapters.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def assert_same_per_adapter(got: nn.Module, expected: nn.Module, x: torch.Tensor, names, atol: float = 0.0) -> None:
    """With each of ``names`` active in both models (a name, or a list of them), ``got`` computes what ``expected``
    does: bit for bit at ``atol=0``, else to ``atol`` (and the same relative tolerance)."""
    from lightning_lora import set_active_adapters

    with torch.no_grad():
        for active in names:
            set_active_adapters(got, active), set_active_adapters(expected, active)
            if atol:
                torch.testing.assert_close(got(x), expected(x), atol=atol, rtol=atol)
            else:
                assert torch.equal(got(x), expected(x)), active


class TwoLinear(nn.Module):
    """A seeded 12 -> 16 -> 5 ReLU network: two Linear layers to adapt, fc1 and fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))
