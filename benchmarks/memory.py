"""Memory of fine-tuning RichBoyNet: full versus LoRA, and file sizes.

    python benchmarks/memory.py

Each mode trains 50 steps at batch 64 in its own subprocess, so the peak resident set size
(ru_maxrss) belongs to that mode alone. Optimizer state bytes are counted from the Adam state
after the run; file sizes come from a real Lightning checkpoint and a saved adapter folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from timing import table  # noqa: E402

CHILD = r"""
import json, resource, sys, torch, torch.nn.functional as F
from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.demo.nets import RichBoyNet
mode, rank = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
net = RichBoyNet()
if mode == "lora":
    inject_lora(net, LoRAConfig(rank=rank, alpha=rank))
params = [p for p in net.parameters() if p.requires_grad]
optimizer = torch.optim.Adam(params, lr=1e-3)
x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
for _ in range(50):
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "optimizer_state_bytes": state, "gradient_bytes": grads,
                  "trainable": sum(p.numel() for p in params)}))
"""


def run(mode: str, rank: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(rank)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def file_sizes(rank: int) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_lora import LitClassifier, LoRAConfig, inject_lora, save_adapter
    from lightning_lora.demo.nets import RichBoyNet

    with tempfile.TemporaryDirectory() as tmp:
        model = LitClassifier(RichBoyNet())
        inject_lora(model.net, LoRAConfig(rank=rank, alpha=rank))
        trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(model)
        trainer.optimizers = [model.configure_optimizers()]
        model.train()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 784)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        trainer.optimizers[0].step()
        trainer.save_checkpoint(Path(tmp) / "full.ckpt")
        folder = save_adapter(model.net, Path(tmp) / "adapter")
        return {
            "checkpoint_bytes": (Path(tmp) / "full.ckpt").stat().st_size,
            "adapter_bytes": sum(f.stat().st_size for f in folder.iterdir()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    rows = []
    full = run("full", 0)
    rows.append(["full fine-tuning", f"{full['trainable']:,}", f"{full['peak_rss_mb']:.0f}",
                 f"{full['gradient_bytes']:,}", f"{full['optimizer_state_bytes']:,}", "-", "-"])  # fmt: skip
    for rank in (1, 4):
        lora = run("lora", rank)
        sizes = file_sizes(rank)
        rows.append([f"LoRA rank {rank}", f"{lora['trainable']:,}", f"{lora['peak_rss_mb']:.0f}",
                     f"{lora['gradient_bytes']:,}", f"{lora['optimizer_state_bytes']:,}",
                     f"{sizes['adapter_bytes']:,}", f"{sizes['checkpoint_bytes']:,}"])  # fmt: skip
        print(rows[-1], flush=True)
    print()
    header = ["RichBoyNet, batch 64", "trainable", "peak RSS (MB)", "gradients (bytes)", "Adam state (bytes)"]
    print(table(header + ["adapter folder (bytes)", "full checkpoint (bytes)"], rows))


if __name__ == "__main__":
    main()
