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
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class DataError(UserError):
    """Input data cannot be used (missing root, corrupt shard, unreadable image under --strict)."""


class NumericalError(RuntimeError):
    """NaN/Inf in features or loss. Raised with the epoch and phase so the run stops on its last good checkpoint."""

    def __init__(self, epoch: int, phase: str, what: str):
        self.epoch, self.phase = epoch, phase
        super().__init__(f"non-finite values in {what} at epoch {epoch}, phase '{phase}'; "
                         f"the last good checkpoint is kept, resume with --resume after fixing the cause")
