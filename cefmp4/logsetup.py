"""structlog configuration: console renderer in development, JSON lines in
production (``APP_ENV``). Called once by the CLI; nothing is configured at import."""

from __future__ import annotations

import logging
import sys

import structlog

from cefmp4.config import Config


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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
