"""The project's own small exception tree.

Adapters (Redis, S3, the file system) translate library exceptions into these at
their boundary, so the rest of the code decides on *kind* rather than on which
library raised. Three kinds:

* ``TransientError``: retried with backoff (network blips, 5xx, timeouts).
* ``DeploymentBlocked``: the deployment cannot work at all right now (bad or
  expired credentials, a missing permission, a skewed clock, no bucket). It is
  no recording's fault, so no recording fails because of it: the S3 adapter
  waits, with one log line and a gauge, until the cause is fixed.
* ``PermanentError``: retrying cannot help *this recording*; the supervisor
  ends the stream with a ``StreamFailed`` event naming the ``reason``.
"""

from typing import Literal

from cefmp4.domain.events import FailReason

BlockCause = Literal["credentials", "permissions", "clock_skew", "no_bucket"]
BLOCK_CAUSES: tuple[BlockCause, ...] = ("credentials", "permissions", "clock_skew", "no_bucket")


class CefError(Exception):
    """Base of every error this project raises on purpose."""


class TransientError(CefError):
    """Worth retrying: network blips, 5xx, SlowDown, timeouts, Redis reconnects.

    ``retry_now`` False means "not here and now": the work stays pending and is
    tried again later (by this or another replica), e.g. a lease held elsewhere.
    """

    retry_now: bool = True


class DeploymentBlocked(CefError):
    """S3 refuses every request of this deployment until someone fixes ``cause``.

    Not a ``PermanentError``: an hour of an expired key must not turn an
    hour of recordings into ``StreamFailed``. The work waits instead.
    """

    def __init__(self, message: str, *, cause: BlockCause) -> None:
        super().__init__(message)
        self.cause: BlockCause = cause


class PermanentError(CefError):
    """Retrying cannot help this recording: it ends with ``StreamFailed(reason)``."""

    reason: FailReason = "internal_error"

    def __init__(self, message: str, *, reason: FailReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class StreamEnded(PermanentError):
    """The recording itself ended its stream: deleted, truncated, empty, too large.

    Raised by handlers like any permanent error; the supervisor records it
    (``GroupConsumer._supervised`` -> ``consumers.uploads.failer``) and is the
    only place that does.
    """

    def __init__(self, reason: FailReason, detail: str) -> None:
        super().__init__(detail, reason=reason)


class NoSuchUpload(PermanentError):
    """The multipart upload is gone (completed, aborted by hand or by lifecycle)."""

    reason = "no_such_upload"


class NoSuchKey(PermanentError):
    """An object the call reads is not there (the source of an UploadPartCopy)."""

    reason = "s3_rejected"


class ConfigError(CefError):
    """A configuration value is missing or not allowed; the CLI exits with code 2."""
