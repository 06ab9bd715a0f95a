"""The package's own exception types, so callers (and the command line) can tell usage from failure.

Every one derives from :class:`LightningLoRAError` as well as from the built-in type it refines
(``ValueError``, ``RuntimeError``), so ``except ValueError`` still catches a bad setting, and the
command line recognises this package's messages by their type.
"""

from __future__ import annotations


class LightningLoRAError(Exception):
    """Raised by lightning-lora itself: its message names the problem and the fix."""


class UsageError(LightningLoRAError, ValueError):
    """A setting is wrong (a config value, a flag, a path): fix the command or config and rerun."""


class ResumeError(UsageError):
    """A resume could not repeat the interrupted run (other settings, or a checkpoint Lightning cannot
    resume exactly); nothing was trained or written."""


class DataError(LightningLoRAError, ValueError):
    """A data file is missing, damaged or not what it claims to be; the message names the file."""


class WriteError(LightningLoRAError, OSError):
    """A file could not be written (a full disk, a quota, a read-only place); the message names the file."""


class NonFiniteLossError(LightningLoRAError, RuntimeError):
    """The training loss became NaN or infinite; raised before the optimizer could apply it.

    ``advice`` is filled in by whoever knows how to go on (the run's checkpoint callback) and is
    part of the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.advice: str | None = None

    def __str__(self) -> str:
        return super().__str__() + (f" {self.advice}" if self.advice else "")


class NonFiniteWeightsError(LightningLoRAError, RuntimeError):
    """Weights about to be written hold NaN or infinity; nothing was written."""


def root_cause(error: BaseException) -> BaseException:
    """The exception worth showing from a chain (jsonargparse wraps constructor errors in its own).

    That is the outermost :class:`LightningLoRAError` of the chain (its message names the fix),
    else the innermost exception, the one that says what actually went wrong.
    """
    chain = [error]
    while True:
        inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if inner is None or inner in chain:
            break
        chain.append(inner)
    ours = [e for e in chain if isinstance(e, LightningLoRAError)]
    return ours[0] if ours else chain[-1]
