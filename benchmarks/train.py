"""Samples per second of LoRA fine-tuning of RichBoyNet on real MNIST, four ways.

    python benchmarks/train.py --data-dir data            # batch sizes 10 and 64
    python benchmarks/train.py --data-dir data --quick
    python benchmarks/train.py --data-dir data --epoch --device cuda   # whole epochs on a GPU (below)

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

``--epoch`` times whole epochs instead, on ``--device``: RichBoyNet pretraining (every weight
trains) and LoRA fine-tuning (rank 1, all three layers) on all of MNIST's training split
(59,999 images: one is held out, the data module needs a validation part), through
``lightning.Trainer`` with the data module served from the host or kept on the device
(``device_resident``), per batch size and precision; and the same epoch as a bare PyTorch loop
over the device-resident loader, the floor that Lightning's per-step overhead is measured
against. One short warm-up fit per precision runs first (CUDA context, kernels, allocator);
every epoch is timed from its first batch to its last, synchronised.
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
from timing import checked_device, table  # noqa: E402

from lightning_lora import LitClassifier, LoRAConfig, LoRAInjectionCallback, MNISTDataModule, inject_lora  # noqa: E402
from lightning_lora.demo.nets import RichBoyNet  # noqa: E402

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


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, synchronised with the device."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_trainer(device: str, precision: str, timer: pl.Callback, lora: bool, **limits) -> pl.Trainer:
    export = os.path.join(tempfile.mkdtemp(), "adapter")
    callbacks = [timer] + ([LoRAInjectionCallback(rank=RANK, alpha=ALPHA, adapter_dir=export)] if lora else [])
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **limits,
    )


def fused_adam_classifier() -> LitClassifier:
    return LitClassifier(RichBoyNet(), optimizer=functools.partial(torch.optim.Adam, lr=LR, fused=True))


def trainer_epoch(data: MNISTDataModule, device: str, precision: str, batch: int, lora: bool) -> float:
    """Seconds of one whole training epoch through the Trainer."""
    data.batch_size = batch
    timer = EpochTimer()
    epoch_trainer(device, precision, timer, lora, max_epochs=1).fit(fused_adam_classifier(), data)
    return timer.seconds[0]


def bare_epoch(data: MNISTDataModule, device: str, precision: str, batch: int) -> float:
    """Seconds of the same LoRA epoch as a plain loop over the device-resident loader: the floor."""
    data.batch_size = batch
    net = lora_net().to(device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=LR, fused=True)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    _sync(torch.device(device))
    start = time.perf_counter()
    for x, y in data.train_dataloader():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(torch.device(device))
    return time.perf_counter() - start


def run_epochs(opts: argparse.Namespace) -> None:
    pl.seed_everything(0, verbose=False)
    host = MNISTDataModule(data_dir=opts.data_dir, val_fraction=1 / 60000)
    resident = MNISTDataModule(data_dir=opts.data_dir, val_fraction=1 / 60000, device_resident=True)
    rows = []
    for precision in opts.precisions:
        epoch_trainer(opts.device, precision, EpochTimer(), True, max_steps=30).fit(fused_adam_classifier(), resident)
        images = len(resident.train_set)
        for batch in opts.batches:
            if precision != "32-true" and batch < 64:
                print(f"skipped: {precision} at batch {batch} (mixed precision only from batch 64)", flush=True)
                continue  # mixed precision does not pay at tiny batches; not worth the minutes
            steps = math.ceil(images / batch)
            floor = bare_epoch(resident, opts.device, precision, batch)
            cases = [("bare loop, LoRA", "device", floor)]
            for lora in (False, True):
                for where, data in (("host", host), ("device", resident)):
                    seconds = trainer_epoch(data, opts.device, precision, batch, lora)
                    cases.append((f"Trainer, {'LoRA fine-tune' if lora else 'pretrain'}", where, seconds))
            for name, where, seconds in cases:
                compared = name == "Trainer, LoRA fine-tune"  # the same computation as the bare loop
                overhead = f"{1e3 * (seconds - floor) / steps:+.2f}" if compared else ""
                rows.append([precision, batch, name, where, f"{seconds:.3f}", f"{images / seconds:,.0f}", overhead])
                print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if opts.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print()
    print(f"torch {torch.__version__}, lightning {pl.__version__}, {where}; one epoch of {images:,} MNIST images")
    header = ["precision", "batch", "run", "data on", "epoch (s)", "samples/s", "over the bare loop (ms/step)"]
    print(table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epoch", action="store_true", help="time whole epochs on --device (see above)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (--epoch)")
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 256, 1024], help="batch sizes (--epoch)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true", "bf16-mixed"],
        choices=["32-true", "bf16-mixed", "16-mixed"],
        help="Trainer precisions (--epoch); mixed precision runs only at batches >= 64",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 steps, 1 round")
    opts = parser.parse_args()
    if opts.quick:
        opts.steps, opts.rounds = 100, 1
    if opts.epoch:
        checked_device(parser, opts.device)
        if min(opts.batches) < 1:
            parser.error(f"--batches must be sizes >= 1, got {opts.batches}")
        return run_epochs(opts)
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
