"""structlog configuration: console renderer in development, JSON lines in
production (``APP_ENV``). Called once by the CLI; nothing is configured at import.

Secrets never reach the output. The service holds two: the S3 secret key and
the password in ``REDIS_URL``. ``Redact`` is the last processor before the
renderer, after ``format_exc_info`` and ``StackInfoRenderer`` have turned
tracebacks into strings, so whatever an exception message, a botocore error
or a caller's keyword carries is masked in the strings that get rendered.
Redacting before rendering rather than on the rendered line matters for JSON:
a secret with a quote or a backslash in it would be escaped by the renderer and
no longer match.

The standard library's loggers (botocore, aiobotocore, urllib3, redis,
asyncio) go through the same processors and renderer, and only from WARNING
up whatever ``LOG_LEVEL`` says: botocore's DEBUG output is request headers and
bodies, which is exactly what must not be printed. That is the one piece of
state configured besides structlog's own: the root logger's level and a
handler of ours on it (replaced, not duplicated, if ``configure`` runs again).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO
from urllib.parse import quote, unquote, unquote_plus

import msgspec
import structlog

from cefmp4.domain.config import Config

REDACTED = "***"
# Third-party libraries log below this only for their own developers.
LIBRARY_LOG_LEVEL = logging.WARNING


def _password_spans(url: str) -> list[tuple[int, int]]:
    """Pure: where passwords sit in ``url``: the one in ``user:password@`` and
    any ``password=`` query value (redis-py passes query values to the
    connection). Split the way urllib, and so redis-py, splits: the authority
    ends at the first ``/``, ``?`` or ``#``, the host follows its last ``@``,
    the query runs from ``?`` to ``#``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return []
    base = len(scheme) + len(sep)
    spans = []
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    colon = rest.find(":", 0, max(at, 0))
    if at >= 0 and colon >= 0:
        spans.append((base + colon + 1, base + at))
    query_at = url.find("?", base)
    if query_at >= 0:
        fragment = url.find("#", query_at)
        query_end = fragment if fragment >= 0 else len(url)
        start = query_at + 1
        for pair in url[start:query_end].split("&"):
            name, eq, _value = pair.partition("=")
            if eq and name == "password":
                spans.append((start + len(name) + 1, start + len(pair)))
            start += len(pair) + 1
    return [(a, b) for a, b in spans if b > a]


def url_passwords(url: str) -> list[str]:
    """Pure: the passwords in ``url`` as written (percent-encoded)."""
    return [url[a:b] for a, b in _password_spans(url)]


def redact_url(url: str) -> str:
    """Pure: ``url`` with its passwords replaced by ``***``; user, host, port,
    path and the other query values are kept, so a line still says where the
    service connects."""
    for a, b in reversed(_password_spans(url)):
        url = url[:a] + REDACTED + url[b:]
    return url


def secrets_of(config: Config) -> tuple[str, ...]:
    """Pure: the strings that must never be written, in every spelling they
    can take on the way out: as configured, percent-decoded (redis-py decodes
    the URL's password), percent-encoded, and escaped by ``repr`` or JSON."""
    raw = [config.s3_secret_access_key, *url_passwords(config.redis_url)]
    found: set[str] = set()
    for secret in raw:
        if not secret:
            continue
        for plain in {secret, unquote(secret), unquote_plus(secret)}:
            found.update(
                {
                    plain,
                    quote(plain, safe=""),
                    repr(plain)[1:-1],
                    msgspec.json.encode(plain).decode()[1:-1],
                }
            )
    # Longest first, so a spelling that contains another is masked whole.
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


class Redact:
    """structlog processor: every occurrence of a secret in the event's values
    becomes ``***``.

    Strings are searched as they are; containers are walked; any other object
    is left alone unless its ``str`` or ``repr`` (what a renderer would print)
    holds a secret, in which case it is replaced by its redacted ``repr``.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event_dict
        # Top-level keys are names the code chose ("event" must stay "event"
        # for the renderer); keys of nested mappings are data and redacted.
        return {k: self._value(v) for k, v in event_dict.items()}

    def _value(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self._value(k): self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._value(v) for v in value]
        shown = repr(value)
        if any(s in shown or s in str(value) for s in self._secrets):
            return self.text(shown)
        return value


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A logging handler writing to whatever ``sys.stderr`` is at each record
    (for the same reason as ``_stderr_logger``)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(config: Config) -> None:
    level = logging.getLevelName(config.log_level)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if config.app_env == "production"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    redact = Redact(secrets_of(config))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr at each use rather than once: whoever replaces it
        # (a test runner capturing output) must not leave loggers writing to
        # a closed stream. Log volume is per event, not per byte: cheap.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LIBRARY_LOG_LEVEL, level))
    logging.captureWarnings(True)
