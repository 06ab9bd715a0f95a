"""Turn the logs of ``benchmarks/gpu_session.sh`` into the record ``benchmarks/results/gpu.json``.

    python benchmarks/gpu_record.py SESSION_DIR [SESSION_DIR ...]

A GPU is lent for minutes at a time, so the session script only writes logs; this reads the
Markdown tables the benchmarks printed there (and the test summaries, and the demo's test
metrics) into one JSON record, from which ``make results`` writes the README's GPU block. The
logs are copied beside the record (``results/gpu/``), so every number can be traced to the
output it came from. Where several session folders hold a log of the same name, the later one
counts (a rerun after a fix).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def markdown_tables(text: str) -> list[dict[str, Any]]:
    """Every Markdown table in ``text``: the line above it (its caption), its header and rows."""
    lines, found = text.splitlines(), []
    index = 0
    while index < len(lines):
        if lines[index].startswith("| ") and index + 1 < len(lines) and lines[index + 1].startswith("|---"):
            header = [cell.strip() for cell in lines[index].strip("|").split("|")]
            rows, index = [], index + 2
            while index < len(lines) and lines[index].startswith("| "):
                rows.append(dict(zip(header, (c.strip() for c in lines[index].strip("|").split("|")), strict=True)))
                index += 1
            caption = next((line for line in reversed(lines[: index - len(rows) - 2]) if line.strip()), "")
            found.append({"caption": caption, "header": header, "rows": rows})
        else:
            index += 1
    return found


def test_summaries(text: str) -> dict[str, Any]:
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failed = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FAILED ")]
    return {"summary": summary[-1].strip("= ") if summary else "no summary", "failed": failed}


def demo_metrics(text: str) -> dict[str, float]:
    """The ``test/...`` values of the demo's ``lightning-lora test`` table."""
    return {m[1]: float(m[2]) for m in re.finditer(r"│\s+(test/[\w/]+)\s+│\s+([-\d.e]+)\s+│", text)}


def environment(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.strip()]
    versions = next(line for line in lines if " torch " in line).split()
    return {
        "date": lines[0],
        "gpu": next(line for line in lines if "MiB" in line and not line.startswith("name")).split(",")[0],
        "python": versions[0],
        "torch": versions[2],
        "lightning": versions[4],
        "torchmetrics": versions[6],
    }


def build(logs: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = {"environment": environment(logs["env.log"]), "command": "bash benchmarks/gpu_session.sh"}
    record["epochs"] = markdown_tables(logs["train.log"])[-1]
    record["layer"] = [
        t for name in ("layer.log", "layer-fp32.log") if name in logs for t in markdown_tables(logs[name])
    ]
    for table, source in zip(record["layer"], _sources(logs, ("layer.log", "layer-fp32.log")), strict=True):
        table["source"] = source
    record["inference"] = markdown_tables(logs["inference.log"])
    record["tests"] = {
        name: test_summaries(text) for name, text in sorted(logs.items()) if name.startswith("gpu-tests")
    }
    record["demo"] = demo_metrics(logs.get("cli.log", ""))
    return record


def _sources(logs: dict[str, str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in logs for _ in markdown_tables(logs[name])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sessions", nargs="+", type=Path, help="folders holding the session's logs, oldest first")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    opts = parser.parse_args(argv)
    paths = {path.name: path for folder in opts.sessions for path in sorted(folder.glob("*.log"))}
    missing = {"env.log", "train.log", "inference.log"} - set(paths)
    if missing:
        print(f"error: the session folders hold no {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    logs = {name: path.read_text(encoding="utf-8", errors="replace") for name, path in paths.items()}
    record = build(logs)
    copies = opts.out.parent / opts.out.stem
    copies.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        shutil.copyfile(path, copies / name)
    opts.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {opts.out} and the logs in {copies}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
