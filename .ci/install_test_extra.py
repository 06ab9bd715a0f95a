"""Install the ``test`` extra (peft, transformers and what they need) into a folder of its own.

    python .ci/install_test_extra.py .venv/test-libs

Installed beside Lightning, transformers is imported by torchmetrics at every ``import lightning``
(about 0.7 s more start-up for every run). So ``make test`` puts this folder on ``PYTHONPATH`` and
nothing else does. pip resolves the extra against the environment as it is (pinned by
``constraints.txt``), and exactly what it would add is installed here, without dependencies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    target = Path(sys.argv[1])
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        constraints = str(REPO / "constraints.txt")
        subprocess.run([*pip, "--dry-run", "--report", str(report), f"{REPO}[test]", "-c", constraints], check=True)
        wanted = [
            f"{p['metadata']['name']}=={p['metadata']['version']}"
            for p in json.loads(report.read_text())["install"]
            if p["metadata"]["name"] != "lightning-lora"
        ]
    shutil.rmtree(target, ignore_errors=True)
    if wanted:
        subprocess.run([*pip, "--no-deps", "--target", str(target), *wanted], check=True)
    print(f"test extra in {target}: {', '.join(wanted) or 'nothing to add'}")


if __name__ == "__main__":
    main()
