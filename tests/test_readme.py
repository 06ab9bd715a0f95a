"""The README is the front door: what it promises must be checked by tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def guarantees() -> str:
    return README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_guarantees_name_exists():
    named = re.findall(r"`(test_\w+)::(test_\w+)`", guarantees())
    assert len(named) >= 30, "the Guarantees name their tests as `file::test`"
    missing = [f"{f}::{t}" for f, t in named if t not in defined_tests(ROOT / "tests" / f"{f}.py")]
    assert not missing, f"the README's Guarantees name tests that do not exist: {missing}"


def test_every_guarantee_names_a_test():
    bullets = re.split(r"\n- ", guarantees())[1:]
    unchecked = [b.split("\n")[0] for b in bullets if "::" not in b]
    assert not unchecked, f"guarantees without a test: {unchecked}"


def test_the_results_tables_are_generated_from_the_committed_records():
    """The README's numbers are never typed: every results block equals its record, rendered."""
    import os

    from lightning_lora.experiments import readme

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        records = readme.load_records()
        blocks = readme.BLOCK.findall(README)
        names = {"environment", "demo", "demo-mlp", "demo-shift", "demo-forgetting", "demo-rank-sweep", "demo-seeds",
                 "startup"}  # fmt: skip
        assert {name for _, name, _, _ in blocks} >= names
        assert readme.render(README, records) == README, "run `make readme` (the README differs from the records)"
        results_md = (ROOT / "benchmarks" / "RESULTS.md").read_text()
        assert "gpu-details" in {name for _, name, _, _ in readme.BLOCK.findall(results_md)}
        assert readme.render(results_md, records) == results_md, "run `make readme` (RESULTS.md differs)"
    finally:
        os.chdir(cwd)
