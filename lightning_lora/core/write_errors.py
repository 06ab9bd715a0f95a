"""Why a write failed, in words: the file asked for and the real cause (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``).

A bare ``[Errno 27] File too large`` names neither the file nor the fix, and torch and
safetensors report a failed write as a ``RuntimeError`` without any errno: then the cause is
found out (a read-only filesystem, a file-size limit the partial file reached, a full device).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_lora.errors import WriteError

WRITE_CAUSES = {
    errno.ENOSPC: "the device holding it is full (ENOSPC): free some space, or write elsewhere",
    errno.EDQUOT: "your disk quota is used up (EDQUOT): free some of your files, or ask for a larger quota",
    errno.EFBIG: "the file would grow past the largest size allowed (EFBIG: a file-size limit such as `ulimit -f`, "
    "or the filesystem's maximum): raise the limit, or write to another filesystem",
    errno.EROFS: "its filesystem is mounted read-only (EROFS): write elsewhere",
}
"""Why a write failed, by errno: each cause its own message and its own fix."""


def write_failure(path: Path, code: int | None, detail: str) -> WriteError:
    """A :class:`WriteError` that names ``path`` and the actual cause (``code``: an errno, if known)."""
    why = WRITE_CAUSES.get(code) if code is not None else None
    error = WriteError(f"cannot write {path}: {why or detail}")
    error.errno = code  # kept for callers; left out of the message, which says it in words
    return error


def _diagnose(path: Path, partial: Path | None) -> int | None:
    """The errno behind a write that torch or safetensors reported without one (they raise RuntimeError)."""
    import resource

    folder = path.parent if path.parent.exists() else Path(".")
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and partial is not None and partial.is_file():
            if partial.stat().st_size >= limit:
                return errno.EFBIG
        if shutil.disk_usage(folder).free < 1_000_000:
            return errno.ENOSPC
    except OSError:
        return None
    return None


@contextmanager
def disk_errors(path: Path, partial: Path | None = None) -> Iterator[None]:
    """Name the file and the real cause (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``) of a failed write.

    Args:
        path: The file asked for (named in the message).
        partial: The temporary file being written, to tell a file-size limit from a full disk.
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        if err.errno in WRITE_CAUSES:
            raise write_failure(path, err.errno, "") from err
        raise
    except RuntimeError as err:  # torch and safetensors report a failed write as a RuntimeError
        text = str(err)
        if "No space left" in text or "error code: 28" in text:
            raise write_failure(path, errno.ENOSPC, "") from err
        if "inline_container" in text or "unexpected pos" in text or "write failed" in text.lower():
            code = _diagnose(path, partial)
            raise write_failure(
                path, code, f"the write failed ({text.strip().splitlines()[0][:120]}), for a reason the OS did not say"
            ) from err
        raise


__all__ = ["disk_errors", "write_failure"]
