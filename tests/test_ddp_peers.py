"""lightning_lora.cli.ddp_peers: a DDP process that fails because another one died says so, from the OS's facts.

The end-to-end case (the first process of a 2-process run SIGKILLed, the second reports it) is in
tests/test_adversarial_runs.py; these try each fact alone, in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lightning_lora.cli import ddp_peers


def test_outside_a_multi_process_run_nothing_is_reported(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert ddp_peers.stopped_peer() is None


def in_a_clean_process(code: str, local_rank: str = "0") -> str:
    """Run ``code`` in a new Python process (no stray children of pytest's can answer ``waitid``); its stdout."""
    env = {**os.environ, "LOCAL_RANK": local_rank}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_a_child_that_was_killed_is_named_with_its_signal_and_left_for_its_owner_to_reap():
    said = in_a_clean_process("""
        import signal, subprocess, sys, time
        from lightning_lora.cli import ddp_peers
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert ddp_peers.stopped_peer() is None, "alive: nothing stopped (after the settling wait)"
        child.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        print(ddp_peers.stopped_peer() == f"another process of this run (pid {child.pid}) stopped first "
              "(killed by signal 9)")
        print(child.wait(timeout=10) == -signal.SIGKILL)  # still reapable by its Popen: waitid left it
    """)
    assert said == "True\nTrue"


def test_a_launched_process_whose_first_process_died_says_so(tmp_path):
    """A process with LOCAL_RANK=1 whose parent is SIGKILLed reports the parent, as DDP's second rank would."""
    report = tmp_path / "report.txt"
    child_code = textwrap.dedent(f"""
        import os, time
        from lightning_lora.cli import ddp_peers
        open({str(tmp_path / "started")!r}, 'w').close()
        while os.getppid() == ddp_peers.PARENT_AT_START:
            time.sleep(0.02)
        open({str(report)!r}, 'w').write(str(ddp_peers.stopped_peer()))
    """)
    parent_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "LOCAL_RANK": "1"}}
        subprocess.Popen([sys.executable, "-c", {child_code!r}], env=env)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert report.read_text() == f"the first process of this run (pid {parent.pid}, rank 0) stopped first"


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="os.waitid is Linux's; elsewhere children are not checked")
def test_no_child_processes_at_all_is_no_report():
    assert (
        in_a_clean_process("""
        from lightning_lora.cli import ddp_peers
        ddp_peers.SETTLE_SECONDS = 0.1
        print(ddp_peers.stopped_peer())
    """)
        == "None"
    )
