"""The exception tree: permanent errors give up on a task, transient ones retry it."""

from __future__ import annotations


class UdemyDlError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(UdemyDlError):
    """Raised when a setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class PermanentError(UdemyDlError):
    """Raised when retrying cannot help: the task is marked failed at once."""


class InvalidTaskError(PermanentError):
    """Raised when task data is missing a key or holds a malformed value."""


class HostNotAllowedError(PermanentError):
    """Raised when a URL points to a host that ALLOWED_HOSTS does not list."""


class UnsafePathError(PermanentError):
    """Raised when a file path from the network would leave its task folder."""


class BadManifestError(PermanentError):
    """Raised when the origin's manifest is not the documented shape."""


class UnwritablePathError(BadManifestError):
    """Raised when a manifest path cannot exist on the download disk: a name longer than the file system
    allows, a path that is not valid text, or a file where a folder must be (or the reverse)."""


class OriginRefusedError(PermanentError):
    """Raised when the origin answers 4xx (not 408/429): the content is not there for us."""


class TooLargeError(PermanentError):
    """Raised when a course exceeds MAX_TASK_BYTES or could never fit on the download disk."""


class TransientError(UdemyDlError):
    """Raised when a later attempt may succeed: the job is retried."""


class FetchError(TransientError):
    """Raised when a transfer fails: network error, 5xx, truncated body."""


class IntegrityError(TransientError):
    """Raised when a fetched file's size or sha256 differs from the manifest."""


class NoSpaceError(TransientError):
    """Raised when the download disk lacks room now; a later attempt may find it."""


class CommandError(TransientError):
    """Raised when the operator's FETCH_COMMAND exits non-zero or times out."""


class StoreError(TransientError):
    """Raised when the status store cannot be reached or refuses a statement."""


class WebhookDeliveryError(TransientError):
    """Raised when the webhook receiver does not answer 2xx; the delivery is retried."""


class LeaseBusyError(TransientError):
    """Raised when another run holds the task's lease: this run steps aside and is retried later."""


class LeaseLostError(TransientError):
    """Raised when a run's lease could not be renewed: another run may take over, so this one stops."""


class Interrupted(UdemyDlError):
    """Raised inside a fetch when its run was asked to stop (worker stopping, lease lost)."""
