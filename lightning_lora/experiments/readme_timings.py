"""The README's blocks for the benchmarks' records (start-up, validation cost, mixed batches): they format
numbers measured elsewhere."""

from __future__ import annotations

from typing import Any


def startup(record: dict[str, Any]) -> str:
    lines = ["| command | wall time (median) | vs importing Lightning | beyond importing torch |", "|---|---|---|---|"]
    lines += [
        f"| `{r['command']}` | {r['seconds']:.2f} s | {r['ratio']:.2f}x | {r['over_torch']:+.2f} s |"
        if "over_torch" in r
        else f"| `{r['command']}` | {r['seconds']:.2f} s | {r['ratio']:.2f}x | |"
        for r in record["rows"]
    ]
    return "\n".join([*lines, "", f"Measured by `benchmarks/startup.py` (median of {record['runs']} runs)."])


def validation_cost(record: dict[str, Any]) -> str:
    seconds = record["seconds"]
    return (
        f"The live validation (10 points, target and retain sets, adapter on and off) adds {record['extra']:.1%} to "
        f"the fine-tune's wall time: {seconds['with validation']:.2f} s against {seconds['without validation']:.2f} s "
        f"without it (median of {record['rounds']} interleaved runs each, start-up included; "
        "`benchmarks/validation_cost.py`)."
    )


def mixed_batch(record: dict[str, Any]) -> str:
    lines = [
        "| adapters | one mixed batch (`adapter_per_sample`) | the batch once per adapter | each one's rows apart |",
        "|---|---|---|---|",
    ]
    for row in record["rows"]:
        ms = row["ms"]
        lines.append(
            f"| {row['adapters']} | {ms['per sample']:.2f} ms | {ms['batch per adapter']:.2f} ms "
            f"| {ms['split per adapter']:.2f} ms |"
        )
    env = record["environment"]
    return "\n".join(
        [
            *lines,
            "",
            f"RichBoyNet, every layer adapted by each rank-{record['rank']} adapter, a batch of {record['batch']} "
            f"spread evenly, inference; median of {record['rounds']} interleaved rounds on {env['cpu']} "
            f"({env['cores']} cores), `benchmarks/mixed_batch.py`.",
        ]
    )
