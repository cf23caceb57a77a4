"""The project's own small exception tree.

Adapters (Redis, S3, the file system) translate library exceptions into these at
their boundary, so the rest of the code decides on *kind* rather than on which
library raised: transient errors are retried with backoff, permanent ones end
the stream with a ``StreamFailed`` event naming the reason.
"""


class CefError(Exception):
    """Base of every error this project raises on purpose."""


class TransientError(CefError):
    """Worth retrying: network blips, 5xx, SlowDown, timeouts, Redis reconnects.

    ``retry_now`` False means "not here and now": the work stays pending and is
    tried again later (by this or another replica), e.g. a lease held elsewhere.
    """

    retry_now: bool = True


class PermanentError(CefError):
    """Retrying cannot help: access denied, bad request, missing bucket."""

    reason: str = "permanent_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class NoSuchUpload(PermanentError):
    """The multipart upload is gone (completed, aborted by hand or by lifecycle)."""

    reason = "no_such_upload"


class ConfigError(CefError):
    """A configuration value is missing or not allowed; the CLI exits with code 2."""
