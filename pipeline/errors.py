"""Typed errors. A stage raises these for a bad sample; the runner records them as data."""

from __future__ import annotations


class AvforgeError(Exception):
    """Base class of avforge's own errors."""


class ConfigError(AvforgeError):
    """A config file, a ``--set`` override or a command-line value is wrong."""


class InputListError(AvforgeError):
    """The input LIST cannot be read at all (missing file, unknown format, no url column)."""


class StageError(AvforgeError):
    """A per-sample failure with a machine-readable ``error_type``.

    ``error_type`` is a short snake_case reason such as ``not_found``, ``forbidden``,
    ``rate_limited``, ``timeout``, ``not_a_video``, ``too_large``, ``corrupt_media``.
    ``transient`` marks failures worth retrying (network hiccups, rate limits).
    """

    def __init__(self, message: str, error_type: str = "error", *, transient: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.transient = transient

    def __reduce__(self) -> tuple[object, ...]:  # keep error_type across pickling (Ray)
        return (_rebuild_stage_error, (type(self), str(self), self.error_type, self.transient))


def _rebuild_stage_error(cls: type[StageError], message: str, error_type: str, transient: bool) -> StageError:
    err = cls.__new__(cls)
    StageError.__init__(err, message, error_type, transient=transient)
    return err


def is_out_of_memory(exc: BaseException) -> bool:
    """True for host or accelerator out-of-memory errors (not retried row by row)."""
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemory" in text
