"""Forward time of RichBoyNet: the base, the unmerged LoRA model, and the merged model.

    python benchmarks/inference.py

Merging folds the adapter into the weights (``merge_and_unload``), so the merged model runs
the base model's exact computation; the target is "within 2% of the base". The unmerged
model pays for the two extra low-rank matmuls per layer. Eval mode, ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved, table  # noqa: E402

from lightning_lora import LoRAConfig, inject_lora, merge_and_unload  # noqa: E402
from lightning_lora.models import RichBoyNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    opts = parser.parse_args()
    torch.manual_seed(0)
    base = RichBoyNet().eval()
    rows = []
    for rank in (1, 4, 64):
        adapted = inject_lora(copy.deepcopy(base), LoRAConfig(rank=rank, alpha=rank)).eval()
        with torch.no_grad():
            for layer in adapted.modules():
                if hasattr(layer, "lora_B"):
                    layer.lora_B.normal_()  # a trained-looking adapter: merging must change the weights
        merged = merge_and_unload(copy.deepcopy(adapted)).eval()
        for batch in (1, 64, 1000):
            x = torch.randn(batch, 1, 28, 28)

            def forward(net, x=x):
                def run():
                    with torch.no_grad():
                        net(x)

                return run

            times = interleaved(
                {"base": forward(base), "unmerged": forward(adapted), "merged": forward(merged)}, rounds=opts.rounds
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; time relative to the base model")
    print(table(["rank", "batch", "base (us)", "unmerged LoRA", "merged"], rows))


if __name__ == "__main__":
    main()
