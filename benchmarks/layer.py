"""One training step (forward, backward, Adam) of a single adapted linear or convolutional layer.

    python benchmarks/layer.py               # linear shapes (ranks 4 and 64), then the conv case
    python benchmarks/layer.py --quick       # fewer rounds
    python benchmarks/layer.py --only conv   # just the ResNet-like Conv2d case
    python benchmarks/layer.py --device cuda --precision bf16-mixed   # on a GPU, under autocast

Compares LoRALinear with full fine-tuning of the plain layer, the frozen layer alone (the
floor: forward only, or forward and backward to the input when the input needs a gradient),
the two tutorial formulations (a ``torch.nn.utils.parametrize`` weight ``W + B@A*scale`` and a
layer that builds the merged weight every step), and PEFT's LoRA layer when ``peft`` is
installed. Times are medians of interleaved rounds; ratios are to full fine-tuning.

On CUDA in full precision it also times ``LoRALinear`` with the CPU's hand-written autograd
Functions forced on ("custom Function"): they run only where they were measured faster
(``lightning_lora/layers/fast_path.py``), and this is the measurement for the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(__file__))
from timing import checked_device, interleaved, synchronizer, table  # noqa: E402

from lightning_lora import LoRAConfig, inject_lora  # noqa: E402
from lightning_lora.core.layers import fast_path  # noqa: E402

DEVICE = torch.device("cpu")
AUTOCAST: torch.dtype | None = None  # bf16 under --precision bf16-mixed

SHAPES = [(1000, 2000, 64), (1000, 2000, 512), (4096, 4096, 256)]


class LowRankWeight(nn.Module):
    """Tutorial formulation 1: the weight is re-parametrised as W + B @ A * scale."""

    def __init__(self, in_f: int, out_f: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A * self.scale


class MergedWeightLinear(nn.Module):
    """Tutorial formulation 2: build the merged weight every step, then one matmul."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.B @ self.A * self.scale, self.base.bias)


def frozen_linear(in_f: int, out_f: int) -> nn.Linear:
    layer = nn.Linear(in_f, out_f)
    layer.requires_grad_(False)
    return layer


def autocast():
    return torch.autocast(DEVICE.type, dtype=AUTOCAST) if AUTOCAST else contextlib.nullcontext()


def forced_fast_path(step):
    """``step`` with the custom autograd Functions forced on (they step aside off the CPU)."""

    def run() -> None:
        chooser = fast_path.use_fast_path
        fast_path.use_fast_path = lambda *args: True
        try:
            step()
        finally:
            fast_path.use_fast_path = chooser

    return run


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool = True):
    model.to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4) if params else None

    def step() -> None:
        if x.requires_grad:
            x.grad = None
        with autocast():
            out = model(x)
        if train or x.requires_grad:
            optimizer is not None and optimizer.zero_grad(set_to_none=True)
            out.backward(grad)
            if optimizer is not None:
                optimizer.step()

    return step


def candidates(in_f: int, out_f: int, batch: int, rank: int, input_grad: bool) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, in_f, device=DEVICE, requires_grad=input_grad)
    grad = torch.randn(batch, out_f, device=DEVICE)
    scale = 2.0
    full = nn.Linear(in_f, out_f)
    lora = nn.Sequential(frozen_linear(in_f, out_f))
    inject_lora(lora, LoRAConfig(rank=rank, alpha=rank * scale))
    param = frozen_linear(in_f, out_f)
    parametrize.register_parametrization(param, "weight", LowRankWeight(in_f, out_f, rank, scale))
    param.parametrizations.weight.original.requires_grad_(False)
    found = {
        "full fine-tuning": step_fn(full, x, grad),
        "frozen floor": step_fn(frozen_linear(in_f, out_f), x, grad, train=False),
        "LoRALinear": step_fn(lora, x, grad),
        "parametrize": step_fn(param, x, grad),
        "merged-weight": step_fn(MergedWeightLinear(frozen_linear(in_f, out_f), rank, scale), x, grad),
    }
    if DEVICE.type != "cpu" and AUTOCAST is None:
        forced = nn.Sequential(frozen_linear(in_f, out_f))
        inject_lora(forced, LoRAConfig(rank=rank, alpha=rank * scale))
        found["custom Function"] = forced_fast_path(step_fn(forced, x, grad))
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return found
    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank * scale, target_modules=["0"]), nn.Sequential(nn.Linear(in_f, out_f))
    )
    found["PEFT"] = step_fn(peft_model, x, grad)
    return found


CONV_CASE = (64, 64, 3, 64, 32)  # in, out channels, kernel, batch, image side: a ResNet basic block's conv


def conv_candidates(rank: int) -> dict:
    """The conv case: full fine-tuning, the frozen conv alone, our LoRA conv and PEFT's."""
    in_c, out_c, kernel, batch, side = CONV_CASE
    torch.manual_seed(0)
    x = torch.randn(batch, in_c, side, side, device=DEVICE)
    grad = torch.randn(batch, out_c, side, side, device=DEVICE)

    def conv() -> nn.Conv2d:
        return nn.Conv2d(in_c, out_c, kernel, padding=kernel // 2)

    lora = nn.Sequential(conv().requires_grad_(False))
    inject_lora(lora, LoRAConfig(rank=rank, alpha=2 * rank, target_modules=["0"]))
    found = {
        "full fine-tuning": step_fn(conv(), x, grad),
        "frozen floor": step_fn(conv().requires_grad_(False), x, grad, train=False),
        "LoRA": step_fn(lora, x, grad),
    }
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return found
    peft_model = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]), nn.Sequential(conv())
    )
    found["PEFT"] = step_fn(peft_model, x, grad)
    return found


def run_conv(rounds: int) -> None:
    in_c, out_c, kernel, batch, side = CONV_CASE
    times = interleaved(conv_candidates(rank=4), rounds=rounds, sync=synchronizer(DEVICE))
    full = times["full fine-tuning"]
    names = ["frozen floor", "LoRA", "PEFT"]
    row = [f"Conv2d {in_c}->{out_c} {kernel}x{kernel}, batch {batch}, {side}x{side}", 4, f"{1e3 * full:.1f}"]
    row += [f"{times[n] / full:.3f}" if n in times else "-" for n in names]
    row += [f"{times['LoRA'] / times['PEFT']:.3f}" if "PEFT" in times else "-"]
    print()
    print(f"{describe_machine()}; step time / full fine-tuning's")
    print(table(["layer", "rank", "full (ms)", *names, "LoRA / PEFT"], [row]))


def describe_machine() -> str:
    precision = "bf16-mixed" if AUTOCAST else "fp32"
    if DEVICE.type == "cuda":
        return f"torch {torch.__version__}, {torch.cuda.get_device_name(DEVICE)}, {precision}"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--only", choices=["linear", "conv"], help="run one of the two parts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    global DEVICE, AUTOCAST
    DEVICE = checked_device(parser, opts.device)
    AUTOCAST = torch.bfloat16 if opts.precision == "bf16-mixed" else None
    rounds = 5 if opts.quick else 15
    if opts.only != "conv":
        run_linear(rounds)
    if opts.only != "linear":
        run_conv(rounds)


def run_linear(rounds: int) -> None:
    header = ["in, out, batch", "rank", "input grad", "full (ms)"]
    names = ["frozen floor", "LoRALinear", "PEFT", "parametrize", "merged-weight"]
    if DEVICE.type != "cpu" and AUTOCAST is None:
        names.append("custom Function")
    rows = []
    for in_f, out_f, batch in SHAPES:
        for rank in (4, 64):
            for input_grad in (False, True):
                found = candidates(in_f, out_f, batch, rank, input_grad)
                times = interleaved(found, rounds=rounds, sync=synchronizer(DEVICE))
                full = times["full fine-tuning"]
                ratio = {n: times[n] / full for n in times}
                lora_vs_floor = times["LoRALinear"] / times["frozen floor"]
                lora_vs_peft = times["LoRALinear"] / times["PEFT"] if "PEFT" in times else float("nan")
                rows.append(
                    [f"{in_f}, {out_f}, {batch}", rank, "yes" if input_grad else "no", f"{1e3 * full:.2f}"]
                    + [f"{ratio[n]:.2f}" if n in ratio else "-" for n in names]
                    + [f"{lora_vs_floor:.2f}", f"{lora_vs_peft:.2f}"]
                )
                print(rows[-1], flush=True)
    print()
    print(f"{describe_machine()}; step time / full fine-tuning's")
    print(table(header + names + ["LoRA / floor", "LoRA / PEFT"], rows))


if __name__ == "__main__":
    main()
