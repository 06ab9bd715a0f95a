"""The README's GPU results (``results:gpu`` and ``results:gpu-details``), from ``benchmarks/results/gpu.json``.

Apart from :mod:`~lightning_lora.experiments.readme`, whose other blocks come from CPU runs, because
the GPU session's record has its own shape (timing tables as the benchmarks printed them).
"""

from __future__ import annotations

import re
import statistics
from typing import Any


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x (median {statistics.median(values):.2f}x)"


def gpu(record: dict[str, Any]) -> str:
    """The GPU session: LoRA epochs with the data on the device, the layer against PEFT, the tests."""
    env, epochs = record["environment"], record["epochs"]
    images = re.search(r"one epoch of ([\d,]+)", epochs["caption"])[1]
    by_key = {(r["precision"], r["batch"], r["run"], r["data on"]): r for r in epochs["rows"]}
    lines = [
        f"On one {env['gpu']} (torch {env['torch']}, Lightning {env['lightning']}; `{record['command']}`, logs "
        "in `benchmarks/results/gpu/`). A LoRA fine-tuning epoch of RichBoyNet (rank 1, all three layers) on "
        f"all of MNIST's training split ({images} images) through `lightning.Trainer`:",
        "",
        "| precision | batch | epoch, data on the GPU | epoch, data from the host | Lightning over a bare loop |",
        "|---|---|---|---|---|",
    ]
    fastest = None
    for (precision, batch, run, where), row in by_key.items():
        if run != "Trainer, LoRA fine-tune" or where != "device":
            continue
        host = by_key[(precision, batch, run, "host")]
        seconds = float(row["epoch (s)"])
        if precision == "32-true" and seconds < 1 and fastest is None:
            fastest = (batch, seconds)
        overhead = row["over the bare loop (ms/step)"]
        lines.append(
            f"| {precision} | {batch} | {seconds:.3f} s | {float(host['epoch (s)']):.3f} s | {overhead} ms/step |"
        )
    target = (
        f"under 1 s from batch {fastest[0]} up ({fastest[1]:.2f} s in fp32)"
        if fastest
        else "not under 1 s at any batch"
    )
    linear = [t for t in record["layer"] if "fp32" in t["caption"] and "LoRA / PEFT" in t["header"]][-1]
    custom = [float(r["custom Function"]) / float(r["LoRALinear"]) for r in linear["rows"]]
    faster = sum(ratio < 0.95 for ratio in custom)
    slower = sum(ratio > 1.05 for ratio in custom)
    bf16 = next(t for t in record["layer"] if "bf16" in t["caption"] and "LoRALinear" in t["header"])
    merged = [float(r["merged"]) for t in record["inference"] for r in t["rows"]]
    tests = "; ".join(
        f"`{name}` {t['summary']}" + (f" ({', '.join(f.split('::')[-1] for f in t['failed'])})" if t["failed"] else "")
        for name, t in record["tests"].items()
    )
    demo = record["demo"]
    findings = [
        f"The epoch is {target}. The last column is what the Trainer, `LitClassifier` and the callback add per "
        "step over the same epoch in a plain PyTorch loop over the same device-resident loader. Each epoch "
        "was timed once (a single sample); bf16-mixed was not run at batch 10.",
        f"One adapted layer's training step (`benchmarks/layer.py`, three shapes, ranks 4 and 64): LoRA / PEFT "
        f"{_span([float(r['LoRA / PEFT']) for r in linear['rows']])} in fp32 and "
        f"{_span([float(r['LoRA / PEFT']) for r in bf16['rows']])} under bf16 autocast; the CPU's hand-written "
        f"backward forced on would take {_span(custom)} the plain ops' time (more than 5% faster in {faster} "
        f"of {len(custom)} cases, slower in {slower}), so it stays off on CUDA. Merged "
        f"inference runs in {min(merged):.2f}-{max(merged):.2f}x the base's time.",
        f"The demo on the GPU (bf16-mixed, data on the GPU): base {_pct(demo['test/acc_base'])}, adapter "
        f"{_pct(demo['test/acc'])}; digit 9 {_pct(demo['test/acc_digit_9_base'])} -> {_pct(demo['test/acc_digit_9'])}.",
        f"Tests marked `gpu` (`pytest -m gpu`), in order: {tests}.",
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(findings)  # the table, then one paragraph per finding


def _markdown(table: dict[str, Any]) -> str:
    header = table["header"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row[h] for h in header) + " |" for row in table["rows"]])


def gpu_details(record: dict[str, Any]) -> str:
    """Every table of the GPU session, as the benchmarks printed them (``benchmarks/RESULTS.md``)."""
    parts = [f"`python benchmarks/train.py --epoch --device cuda` ({record['epochs']['caption']}):"]
    parts.append(_markdown(record["epochs"]))
    for table in record["layer"] + record["inference"]:
        command = table.get("command")
        how = f"`{command}`" if command else f"`{table['source']}` (the log does not hold its command)"
        parts += [f"{how} ({table['caption']}):", _markdown(table)]
    return "\n\n".join(parts)
