"""The package's own exception types, so callers (and the CLI) can tell usage from failure."""

import os


class UsageError(ValueError):
    """A setting is wrong (a config value, a flag, a path): fix the command or config and rerun."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the optimizer could apply it."""


class DataError(ValueError):
    """A data file is missing, damaged or not what it claims to be; the message names the file."""


class NonFiniteWeightsError(RuntimeError):
    """Weights about to be written hold NaN or infinity; nothing was written."""


def _raised_here(error: BaseException) -> bool:
    """Whether the exception was raised from lightning_lora's own code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}lightning_lora{os.sep}" in tb.tb_frame.f_code.co_filename


def root_cause(error: BaseException) -> BaseException:
    """The exception worth showing from a chain (jsonargparse wraps constructor errors in its own).

    That is the outermost one raised by lightning_lora (its message names the fix), else the
    innermost of the chain.
    """
    chain = [error]
    while True:
        inner = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if inner is None:
            break
        chain.append(inner)
    ours = [e for e in chain if _raised_here(e)]
    return ours[0] if ours else chain[-1]
