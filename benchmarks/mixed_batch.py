"""Serving several adapters in one batch: ``adapter_per_sample`` against running the batch once per adapter.

    python benchmarks/mixed_batch.py --results benchmarks/results

RichBoyNet's shape (784 -> 1000 -> 2000 -> 10), every layer adapted by K rank-4 adapters, a batch
of 256 with the samples spread evenly over the adapters, inference (eval, no grad). Three ways to
get every sample its adapter's output:

- ``per sample``: one forward inside ``adapter_per_sample`` (the base once, each adapter on its rows);
- ``batch per adapter``: the whole batch once per adapter (``set_active_adapters``), rows picked after;
- ``split per adapter``: each adapter's own rows, one forward each (what a server would otherwise do).

Medians of interleaved rounds go to ``--results`` (``benchmarks/results/mixed-batch.json`` is the
committed record the README states).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import add_results_option, interleaved  # noqa: E402

from lightning_lora import LoRAConfig, adapter_per_sample, inject_lora, set_active_adapters  # noqa: E402
from lightning_lora.demo.nets import RichBoyNet  # noqa: E402
from lightning_lora.experiments.pipeline import environment, write_record  # noqa: E402


def model_with(adapters: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = RichBoyNet().eval()
    for i in range(adapters):
        inject_lora(model, LoRAConfig(rank=4, alpha=8), adapter_name=f"a{i}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f".a{i}.lora_B" in name:
                    param.normal_(std=0.02)
    return model


def candidates(model: torch.nn.Module, x: torch.Tensor, names: list[str]):
    adapters = sorted(set(names))
    rows = {a: torch.tensor([i for i, n in enumerate(names) if n == a]) for a in adapters}

    def per_sample():
        with adapter_per_sample(model, names):
            return model(x)

    def batch_per_adapter():
        out = torch.empty(x.shape[0], 10)
        for a in adapters:
            set_active_adapters(model, a)
            out[rows[a]] = model(x)[rows[a]]
        return out

    def split_per_adapter():
        out = torch.empty(x.shape[0], 10)
        for a in adapters:
            set_active_adapters(model, a)
            out[rows[a]] = model(x[rows[a]])
        return out

    return {"per sample": per_sample, "batch per adapter": batch_per_adapter, "split per adapter": split_per_adapter}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=15)
    add_results_option(parser)
    opts = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for count in opts.adapters:
        model = model_with(count)
        x = torch.randn(opts.batch, 784)
        names = [f"a{i % count}" for i in range(opts.batch)]
        ways = candidates(model, x, names)
        with torch.no_grad():
            reference = ways["split per adapter"]()
            for name, way in ways.items():  # the three give the same outputs, or the timing means nothing
                torch.testing.assert_close(way(), reference, atol=1e-5, rtol=1e-5, msg=name)
            medians = interleaved(ways, rounds=opts.rounds)
        row = {"adapters": count, "ms": {k: round(v * 1e3, 3) for k, v in medians.items()}}
        rows.append(row)
        print(count, row["ms"])
    record = {"experiment": "mixed-batch", "batch": opts.batch, "rank": 4, "rounds": opts.rounds, "rows": rows}
    write_record("mixed-batch", {**record, "environment": environment()}, Path(opts.results))


if __name__ == "__main__":
    main()
