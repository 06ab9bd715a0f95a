"""Whether another process of a multi-process (DDP) run stopped first, told by the processes, not by a message.

When one process of a DDP run dies (a SIGKILL, the kernel's out-of-memory killer, a crash), the
others fail in their next collective with a transport error from the communication library, which
names no cause. The command line asks the operating system instead: a process that Lightning's
launcher started has lost its parent (the first process) when its parent id has changed, and the
first process has a child that exited when ``waitid`` reports one (without reaping it, so the
launcher's own bookkeeping is untouched).
"""

from __future__ import annotations

import os
import time

PARENT_AT_START = os.getppid()
"""The parent process when the command started: for a process the launcher started, the first process."""

SETTLE_SECONDS = 1.0
"""How long to wait for the operating system to record a peer's exit: a dying process closes its sockets
(the error seen here) a moment before its parent or children are told."""


def _launched_process() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


def _exited_child() -> str | None:
    waitid = getattr(os, "waitid", None)  # Linux; macOS has none, and the check is skipped
    if waitid is None:
        return None
    try:
        info = waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # no child processes at all
        return None
    if info is None:
        return None
    killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    if not killed and info.si_status == 0:
        return None  # a helper process that finished its work (a DataLoader worker at an epoch's end)
    how = f"killed by signal {info.si_status}" if killed else f"exited with code {info.si_status}"
    return f"another process of this run (pid {info.si_pid}) stopped first ({how})"


def stopped_peer() -> str | None:
    """What stopped first, if another process of this multi-process run did; ``None`` when none did."""
    if "LOCAL_RANK" not in os.environ:  # Lightning's launcher sets it in every process of a multi-process run
        return None
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        if _launched_process() and os.getppid() != PARENT_AT_START:
            return f"the first process of this run (pid {PARENT_AT_START}, rank 0) stopped first"
        child = _exited_child()
        if child is not None or time.monotonic() >= deadline:
            return child
        time.sleep(0.05)


__all__ = ["stopped_peer"]
