"""Log lines: the JSON formatter (fields, bound context, gunicorn's access atoms, exceptions),
the text default, and the logging configurations the processes install. A real run's output
is parsed in tests/integration/test_observability.py."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
import threading
from collections.abc import Iterator

import pytest

from batchvision.core.logs import (
    ACCESS_FORMAT,
    JsonFormatter,
    check_format,
    configure_logging,
    formatter,
    gunicorn_config,
    log_context,
)


def record(
    msg: str = "hello %s", args: object = ("world",), name: str = "t", **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)  # type: ignore[arg-type]
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_the_fixed_fields_and_the_extras() -> None:
    line = JsonFormatter({"service": "worker"}).format(record(job_id="j1", batch_size=8, wait_ms=1.5))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "hello world" and doc["level"] == "INFO" and doc["logger"] == "t"
    assert doc["service"] == "worker" and isinstance(doc["pid"], int)
    assert doc["ts"].endswith("Z") and doc["ts"][10] == "T"
    assert (doc["job_id"], doc["batch_size"], doc["wait_ms"]) == ("j1", 8, 1.5)
    # nothing of LogRecord's own attributes leaks in
    assert not {"args", "msg", "levelno", "pathname", "exc_info", "created"} & doc.keys()


def test_values_json_cannot_encode_become_strings() -> None:
    doc = json.loads(JsonFormatter().format(record(obj=object(), ids=["a"])))
    assert doc["obj"].startswith("<object object") and doc["ids"] == ["a"]


def test_an_exception_is_one_field_of_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert "ValueError: boom" in doc["exc"] and "Traceback" in doc["exc"]


def test_log_context_binds_fields_to_this_thread_only() -> None:
    fmt = JsonFormatter()
    seen: list[dict[str, object]] = []
    with log_context(task_id="t1", job_id="j1"):
        with log_context(images=3):
            inner = json.loads(fmt.format(record()))
        other = threading.Thread(target=lambda: seen.append(json.loads(fmt.format(record()))))
        other.start()
        other.join()
        outer = json.loads(fmt.format(record()))
    after = json.loads(fmt.format(record()))
    assert (inner["task_id"], inner["job_id"], inner["images"]) == ("t1", "j1", 3)
    assert "images" not in outer and outer["task_id"] == "t1"
    assert "task_id" not in seen[0] and "task_id" not in after


def test_gunicorn_access_atoms_become_fields() -> None:
    atoms = {"m": "GET", "U": "/v1/jobs/abc123/results", "q": "format=csv", "s": "200", "M": 12, "B": 345}
    atoms |= {"h": "10.0.0.1", "f": "-"}
    rec = record(ACCESS_FORMAT, None, name="gunicorn.access")
    rec.args = atoms  # gunicorn passes its atoms dict as the record's args
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["message"] == "GET /v1/jobs/abc123/results 200 12ms"
    assert (
        doc["method"] == "GET" and doc["path"] == "/v1/jobs/abc123/results" and doc["query"] == "format=csv"
    )
    assert (doc["status"], doc["duration_ms"], doc["bytes"]) == (200, 12, 345)
    assert doc["job_id"] == "abc123" and doc["remote_addr"] == "10.0.0.1"


def test_an_access_lines_query_shows_no_credential_or_url_that_may_carry_one() -> None:
    # A key sent as ?api_key= (refused, but logged), a webhook URL with its token.
    query = "api_key=secret-key&model=shapes&callback_url=https%3A%2F%2Fh%2Fhook%3Ftoken%3Dt0k&wait=5"
    rec = record(ACCESS_FORMAT, None, name="gunicorn.access")
    rec.args = {"m": "POST", "U": "/v1/jobs", "q": query, "s": "401", "M": 1, "B": 2}
    line = JsonFormatter().format(rec)
    assert "secret-key" not in line and "t0k" not in line, line
    assert json.loads(line)["query"] == "api_key=**********&model=shapes&callback_url=**********&wait=5"


def test_formats() -> None:
    assert check_format("json") == "json" and check_format("text") == "text"
    with pytest.raises(ValueError, match="BATCHVISION_LOG_FORMAT"):
        check_format("xml")
    text = formatter("text").format(record())
    assert "hello world" in text and not text.startswith("{")
    assert isinstance(formatter("json", "api"), JsonFormatter)


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    loggers = {n: logging.getLogger(n) for n in ("gunicorn.error", "gunicorn.access")}
    saved_named = {n: (list(lg.handlers), lg.level, lg.propagate) for n, lg in loggers.items()}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, (handlers, level, propagate) in saved_named.items():
        lg = loggers[name]
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_replaces_the_root_handlers() -> None:
    out = io.StringIO()
    configure_logging("json", logging.INFO, service="up", stream=out)
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("batchvision.up").info("started %s", "api", extra={"child_pid": 42})
    logging.getLogger("batchvision.up").debug("not shown")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["message"] == "started api" and doc["child_pid"] == 42 and doc["service"] == "up"


@pytest.mark.usefixtures("restore_logging")
def test_gunicorn_config_is_a_valid_dict_config() -> None:
    config = gunicorn_config("api")
    logging.config.dictConfig(config)
    for name in ("gunicorn.error", "gunicorn.access"):
        (handler,) = logging.getLogger(name).handlers
        assert isinstance(handler.formatter, JsonFormatter), name
        assert not logging.getLogger(name).propagate
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert handler.formatter.static == {"service": "api"}
