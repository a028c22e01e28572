"""Client subcommands of ``batchvision``: submit (with progress bars), status, jobs, results,
cancel, retry, delete; and the exit codes of every client subcommand."""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import requests
from pydantic import BaseModel, ValidationError
from urllib3.exceptions import MaxRetryError

from batchvision.client import ApiError, Client
from batchvision.client.bulk import scan, submit_folder
from batchvision.client.retry import cause_of
from batchvision.core import manifest
from batchvision.core.documents import Job
from batchvision.core.errors import BatchvisionError
from batchvision.core.job_list import MAX_PAGE
from batchvision.core.priorities import MAX_PRIORITY, MIN_PRIORITY
from batchvision.core.results import JobStatus


class ExitCode(enum.IntEnum):
    """Exit status of the client commands (``submit``, ``status``, ``jobs``, ``results``,
    ``cancel``, ``retry``, ``delete``, ``models``, ``reload``); the service commands use ``USAGE``
    for a refused configuration."""

    #: Done; for ``submit --wait``: every image has a prediction.
    OK = 0
    #: A bad argument (from argparse too), or arguments that do not fit together.
    USAGE = 2
    #: ``submit --wait``: the job ended, but not every image has a prediction.
    SOME_FAILED = 3
    #: ``submit``: the job could not be submitted (the API refused it, or stayed unreachable).
    SUBMIT_FAILED = 4
    #: Any other request (``status``, ``results``, ``cancel``, ``retry``, ``delete``, ``models``,
    #: ``reload``, waiting after a submit) was refused by the API, or the API stayed unreachable.
    REQUEST_FAILED = 5


EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED = ExitCode.OK, ExitCode.USAGE, ExitCode.SOME_FAILED
EXIT_SUBMIT_FAILED, EXIT_REQUEST_FAILED = ExitCode.SUBMIT_FAILED, ExitCode.REQUEST_FAILED
AddFn = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


class UsageError(Exception):
    """A bad argument found after parsing (exit :data:`EXIT_USAGE` with the message)."""


def client_of(args: argparse.Namespace) -> Client:
    """The client of a command's :func:`client_options`. Its retries are logged in one line each
    by the client (urllib3's own warnings, a screenful of class names each, are not shown)."""
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        return Client(args.api_url, args.api_key, retry_for_s=args.retry_for)
    except ValueError as exc:  # an API URL that is not http(s)://
        raise UsageError(str(exc)) from None


#: The results formats the output file's extension names.
OUTPUT_EXTENSIONS = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json"}


def fmt_of(path: Path, explicit: str | None) -> str:
    """Results format from ``--format`` or the output file's extension (checked beforehand by
    :func:`output_refused`)."""
    return explicit or OUTPUT_EXTENSIONS[path.suffix.lower().lstrip(".")]


#: ``-o -``: the results go to standard output.
STDOUT = "-"


def output_refused(args: argparse.Namespace) -> bool:
    """True, having said why, when ``-o`` names a file we cannot write there (a folder that is
    not there or not writable, a folder itself), or whose extension names no format we write
    and ``--format`` does not say one (it would be written as some other format than it says).
    Checked before anything is sent: a submit would otherwise upload and wait first."""
    if not args.output or args.output == STDOUT:
        return False
    out = Path(args.output)
    folder = out.parent
    problem = None
    if out.is_dir():
        problem = "is a folder: name the results file"
    elif not folder.is_dir():
        problem = f"the folder {folder} does not exist"
    elif not os.access(folder, os.W_OK):
        problem = f"the folder {folder} is not writable"
    elif not args.format and out.suffix.lower().lstrip(".") not in OUTPUT_EXTENSIONS:
        problem = (
            f"the results format comes from the file's extension, one of "
            f"{', '.join('.' + e for e in OUTPUT_EXTENSIONS)}; or give --format csv, jsonl or json"
        )
    if problem is None:
        return False
    print(f"error: -o {args.output}: {problem}", file=sys.stderr)
    return True


def cmd_status(args: argparse.Namespace) -> int:
    """Print a job's status document."""
    print(_document(client_of(args).status(args.job_id)))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    """List this API key's jobs, newest first: a page (``--cursor`` for the next), or all."""
    client = client_of(args)
    cursor = args.cursor
    while True:
        page = client.jobs(
            status=args.status,
            created_after=args.created_after,
            created_before=args.created_before,
            limit=args.limit,
            cursor=cursor,
        )
        for job in page.jobs:
            if args.json:
                print(job.model_dump_json())
            else:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
                finished = job.done + job.failed + job.canceled
                print(f"{job.job_id}  {job.status.value:<9}  {finished}/{job.total}  {created}  {job.model}")
        cursor = page.next_cursor
        if cursor is None or not args.all:
            break
    if cursor is not None:
        print(f"more: --cursor {cursor}", file=sys.stderr)
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    """Write a job's results (format from the extension, or --format); stdout without -o."""
    if output_refused(args):
        return EXIT_USAGE
    client = client_of(args)
    job = client.status(args.job_id)
    if not job.final:  # rows so far: say so, or they pass for the job's results
        have = job.done + job.failed + job.canceled
        print(
            f"note: job {job.job_id} is {job.status.value} ({have} of {job.total} images have a "
            "result): these are the results so far; `batchvision status` tells when it ends",
            file=sys.stderr,
        )
    write_results(client, args.job_id, args.output, args.format)
    return EXIT_OK


def write_results(client: Client, job_id: str, output: str | None, fmt: str | None) -> None:
    """The job's results into the file ``output`` (its format from the extension, or ``fmt``),
    or to standard output (``output`` ``None`` or ``-``: ``fmt``, JSONL by default)."""
    if output and output != STDOUT:
        out = Path(output)
        client.download(job_id, out, fmt_of(out, fmt))
        print(f"wrote {out}", file=sys.stderr)
    elif fmt in (None, "jsonl"):
        for row in client.iter_results(job_id):
            print(row.model_dump_json(exclude_unset=True))
    else:  # the API's rendering (CSV, one JSON document), whole: a retried stream is not repeated
        with tempfile.TemporaryDirectory(prefix="batchvision-") as tmp:
            out = Path(tmp) / f"results.{fmt}"
            client.download(job_id, out, fmt)
            with out.open("rb") as fh:
                shutil.copyfileobj(fh, sys.stdout.buffer)
            sys.stdout.buffer.flush()


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel what a job has not classified yet."""
    print(_document(client_of(args).cancel(args.job_id)))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue again the images of a finished job whose errors are retryable."""
    print(_document(client_of(args).retry(args.job_id)))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a job: cancel what is queued, remove the job, its results and its uploads."""
    client_of(args).delete(args.job_id)
    print(f"deleted {args.job_id}", file=sys.stderr)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Upload folders/files as one job; with --wait, wait and write the results."""
    from tqdm import tqdm

    client = client_of(args)
    if args.output and not args.wait:
        print(
            "error: -o/--output writes the results once the job is done: add --wait, or fetch "
            "them later with `batchvision results JOB_ID -o FILE`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if output_refused(args):  # before the upload, not after the wait
        return EXIT_USAGE
    if args.urls is not None:  # images named by URL, fetched by the workers
        if args.paths or args.resume:
            print("error: --urls takes no folders or --resume", file=sys.stderr)
            return EXIT_USAGE
        try:
            entries = manifest.read_file(args.urls)
        except (BatchvisionError, OSError) as exc:
            print(f"error: {args.urls}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        start = time.monotonic()
        # Whole entries: their ids and pass-through columns come back beside the predictions.
        job = client.submit_urls(entries, callback_url=args.callback_url, **job_options(args))
        for item in job.rejected:
            print(f"refused: {item.filename}: {item.code}: {item.message}", file=sys.stderr)
        print(f"submitted {len(entries)} URLs", file=sys.stderr)
        print(job.job_id, file=_id_stream(args))
        return _wait_and_write(client, args, job.job_id, len(entries), start) if args.wait else EXIT_OK
    if not args.paths:
        print("error: give folders or files to upload, or --urls MANIFEST", file=sys.stderr)
        return EXIT_USAGE
    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = scan(paths)  # read once: it is what submit_folder sends
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    total = len(found.images)
    if not total and not args.resume:
        skipped = f" ({len(found.skipped)} files that are not images)" if found.skipped else ""
        print(f"error: no image files in {', '.join(map(str, paths))}{skipped}", file=sys.stderr)
        return EXIT_USAGE
    # The job is opened with its callback and options, then filled.
    options = {**job_options(args), **({"callback_url": args.callback_url} if args.callback_url else {})}
    if args.resume and options:
        given = ", ".join(_flags(options))
        print(f"error: --resume continues a job as it was opened: {given} cannot change it", file=sys.stderr)
        return EXIT_USAGE
    quiet = args.no_progress
    start = time.monotonic()
    opened: list[str] = []

    def announce(job_id: str) -> None:
        # At once, before any part: an upload that stops half-way (^C, an outage) can then be
        # finished with --resume.
        opened.append(job_id)
        print(job_id, flush=True, file=_id_stream(args))

    try:
        with tqdm(total=total, desc="upload", unit="img", disable=quiet, file=sys.stderr) as bar:
            summary = submit_folder(
                client,
                found,
                part_files=args.part_files,
                part_bytes=int(args.part_mb * 1024 * 1024),
                resume=args.resume,
                on_part=bar.update,
                on_open=announce,
                options=options,
            )
    except BaseException as exc:
        if opened and isinstance(exc, ApiError) and exc.status in (404, 409, 410):
            # Canceled, sealed, deleted or expired meanwhile: --resume would meet the same answer.
            print(f"the upload stopped: job {opened[0]} takes no more files ({exc.code})", file=sys.stderr)
        elif opened:
            kept = f" and without {', '.join(_flags(options))} (the job keeps them)" if options else ""
            print(f"the upload stopped: finish it with --resume {opened[0]}{kept}", file=sys.stderr)
        raise
    job_id = summary.job_id
    for rel in summary.skipped:
        print(f"skipped (not an image): {rel}", file=sys.stderr)
    for item in summary.rejected:
        print(f"refused: {item.filename}: {item.code}: {item.message}", file=sys.stderr)
    sealed = summary.sealed
    meanwhile = (
        f" ({sealed.done} classified, {sealed.failed} with an error so far)"
        if sealed and sealed.done + sealed.failed
        else ""
    )
    print(f"uploaded {summary.sent} images in {time.monotonic() - start:.1f}s{meanwhile}", file=sys.stderr)
    return _wait_and_write(client, args, job_id, total, start) if args.wait else EXIT_OK


def _flags(options: dict[str, Any]) -> list[str]:
    """The command-line flags of per-job ``options`` (``top_k`` -> ``--top-k``)."""
    return [f"--{k.replace('_', '-')}" for k in options]


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--model``, ``--top-k``, ``--min-score``, ``--priority`` as the client's per-job options."""
    given = {"model": args.model, "top_k": args.top_k, "min_score": args.min_score, "priority": args.priority}
    return {k: v for k, v in given.items() if v is not None}


def _id_stream(args: argparse.Namespace) -> TextIO:
    """Where submit prints the job id: standard output, or standard error when the results go
    there (``-o -``), so that standard output is the results alone."""
    return sys.stderr if args.output == STDOUT else sys.stdout


def _wait_and_write(client: Client, args: argparse.Namespace, job_id: str, total: int, start: float) -> int:
    """``--wait``: a progress bar until the job is final, then the results file (``-o``). The job
    is submitted by now: a failure from here on is EXIT_REQUEST_FAILED, not EXIT_SUBMIT_FAILED."""
    return _request_failed_on_error(lambda: _wait_and_write_unguarded(client, args, job_id, total, start))


def _wait_and_write_unguarded(
    client: Client, args: argparse.Namespace, job_id: str, total: int, start: float
) -> int:
    from tqdm import tqdm

    quiet = args.no_progress
    with tqdm(total=total, desc="classify", unit="img", disable=quiet, file=sys.stderr) as bar:

        def progress(st: Job) -> None:
            bar.total = st.total
            bar.update(st.done + st.failed + st.canceled - bar.n)

        status = client.wait(job_id, on_progress=progress)
    if args.output:
        write_results(client, job_id, args.output, args.format)
    print(
        f"{status.status}: {status.done} classified, {status.failed} failed "
        f"in {time.monotonic() - start:.1f}s",
        file=sys.stderr,
    )
    return exit_code(status)


def _request_failed_on_error(call: Callable[[], int], failed: int = EXIT_REQUEST_FAILED) -> int:
    """``call()``, with an API or connection error turned into a message and ``failed``."""
    try:
        return call()
    except ApiError as exc:
        print(f"error: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        for line in detail_lines(exc.details):
            print(f"  {line}", file=sys.stderr)
        if exc.status == 401:  # the API speaks of headers; here the key is an option
            print("  the CLI sends the key given by --api-key or BATCHVISION_API_KEY", file=sys.stderr)
    except requests.RequestException as exc:
        print(f"error: cannot reach the API: {_unreachable(exc)}", file=sys.stderr)
    except ValidationError as exc:  # a JSON answer of another shape: another version of the API
        errors = exc.errors()
        what = f"{'.'.join(str(p) for p in errors[0]['loc'])}: {errors[0]['msg']}" if errors else str(exc)
        print(
            f"error: the API's answer does not fit this client ({what}): "
            "are the client and the server of the same version?",
            file=sys.stderr,
        )
    except BrokenPipeError:
        raise  # not a file of ours: the reader of stdout went away (see guarded)
    except OSError as exc:  # a local file: one that cannot be read, or a folder that is not there
        print(f"error: {exc}", file=sys.stderr)
    return failed


def _unreachable(exc: requests.RequestException) -> str:
    """Where and why a request found no API, in a line (requests and urllib3 nest their
    exceptions and name their classes and connection pools)."""
    inner = exc.args[0] if exc.args else None
    url = exc.request.url if exc.request is not None else None
    if isinstance(inner, MaxRetryError):
        return f"{url}: {cause_of(inner.reason, None)}"
    return f"{url}: {exc}" if url else str(exc)


#: The per-item reasons of an error printed at most (the rest are counted).
MAX_DETAILS = 10


def detail_lines(details: Any) -> list[str]:
    """An API error's ``details`` as lines a person reads: each item's name (file, URL, field)
    and reason, at most :data:`MAX_DETAILS` of them."""
    if not isinstance(details, list):
        return []
    lines = []
    for item in details[:MAX_DETAILS]:
        if isinstance(item, dict):
            name = next((str(item[k]) for k in ("filename", "url", "field", "job_id") if item.get(k)), "")
            why = item.get("message") or item.get("reason") or item.get("code")
            if not why:  # only what the message names already (a field's value, a job id)
                continue
            code = item.get("code")
            text = f"{why} ({code})" if code and code != why else str(why)
            lines.append(f"{name}: {text}" if name else text)
        else:
            lines.append(str(item))
    if len(details) > MAX_DETAILS:
        lines.append(f"... and {len(details) - MAX_DETAILS} more")
    return lines


def exit_code(status: Job) -> int:
    """0 when every image has a prediction, EXIT_SOME_FAILED otherwise."""
    return EXIT_OK if status.status == JobStatus.SUCCEEDED else EXIT_SOME_FAILED


def _document(doc: BaseModel) -> str:
    """A response document as the API sent it (fields it left out stay out), indented."""
    return json.dumps(doc.model_dump(mode="json", exclude_unset=True), indent=2)


def _number(
    kind: type[float] | type[int], least: float, above: bool = False, most: float | None = None
) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` at least ``least`` (``above``: more than it) and at
    most ``most``."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if (
            not math.isfinite(value)
            or value < least
            or (above and value == least)
            or (most is not None and value > most)
        ):
            bound = f"above {least:g}" if above else f"at least {least:g}"
            if most is not None:
                bound = f"from {least:g} to {most:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: give a {kind.__name__} {bound}")
        return value

    return parse


def client_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--api-url``, ``--api-key`` and ``--retry-for``: every client command's (see :func:`client_of`)."""
    p.add_argument("--api-url", help="default: $BATCHVISION_API_URL or http://127.0.0.1:8000")
    p.add_argument("--api-key", help="default: $BATCHVISION_API_KEY")
    p.add_argument(
        "--retry-for",
        type=_number(float, 0),
        default=120.0,
        metavar="SECONDS",
        help="retry each request through connection errors, 429 and 502-504 this long (default 120)",
    )
    return p


def register(sub: Any, add: AddFn) -> None:
    """Add the client subcommands to the ``batchvision`` parser."""
    p = client_options(
        add("submit", guarded(cmd_submit, EXIT_SUBMIT_FAILED), "upload a folder or files as one job")
    )
    p.add_argument("paths", nargs="*", help="folders (walked recursively) and image files")
    p.add_argument(
        "--urls",
        metavar="MANIFEST",
        help="submit the images a manifest names by URL instead (.csv with a url column and an "
        "optional filename column, .jsonl, or .txt with one URL a line); the workers fetch them",
    )
    p.add_argument("--callback-url", help="URL that gets one signed POST when the job is final")
    # Per-job options; the service checks them (422 names what is allowed).
    p.add_argument("--model", help="model name, or NAME:VERSION (default: the service's default model)")
    # What does not depend on the model is checked here already (a usage error, exit 2).
    p.add_argument(
        "--top-k", type=_number(int, 1), help="classes each result lists (1 to the model's classes)"
    )
    p.add_argument(
        "--min-score",
        type=_number(float, 0, most=1),
        help="leave classes scoring below this out of top_k (0 to 1)",
    )
    p.add_argument(
        "--priority",
        type=_number(int, MIN_PRIORITY, most=MAX_PRIORITY),
        help="0 (lowest) to 9 (highest), default 5: higher priorities are served first, lower "
        "ones keep moving (at most the API key's maximum)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the end and write the results")
    p.add_argument(
        "-o",
        "--output",
        help="results file (needs --wait): .csv, .jsonl or .json; -: standard output (the job id "
        "then goes to standard error)",
    )
    p.add_argument("--format", choices=["csv", "jsonl", "json"])
    p.add_argument("--part-files", type=_number(int, 1), default=64, help="most files per upload request")
    p.add_argument(
        "--part-mb",
        type=_number(float, 0, above=True),
        default=32.0,
        help="most megabytes per upload request",
    )
    p.add_argument("--resume", metavar="JOB_ID", help="continue an interrupted upload to this job")
    p.add_argument("--no-progress", action="store_true")
    p = client_options(add("status", guarded(cmd_status, reads=True), "show a job's status"))
    p.add_argument("job_id")
    p = client_options(add("jobs", guarded(cmd_jobs, reads=True), "list this API key's jobs, newest first"))
    p.add_argument("--status", choices=[s.value for s in JobStatus])
    p.add_argument("--created-after", type=float, metavar="UNIX_TIME")
    p.add_argument("--created-before", type=float, metavar="UNIX_TIME")
    p.add_argument(
        "--limit", type=_number(int, 1, most=MAX_PAGE), help=f"jobs a page (1 to {MAX_PAGE}; default 20)"
    )
    p.add_argument("--cursor", help="the page after the one that printed it")
    p.add_argument("--all", action="store_true", help="every page")
    p.add_argument("--json", action="store_true", help="one job document a line")
    p = client_options(add("results", guarded(cmd_results, reads=True), "fetch a job's results"))
    p.add_argument("job_id")
    p.add_argument(
        "-o", "--output", help="results file: .csv, .jsonl or .json (default, or -: standard output)"
    )
    p.add_argument("--format", choices=["csv", "jsonl", "json"])
    p = client_options(add("cancel", guarded(cmd_cancel), "cancel what a job has not classified yet"))
    p.add_argument("job_id")
    p = client_options(
        add("retry", guarded(cmd_retry), "queue again a finished job's images with retryable errors")
    )
    p.add_argument("job_id")
    p = client_options(add("delete", guarded(cmd_delete), "delete a job, its results and its uploads"))
    p.add_argument("job_id")


def guarded(
    fn: Callable[[argparse.Namespace], int], failed: int = EXIT_REQUEST_FAILED, *, reads: bool = False
) -> Callable[[argparse.Namespace], int]:
    """Turn API and connection errors into a message and ``failed`` (EXIT_REQUEST_FAILED, or
    EXIT_SUBMIT_FAILED for ``submit``). ``reads``: a command whose product is what it prints,
    so a reader that stops early (``| head``) ends it well."""

    def run(args: argparse.Namespace) -> int:
        try:
            return _request_failed_on_error(lambda: fn(args), failed)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:
            # The reader of our output went away. Python would complain again flushing stdout
            # at exit: point it at nothing. For a reading command, what was read was right; a
            # command that changes something (an upload) did not finish.
            with contextlib.suppress(OSError, ValueError):  # a stdout without a file (tests)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK if reads else failed

    run.__doc__ = fn.__doc__
    return run
