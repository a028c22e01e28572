"""Result and job schemas: what is stored per image and what the API returns.

The result of one image travels as a typed, frozen :data:`ImageResult` (a :class:`Prediction`
or a :class:`Failure`); :func:`encode`/:func:`decode` are the one codec of its JSON in Redis,
and :class:`Row` becomes the public ``/results`` row (or CSV/JSON Lines) only at the API edge.
"""

from __future__ import annotations

import base64
import csv
import enum
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypedDict

import numpy as np


class JobStatus(enum.StrEnum):
    """Lifecycle of a job; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"


class Score(TypedDict):
    label: str
    score: float


@dataclass(frozen=True)
class TopScore:
    """One of the best classes of an image."""

    label: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """The stored result of a classified image; ``model`` and ``version`` name what made it.
    ``scores``: every class's probability as little-endian float32 (kept for a job that asked
    for them; stored, never served on ``/v1``)."""

    label: str
    class_id: int
    score: float
    top_k: tuple[TopScore, ...]
    model: str | None = None
    version: int | None = None
    scores: bytes | None = None

    @property
    def outcome(self) -> Literal["done"]:
        """The job counter this result raises."""
        return "done"

    def with_model(self, model: str, version: int) -> Prediction:
        """This prediction tagged with the model version that made it."""
        return Prediction(self.label, self.class_id, self.score, self.top_k, model, version, self.scores)

    def score_vector(self) -> np.ndarray | None:
        """Every class's probability (float32, in class order), if the result kept them."""
        return None if self.scores is None else np.frombuffer(self.scores, dtype="<f4")

    def document(self) -> dict[str, Any]:
        """The JSON object stored and served, keys in their stored order."""
        doc: dict[str, Any] = {
            "label": self.label,
            "class_id": self.class_id,
            "score": self.score,
            "top_k": [{"label": s.label, "score": s.score} for s in self.top_k],
        }
        if self.model is not None:
            doc["model"] = self.model
        if self.version is not None:
            doc["version"] = self.version
        return doc


#: The error code of an image its job's cancellation reached first.
CANCELED = "canceled"

#: Per-image error codes that a later try may well not meet (``POST /v1/jobs/{id}/retry``
#: re-queues these): the URL's host timed out, was unreachable or did not resolve, the model
#: did not answer or failed, workers were lost holding the image past the delivery limit
#: (``poison_image`` on Redis, ``delivery_limit`` and ``task_failed`` on RabbitMQ), or Redis
#: was full. Besides these, ``http_408``, ``http_429`` and every ``http_5xx`` (see
#: :func:`retryable`). Every other code is about the input itself (not an image, truncated,
#: over a limit, a refused address, a 404) or final by choice (``canceled``).
RETRYABLE_CODES = frozenset(
    {
        "fetch_timeout",
        "connection_failed",
        "dns_error",
        "inference_timeout",
        "inference_failed",
        "poison_image",
        "delivery_limit",
        "task_failed",
        "store_full",
        "s3_throttled",
        "s3_unavailable",
        "incomplete_download",
        "model_busy",
        "model_load_failed",
    }
)


def retryable(code: str) -> bool:
    """Whether an image that failed with ``code`` is worth trying again (:data:`RETRYABLE_CODES`,
    and an origin's answer ``http_408``, ``http_429`` or ``http_5xx``)."""
    if code in RETRYABLE_CODES:
        return True
    status = code.removeprefix("http_")
    return status != code and status.isdigit() and (int(status) in (408, 429) or 500 <= int(status) <= 599)


@dataclass(frozen=True)
class Failure:
    """The stored result of an image that could not be classified (or was canceled)."""

    code: str
    message: str

    @property
    def outcome(self) -> Literal["failed", "canceled"]:
        """The job counter this result raises."""
        return "canceled" if self.code == CANCELED else "failed"

    @property
    def retryable(self) -> bool:
        """Whether a retry of the job re-queues this image (:func:`retryable`)."""
        return retryable(self.code)

    def document(self) -> dict[str, Any]:
        """The JSON object stored and served."""
        return {"error": {"code": self.code, "message": self.message}}


#: The stored result of one image.
ImageResult = Prediction | Failure


def encode(result: ImageResult) -> str:
    """The JSON a result is stored as in Redis (compact, keys in a fixed order; a prediction's
    score vector as base64 under ``scores``)."""
    doc = result.document()
    if isinstance(result, Prediction) and result.scores is not None:
        doc["scores"] = base64.b64encode(result.scores).decode("ascii")
    return json.dumps(doc, separators=(",", ":"))


def decode(text: str | bytes) -> ImageResult:
    """A stored result from its JSON (:func:`encode`'s, or an older row without ``model`` and
    ``version``)."""
    doc = json.loads(text)
    result = from_document(doc)
    if isinstance(result, Prediction) and "scores" in doc:
        return replace(result, scores=base64.b64decode(doc["scores"]))
    return result


def from_document(doc: dict[str, Any]) -> ImageResult:
    """A result from its JSON object (:meth:`Prediction.document`'s or
    :meth:`Failure.document`'s; a served row's other keys are ignored)."""
    err = doc.get("error")
    if err is not None:
        return Failure(str(err.get("code", "")), str(err.get("message", "")))
    return Prediction(
        label=doc.get("label", ""),
        class_id=doc.get("class_id", -1),
        score=doc.get("score", 0.0),
        top_k=tuple(TopScore(s["label"], s["score"]) for s in doc.get("top_k", ())),
        model=doc.get("model"),
        version=doc.get("version"),
    )


def prediction(
    probs: np.ndarray, labels: Sequence[str], k: int, min_score: float = 0.0, *, scores: bool = False
) -> Prediction:
    """The stored result for one image from its class probabilities: the best class, the ``k``
    best (at most the number of classes) that score at least ``min_score``, and with ``scores``
    every class's probability."""
    k = max(1, min(k, probs.shape[-1]))
    top = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[-1] else np.arange(probs.shape[-1])
    top = top[np.argsort(-probs[top], kind="stable")]
    best = int(top[0])
    return Prediction(
        label=label_of(labels, best),
        class_id=best,
        score=round(float(probs[best]), 6),
        top_k=tuple(
            TopScore(label_of(labels, int(i)), round(float(probs[i]), 6))
            for i in top
            if min_score <= 0 or probs[i] >= min_score
        ),
        scores=np.asarray(probs, dtype="<f4").tobytes() if scores else None,
    )


def error_result(code: str, message: str) -> Failure:
    """The stored result for an image that could not be classified."""
    return Failure(code, message)


def canceled_result() -> Failure:
    """The stored result of an image its job's cancellation reached first."""
    return Failure(CANCELED, "the job was canceled before this image was classified")


def label_of(labels: Sequence[str], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


def job_status(
    *, total: int, done: int, failed: int, canceled: int, sealed: bool, cancel_requested: bool
) -> JobStatus:
    """Derive the status from counts, so it can never disagree with the stored results."""
    finished = sealed and done + failed + canceled >= total
    if cancel_requested and (canceled or not finished or total == 0):
        return JobStatus.CANCELED
    if not finished:
        return JobStatus.RUNNING if done + failed + canceled else JobStatus.QUEUED
    if failed == 0 and canceled == 0:
        return JobStatus.SUCCEEDED
    return JobStatus.FAILED if done == 0 else JobStatus.PARTIAL


def status_of(fields: dict[str, str]) -> tuple[JobStatus, dict[str, int]]:
    """The status and counts of a job hash's fields (``cancel`` is ``1``, or ``open`` when the
    job was canceled during its upload: that job is canceled even if every image it received
    had a result, since the rest of the upload never came)."""
    counts = {k: int(fields.get(k, 0) or 0) for k in ("total", "done", "failed", "canceled")}
    if fields.get("cancel") == "open":
        return JobStatus.CANCELED, counts
    status = job_status(
        **counts, sealed=fields.get("sealed") == "1", cancel_requested=fields.get("cancel") == "1"
    )
    return status, counts


@dataclass(frozen=True)
class Passthrough:
    """What an input carried to come back beside its prediction: its id and free columns."""

    id: str | None = None
    columns: tuple[tuple[str, Any], ...] = ()

    def encode(self) -> str:
        """The JSON it is stored as (beside the job's files)."""
        return json.dumps({"id": self.id, "columns": dict(self.columns)}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> Passthrough:
        doc = json.loads(text)
        return cls(doc.get("id"), tuple((doc.get("columns") or {}).items()))


@dataclass(frozen=True)
class Row:
    """One image of a job as read from the store: its index, filename and result (``None``
    while pending), and what its input passed through (``None``: nothing)."""

    index: int
    filename: str
    result: ImageResult | None
    passthrough: Passthrough | None = None

    def document(self) -> dict[str, Any]:
        """The public ``/results`` row (:class:`~batchvision.core.documents.ResultRow`)."""
        row = entry(self.index, self.filename, self.result)
        if self.passthrough is not None:
            if self.passthrough.id is not None:
                row["id"] = self.passthrough.id
            if self.passthrough.columns:
                row["columns"] = dict(self.passthrough.columns)
        return row

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Row:
        """The row a served document (:meth:`document`'s, as written to a JSON Lines part)
        stands for."""
        result = None if doc.get("status") == "pending" else from_document(doc)
        given = doc.get("id"), tuple((doc.get("columns") or {}).items())
        passthrough = Passthrough(*given) if given != (None, ()) else None
        return cls(int(doc["index"]), str(doc["filename"]), result, passthrough)


def entry(index: int, filename: str, stored: ImageResult | None) -> dict[str, Any]:
    """One row of ``/results``: the stored result with its index and filename."""
    row: dict[str, Any] = {"index": index, "filename": filename}
    if stored is None:
        row["status"] = "pending"
    else:
        row["status"] = "error" if isinstance(stored, Failure) else "ok"
        row.update(stored.document())
        if isinstance(stored, Failure):  # served, never stored: the catalogue may grow
            row["error"]["retryable"] = stored.retryable
    return row


#: The CSV header; a job whose inputs carry ids or pass-through columns gets ``id`` after
#: ``filename`` and one column per pass-through name at the end.
CSV_COLUMNS = ("filename", "label", "score", "class_id", "top_k", "error", "model", "version")


#: First characters that make a spreadsheet read a cell as a formula (or hide one behind them).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return) gets a leading ``'``, which spreadsheets show as
    text; numbers and other text pass unchanged. JSON and JSON Lines keep the raw value."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_header(with_id: bool = False, columns: Sequence[str] = ()) -> list[str]:
    """The CSV header of a job (``with_id``: its inputs carry ids; ``columns``: the names of
    their pass-through columns, formula starts neutralised like every text cell)."""
    head = list(CSV_COLUMNS)
    if with_id:
        head.insert(1, "id")
    return head + [csv_cell(c) for c in columns if c not in head]


def csv_row(row: Row, with_id: bool = False, columns: Sequence[str] = ()) -> list[Any]:
    """One row's CSV cells in :func:`csv_header`'s order, formula starts neutralised."""
    cells: list[Any] = [row.filename, *_csv_cells(row.result)]
    pt = row.passthrough
    if with_id:
        cells.insert(1, pt.id if pt is not None and pt.id is not None else "")
    if columns:
        given = dict(pt.columns) if pt is not None else {}
        cells += ["" if given.get(c) is None else given[c] for c in columns if c not in CSV_COLUMNS]
    return [csv_cell(c) for c in cells]


def csv_lines(rows: Iterable[Row], with_id: bool = False, columns: Sequence[str] = ()) -> Iterator[str]:
    """Stream ``/results`` rows as CSV, header first; top_k as ``label:score;...``. Text cells
    that would start a formula are neutralised (:func:`csv_cell`). ``with_id`` and ``columns``:
    as :func:`csv_header`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(with_id, columns))
    yield _drain(buf)
    for row in rows:
        writer.writerow(csv_row(row, with_id, columns))
        yield _drain(buf)


def _csv_cells(result: ImageResult | None) -> tuple[object, ...]:
    """The ``label, score, class_id, top_k, error, model, version`` cells of a result."""
    if result is None:
        return ("", "", "", "", "pending", "", "")
    if isinstance(result, Failure):
        return ("", "", "", "", f"{result.code}: {result.message}", "", "")
    top_k = ";".join(f"{s.label}:{s.score}" for s in result.top_k)
    model = result.model or ""
    version = "" if result.version is None else result.version
    return (result.label, result.score, result.class_id, top_k, "", model, version)


def jsonl_lines(rows: Iterable[Row]) -> Iterator[str]:
    """Stream rows as JSON Lines."""
    for row in rows:
        yield json.dumps(row.document(), separators=(",", ":")) + "\n"


def _drain(buf: io.StringIO) -> str:
    text = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return text
