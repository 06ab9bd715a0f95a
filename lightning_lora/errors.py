"""The package's own exception types, so callers (and the CLI) can tell usage from failure."""


class UsageError(ValueError):
    """A setting is wrong (a config value, a flag, a path): fix the command or config and rerun."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the optimizer could apply it."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse wraps constructor errors in its own)."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            return error
        error = inner
