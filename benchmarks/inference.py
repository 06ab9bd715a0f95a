"""Forward time of RichBoyNet: the base, the unmerged LoRA model, and the merged model.

    python benchmarks/inference.py
    python benchmarks/inference.py --device cuda --precision bf16-mixed

Merging folds the adapter into the weights (``merge_and_unload``), so the merged model runs
the base model's exact computation; the target is "within 2% of the base". The unmerged
model pays for the two extra low-rank matmuls per layer. Eval mode, ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import checked_device, interleaved, synchronizer, table  # noqa: E402

from lightning_lora import LoRAConfig, inject_lora, merge_and_unload  # noqa: E402
from lightning_lora.demo.nets import RichBoyNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32")
    opts = parser.parse_args()
    device = checked_device(parser, opts.device)
    amp = opts.precision == "bf16-mixed"
    torch.manual_seed(0)
    base = RichBoyNet().eval().to(device)
    rows = []
    for rank in (1, 4, 64):
        adapted = inject_lora(copy.deepcopy(base), LoRAConfig(rank=rank, alpha=rank)).eval()
        with torch.no_grad():
            for layer in adapted.modules():
                if hasattr(layer, "lora_B"):
                    layer.lora_B.normal_()  # a trained-looking adapter: merging must change the weights
        merged = merge_and_unload(copy.deepcopy(adapted)).eval()
        for batch in (1, 64, 1000):
            x = torch.randn(batch, 1, 28, 28, device=device)

            def forward(net, x=x):
                def run():
                    cast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
                    with torch.no_grad(), cast:
                        net(x)

                return run

            times = interleaved(
                {"base": forward(base), "unmerged": forward(adapted), "merged": forward(merged)},
                rounds=opts.rounds,
                sync=synchronizer(device),
            )
            rows.append(
                [
                    rank,
                    batch,
                    f"{1e6 * times['base']:.0f}",
                    f"{times['unmerged'] / times['base']:.3f}",
                    f"{times['merged'] / times['base']:.3f}",
                ]  # fmt: skip
            )
            print(rows[-1], flush=True)
    print()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {opts.precision}; time relative to the base model")
    print(table(["rank", "batch", "base (us)", "unmerged LoRA", "merged"], rows))


if __name__ == "__main__":
    main()
