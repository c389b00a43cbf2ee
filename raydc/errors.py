"""User-facing errors.

A `UserError` is something the person running raydc can fix (a bad config field, a missing data root, an
existing run directory). The CLI prints its message without a traceback and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error the user can fix; the message must say what is wrong and how to fix it."""


class ConfigError(UserError):
    """A config field is unknown, of the wrong type, or out of range. The message names the field."""

    def __init__(self, field: str, message: str):
        self.field, self.detail = field, message
        super().__init__(f"config field '{field}': {message}")

    def __reduce__(self):
        # Raised in a Ray worker, it is pickled to the driver: rebuilt from its own arguments, not from the
        # formatted message (the default, which would call __init__ with one argument and fail).
        return type(self), (self.field, self.detail)


class DataError(UserError):
    """Input data cannot be used (missing root, corrupt shard, unreadable image under --strict)."""


class NumericalError(RuntimeError):
    """NaN/Inf in features or loss. Raised with the epoch and phase so the run stops on its last good checkpoint."""

    def __init__(self, epoch: int, phase: str, what: str):
        self.epoch, self.phase, self.what = epoch, phase, what
        super().__init__(f"non-finite values in {what} at epoch {epoch}, phase '{phase}'; "
                         f"the last good checkpoint is kept, resume with --resume after fixing the cause")

    def __reduce__(self):
        return type(self), (self.epoch, self.phase, self.what)
