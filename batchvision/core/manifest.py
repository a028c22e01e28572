"""Manifests: lists of image URLs a job names instead of carrying the images.

Pure parsing, no network: the API reads a manifest body with it, the CLI a local file. Three
forms, each up to a configured number of entries:

- CSV with a header row that has a ``url`` column and optionally ``filename`` and ``id``
  columns (``text/csv``; every other column is a pass-through column, blank rows skipped);
- JSON Lines, one entry per line: a JSON string (the URL) or an object ``{"url", "filename"?,
  "id"?, "columns"?}`` (``application/x-ndjson``, ``application/jsonl``);
- a URI list, one URL per line, ``#`` comments (``text/uri-list``, RFC 2483).

URLs are ``http(s)://`` or ``s3://bucket/key``. An entry's ``id`` and pass-through
``columns`` (at most :data:`MAX_COLUMNS`, text, numbers, booleans or null) come back beside its
prediction in every results format.

Whether a URL may be fetched (scheme, host, address rules) is decided later, per entry, by
:mod:`batchvision.server.fetch`: a bad URL is a per-image error, not a refused manifest. A
manifest that cannot be read at all is refused with ``400 bad_manifest`` naming the line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from batchvision.core.errors import BadRequest, BatchvisionError

#: Names a pass-through column may not have (any case): the columns of the results themselves
#: in CSV, JSON Lines and Parquet (``id`` too: Parquet always has it).
RESERVED_COLUMNS = (
    "index",
    "filename",
    "id",
    "status",
    "label",
    "score",
    "class_id",
    "top_k",
    "error",
    "error_code",
    "error_message",
    "model",
    "version",
    "url",
    "columns",
)
#: Longest URL an entry may have (what browsers and CDNs reliably carry).
MAX_URL_LENGTH = 2048
#: Longest display name of an entry.
MAX_FILENAME_LENGTH = 1024
#: Deepest nesting a JSON request body may have (the deepest document of the API has 4 levels).
MAX_JSON_DEPTH = 32
#: Pass-through columns an entry may carry, and the longest name and value of one.
MAX_COLUMNS = 32
MAX_COLUMN_NAME = 64
MAX_COLUMN_VALUE = 1024
#: Longest id of an entry.
MAX_ID_LENGTH = 256
#: JSON tokens per URL a body may hold: an entry ``{"url": .., "filename": ..},`` is 10.
TOKENS_PER_URL = 12

#: A pass-through column's value.
Cell = str | int | float | bool | None

Kind = Literal["csv", "jsonl", "urilist"]

#: Content types of a manifest body, by kind.
MEDIA_TYPES: Mapping[str, Kind] = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "text/uri-list": "urilist",
}
#: File extensions of a manifest file (the CLI), by kind.
EXTENSIONS: Mapping[str, Kind] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "urilist",
    ".uris": "urilist",
}

#: S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit
#: at each end.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name (``None`` when it is): the check of an
    ``s3://`` URL's bucket that the API, workers and settings share."""
    if _BUCKET_RE.fullmatch(bucket) is None:
        return f"not a valid bucket name: {bucket[:80]!r} (3-63 lowercase letters, digits, dots, hyphens)"
    return None


def key_problem(key: str) -> str | None:
    """Why ``key`` may not be named in an ``s3://`` URL (``None``: it may): a ``.`` or ``..``
    segment, which a store or a proxy in front of it may resolve, so the key would lie
    elsewhere than the prefix it was checked against."""
    if any(segment in (".", "..") for segment in key.replace("\\", "/").split("/")):
        return f"a key with a '.' or '..' segment: {key[:200]!r} (name the object by its own key)"
    return None


class ManifestError(BadRequest):
    """The manifest cannot be read (``400``); the message names the line."""

    code = "bad_manifest"


class TooManyUrls(BatchvisionError):
    """More entries than ``BATCHVISION_MAX_URLS_PER_JOB`` (``413``)."""

    status = 413
    code = "too_many_urls"


@dataclass(frozen=True)
class UrlEntry:
    """One image of a URL job: where it is, and the name its result row shows (the URL when
    none is given)."""

    url: str
    filename: str | None = None
    #: The caller's id of this input, returned beside its prediction.
    id: str | None = None
    #: Pass-through columns, ``(name, value)`` in the order given, returned beside the prediction.
    columns: tuple[tuple[str, Cell], ...] = ()

    @property
    def passthrough(self) -> bool:
        """Whether this entry carries anything to return beside its prediction."""
        return self.id is not None or bool(self.columns)

    @property
    def name(self) -> str:
        """The row's name: the filename, else the URL (cut short past the URL limit: such a URL
        is that row's ``bad_url``, and its name must not carry what the limit keeps out)."""
        if self.filename:
            return self.filename
        return self.url if len(self.url) <= MAX_URL_LENGTH else self.url[:MAX_URL_LENGTH] + "…"


def kind_of_media_type(media_type: str) -> Kind | None:
    return MEDIA_TYPES.get(media_type.strip().lower())


def kind_of_path(path: str | Path) -> Kind | None:
    return EXTENSIONS.get(Path(path).suffix.lower())


# A JSON token: a string (escapes included), or one of the structural characters. Numbers,
# true, false and null are not tokens of their own; they sit between two of these.
# Possessive, and a string not closed runs to the end: a body of unclosed quotes (`\"\"\"...`)
# would otherwise rescan the rest of the body from every quote, quadratic time. Valid JSON
# gives the same tokens either way.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{},:]', re.DOTALL)


def json_tokens(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The tokens of a JSON text (strings and structural characters), each with the nesting
    depth after it: one linear pass over the bytes, nothing parsed. Invalid JSON passes (the
    parser reports it), so a guard built on it only ever refuses more than the parser would."""
    depth = 0
    for match in _JSON_TOKEN.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
        yield depth, token


def scan_json(data: bytes, *, max_entries: int, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse a JSON body before it is parsed: nested deeper than ``max_depth`` (``400
    bad_body``), a top-level ``urls`` array of more than ``max_entries`` items, or more tokens
    than such a job can have (``413 too_many_urls``). One pass over the bytes that stops at the
    first excess, so neither the parser's recursion nor its objects (eight times the body for a
    list of URLs) are ever reached by a body over a limit. Invalid JSON passes: the parser
    reports it."""
    items = 0
    in_urls = False
    key: bytes | None = None
    budget = TOKENS_PER_URL * max_entries + 64
    for count, (depth, token) in enumerate(json_tokens(data)):
        if count > budget:
            raise TooManyUrls(
                f"the JSON body is larger than a job of {max_entries} URLs can be "
                "(BATCHVISION_MAX_URLS_PER_JOB)"
            )
        if depth > max_depth:
            raise BadRequest(f"the JSON body is nested deeper than {max_depth} levels", code="bad_body")
        if token in (b"[", b"{") and depth == 2:
            in_urls = token == b"[" and key == b'"urls"'
            items = 1
        elif token == b"," and depth == 2 and in_urls:
            items += 1
            if items > max_entries:
                raise TooManyUrls(
                    f"the job lists more than {max_entries} URLs (BATCHVISION_MAX_URLS_PER_JOB)"
                )
        elif depth == 1 and token.startswith(b'"'):
            key = token


def parse(data: bytes | str, kind: Kind, *, max_entries: int) -> list[UrlEntry]:
    """The entries of a manifest of ``kind``; raises :class:`ManifestError` or
    :class:`TooManyUrls` (at the first entry over ``max_entries``: lines are read one at a
    time, never all split up front)."""
    text = _stream(data)
    if kind == "csv":
        entries = _csv(text, max_entries)
    elif kind == "jsonl":
        entries = _lines(text, max_entries, _jsonl_entry)
    else:
        entries = _lines(text, max_entries, _uri_entry)
    if not entries:
        raise ManifestError("the manifest lists no URL")
    return entries


def entries_from_json(items: Iterable[str | Mapping[str, Any]], *, max_entries: int) -> list[UrlEntry]:
    """Entries of a JSON body's ``urls`` list: URL strings or ``{"url", "filename"?}`` objects
    (shapes are checked by the request model; this applies the count limit)."""
    out: list[UrlEntry] = []
    for item in items:
        _room(out, max_entries)
        if isinstance(item, str):
            out.append(UrlEntry(item))
        else:
            where = f"urls[{len(out)}]"
            out.append(
                UrlEntry(
                    str(item["url"]),
                    item.get("filename"),
                    _id(item.get("id"), where),
                    _columns(item.get("columns"), where),
                )
            )
    return out


def read_file(path: str | Path, *, max_entries: int = 1_000_000) -> list[UrlEntry]:
    """A manifest file, its kind from the extension (``.csv``, ``.jsonl``/``.ndjson``,
    ``.txt``/``.uris``)."""
    kind = kind_of_path(path)
    if kind is None:
        raise ManifestError(
            f"{Path(path).name}: unknown manifest type; use .csv (url[,filename]), .jsonl or .txt"
        )
    return parse(Path(path).read_bytes(), kind, max_entries=max_entries)


# -- the forms --------------------------------------------------------------------------------


def _stream(data: bytes | str) -> io.TextIOBase:
    """The manifest as text read a line at a time (decoded as it is read, not copied whole)."""
    if isinstance(data, str):
        return io.StringIO(data.removeprefix("\ufeff"), newline="")
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")


def _read_lines(text: io.TextIOBase) -> Iterator[str]:
    number = 0
    try:
        for number, line in enumerate(text, start=1):  # noqa: B007 - the error names the line
            yield line
    except UnicodeDecodeError as exc:
        raise ManifestError(f"the manifest is not UTF-8 text (near line {number + 1})") from exc


def _room(out: list[UrlEntry], max_entries: int) -> None:
    if len(out) >= max_entries:
        _room_for(max_entries)


def _room_for(max_entries: int) -> None:
    raise TooManyUrls(f"the job lists more than {max_entries} URLs (BATCHVISION_MAX_URLS_PER_JOB)")


def _id(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ManifestError(f"{where}: id must be a string or an integer")
    text = str(value).strip()
    if len(text) > MAX_ID_LENGTH:
        raise ManifestError(f"{where}: the id is longer than {MAX_ID_LENGTH} characters")
    return text or None


def _columns(value: Any, where: str) -> tuple[tuple[str, Cell], ...]:
    """Pass-through columns checked: at most MAX_COLUMNS, names and values within limits, no
    name of :data:`RESERVED_COLUMNS`."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: columns must be an object of name -> value")
    if len(value) > MAX_COLUMNS:
        raise ManifestError(f"{where}: more than {MAX_COLUMNS} pass-through columns")
    out: list[tuple[str, Cell]] = []
    for name, cell in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_COLUMN_NAME:
            raise ManifestError(f"{where}: column names are 1 to {MAX_COLUMN_NAME} characters")
        if name.strip().lower() in RESERVED_COLUMNS:
            raise ManifestError(
                f"{where}: pass-through column {name!r} has the name of a result column; rename it "
                f"(reserved, in any case: {', '.join(RESERVED_COLUMNS)})"
            )
        if cell is not None and not isinstance(cell, str | int | float | bool):
            raise ManifestError(f"{where}: column {name!r} must be text, a number, a boolean or null")
        if isinstance(cell, str) and len(cell) > MAX_COLUMN_VALUE:
            raise ManifestError(f"{where}: column {name!r} is longer than {MAX_COLUMN_VALUE} characters")
        if isinstance(cell, float) and not math.isfinite(cell):  # 1e400 parses as inf
            raise ManifestError(f"{where}: column {name!r} is {cell}: numbers must be finite")
        out.append((name, cell))
    return tuple(out)


def _entry(
    url: Any,
    filename: Any,
    where: str,
    id_: Any = None,
    columns: Any = None,
) -> UrlEntry:
    if not isinstance(url, str) or not url.strip():
        raise ManifestError(f"{where}: no URL")
    url = url.strip()  # (a URL over MAX_URL_LENGTH is that image's bad_url, not the manifest's)
    if filename is not None and not isinstance(filename, str):
        raise ManifestError(f"{where}: filename must be a string")
    name = (filename or "").strip() or None
    if name is not None and len(name) > MAX_FILENAME_LENGTH:
        raise ManifestError(f"{where}: the filename is longer than {MAX_FILENAME_LENGTH} characters")
    return UrlEntry(url, name, _id(id_, where), _columns(columns, where))


def _csv(text: io.TextIOBase, max_entries: int) -> list[UrlEntry]:
    try:
        reader = csv.reader(_read_lines(text))
        header = next(reader, None)
        if header is None:
            raise ManifestError("the CSV manifest is empty")
        columns = [h.strip().lower() for h in header]
        if "url" not in columns:
            raise ManifestError(f"the CSV manifest has no 'url' column (header: {header[:10]!r})")
        url_col = columns.index("url")
        name_col = columns.index("filename") if "filename" in columns else None
        id_col = columns.index("id") if "id" in columns else None
        # Every other named column is passed through, under its name as written.
        extra = [(n, h.strip()) for n, h in enumerate(header) if n not in (url_col, name_col, id_col)]
        extra = [(n, h) for n, h in extra if h]
        if len(extra) > MAX_COLUMNS:
            raise ManifestError(f"the CSV manifest has more than {MAX_COLUMNS} pass-through columns")
        out: list[UrlEntry] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"line {reader.line_num}"
            if len(row) <= url_col:
                raise ManifestError(f"{where}: no value in the 'url' column")
            _room(out, max_entries)
            name = row[name_col] if name_col is not None and name_col < len(row) else None
            id_ = row[id_col] if id_col is not None and id_col < len(row) else None
            cells = {h: (row[n] if n < len(row) else "") for n, h in extra} if extra else None
            out.append(_entry(row[url_col], name, where, id_, cells))
        return out
    except csv.Error as exc:
        raise ManifestError(f"the CSV manifest cannot be read: {exc}") from exc


def _lines(
    text: io.TextIOBase, max_entries: int, read: Callable[[str, str], UrlEntry | None]
) -> list[UrlEntry]:
    out: list[UrlEntry] = []
    for number, line in enumerate(_read_lines(text), start=1):
        entry = read(line.strip(), f"line {number}")
        if entry is not None:
            _room(out, max_entries)
            out.append(entry)
    return out


def _jsonl_entry(line: str, where: str) -> UrlEntry | None:
    if not line:
        return None
    try:
        item = json.loads(line, parse_constant=_no_constant)
        # A lone surrogate (`"\ud800"`) parses, but no store or URL can take it.
        json.dumps(item, ensure_ascii=False).encode()
    except RecursionError as exc:
        raise ManifestError(f"{where}: nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise ManifestError(
            f"{where}: a string holds a lone surrogate ({exc.object[exc.start : exc.end]!r})"
        ) from exc
    except ValueError as exc:
        raise ManifestError(f"{where}: not JSON ({exc.args[0]})") from exc
    if isinstance(item, str):
        return _entry(item, None, where)
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"url", "filename", "id", "columns"})
        if unknown:
            raise ManifestError(
                f"{where}: unknown field {unknown[0]!r} (allowed: url, filename, id, columns)"
            )
        return _entry(item.get("url"), item.get("filename"), where, item.get("id"), item.get("columns"))
    raise ManifestError(f'{where}: expected a URL string or {{"url": ..., "filename": ..., "id": ...}}')


def _no_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``, which Python's parser takes: not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _uri_entry(line: str, where: str) -> UrlEntry | None:
    if not line or line.startswith("#"):
        return None
    return _entry(line, None, where)
