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


class IncompleteLog(ValueError):
    """A log that lacks what the record needs (a killed or failed part)."""


def environment(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.strip()]
    found = [line for line in lines if " torch " in line and len(line.split()) >= 7]
    if not lines or not found:
        raise IncompleteLog("env.log holds no 'python torch ... lightning ...' version line")
    versions = found[0].split()
    gpus = [line for line in lines if "MiB" in line and not line.startswith("name")]
    return {
        "date": lines[0],
        "gpu": gpus[0].split(",")[0] if gpus else "no GPU (a CPU dry run)",
        "python": versions[0],
        "torch": versions[2],
        "lightning": versions[4],
        "torchmetrics": versions[6],
    }


def command_of(text: str) -> str | None:
    """The command a part ran (the ``$ ...`` line gpu_session.sh writes first), if the log has it."""
    first = text.splitlines()[0] if text else ""
    return first[2:] if first.startswith("$ ") else None


def failed_parts(logs: dict[str, str]) -> list[str]:
    """The parts whose closing line says they failed or ran out of time."""
    return [m[1] for text in logs.values() for m in re.finditer(r"^== (\S+): exit (?!0 )", text, re.MULTILINE)]


def tables_of(logs: dict[str, str], name: str, wanted: int = 1) -> list[dict[str, Any]]:
    found = markdown_tables(logs[name])
    if len(found) < wanted:
        raise IncompleteLog(f"{name} holds {len(found)} result table(s), {wanted} expected: the part did not finish")
    for table in found:
        table["source"], table["command"] = name, command_of(logs[name])
    return found


def build(logs: dict[str, str]) -> dict[str, Any]:
    failed = [part for part in failed_parts(logs) if part != "gpu-tests"]  # failed tests are part of the record
    if failed:
        raise IncompleteLog(f"these parts failed or ran out of time: {', '.join(failed)} (see their logs)")
    record: dict[str, Any] = {"environment": environment(logs["env.log"]), "command": "bash benchmarks/gpu_session.sh"}
    record["epochs"] = tables_of(logs, "train.log")[-1]
    record["layer"] = [t for name in ("layer.log", "layer-fp32.log") if name in logs for t in tables_of(logs, name)]
    if not any("bf16" in t["caption"] for t in record["layer"]):
        raise IncompleteLog("the layer logs hold no bf16-mixed table: layer.log did not finish")
    record["inference"] = tables_of(logs, "inference.log", 2)
    record["tests"] = {
        name: {**test_summaries(text), "command": command_of(text)}
        for name, text in sorted(logs.items())
        if name.startswith("gpu-tests")
    }
    record["demo"] = demo_metrics(logs.get("cli.log", ""))
    return record


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
    try:
        record = build(logs)
    except IncompleteLog as err:
        print(f"error: {err}; nothing written", file=sys.stderr)
        return 1
    copies = opts.out.parent / opts.out.stem
    if copies.exists() and any(path.parent.resolve() != copies.resolve() for path in paths.values()):
        shutil.rmtree(copies)  # the logs of the record being replaced
    copies.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        if path.resolve() != (copies / name).resolve():
            shutil.copyfile(path, copies / name)
    opts.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {opts.out} and the logs in {copies}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
