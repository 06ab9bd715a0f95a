"""Samples per second of LoRA fine-tuning of RichBoyNet on real MNIST, four ways.

    python benchmarks/train.py --data-dir data            # batch sizes 10 and 64
    python benchmarks/train.py --data-dir data --quick

- ``tutorial loop``: torchvision ``MNIST`` + ``ToTensor`` + ``Normalize``, a ``DataLoader``, a
  plain PyTorch loop, and the tutorial's LoRA (a ``parametrize``-d weight ``W + B@A*scale``).
- ``tutorial loop, LoRALinear``: the same loop and data path with this package's layer.
- ``bare in-memory loop``: ``MNISTDataModule``'s loader and ``LoRALinear`` in a plain loop: the
  floor for what Lightning itself costs.
- ``Trainer + callback``: ``LitClassifier`` + ``LoRAInjectionCallback`` + ``MNISTDataModule``
  through ``lightning.Trainer`` (progress bar, logger and checkpoints off, per-step logging on).
- ``Trainer, full fine-tuning``: the same without the callback (every weight trains).

Each candidate runs ``--steps`` optimizer steps after ``--warmup`` untimed ones; rounds are
interleaved and the median is reported.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(__file__))
from timing import table  # noqa: E402

from lightning_lora import LitClassifier, LoRAConfig, LoRAInjectionCallback, MNISTDataModule, inject_lora  # noqa: E402
from lightning_lora.models import RichBoyNet  # noqa: E402

RANK, ALPHA, LR = 1, 1.0, 1e-3


class LowRankWeight(nn.Module):
    """The tutorial's LoRA: a parametrization that returns ``W + B @ A * scale`` every call."""

    def __init__(self, in_f: int, out_f: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(RANK, in_f) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, RANK))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A * (ALPHA / RANK)


def tutorial_net() -> nn.Module:
    net = RichBoyNet()
    for layer in (net.linear1, net.linear2, net.linear3):
        parametrize.register_parametrization(layer, "weight", LowRankWeight(layer.in_features, layer.out_features))
    for name, param in net.named_parameters():
        param.requires_grad_(".A" in name or ".B" in name)
    return net


def lora_net() -> nn.Module:
    return inject_lora(RichBoyNet(), LoRAConfig(rank=RANK, alpha=ALPHA))


def plain_loop(net: nn.Module, loader: DataLoader, steps: int, warmup: int) -> float:
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=LR)
    batches, start, seen = iter(loader), 0.0, 0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        seen += len(y) if step >= warmup else 0
    return seen / (time.perf_counter() - start)


class Throughput(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seen = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.seen += len(batch[1])
            self.end = time.perf_counter()

    def rate(self) -> float:
        return self.seen / (self.end - self.start)


def trainer_run(data_dir: str, batch: int, steps: int, warmup: int, lora: bool) -> float:
    meter = Throughput(warmup)
    export = os.path.join(tempfile.mkdtemp(), "adapter")
    lora_callback = LoRAInjectionCallback(rank=RANK, alpha=ALPHA, adapter_dir=export)
    callbacks = [meter] + ([lora_callback] if lora else [])
    trainer = pl.Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    model = LitClassifier(RichBoyNet(), optimizer=functools.partial(torch.optim.Adam, lr=LR, fused=True))
    trainer.fit(model, MNISTDataModule(data_dir=data_dir, batch_size=batch))
    return meter.rate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 steps, 1 round")
    opts = parser.parse_args()
    if opts.quick:
        opts.steps, opts.rounds = 100, 1
    pl.seed_everything(0, verbose=False)
    tv = datasets.MNIST(
        opts.data_dir,
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
    )
    memory = MNISTDataModule(data_dir=opts.data_dir, val_fraction=0.1)
    memory.setup("fit")
    rows = []
    for batch in (10, 64):
        candidates = candidates_for(batch, tv, memory, opts)
        rates: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(opts.rounds):
            for name, run in candidates.items():
                rates[name].append(run())
        median = {name: statistics.median(values) for name, values in rates.items()}
        tutorial = median["tutorial loop (parametrize LoRA)"]
        bare = median["bare in-memory loop, LoRALinear"]
        for name, rate in median.items():
            rows.append([batch, name, f"{rate:,.0f}", f"{rate / tutorial:.2f}x", f"{bare / rate - 1:+.0%}"])
            print(rows[-1], flush=True)
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opts.steps} steps x {opts.rounds} rounds")
    print(table(["batch", "pipeline", "samples/s", "vs tutorial", "bare loop faster by"], rows))


def _loader(memory: MNISTDataModule, batch: int) -> DataLoader:
    memory.batch_size = batch
    return memory.train_dataloader()


def candidates_for(batch: int, tv: datasets.MNIST, memory: MNISTDataModule, opts: argparse.Namespace) -> dict:
    steps, warmup = opts.steps, opts.warmup
    return {
        "tutorial loop (parametrize LoRA)": lambda: plain_loop(
            tutorial_net(), DataLoader(tv, batch_size=batch, shuffle=True), steps, warmup
        ),
        "tutorial loop, LoRALinear": lambda: plain_loop(
            lora_net(), DataLoader(tv, batch_size=batch, shuffle=True), steps, warmup
        ),
        "bare in-memory loop, LoRALinear": lambda: plain_loop(lora_net(), _loader(memory, batch), steps, warmup),
        "Trainer + LoRAInjectionCallback": lambda: trainer_run(opts.data_dir, batch, steps, warmup, True),
        "Trainer, full fine-tuning": lambda: trainer_run(opts.data_dir, batch, steps, warmup, False),
    }


if __name__ == "__main__":
    main()
