"""structlog configuration: console renderer in development, JSON lines in
production (``APP_ENV``). Called once by the CLI; nothing is configured at import."""

from __future__ import annotations

import logging
import sys

import structlog

from cefmp4.config import Config


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure(config: Config) -> None:
    level = logging.getLevelName(config.log_level)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if config.app_env == "production"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr at each use rather than once: whoever replaces it
        # (a test runner capturing output) must not leave loggers writing to
        # a closed stream. Log volume is per event, not per byte: cheap.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
