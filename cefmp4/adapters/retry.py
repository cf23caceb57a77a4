"""One retry policy for transient failures, shared by the Redis and S3 adapters.

Only :class:`~cefmp4.domain.errors.TransientError` is retried (exponential backoff
with jitter); a permanent error surfaces at once. ``attempts=None`` retries
until the surrounding task is cancelled: used where giving up would lose a fact
(appending an event while Redis restarts); the files on disk stay the source
of truth meanwhile.
"""

from __future__ import annotations

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    wait_exponential_jitter,
)

from cefmp4.domain.errors import TransientError

log = structlog.get_logger(__name__)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "transient error, retrying",
        operation=getattr(state.fn, "__name__", None) or str(state.args[:1]),
        attempt=state.attempt_number,
        error=str(exc),
    )


def transient(*, attempts: int | None = 8, max_wait: float = 5.0) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(lambda e: isinstance(e, TransientError) and e.retry_now),
        wait=wait_exponential_jitter(multiplier=0.1, max=max_wait, jitter=0.1),
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=_log_retry,
        reraise=True,
    )
