"""Structured logging: structlog with bound context, one JSON object per line by default.

* Format: ``json`` (orjson, one object per line), ``console`` (human-readable), or ``auto``
  (console when the stream is a terminal, else JSON). Level and format come from
  ``[dispatcher].log_level``/``log_format``, overridden by ``DISPATCHER_LOG_LEVEL`` and
  ``DISPATCHER_LOG_FORMAT``.
* Context (``event_id``, ``subscriber``, ``attempt``) is bound with contextvars around each
  delivery; a worker under the supervisor adds ``worker`` (its index).
* Records of libraries that use the standard `logging` module (aio-pika, aiormq, aiohttp) are
  routed through the same processors, so they come out in the same format.
* Secrets are never logged on purpose. As a last line of defence, every rendered value is
  scrubbed of anything shaped like an agent token (a JWS), a ``Bearer`` credential, a
  ``whsec_`` secret, a ``v1,`` HMAC signature, a PEM private key or a password in a URL.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

__all__ = ["configure_logging", "scrub"]

_SECRETISH = re.compile(
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # a JWS/JWT
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{8,}=*"  # an Authorization credential
    r"|whsec_[A-Za-z0-9+/=]{8,}"  # a Standard Webhooks secret
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"
    r"|v1,[A-Za-z0-9+/]{40,}={0,2}"  # an HMAC signature header
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"  # user:password in a URL
)
_REDACTED = "[redacted]"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def scrub(value: str) -> str:
    """``value`` with anything that looks like a token or secret replaced by ``[redacted]``."""
    return _SECRETISH.sub(_REDACTED, value)


def _clean(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return scrub(str(value))


def _scrub_processor(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = _clean(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


class _ToStructlog(logging.Handler):
    """Hands standard-library log records to structlog (same format, same scrubbing)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, record.getMessage(), **kw)
        except Exception:  # pragma: no cover - never let logging break the caller
            self.handleError(record)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog (and route stdlib logging into it). Safe to call again."""
    stream = stream if stream is not None else sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    console = fmt == "console" or (fmt == "auto" and tty)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    worker = os.environ.get("DISPATCHER_WORKER_INDEX")
    if worker is not None and worker.isdigit():
        index = int(worker)

        def add_worker(_: Any, __: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
            ed.setdefault("worker", index)
            return ed

        processors.append(add_worker)
    # Exceptions become text first, so the scrubber sees the traceback too.
    processors += [structlog.processors.format_exc_info, _scrub_processor]
    if console:
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=tty, exception_formatter=structlog.dev.plain_traceback
            )
        )
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (message and newline together): several workers share a stream.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    # Libraries are chatty below WARNING (aiormq at DEBUG logs every frame).
    root.setLevel(max(logging.WARNING, numeric))
