"""structlog configured once, in ``main()``: console on a TTY, JSON lines otherwise, to stderr."""

from __future__ import annotations

import logging
import sys

import structlog

from flops.redact import redact_log_event


def configure(fmt: str = "auto", level: str = "info") -> None:
    renderer: structlog.types.Processor
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if not use_console else structlog.dev.set_exc_info,
            redact_log_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
