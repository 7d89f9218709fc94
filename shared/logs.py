"""Structured logs: one JSON object per line, for a log pipeline (Loki, Elasticsearch, Cloud Logging).

Enabled with LANDMARKS_LOG_JSON=1 (read here, by ``json_logs_enabled``, when a worker or the backlog
exporter sets up logging). Each line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and,
when the call site passed them with ``extra=``, ``event_id``, ``photo_id``, ``model_version`` and any
other extra field; ``exc`` holds a traceback. Inside ``log_context(...)`` every line of the thread also
carries the context's fields (the worker sets ``model_version`` for a batch). A worker run among several
by `landmarks worker --processes N` adds ``worker``, its Celery node name (``worker0@host``, ...).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

JSON_ENV = "LANDMARKS_LOG_JSON"
# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# Keys the formatter owns: an extra field with one of these names is prefixed with "extra_".
_RESERVED = {"ts", "level", "logger", "msg", "worker", "exc", "stack"}
# Each worker process's Celery node name, set by workers/supervisor.py for the workers it runs.
NODE_ENV = "LANDMARKS_WORKER_NODE"
_WORKER_NODE = os.environ.get(NODE_ENV)
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("landmarks_log_context", default={})


def json_logs_enabled(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(JSON_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields added to every log line of this thread (or task) inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _WORKER_NODE:
            out["worker"] = _WORKER_NODE
        fields = dict(_context.get())
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        for key, value in fields.items():
            out[f"extra_{key}" if key in _RESERVED else key] = _plain(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def use_json(loggers: list[logging.Logger] | None = None) -> None:
    """Give every handler of these loggers (default: root and Celery's task logger) the JSON formatter."""
    for logger in loggers or [logging.getLogger(), logging.getLogger("celery.task")]:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())


def configure_logging(level: int | str | None = None, environ: dict[str, str] | None = None) -> bool:
    """Set up the root logger (a stderr handler if it has none) and switch it to JSON when
    LANDMARKS_LOG_JSON is set. Returns whether logs are JSON."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    if level is not None:
        root.setLevel(level)
    enabled = json_logs_enabled(environ)
    if enabled:
        use_json([root])
    return enabled
