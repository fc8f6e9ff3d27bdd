"""The errors the library raises on purpose, and what each means to a caller.

Every deliberate failure is a :class:`DeiTError`. Each class says how the two front ends
report it: ``exit_code`` for the ``deit`` command (which prints one line, never a
traceback) and ``http_status`` for the server. Front ends read these attributes; they never
match the text of a message, so rewording a message changes nothing but the message.

The classes also derive from the built-in exception a caller would expect (``ValueError``
for bad input, ``ImportError`` for a missing package, ...), so ``except ValueError`` keeps
working in user code.
"""

from __future__ import annotations

EXIT_INPUT_FAILED = 1  # ran, but some input could not be processed
EXIT_USAGE = 2  # nothing ran: bad arguments, model, data or environment


class DeiTError(Exception):
    """Base class: a failure a user can cause or fix, reported in one line."""

    exit_code: int = EXIT_USAGE
    http_status: int = 400

    def __str__(self) -> str:  # KeyError subclasses would otherwise quote the message
        return str(self.args[0]) if self.args else type(self).__name__


class UsageError(DeiTError, ValueError):
    """A bad argument or setting: a value out of range, a missing input, a wrong file type."""

    http_status = 422


class ConfigError(UsageError):
    """A configuration file or override that is malformed; the message names the field."""


class ConfigKeyError(ConfigError, KeyError):
    """An unknown section or key in a configuration."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value of the wrong type."""


class CheckpointError(DeiTError, ValueError):
    """A checkpoint that can't be used: missing, malformed, mismatched keys or shapes."""

    http_status = 422


class UnsafeFileError(CheckpointError):
    """A file that would run code when loaded (pickle, TorchScript), refused without opt-in."""


class ResourceLimitError(DeiTError, ValueError):
    """A file or setting that claims more memory than the limits allow (refused up front)."""

    http_status = 413


class ExportError(DeiTError, ValueError):
    """An export that failed, or whose outputs differ from eager PyTorch."""


class ImageLoadError(DeiTError, ValueError):
    """An input image that cannot be used (corrupt, truncated, unreadable).

    Batch commands report such images per file and go on; a command that stops on one
    (an export's verification images) ran nothing, hence the usage exit code.
    """

    http_status = 422


class EmptyImageError(ImageLoadError):
    """An empty file, or an image of zero width or height."""

    http_status = 400


class NotAnImageError(ImageLoadError):
    """Bytes that no decoder recognises, or an image mode that can't be converted."""

    http_status = 415


class ImageTooLargeError(ImageLoadError):
    """An image over the decoded-pixel limit (a decompression bomb, or just too large)."""

    http_status = 413


class NonFiniteOutputError(DeiTError, ValueError):
    """A model whose output for an input is not a finite number (NaN or infinity): corrupt
    weights, or an input it overflows on. An error for that input, never a score."""

    http_status = 422


class MissingDependencyError(DeiTError, ImportError):
    """An optional package that this feature needs is not installed."""

    http_status = 500


class TrainingError(DeiTError, RuntimeError):
    """A run that cannot go on: a diverging loss, an unusable resume state."""


class BusyError(DeiTError, RuntimeError):
    """Too much work in flight; try again later."""

    http_status = 503


class ApiError(DeiTError):
    """A server's answer ``{"error": message}`` with the HTTP status given (the serving
    routes' own refusals: limits, malformed bodies).

    ``retry_after`` (seconds) becomes a ``Retry-After`` header (503 answers get one anyway).
    """

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.http_status = status
        self.retry_after = retry_after
