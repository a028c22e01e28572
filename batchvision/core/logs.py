"""Log output of every process: readable text (the default) or one JSON object per line.

``BATCHVISION_LOG_FORMAT=json`` makes API (gunicorn's error and access logs included), worker
and ``batchvision up`` write one JSON object per line::

    {"ts": "2026-11-29T10:00:00.123Z", "level": "INFO", "logger": "workers.runtime",
     "message": "batch of 8 images ...", "service": "worker", "pid": 4242,
     "batch_size": 8, "job_ids": ["..."], "wait_ms": 1.2, "model_ms": 31.0}

Beyond the fixed keys (``ts``, ``level``, ``logger``, ``message``, ``service``, ``pid``) a line
carries what the code passed with ``extra=`` (``job_id``, ``job_ids``, ``task_id``,
``batch_size``, ``images``, ``duration_ms`` ...), what :func:`log_context` bound for the
current thread (a task's ``task_id`` and ``job_ids``), ``trace_id``/``span_id`` when tracing
is on, and ``exc`` (the formatted traceback) for an exception. Pure: standard library only.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# What every LogRecord has (and the formatter's own keys): anything else came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "batchvision_log", default=None
)

# gunicorn's access log passes its "atoms" as the record's args: the ones worth a field.
ACCESS_ATOMS = {
    "m": "method",
    "U": "path",
    "q": "query",
    "s": "status",
    "M": "duration_ms",
    "B": "bytes",
    "h": "remote_addr",
}
ACCESS_FORMAT = "%(m)s %(U)s %(s)s %(M)sms"
_JOB_PATH = re.compile(r"^/v1/jobs/([A-Za-z0-9_-]+)")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every JSON line this thread (or task) logs inside the block."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); ``static`` fields go on every line."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
            "pid": record.process,
        }
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            doc.update(_access_fields(record.args))
        doc.update(_context.get() or {})
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for atom, field in ACCESS_ATOMS.items():
        value = atoms.get(atom)
        if value not in (None, "", "-"):
            out[field] = value
    for key in ("status", "duration_ms", "bytes"):
        with contextlib.suppress(TypeError, ValueError):
            if key in out:
                out[key] = int(out[key])
    if "query" in out:
        out["query"] = redact_query(str(out["query"]))
    match = _JOB_PATH.match(str(out.get("path", "")))
    if match:
        out["job_id"] = match.group(1)
    return out


#: Query parameters whose values an access log never shows: credentials by any name, and URLs
#: that may carry one (a webhook's token, a presigned output location).
_SECRET_PARAM = re.compile(r"key|token|secret|passw|signature|sig$|auth|credential|_url$", re.IGNORECASE)


def redact_query(query: str) -> str:
    """``query`` (a URL's query string) with the values of parameters that may hold a secret
    masked."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not any(_SECRET_PARAM.search(name) for name, _ in pairs):
        return query
    return urllib.parse.urlencode(
        [(name, "**********" if _SECRET_PARAM.search(name) else value) for name, value in pairs], safe="*"
    )


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known log format, else ``ValueError`` naming the setting."""
    if fmt not in FORMATS:
        raise ValueError(f"BATCHVISION_LOG_FORMAT={fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def formatter(fmt: str, service: str = "") -> logging.Formatter:
    """The formatter of log format ``fmt`` (``service`` names the process in JSON lines)."""
    if check_format(fmt) == "json":
        return JsonFormatter({"service": service} if service else None)
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(
    fmt: str, level: int | str = logging.INFO, service: str = "", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of this process, in format ``fmt``, to ``stream`` (stderr): the
    root logger gets one handler (any others are removed). Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt, service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if fmt == "json":
        logging.captureWarnings(True)  # warnings.warn() lines become JSON records too
    return handler


def gunicorn_config(service: str = "api", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document for gunicorn (``api.gunicorn_conf``) that
    writes JSON lines to stderr: its error log, its access log and the application's records
    (stdout stays free of logs, as in the worker and ``batchvision up``)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter", "static": {"service": service}}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }
