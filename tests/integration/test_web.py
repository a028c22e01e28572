"""The web page (``GET /``) in a real browser: Debian's Chromium under Playwright, against the
real stack (API, worker, Redis) of the session.

A folder of generated images in nested folders, plus a text file and a truncated JPEG, goes in
through the folder picker and through a real directory drop (Chromium's own drag data, sent
over CDP, so the page's ``webkitGetAsEntry`` walk runs); the tests wait for the job to finish
and compare what the page shows and downloads with what the API returns. Cancel, the recent
jobs after a reload, API keys (401 shown, key kept, a 429 retried after ``Retry-After``) and
phone width are covered too, and the page must never request anything outside its origin.

Screenshots go to ``tests/artifacts/web-*.png`` (a test run never rewrites tracked files; the
ones in ``docs/`` are copies).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Request, Route, sync_playwright

from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.queue import create_celery

pytestmark = pytest.mark.slow

IMAGES = 204
FINAL = ("succeeded", "partial", "failed", "canceled")
KEY = "web-page-key"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def make_folder(root: Path, n: int, seed: int, *, broken: bool = True) -> dict[str, str]:
    """``n`` images spread over nested folders, a text file and (``broken``) a truncated JPEG;
    returns {relative path: true label} of the images."""
    labels = {}
    for i, (name, data, label) in enumerate(labelled_files(n, seed=seed)):
        rel = Path(f"set{i % 3}") / ("deep/er" if i % 4 == 1 else "deep" if i % 4 == 2 else "") / name
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        labels[rel.as_posix()] = label
    (root / "notes.txt").write_text("a text file: skipped in the browser, never uploaded\n")
    if broken:
        _, jpeg, _ = next(labelled_files(1, seed=seed + 1))
        (root / "set1" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("web") / "photos"
    return root, make_folder(root, IMAGES, seed=41)


@pytest.fixture(scope="module")
def keyed_api(stack: Supervisor, settings: Settings) -> Iterator[str]:
    """A second API process of the same stack with API keys on."""
    port = free_port()
    sup = Supervisor(
        [
            Service(
                "api-keyed",
                cli_argv("api", "--host", "127.0.0.1"),
                # The key may ask for priorities up to 3 only: a job that names none gets 3.
                settings.replace(api_port=port, api_keys=KEY, key_max_priority=f"{KEY}=3").to_env(
                    include_secrets=True
                ),
                health_url=f"http://127.0.0.1:{port}/healthz",
            )
        ]
    )
    sup.start()
    try:
        sup.wait_healthy(60)
        yield f"http://127.0.0.1:{port}"
    finally:
        sup.stop()


class Watch:
    """What a page asked for and complained about: every request must stay on the page's
    origin (or be a blob: thumbnail/download), and nothing may throw."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.urls: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (method, URL)
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _request(self, req: Request) -> None:
        self.urls.append(req.url)
        self.calls.append((req.method, req.url))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        # An API answer the page expects and shows (a 401, a 429) is
        # logged by Chromium as a failed resource of /v1: fine. Anything else is a bug.
        url = str(msg.location.get("url", ""))
        if msg.text.startswith("Failed to load resource") and url.startswith(f"{self.origin}/v1/"):
            return
        self.errors.append(f"console: {msg.text} ({url})")

    def check(self) -> None:
        assert not self.errors, self.errors
        outside = [u for u in self.urls if not u.startswith((f"{self.origin}/", "blob:", "data:"))]
        assert not outside, f"requests outside the origin: {outside[:5]}"
        assert not [u for u in self.urls if "/static/" not in u and u.endswith((".jpg", ".png"))], (
            "thumbnails must come from the local files, never from the server"
        )


def open_page(browser: Browser, url: str, **context: Any) -> tuple[BrowserContext, Page, Watch]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True, **context)
    page = ctx.new_page()
    watch = Watch(page, url)
    page.goto(f"{url}/")
    page.wait_for_selector("#dropzone")
    return ctx, page, watch


class Throttle:
    """Slow the page's uploads down with Chromium's network emulation (-1: full speed)."""

    def __init__(self, page: Page) -> None:
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Network.enable")

    def upload(self, bytes_per_s: float) -> None:
        self.cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_s},
        )


def wait_finished(page: Page, timeout_ms: int = 90_000) -> str:
    """Wait until the job on screen is final and every result row is loaded; its status."""
    page.wait_for_function(
        """(final) => {
          const job = document.getElementById('job');
          const bar = document.getElementById('classify-bar');
          const table = document.getElementById('results-table');
          return final.includes(job.dataset.status)
            && table.dataset.loaded === bar.getAttribute('aria-valuemax')
            && document.getElementById('job-status').dataset.status === job.dataset.status;
        }""",
        arg=list(FINAL),
        timeout=timeout_ms,
    )
    return str(page.get_attribute("#job", "data-status"))


def table_rows(page: Page) -> dict[str, dict[str, str]]:
    """Every row of the virtual table, by file name, read from the DOM while scrolling through."""
    rows: dict[str, dict[str, str]] = page.evaluate(
        """async () => {
          const sc = document.getElementById('scroller');
          const frame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
          const seen = {};
          sc.scrollTop = 0;
          for (;;) {
            await frame();
            for (const tr of document.querySelectorAll('#rows tr[data-index]')) {
              const text = (cls) => tr.querySelector(cls).textContent;
              const thumb = tr.querySelector('td.c-thumb canvas');
              seen[text('.fname')] = {
                index: tr.dataset.index, status: tr.dataset.status, label: text('td.c-label'),
                score: text('td.c-score'), error: text('td.c-error'), thumb: thumb ? 'canvas' : '',
              };
            }
            if (sc.scrollTop + sc.clientHeight >= sc.scrollHeight - 1) break;
            sc.scrollTop += sc.clientHeight / 2;
          }
          sc.scrollTop = 0;
          return seen;
        }"""
    )
    return rows


def api_results(url: str, job_id: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    resp = requests.get(f"{url}/v1/jobs/{job_id}/results?format=json", headers=headers or {}, timeout=30)
    resp.raise_for_status()
    results: list[dict[str, Any]] = resp.json()["results"]
    return results


def shown_count(page: Page) -> int:
    return int(page.get_attribute("#results-table", "data-rows") or -1)


def first_score_is(page: Page, score: str) -> None:
    """Wait until the table's first row (redrawn on the next animation frame) shows ``score``."""
    page.wait_for_function(
        "(s) => { const td = document.querySelector('#rows tr[data-index] td.c-score');"
        " return td && td.textContent === s; }",
        arg=score,
        timeout=5_000,
    )


def download(page: Page, button: str) -> str:
    with page.expect_download() as info:
        page.click(button)
    return Path(info.value.path()).read_text()


def drop_folder(page: Page, folder: Path) -> None:
    """Drag ``folder`` from the 'desktop' onto the drop zone: Chromium's own drag data with a
    real path, so ``DataTransferItem.webkitGetAsEntry()`` gives a directory entry."""
    cdp = page.context.new_cdp_session(page)
    box = page.locator("#dropzone").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    data = {"items": [], "files": [str(folder)], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


# ----------------------------------------------------------------------------- tests


def test_page_and_its_files_are_served_without_external_urls(api_url: str) -> None:
    page = requests.get(f"{api_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    static = Path(__file__).resolve().parents[2] / "api" / "static"
    files = sorted(p for p in static.rglob("*") if p.is_file())
    assert {"index.html", "app.css", "main.js", "table.js", "upload.js", "scan.js"} <= {p.name for p in files}
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
    for path in files:
        rel = path.relative_to(static).as_posix()
        resp = requests.get(f"{api_url}/static/{rel}", timeout=10)
        assert resp.status_code == 200, rel
        mime = resp.headers["Content-Type"].split(";")[0]
        assert mime in (types[path.suffix], "application/javascript"), rel
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        text = resp.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, rel


def test_folder_is_uploaded_classified_browsed_and_downloaded(
    browser: Browser,
    api_url: str,
    settings: Settings,
    folder: tuple[Path, dict[str, str]],
    artifacts: Path,
    reference_labels: Callable[..., list[str]],
) -> None:
    root, truth = folder
    ctx, page, watch = open_page(browser, api_url)
    # Slow uploads down (about 2.5 MB here, at 1 MB/s) so the screenshot catches them moving.
    throttle = Throttle(page)
    throttle.upload(1_000_000)
    page.set_input_files("#folder-input", str(root))
    page.wait_for_function(  # the job shown as uploading, its bar (bytes sent) at 40-90%
        """() => {
          const width = parseFloat(document.querySelector('#upload-bar .fill').style.width || '0');
          return width >= 40 && width <= 90
            && document.getElementById('job-status').dataset.status === 'uploading';
        }""",
        timeout=30_000,
    )
    page.screenshot(path=str(artifacts / "web-upload.png"))
    throttle.upload(-1)

    assert wait_finished(page) == "partial"  # the truncated JPEG fails, the rest is classified
    job_id = page.inner_text("#job-id")
    # The status is long-polled: the page learns of the end as the API does, not a second later.
    polls = [u for m, u in watch.calls if m == "GET" and u.split("?")[0].endswith(f"/v1/jobs/{job_id}")]
    assert polls and all(u.endswith("?wait=1") for u in polls), polls[:3]
    api = api_results(api_url, job_id)
    # One row per image: the 204 images and the truncated JPEG (it starts like a JPEG, so the
    # page sends it and the API reports it); the text file never left the browser.
    assert sorted(r["filename"] for r in api) == sorted([*truth, "set1/broken.jpg"])
    assert page.get_attribute("#upload-bar", "aria-valuenow") == str(IMAGES + 1)
    assert page.get_attribute("#classify-bar", "aria-valuenow") == str(IMAGES + 1)
    skipped = page.locator("#skipped-list li")
    assert skipped.count() == 1
    assert skipped.first.get_attribute("data-filename") == "notes.txt"
    assert "notes.txt — skipped: not an image" in skipped.first.inner_text()

    rows = table_rows(page)
    assert len(rows) == len(api) == IMAGES + 1
    for r in api:
        shown = rows[r["filename"]]
        assert shown["index"] == str(r["index"])
        assert shown["thumb"] == "canvas", "a thumbnail, from the local file"
        if r["status"] == "ok":
            assert (shown["label"], shown["score"], shown["error"]) == (r["label"], f"{r['score']:.3f}", "")
        else:
            assert shown["status"] == "error" and shown["label"] == ""
            assert shown["error"] == f"{r['error']['code']}: {r['error']['message']}"
    broken = rows["set1/broken.jpg"]
    assert broken["error"].startswith("truncated: ")
    # The thumbnails in view are drawn, decoded from the local files (no image request left);
    # the truncated JPEG may have none.
    page.wait_for_function(
        "() => { const c = [...document.querySelectorAll('#rows canvas.thumb')];"
        " return c.filter((x) => x.dataset.state === 'drawn').length >= c.length - 1 && c.length > 5; }",
        timeout=10_000,
    )
    # The labels are the demo model's own, image by image (never how well it happened to train).
    names = sorted(truth)
    files = [(name, (root / name).read_bytes()) for name in names]
    assert [rows[name]["label"] for name in names] == reference_labels(Path(settings.model), files)

    # Filters: label, errors, score below a threshold, file name; the counts are the API's.
    page.select_option("#f-label", "circle")
    assert shown_count(page) == sum(r.get("label") == "circle" for r in api)
    page.select_option("#f-label", "")
    page.select_option("#f-status", "error")
    assert shown_count(page) == 1
    assert table_rows(page).keys() == {"set1/broken.jpg"}
    page.click("#rows tr[data-index] button.topk-btn")  # the whole error, also at phone width
    err = next(r["error"] for r in api if r["filename"] == "set1/broken.jpg")
    assert page.inner_text("#topk-error") == f"{err['code']}: {err['message']}"
    page.keyboard.press("Escape")
    page.select_option("#f-status", "")
    page.fill("#f-below", "0.99")
    below = [r for r in api if r["status"] == "ok" and r["score"] < 0.99]
    assert shown_count(page) == len(below)
    page.fill("#f-below", "")
    page.fill("#f-text", "deep/er/")
    page.wait_for_function("() => document.getElementById('results-table').dataset.rows !== '205'")
    assert shown_count(page) == sum("deep/er/" in r["filename"] for r in api)
    page.fill("#f-text", "")
    page.wait_for_function("() => document.getElementById('results-table').dataset.rows === '205'")

    # Sort by score both ways (by header buttons, as a keyboard user would: focus + Enter).
    page.focus("th button[data-sort='score']")
    page.keyboard.press("Enter")
    scores = sorted(r["score"] for r in api if r["status"] == "ok")
    assert page.get_attribute("th:has(button[data-sort='score'])", "aria-sort") == "ascending"
    first_score_is(page, f"{scores[0]:.3f}")
    page.keyboard.press("Enter")
    assert page.get_attribute("th:has(button[data-sort='score'])", "aria-sort") == "descending"
    first_score_is(page, f"{scores[-1]:.3f}")

    # Top-k on demand, in a dialog that Escape closes.
    first = page.locator("#rows tr[data-index]").first
    index = int(first.get_attribute("data-index") or -1)
    first.locator("button.topk-btn").click()
    assert page.locator("#topk-dialog").is_visible()
    assert page.locator("#topk-list li").count() == len(api[index]["top_k"])
    assert page.inner_text("#topk-file") == api[index]["filename"]
    page.keyboard.press("Escape")
    assert not page.locator("#topk-dialog").is_visible()

    # Downloads are the API's own exports, byte for byte.
    csv = requests.get(f"{api_url}/v1/jobs/{job_id}/results?format=csv", timeout=30).text
    assert download(page, "#download-csv") == csv
    jsonl = requests.get(f"{api_url}/v1/jobs/{job_id}/results?format=jsonl", timeout=30).text
    assert download(page, "#download-jsonl") == jsonl

    page.click("th button[data-sort='error']")  # errors first, for the screenshot
    page.evaluate("() => document.getElementById('results').scrollIntoView()")
    page.screenshot(path=str(artifacts / "web-results.png"))
    page.click("th button[data-sort='index']")

    # Phone width: the page reflows to one column; only the table scrolls sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    page.evaluate("() => window.scrollTo(0, document.getElementById('results').offsetTop - 8)")
    page.screenshot(path=str(artifacts / "web-phone.png"))
    assert page.evaluate(
        "() => document.getElementById('results-table').offsetWidth"
        " >= document.getElementById('scroller').clientWidth - 1"
    )
    phone_rows = table_rows(page)  # the same rows, with two-line file cells
    assert len(phone_rows) == IMAGES + 1
    broken_sub = page.evaluate(
        "() => [...document.querySelectorAll('#rows td.c-file')].map((td) => td.innerText)"
        ".find((t) => t.includes('broken.jpg'))"
    )
    assert broken_sub is None or "truncated: " in broken_sub  # error under the name when in view
    page.set_viewport_size({"width": 1280, "height": 900})

    # The recent jobs survive a reload; reopening one shows its status and results (no
    # thumbnails: the files stayed in the page that was closed).
    page.goto(f"{api_url}/")
    item = page.locator(f"#recent li[data-job='{job_id}']")
    assert "partial" in item.inner_text() and "205 images" in item.inner_text()
    assert page.locator("#job").is_hidden()
    item.locator("a").click()
    assert wait_finished(page) == "partial"
    assert page.inner_text("#job-id") == job_id
    assert page.get_attribute("#results-table", "data-loaded") == str(IMAGES + 1)
    assert page.locator("#rows canvas").count() == 0
    assert "Classified 204 of 205 · 1 failed" in page.inner_text("#classify-text")
    assert page.locator("#upload-block").is_hidden()
    assert page.url.endswith(f"#job={job_id}")
    watch.check()
    ctx.close()


def test_cancel_stops_a_job_mid_upload(
    browser: Browser, api_url: str, settings: Settings, folder: tuple[Path, dict[str, str]]
) -> None:
    root, _ = folder
    # The worker stops taking bulk work, so the images sent are still waiting when the page
    # cancels (a cancel after every sent image has its result leaves the job "partial").
    control = create_celery(settings).control
    control.cancel_consumer(settings.queue, reply=True)
    held: list[Route] = []

    def first_part_only(route: Route) -> None:
        """The first part goes through; the others hang (a slow network) until the cancel."""
        held.append(route)
        if len(held) == 1:
            route.continue_()

    try:
        ctx, page, watch = open_page(browser, api_url)
        page.route("**/v1/jobs/*/files", first_part_only)
        page.set_input_files("#folder-input", str(root))
        page.wait_for_function(
            "() => +document.getElementById('upload-bar').getAttribute('aria-valuenow') > 0", timeout=30_000
        )
        # The first part: 63 images and notes.txt (sorted first, read and left out in the browser).
        sent = int(page.get_attribute("#upload-bar", "aria-valuenow") or 0)
        assert sent == 63 and len(held) >= 3  # three parts in flight, then only hanging ones
        job_id = page.inner_text("#job-id")
        page.click("#cancel-job")
        assert wait_finished(page) == "canceled"
    finally:
        control.add_consumer(settings.queue, reply=True)
    job = requests.get(f"{api_url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "canceled"
    assert job["total"] == sent and job["canceled"] == sent  # the rest of the folder was never sent
    assert page.inner_text("#upload-text") == f"Upload canceled after {sent} images."
    assert f"{sent} canceled" in page.inner_text("#classify-text")
    assert page.is_disabled("#cancel-job")
    rows = table_rows(page)
    assert len(rows) == sent and all(r["error"].startswith("canceled: ") for r in rows.values())
    # The parts that were hanging fail (the page aborted them); the job is sealed: no more files.
    page.unroute_all(behavior="ignoreErrors")
    name, data, _ = next(labelled_files(1, seed=45))
    late = requests.post(f"{api_url}/v1/jobs/{job_id}/files", files=[("files", (name, data))], timeout=10)
    assert late.status_code == 409
    assert requests.get(f"{api_url}/v1/jobs/{job_id}", timeout=10).json()["total"] == sent
    assert "canceled" in page.inner_text(f"#recent li[data-job='{job_id}']")
    # The page cancels with POST .../cancel (DELETE now deletes the job).
    assert ("POST", f"{api_url}/v1/jobs/{job_id}/cancel") in watch.calls
    assert not [c for c in watch.calls if c[0] == "DELETE"]
    watch.check()
    ctx.close()


def test_the_page_lists_the_key_s_jobs_from_the_server(browser: Browser, keyed_api: str) -> None:
    # Jobs another client made with the key: a browser that never saw them lists them.
    headers = {"Authorization": f"Bearer {KEY}"}
    made = []
    for seed in (61, 62):
        name, data, _ = next(labelled_files(1, seed=seed))
        resp = requests.post(
            f"{keyed_api}/v1/jobs", files=[("files", (name, data))], headers=headers, timeout=30
        )
        assert resp.status_code == 202, resp.text
        made.append(resp.json()["job_id"])
    ctx, page, watch = open_page(browser, keyed_api)  # a new context: nothing in its storage
    page.wait_for_selector("#key-section:not([hidden])")
    assert page.locator("#recent li").count() == 0  # no key, no list (and no 401 asked for)
    page.fill("#key-input", KEY)
    page.click("#key-form button[type='submit']")
    page.wait_for_selector(f"#recent li[data-job='{made[1]}']")
    listed = page.eval_on_selector_all("#recent li", "els => els.map((e) => e.dataset.job)")
    server = requests.get(f"{keyed_api}/v1/jobs?limit=50", headers=headers, timeout=30).json()["jobs"]
    assert listed == [j["job_id"] for j in server]  # the server's list, newest first
    assert listed.index(made[1]) < listed.index(made[0])
    page.click(f"#recent li[data-job='{made[0]}'] a")
    assert wait_finished(page) == "succeeded"
    page.wait_for_function(
        "(id) => document.querySelector(`#recent li[data-job='${id}']`).innerText.includes('succeeded')",
        arg=made[0],
    )
    assert "1 images" in page.inner_text(f"#recent li[data-job='{made[0]}']")
    watch.check()
    ctx.close()


def test_a_dropped_directory_keeps_its_relative_paths(browser: Browser, api_url: str, tmp_path: Path) -> None:
    root = tmp_path / "dropped"
    truth = make_folder(root, 12, seed=43)
    ctx, page, watch = open_page(browser, api_url)
    drop_folder(page, root)
    assert wait_finished(page) == "partial"
    job_id = page.inner_text("#job-id")
    names = sorted(r["filename"] for r in api_results(api_url, job_id))
    # Relative to the dropped folder, sub-folders kept, as `batchvision submit dropped/` sends them.
    assert names == sorted([*truth, "set1/broken.jpg"])
    assert any(n.startswith("set1/deep/er/") for n in names)
    assert page.get_attribute("#skipped-list li", "data-filename") == "notes.txt"
    assert len(table_rows(page)) == 13
    watch.check()
    ctx.close()


def test_api_keys_401_shown_key_kept_and_429_retried(
    browser: Browser, keyed_api: str, tmp_path: Path
) -> None:
    root = tmp_path / "keyed"
    truth = make_folder(root, 12, seed=47, broken=False)
    ctx, page, watch = open_page(browser, keyed_api)
    # The API wants a key: the page asks for one.
    page.wait_for_selector("#key-section:not([hidden])")
    assert "requires a key" in page.inner_text("#key-help")
    assert page.locator("#key-input").get_attribute("type") == "password"

    # Without a key: the 401 is shown, no job is made.
    page.set_input_files("#folder-input", str(root))
    page.wait_for_selector("#alert:not([hidden])")
    assert "401 unauthorized" in page.inner_text("#alert")
    assert page.locator("#job").is_hidden()
    # A wrong key: 401 again, with the API's reason.
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button[type='submit']")
    page.wait_for_function("() => document.getElementById('alert').textContent.includes('invalid_api_key')")

    page.fill("#key-input", KEY)
    page.click("#key-form button[type='submit']")
    page.wait_for_selector("#alert", state="hidden")

    # The first part is answered 429 with Retry-After: 2 (as the rate limiter answers): the
    # page says so and sends it again after two seconds.
    answered: list[float] = []

    def first_part_limited(route: Route) -> None:
        if not answered:
            answered.append(time.monotonic())
            body = {"error": {"code": "rate_limited", "message": "rate limit of 25 requests per minute"}}
            route.fulfill(
                status=429,
                headers={"Retry-After": "2"},
                content_type="application/json",
                body=json.dumps(body),
            )
        else:
            answered.append(time.monotonic())
            route.continue_()

    page.route("**/v1/jobs/*/files", first_part_limited)
    page.set_input_files("#folder-input", str(root))
    page.wait_for_selector("#notice:not([hidden])")
    text = page.inner_text("#notice")
    assert "Too many requests" in text and "429 rate_limited" in text and "Retrying in" in text
    assert wait_finished(page) == "succeeded"
    assert len(answered) == 2 and answered[1] - answered[0] >= 1.9
    assert page.locator("#notice").is_hidden()
    job_id = page.inner_text("#job-id")
    headers = {"Authorization": f"Bearer {KEY}"}
    # No priority chosen: none asked for, so the key's maximum (3), not a refused 5.
    job = requests.get(f"{keyed_api}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    assert job["priority"] == 3 and "priority 3" in page.inner_text("#job-meta"), job
    api = api_results(keyed_api, job_id, headers)
    assert sorted(r["filename"] for r in api) == sorted(truth)
    assert len(table_rows(page)) == 12
    csv = requests.get(f"{keyed_api}/v1/jobs/{job_id}/results?format=csv", headers=headers, timeout=30).text
    assert download(page, "#download-csv") == csv

    # The key is kept in the browser: after a reload the job reopens with it.
    page.unroute("**/v1/jobs/*/files")
    page.goto(f"{keyed_api}/")
    page.wait_for_selector("#key-section:not([hidden])")
    assert page.input_value("#key-input") == KEY
    page.click(f"#recent li[data-job='{job_id}'] a")
    assert wait_finished(page) == "succeeded"
    assert page.get_attribute("#results-table", "data-loaded") == "12"
    assert page.locator("#alert").is_hidden()
    watch.check()
    ctx.close()


def test_a_job_whose_creation_answer_was_lost_is_not_made_twice(
    browser: Browser, api_url: str, tmp_path: Path
) -> None:
    # A proxy times out after the API made the job (504): the page tries again, with the same
    # Idempotency-Key, and gets that job back instead of opening a second one.
    root = tmp_path / "lost"
    make_folder(root, 3, seed=48, broken=False)
    ctx, page, watch = open_page(browser, api_url)
    made: list[tuple[str, str]] = []  # (Idempotency-Key, job id the API answered)

    def lose_the_first_answer(route: Route) -> None:
        answer = route.fetch()
        made.append((route.request.headers.get("idempotency-key", ""), answer.json()["job_id"]))
        if len(made) == 1:
            body = {"error": {"code": "gateway_timeout", "message": "the upstream did not answer in time"}}
            route.fulfill(status=504, content_type="application/json", body=json.dumps(body))
        else:
            route.fulfill(response=answer)

    page.route(re.compile(r".*/v1/jobs\?priority=\d+$"), lose_the_first_answer)
    page.select_option("#priority-select", "8")  # a chosen priority goes with the job
    page.set_input_files("#folder-input", str(root))
    assert wait_finished(page) == "succeeded"
    assert len(made) == 2 and made[0][0] and made[0] == made[1], made
    assert page.inner_text("#job-id") == made[0][1]
    assert requests.get(f"{api_url}/v1/jobs/{made[0][1]}", timeout=30).json()["priority"] == 8
    assert page.locator("#notice").is_hidden()
    watch.check()
    ctx.close()


def test_a_link_to_an_id_that_is_no_job_stops_polling(browser: Browser, api_url: str) -> None:
    # `#job=ABC` passes the page's pattern; the API answers 400 bad_job_id, which asking
    # again every few seconds cannot change: the page says so and stops.
    ctx, page, watch = open_page(browser, api_url)
    page.goto(f"{api_url}/#job=ABC")
    page.wait_for_function(
        "() => document.getElementById('job-status').textContent === 'bad_job_id'"
        " && document.getElementById('job-status').dataset.status === 'failed'"
    )
    assert "bad_job_id" in page.inner_text("#alert")
    watch.check()
    ctx.close()


def test_controls_are_labelled_and_reachable_by_keyboard(browser: Browser, api_url: str) -> None:
    ctx, page, watch = open_page(browser, api_url)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')].filter((el) => {
          const name = el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
            || (el.labels && el.labels.length) || el.textContent.trim();
          return !name;
        }).map((el) => el.outerHTML)"""
    )
    assert unlabelled == []
    bars = page.locator("[role='progressbar']")
    assert bars.count() == 2
    for i in range(2):
        assert bars.nth(i).get_attribute("aria-labelledby")
    # Tab from the top reaches the folder picker (a real, focusable file input under its label).
    reached = []
    for _ in range(8):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
        if reached[-1] == "folder-input":
            break
    assert "folder-input" in reached, reached
    watch.check()
    ctx.close()


def _finished_job(api_url: str, n: int, seed: int) -> tuple[str, list[str]]:
    """A job of ``n`` images made through the API and run to its end; its id and file names."""
    files = [(name, data) for name, data, _ in labelled_files(n, seed=seed)]
    resp = requests.post(
        f"{api_url}/v1/jobs", files=[("files", (f, d, "image/jpeg")) for f, d in files], timeout=30
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    status = requests.get(f"{api_url}/v1/jobs/{job_id}?wait=60", timeout=90).json()["status"]
    assert status == "succeeded", status
    return job_id, [f for f, _ in files]


def test_a_retry_notice_goes_when_its_request_is_given_up(browser: Browser, api_url: str) -> None:
    # The poll of a job is answered 503 with Retry-After: 10; while the page waits to retry,
    # the user opens another job: the first poll is abandoned, and its "Retrying in" with it.
    first, _ = _finished_job(api_url, 1, seed=61)
    second, _ = _finished_job(api_url, 1, seed=62)
    ctx, page, watch = open_page(browser, api_url)

    def busy(route: Route) -> None:
        body = {"error": {"code": "unavailable", "message": "Redis is restarting"}}
        route.fulfill(
            status=503, headers={"Retry-After": "10"}, content_type="application/json", body=json.dumps(body)
        )

    page.route(re.compile(rf".*/v1/jobs/{first}\?wait=.*"), busy)
    page.goto(f"{api_url}/#job={first}")
    page.wait_for_selector("#notice:not([hidden])")
    assert "Retrying in" in page.inner_text("#notice")
    page.goto(f"{api_url}/#job={second}")
    assert wait_finished(page) == "succeeded"
    page.wait_for_selector("#notice", state="hidden", timeout=5_000)
    watch.check()
    ctx.close()


def test_rows_whose_output_part_is_gone_are_named_and_the_rest_shown(browser: Browser, api_url: str) -> None:
    # A job written to an output prefix in parts whose first part was deleted from the bucket:
    # the API answers 409 results_in_output for its rows, naming the first row it serves again.
    job_id, names = _finished_job(api_url, 4, seed=63)
    ctx, page, watch = open_page(browser, api_url)

    def part_gone(route: Route) -> None:
        body = {
            "error": {
                "code": "results_in_output",
                "message": "part 0 of the job is not in the bucket: read the rows from s3://out/x/",
                "details": [{"in": "query", "field": "offset", "first_served": 2, "output": "s3://out/x/"}],
            }
        }
        route.fulfill(status=409, content_type="application/json", body=json.dumps(body))

    page.route(re.compile(rf".*/v1/jobs/{job_id}/results\?format=json&offset=0&.*"), part_gone)
    page.goto(f"{api_url}/#job={job_id}")
    page.wait_for_function("() => document.getElementById('results-table').dataset.loaded === '2'")
    assert sorted(table_rows(page)) == sorted(names[2:])
    assert "Rows 1 to 2 are not shown" in page.inner_text("#alert")
    assert "results_in_output" in page.inner_text("#alert")
    watch.check()
    ctx.close()


def test_leaving_the_page_mid_upload_is_asked_first(browser: Browser, api_url: str, tmp_path: Path) -> None:
    root = tmp_path / "leaving"
    make_folder(root, 3, seed=64)
    ctx, page, watch = open_page(browser, api_url)
    held: list[Route] = []
    page.route("**/v1/jobs/*/files", lambda route: held.append(route))  # the part hangs: still uploading
    page.click("body")  # browsers ask only on a page the user has touched
    page.set_input_files("#folder-input", str(root))
    page.wait_for_function("() => document.getElementById('upload-bar').dataset.state === 'uploading'")
    with page.expect_event("dialog", timeout=15_000) as asked:
        page.close(run_before_unload=True)
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()  # stay
    watch.check()
    # The held parts are let go: a route left pending outlives the context as a pending task,
    # which the garbage collector may finalise (and log) at any later moment of the run.
    page.unroute_all(behavior="ignoreErrors")
    ctx.close()


def test_a_file_too_large_for_a_request_is_refused_and_the_folder_goes_on(
    browser: Browser, api_url: str, tmp_path: Path
) -> None:
    # Behind a proxy whose body limit is below the part size (the Ingress' proxy-body-size), a
    # file that stands alone in its part is answered 413: that file is refused, not the folder.
    root = tmp_path / "with-a-big-one"
    truth = make_folder(root, 3, seed=65, broken=False)
    big = root / "big.png"
    with big.open("wb") as fh:  # a PNG by its first bytes, over a part's 32 MB: alone in its part
        fh.write(b"\x89PNG\r\n\x1a\n" + bytes(33 * 1024 * 1024))
    ctx, page, watch = open_page(browser, api_url)

    def proxy_limit(route: Route) -> None:
        # (Chromium hands the route the form's part headers, not the files' bytes.)
        if b'filename="big.png"' in (route.request.post_data_buffer or b""):
            body = {"error": {"code": "request_entity_too_large", "message": "over the proxy's 30 MB"}}
            route.fulfill(status=413, content_type="application/json", body=json.dumps(body))
        else:
            route.continue_()

    page.route("**/v1/jobs/*/files", proxy_limit)
    page.set_input_files("#folder-input", str(root))
    assert wait_finished(page) == "succeeded"
    assert sorted(table_rows(page)) == sorted(truth)
    page.wait_for_selector("#skipped li[data-filename='big.png']", state="attached")
    assert "request_entity_too_large" in page.inner_text("#skipped-list")
    watch.check()
    ctx.close()


def test_parts_a_proxy_refuses_as_too_large_go_again_smaller(
    browser: Browser, api_url: str, tmp_path: Path
) -> None:
    # A proxy in front of the API that takes at most 8 files a request (its body limit) and
    # answers 413 in HTML: the page sends the refused part again in smaller parts, and each
    # image arrives once.
    root = tmp_path / "many"
    truth = make_folder(root, 40, seed=67, broken=False)
    ctx, page, watch = open_page(browser, api_url)
    refused: list[int] = []
    passed: list[int] = []

    def proxy_limit(route: Route) -> None:
        files = (route.request.post_data_buffer or b"").count(b'filename="')
        if files > 8:
            refused.append(files)
            route.fulfill(status=413, content_type="text/html", body="<h1>413 Request Entity Too Large</h1>")
        else:
            passed.append(files)
            route.continue_()

    page.route("**/v1/jobs/*/files", proxy_limit)
    page.set_input_files("#folder-input", str(root))
    assert wait_finished(page) == "succeeded"
    assert sorted(table_rows(page)) == sorted(truth)
    assert sum(passed) == 40 and max(passed) <= 8, passed
    # One refusal a halving (40, 20, then 10 files), never one for every piece of every half.
    assert refused == [40, 20, 10], refused
    watch.check()
    ctx.close()


def test_a_final_job_whose_results_keep_failing_is_asked_three_times(browser: Browser, api_url: str) -> None:
    job_id, _ = _finished_job(api_url, 2, seed=66)
    ctx, page, watch = open_page(browser, api_url)
    polls: list[str] = []
    page.on("request", lambda req: polls.append(req.url) if f"/v1/jobs/{job_id}?wait=" in req.url else None)

    def broken(route: Route) -> None:
        # A conflict asking again does not resolve (a 500 would be retried by each request).
        body = {"error": {"code": "results_in_output", "message": "read the rows from s3://out/x/"}}
        route.fulfill(status=409, content_type="application/json", body=json.dumps(body))

    page.route(re.compile(rf".*/v1/jobs/{job_id}/results\?.*"), broken)
    page.goto(f"{api_url}/#job={job_id}")
    page.wait_for_function(
        "() => document.getElementById('alert').textContent.includes('Stopped asking')", timeout=30_000
    )
    assert "results_in_output" in page.inner_text("#alert")
    assert len(polls) == 3, polls
    watch.check()
    ctx.close()


def _open_job(api_url: str, wait_until: Callable[..., Any], images: int = 0, seed: int = 0) -> str:
    """A job opened for an upload in parts, with ``images`` images sent and classified: it runs
    (and the page polls it every second) until it is sealed or canceled."""
    resp = requests.post(f"{api_url}/v1/jobs", json={"expected": images + 2}, timeout=30)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["job_id"]
    for i in range(images):
        _add_image(api_url, job_id, seed + i)

    def classified() -> dict[str, Any] | None:
        job: dict[str, Any] = requests.get(f"{api_url}/v1/jobs/{job_id}?wait=1", timeout=30).json()
        return job if job["done"] >= images else None

    done = wait_until(classified, timeout=60, interval=0, message=f"{images} images classified")
    assert done["status"] not in FINAL, done
    return job_id


def _add_image(api_url: str, job_id: str, seed: int) -> None:
    name, data, _ = next(labelled_files(1, seed=seed))
    name = f"{seed}-{name}"  # (a file sent again under the same name changes nothing)
    resp = requests.post(f"{api_url}/v1/jobs/{job_id}/files", files=[("files", (name, data))], timeout=30)
    assert resp.status_code == 202, resp.text


def _polls_of(page: Page, job_id: str) -> list[float]:
    """When (time.monotonic()) each poll of the job was sent, as the page goes on."""
    sent: list[float] = []
    poll = f"/v1/jobs/{job_id}?wait="
    page.on("request", lambda req: sent.append(time.monotonic()) if poll in req.url else None)
    return sent


def _wait_polls(
    page: Page, polls: list[float], more: int, wait_until: Callable[..., Any], timeout_s: float = 15
) -> None:
    """Wait until ``more`` polls more than now have been sent."""
    want = len(polls) + more

    def sent() -> bool:
        page.wait_for_timeout(50)  # (Playwright's events reach Python while it waits)
        return len(polls) >= want

    wait_until(sent, timeout=timeout_s, interval=0, message=f"{want} polls")


def _set_hidden(page: Page, hidden: bool) -> None:
    """Tell the page its tab was hidden (or shown again), as switching tabs does: a headless
    Chromium's page is never hidden by itself."""
    page.evaluate(
        """(hidden) => {
          const values = { visibilityState: hidden ? 'hidden' : 'visible', hidden };
          for (const [name, value] of Object.entries(values)) {
            Object.defineProperty(document, name, { configurable: true, get: () => value });
          }
          document.dispatchEvent(new Event('visibilitychange'));
        }""",
        hidden,
    )


def test_keyboard_focus_stays_while_a_running_job_is_polled_and_its_results_arrive(
    browser: Browser, api_url: str, wait_until: Callable[..., Any]
) -> None:
    # The job on screen is polled every second and the list of jobs redrawn with it; its rows
    # are redrawn when results arrive. A keyboard user on a link or a Top-k button stays there.
    job_id = _open_job(api_url, wait_until, images=1, seed=67)
    ctx, page, watch = open_page(browser, api_url)
    polls = _polls_of(page, job_id)
    page.goto(f"{api_url}/#job={job_id}")
    page.wait_for_selector("#rows tr[data-index='0'] button.topk-btn")
    focused = (
        "() => { window.focusedBefore = document.activeElement; return document.activeElement.outerHTML; }"
    )
    # true, or where the focus went instead
    kept = """() => (document.activeElement === window.focusedBefore && window.focusedBefore.isConnected)
      || `the focus went to ${document.activeElement.tagName} ${document.activeElement.id}`"""

    page.focus(f"#recent li[data-job='{job_id}'] a")
    assert f'href="#job={job_id}"' in page.evaluate(focused)
    _wait_polls(page, polls, 3, wait_until)  # (the third is sent after the second is answered and drawn)
    assert (focus := page.evaluate(kept)) is True, focus

    page.focus("#rows tr[data-index='0'] button.topk-btn")
    assert "Top " in page.evaluate(focused)
    _add_image(api_url, job_id, seed=68)
    page.wait_for_selector("#rows tr[data-index='1'] button.topk-btn")  # the table was redrawn
    assert (focus := page.evaluate(kept)) is True, focus
    assert page.get_attribute("#job", "data-status") not in FINAL  # still polled
    requests.post(f"{api_url}/v1/jobs/{job_id}/cancel", timeout=10).raise_for_status()
    watch.check()
    ctx.close()


def test_a_hidden_tab_polls_its_job_slowly_unless_it_uploads(
    browser: Browser, api_url: str, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    job_id = _open_job(api_url, wait_until)
    ctx, page, watch = open_page(browser, api_url)
    polls = _polls_of(page, job_id)
    page.goto(f"{api_url}/#job={job_id}")
    _wait_polls(page, polls, 2, wait_until)
    _set_hidden(page, True)
    hidden_at = time.monotonic()
    # Hidden, the page waits HIDDEN_POLL_S (30 s) between polls: none for 6 s but the one that
    # may have been on its way as the tab was hidden.
    while (waited := time.monotonic() - hidden_at) < 6:
        page.wait_for_timeout(100)
        late = [t - hidden_at for t in polls if t > hidden_at]
        assert len(late) <= 1, f"{len(late)} polls in the {waited:.1f} s after the tab was hidden: {late}"
    # Shown again: a poll at once.
    with page.expect_request(lambda req: f"/v1/jobs/{job_id}?wait=" in req.url, timeout=3_000):
        _set_hidden(page, False)
    requests.post(f"{api_url}/v1/jobs/{job_id}/cancel", timeout=10).raise_for_status()

    # A page that uploads is not slowed down, hidden or not.
    root = tmp_path / "hidden"
    make_folder(root, 3, seed=69)
    held: list[Route] = []
    page.route("**/v1/jobs/*/files", lambda route: held.append(route))  # the part hangs: still uploading
    page.set_input_files("#folder-input", str(root))
    page.wait_for_function("() => document.getElementById('upload-bar').dataset.state === 'uploading'")
    page.wait_for_function("() => document.getElementById('job-id').textContent.length > 0")
    uploading = page.inner_text("#job-id")
    polls = _polls_of(page, uploading)
    _set_hidden(page, True)
    _wait_polls(page, polls, 3, wait_until, timeout_s=10)
    assert page.get_attribute("#upload-bar", "data-state") == "uploading"
    requests.post(f"{api_url}/v1/jobs/{uploading}/cancel", timeout=10).raise_for_status()
    watch.check()
    page.unroute_all(behavior="ignoreErrors")
    ctx.close()
