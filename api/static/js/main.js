// The page: pick or drop -> scan -> upload in parts -> watch -> browse and download.

import { Api, ApiError, isAbort, sleep } from "./api.js";
import { placeChildren, setAttr, setText } from "./dom.js";
import { Rate, fmtBytes, fmtDuration, fmtInt, setBar } from "./progress.js";
import * as store from "./recent.js";
import { fromDrop, fromInput, normalise } from "./scan.js";
import { ResultsTable } from "./table.js";
import { uploadFolder } from "./upload.js";

const FINAL = new Set(["succeeded", "partial", "failed", "canceled"]);
const POLL_S = 1.0;
// A hidden tab with no upload under way asks about its job at most this often (a tab left
// open all night would otherwise cost the API a request every second); shown, at once again.
const HIDDEN_POLL_S = 30;
// Failed passes in a row after which a final job is no longer polled (its error stays shown).
const FINAL_JOB_TRIES = 3;
const PAGE_RUNNING = 500;
const PAGE_FINAL = 1000;
const JOBS_LISTED = 50;

const $ = (id) => document.getElementById(id);

const state = {
  key: store.apiKey(),
  sessions: new Map(), // job id -> upload started on this page (its files make the thumbnails)
  view: null, // the job on screen
  serverJobs: null, // the key's jobs as GET /v1/jobs listed them last (null: not asked yet)
};

// ---------------------------------------------------------------- messages

let noticeTimer = 0;

function notice(n) {
  const el = $("notice");
  clearInterval(noticeTimer);
  if (!n) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  const what = n.status === 429 ? "Too many requests" : n.status ? "The API is busy" : "Network error";
  const until = Date.now() + n.seconds * 1000;
  const draw = () => {
    const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    el.textContent = `${what} (${n.message}). Retrying in ${left} s…`;
  };
  draw();
  el.dataset.status = String(n.status);
  el.hidden = false;
  noticeTimer = setInterval(draw, 500);
}

function alertMessage(text) {
  const el = $("alert");
  el.textContent = text || "";
  el.hidden = !text;
}

function showError(err, context = "") {
  if (isAbort(err)) return;
  const text = err instanceof ApiError ? err.describe() : String(err?.message || err);
  alertMessage(context ? `${context}: ${text}` : text);
}

// ---------------------------------------------------------------- API key

const api = new Api({
  getKey: () => state.key,
  onNotice: notice,
  onUnauthorized: (err) => {
    showKeySection(true);
    alertMessage(`${err.describe()}. Enter a valid API key.`);
    $("key-input").focus();
  },
});

function showKeySection(required) {
  $("key-section").hidden = false;
  $("key-help").textContent = required
    ? "This API requires a key. It is kept in this browser's storage and sent as “Authorization: Bearer …”."
    : "The key is kept in this browser's storage and sent as “Authorization: Bearer …”.";
  $("key-input").value = state.key;
}

/** Ask the API whether it wants a key and takes the one kept here. `GET /auth` answers 200
 * either way (a 4xx would be logged by the browser as a failed resource). */
async function probeAuth() {
  let answer;
  try {
    answer = await api.request("GET", "/auth", { attempts: 3 });
  } catch (err) {
    showError(err, "The API did not answer");
    return;
  }
  if (answer.keys_required && !answer.key_accepted) {
    const { code, message } = answer.reason || { code: "unauthorized", message: "an API key is required" };
    api.onUnauthorized(new ApiError(401, code, message));
    state.serverJobs = null; // another key's list is not this one's
    renderRecent();
    return;
  }
  if (state.key) showKeySection(false);
  await loadJobs();
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.key = $("key-input").value.trim();
  store.setApiKey(state.key);
  alertMessage("");
  await probeAuth();
  if (state.view && state.view.blocked) openJob(state.view.id);
});

$("key-forget").addEventListener("click", () => {
  state.key = "";
  store.setApiKey("");
  $("key-input").value = "";
  probeAuth();
});

// ---------------------------------------------------------------- picking and dropping

function scanStatus(text) {
  $("scan-status").textContent = text;
}

/** Where a new job is opened: no priority unless one is chosen, so the API's default applies
 * (5, or the key's maximum when that is lower; asking 5 of such a key would be refused). */
function jobsPath(priority) {
  return priority === "" ? "/v1/jobs" : `/v1/jobs?priority=${encodeURIComponent(priority)}`;
}

/** Images of a local upload, as far as known: its files less those found not to be images. */
function expected(s) {
  return s.entries.length - s.notImages - s.refused;
}

async function start(rawEntries) {
  alertMessage("");
  if (!rawEntries.length) {
    scanStatus("Nothing to upload: the selection holds no files.");
    return;
  }
  const { entries, root } = normalise(rawEntries);
  const session = {
    id: null,
    name: root || (entries.length === 1 ? entries[0].path : `${fmtInt(entries.length)} files`),
    entries,
    files: new Map(entries.map((e) => [e.path, e.file])),
    skipped: [], // {filename, code, message}: not images, or refused by the API
    notImages: 0,
    refused: 0,
    sent: { files: 0, bytes: 0, acked: 0 }, // files: fractional, counting parts in flight
    rate: new Rate(), // images per second
    byteRate: new Rate(),
    started: performance.now(),
    finished: 0,
    uploading: false,
    error: "",
    abort: null,
  };
  const jobId = await runUpload(session, entries);
  if (!jobId && !session.error) {
    const names = session.skipped.slice(0, 5).map((r) => r.filename);
    scanStatus(
      `No images: ${fmtInt(entries.length)} file${entries.length === 1 ? "" : "s"} skipped (not an image): ` +
        names.join(", ") +
        (session.skipped.length > names.length ? ", …" : "."),
    );
  }
}

function scanSummary(s) {
  const images = expected(s);
  const skipped = s.notImages ? `${fmtInt(s.notImages)} skipped (not an image)` : "";
  if (s.uploading) {
    // Files are recognised part by part, just before each part is sent.
    scanStatus(`${fmtInt(s.entries.length)} files, read as they are sent${skipped ? `; so far ${skipped}` : ""}.`);
  } else {
    scanStatus(`${fmtInt(s.entries.length)} files: ${fmtInt(images)} image${images === 1 ? "" : "s"}${skipped ? `, ${skipped}` : ""}.`);
  }
}

/** Upload `entries` (all of the session's files, or what a resumed job lacks); the job id. */
async function runUpload(session, entries) {
  session.uploading = true;
  session.error = "";
  session.abort = new AbortController();
  session.started = performance.now();
  session.finished = 0;
  session.rate = new Rate();
  session.byteRate = new Rate();
  const base = { ...session.sent };
  const seen = new Set(session.skipped.map((r) => r.filename));
  const skip = (rows) => {
    const fresh = rows.filter((r) => !seen.has(r.filename));
    fresh.forEach((r) => seen.add(r.filename));
    session.skipped.push(...fresh);
    return fresh.length;
  };
  scanSummary(session);
  renderUpload();
  try {
    const result = await uploadFolder(api, entries, {
      jobId: session.id,
      signal: session.abort.signal,
      createJob: async () =>
        (
          await api.request("POST", jobsPath($("priority-select").value), {
            json: { expected: expected(session) },
            signal: session.abort.signal,
            idempotent: true,
          })
        ).job_id,
      onJob: (id) => {
        session.id = id;
        state.sessions.set(id, session);
        store.saveJob(id, { name: session.name, count: expected(session), status: "uploading" });
        loadJobs(); // the new job joins the list
        history.pushState(null, "", `#job=${id}`);
        openJob(id);
      },
      onSkipped: (found) => {
        const fresh = found.filter((e) => !seen.has(e.path));
        session.notImages += skip(fresh.map((e) => ({ filename: e.path, code: "skipped", message: "not an image" })));
        scanSummary(session);
        if (session.id) store.saveJob(session.id, { skipped: session.skipped, count: expected(session) });
        if (state.view?.session === session) renderSkipped();
      },
      onProgress: (p) => {
        session.sent = {
          files: base.files + p.files,
          bytes: base.bytes + p.bytes,
          acked: base.acked + p.acknowledged,
        };
        session.rate.add(session.sent.files);
        session.byteRate.add(session.sent.bytes);
        renderUpload();
      },
    });
    session.finished = performance.now();
    if (result.refused.length) session.refused += skip(result.refused);
    if (session.id) store.saveJob(session.id, { skipped: session.skipped, count: expected(session) });
    return result.jobId;
  } catch (err) {
    session.error = isAbort(err) ? "canceled" : err instanceof ApiError ? err.describe() : String(err);
    if (!isAbort(err)) showError(err, session.id ? "Upload stopped" : "Could not create the job");
    return session.id;
  } finally {
    session.uploading = false;
    scanSummary(session);
    renderUpload();
    renderSkipped();
    renderActions();
  }
}

/** Send what the job does not have yet (after an upload stopped on an error). */
async function resumeUpload(session) {
  alertMessage("");
  let have;
  try {
    have = new Set((await api.request("GET", `/v1/jobs/${session.id}/files`)).files);
  } catch (err) {
    showError(err, "Could not resume");
    return;
  }
  const skipped = new Set(session.skipped.map((r) => r.filename));
  const todo = session.entries.filter((e) => !have.has(e.path) && !skipped.has(e.path));
  const sent = session.entries.length - todo.length - skipped.size;
  session.sent = { files: sent, bytes: 0, acked: sent }; // bytes: of this run only
  runUpload(session, todo);
}

$("folder-input").addEventListener("change", (e) => {
  const entries = fromInput(e.target.files);
  e.target.value = "";
  start(entries);
});
$("files-input").addEventListener("change", (e) => {
  const entries = fromInput(e.target.files);
  e.target.value = "";
  start(entries);
});

const dropzone = $("dropzone");
let dragDepth = 0;
const carriesFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
document.addEventListener("dragenter", (e) => {
  if (!carriesFiles(e)) return;
  dragDepth++;
  dropzone.classList.add("over");
});
document.addEventListener("dragleave", () => {
  if (--dragDepth <= 0) {
    dragDepth = 0;
    dropzone.classList.remove("over");
  }
});
document.addEventListener("dragover", (e) => {
  if (!carriesFiles(e)) return; // text dragged into a field keeps its default
  e.preventDefault(); // the whole page takes files; the browser must not open them
  if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
});
document.addEventListener("drop", (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  dropzone.classList.remove("over");
  if (!e.dataTransfer) return;
  fromDrop(e.dataTransfer).then(start, (err) => showError(err, "Could not read the dropped files"));
});

// ---------------------------------------------------------------- the job view

const table = new ResultsTable({
  scroller: $("scroller"),
  table: $("results-table"),
  tbody: $("rows"),
  count: $("results-count"),
  labelSelect: $("f-label"),
  sortSelect: $("f-sort"),
  onTopK: showTopK,
});

function openJob(id) {
  if (state.view) {
    state.view.stopped = true;
    state.view.abort.abort();
  }
  const session = state.sessions.get(id) || null;
  const view = {
    id,
    session,
    job: null,
    stopped: false,
    blocked: false,
    abort: new AbortController(),
    rate: new Rate(),
    cursor: 0, // results before this index are loaded and final
    seen: -1, // done + failed + canceled at the last results fetch
  };
  state.view = view;
  if (!store.getJob(id)) store.saveJob(id, { name: id.slice(0, 12), status: "" });
  $("job").hidden = false;
  $("results").hidden = false;
  $("job-id").textContent = id;
  $("job-status").textContent = "loading";
  $("job-status").dataset.status = "";
  $("job-meta").textContent = "";
  $("upload-block").hidden = !session;
  table.reset(session ? session.files : null);
  renderSkipped();
  renderUpload();
  renderClassify();
  renderActions();
  renderRecent();
  poll(view);
}

async function poll(view) {
  const signal = view.abort.signal;
  while (!view.stopped) {
    const started = performance.now();
    try {
      // A long poll: the API answers at once when the job is final, else after POLL_S.
      const job = await api.request("GET", `/v1/jobs/${view.id}?wait=${POLL_S}`, { signal });
      if (view.stopped) return;
      view.blocked = false;
      view.job = job;
      view.rate.add(job.done + job.failed + job.canceled);
      renderClassify();
      renderActions();
      const uploading = view.session?.uploading;
      store.saveJob(view.id, {
        status: uploading && !FINAL.has(job.status) ? "uploading" : job.status,
        count: Math.max(job.total, view.session ? expected(view.session) : 0),
        done: job.done,
        failed: job.failed,
      });
      renderRecent();
      const finished = FINAL.has(job.status) && !uploading;
      if (finished) loadJobs(); // the list shows the final status
      await loadResults(view, finished);
      if (view.failing) alertMessage(""); // the whole pass worked: what failed passes showed is over
      view.failing = 0;
      if (finished) return;
    } catch (err) {
      if (isAbort(err) || view.stopped) return;
      // A refusal asking again cannot change (a 400 for an id that is not a job's, a 404...):
      // stop. Not a 408 or 429 (api.request's retries ran out: later may pass), nor a 409 of
      // the results (the job itself is fine).
      const final = err instanceof ApiError && err.status >= 400 && err.status < 500;
      if (final && ![408, 409, 429].includes(err.status)) {
        view.blocked = true;
        const status = { 401: "unauthorized", 404: "not found", 410: "expired" }[err.status] ?? err.code;
        $("job-status").textContent = status;
        $("job-status").dataset.status = "failed";
        if (err.status !== 401) {
          store.saveJob(view.id, { status });
          renderRecent();
          showError(err, err.status === 404 ? "This job is not visible with the current key" : "");
        }
        return;
      }
      // A final job whose results keep failing: asking every 3 s all night changes nothing
      // (the error stays on screen; choosing the job again asks again).
      view.failing = (view.failing || 0) + 1;
      if (view.job && FINAL.has(view.job.status) && view.failing >= FINAL_JOB_TRIES) {
        showError(err, "Stopped asking for this job's results (open the job again to retry)");
        return;
      }
      showError(err);
      await pause(performance.now(), 3, signal);
      continue;
    }
    // What the long poll did not hold (a job still uploading that has no image left to wait for).
    await pause(started, POLL_S, signal);
  }
}

/** Nobody sees the page and it sends nothing: its job can wait to be asked about. */
function idle() {
  return document.visibilityState === "hidden" && ![...state.sessions.values()].some((s) => s.uploading);
}

/**
 * Wait until `seconds` after `since` (a performance.now()) before the next poll; while the page
 * is idle, until HIDDEN_POLL_S after it, or the moment it is shown again.
 */
async function pause(since, seconds, signal) {
  if (signal.aborted) return;
  const left = (s) => s - (performance.now() - since) / 1000;
  const wake = new AbortController();
  const stop = () => wake.abort();
  const shown = () => {
    if (!idle()) wake.abort();
  };
  signal.addEventListener("abort", stop);
  document.addEventListener("visibilitychange", shown);
  try {
    if (left(seconds) > 0) await sleep(left(seconds), signal);
    // (Checked after the short wait too: the tab may have been hidden during it.)
    if (idle() && left(HIDDEN_POLL_S) > 0) await sleep(left(HIDDEN_POLL_S), wake.signal);
  } catch {
    // the view was closed, or the tab shown again
  } finally {
    signal.removeEventListener("abort", stop);
    document.removeEventListener("visibilitychange", shown);
  }
}

/**
 * While the job runs: one page from the first pending row, when something new has a result.
 * Once it has finished: every page not loaded yet.
 */
async function loadResults(view, finished) {
  const job = view.job;
  const resolved = job.done + job.failed + job.canceled;
  if (!finished && resolved === view.seen) return;
  view.seen = resolved;
  const signal = view.abort.signal;
  const limit = finished ? PAGE_FINAL : PAGE_RUNNING;
  let offset = view.cursor;
  while (offset < job.total) {
    let page;
    try {
      page = await api.request(
        "GET",
        `/v1/jobs/${view.id}/results?format=json&offset=${offset}&limit=${limit}`,
        { signal },
      );
    } catch (err) {
      // A part written to the job's output is gone from the bucket: its rows are only there.
      // Say so, and go on from the first row the API serves again.
      const next = err instanceof ApiError && err.code === "results_in_output" ? err.details?.[0]?.first_served : null;
      if (!(Number.isInteger(next) && next > offset)) throw err;
      showError(err, `Rows ${offset + 1} to ${next} are not shown`);
      view.cursor = offset = next;
      continue;
    }
    if (view.stopped) return;
    const rows = page.results;
    table.merge(rows, job.total);
    const pending = rows.findIndex((r) => r.status === "pending");
    if (pending >= 0) {
      view.cursor = rows[pending].index;
    } else {
      view.cursor = offset + rows.length;
    }
    if (!finished || !rows.length) break;
    offset += rows.length;
  }
}

function renderUpload() {
  const view = state.view;
  const s = view?.session;
  if (!s) return;
  const total = expected(s);
  const elapsed = ((s.finished || performance.now()) - s.started) / 1000;
  let text;
  if (s.uploading) {
    const moving = Math.floor(s.sent.files - s.sent.acked);
    text =
      `Uploaded ${fmtInt(s.sent.acked)} of ${fmtInt(total)} images` +
      (moving > 0 ? ` (about ${fmtInt(moving)} more on the way)` : "") +
      ` · ${fmtBytes(Math.round(s.sent.bytes))} · ${fmtBytes(Math.round(s.byteRate.perSecond()))}/s` +
      ` · ${fmtDuration(s.rate.timeLeft(total))} left`;
  } else if (s.error) {
    text = s.error === "canceled" ? `Upload canceled after ${fmtInt(s.sent.acked)} images.` : `Upload stopped: ${s.error}`;
  } else if (s.finished) {
    text = `Upload complete: ${fmtInt(s.sent.acked)} images, ${fmtBytes(Math.round(s.sent.bytes))} in ${fmtDuration(elapsed)}.`;
  } else {
    text = "Starting the upload…";
  }
  $("upload-text").textContent = text;
  setBar($("upload-bar"), { fractions: [total ? s.sent.files / total : 0], now: s.sent.acked, max: total, text });
  $("upload-bar").dataset.state = s.uploading ? "uploading" : s.error ? "stopped" : s.finished ? "done" : "";
}

function renderClassify() {
  const view = state.view;
  const job = view?.job;
  const bar = $("classify-bar");
  if (!job) {
    $("classify-text").textContent = "Waiting for the job…";
    setBar(bar, { fractions: [0, 0, 0], now: 0, max: 0, text: "waiting" });
    return;
  }
  const uploading = view.session?.uploading;
  const total = Math.max(job.total, uploading ? expected(view.session) : 0);
  const resolved = job.done + job.failed + job.canceled;
  const status = uploading && !FINAL.has(job.status) ? "uploading" : job.status;
  const badge = $("job-status");
  badge.textContent = status;
  badge.dataset.status = status;
  $("job").dataset.status = job.status;
  const created = new Date(job.created_at * 1000);
  $("job-meta").textContent =
    `Created ${created.toLocaleString()} · model ${job.model} · priority ${job.priority ?? 5} · ${fmtInt(total)} images`;
  let text = `Classified ${fmtInt(job.done)} of ${fmtInt(total)}`;
  if (job.failed) text += ` · ${fmtInt(job.failed)} failed`;
  if (job.canceled) text += ` · ${fmtInt(job.canceled)} canceled`;
  if (FINAL.has(job.status) && job.finished_at) {
    const took = Math.max(0.001, job.finished_at - job.created_at);
    text += ` · finished in ${fmtDuration(took)} (${(resolved / took).toFixed(1)} images/s)`;
  } else {
    const rate = view.rate.perSecond();
    text += ` · ${rate.toFixed(1)} images/s · ${fmtDuration(view.rate.timeLeft(total))} left`;
  }
  $("classify-text").textContent = text;
  const f = (n) => (total ? n / total : 0);
  setBar(bar, { fractions: [f(job.done), f(job.failed), f(job.canceled)], now: resolved, max: total, text });
}

function renderActions() {
  const view = state.view;
  const job = view?.job;
  const uploading = view?.session?.uploading;
  $("cancel-job").disabled = !view || view.blocked || (!uploading && (!job || FINAL.has(job.status)));
  $("download-csv").disabled = !job;
  $("download-jsonl").disabled = !job;
  let resume = $("resume-upload");
  const s = view?.session;
  const canResume = s && !s.uploading && s.error && s.error !== "canceled" && job && !FINAL.has(job.status);
  if (canResume && !resume) {
    resume = document.createElement("button");
    resume.type = "button";
    resume.id = "resume-upload";
    resume.textContent = "Resume upload";
    resume.addEventListener("click", () => resumeUpload(state.view.session));
    $("cancel-job").before(resume);
  } else if (!canResume && resume) {
    resume.remove();
  }
}

function renderSkipped() {
  const view = state.view;
  const rows = view?.session?.skipped || store.getJob(view?.id)?.skipped || [];
  const box = $("skipped");
  box.hidden = !rows.length;
  box.open = rows.length > 0 && rows.length <= 10; // a few are shown at once, many on demand
  $("skipped-summary").textContent = `Skipped files (${fmtInt(rows.length)})`;
  const items = rows.map((r) => {
    const li = document.createElement("li");
    li.dataset.filename = r.filename;
    li.textContent = `${r.filename} — ${r.code === "skipped" ? "skipped" : r.code}: ${r.message}`;
    return li;
  });
  $("skipped-list").replaceChildren(...items);
}

$("cancel-job").addEventListener("click", async () => {
  const view = state.view;
  if (!view) return;
  $("cancel-job").disabled = true;
  view.session?.abort?.abort(); // parts in flight stop; the job is sealed by the cancel
  try {
    const job = await api.request("POST", `/v1/jobs/${view.id}/cancel`);
    if (state.view === view) {
      view.job = job;
      renderClassify(); // the poll loop loads the final results on its next turn
    }
  } catch (err) {
    showError(err, "Could not cancel");
  }
  renderActions();
});

async function download(format) {
  const view = state.view;
  if (!view) return;
  try {
    const blob = await api.request("GET", `/v1/jobs/${view.id}/results?format=${format}`, { responseType: "blob" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = `${view.id}.${format}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showError(err, "Download failed");
  }
}
$("download-csv").addEventListener("click", () => download("csv"));
$("download-jsonl").addEventListener("click", () => download("jsonl"));

// ---------------------------------------------------------------- filters and details

let textTimer = 0;
$("f-label").addEventListener("change", (e) => table.setFilter({ label: e.target.value }));
$("f-status").addEventListener("change", (e) => table.setFilter({ status: e.target.value }));
$("f-below").addEventListener("input", (e) => {
  const v = e.target.value === "" ? null : Number(e.target.value);
  table.setFilter({ below: Number.isFinite(v) ? v : null });
});
$("f-text").addEventListener("input", (e) => {
  clearTimeout(textTimer);
  textTimer = setTimeout(() => table.setFilter({ text: e.target.value }), 120);
});
$("filters").addEventListener("submit", (e) => e.preventDefault());

function showTopK(row) {
  if (!row) return;
  $("topk-title").textContent = row.top_k?.length ? `Top ${row.top_k.length}` : "Error";
  $("topk-file").textContent = row.filename;
  const items = (row.top_k || []).map((s) => {
    const li = document.createElement("li");
    li.textContent = `${s.label} — ${s.score.toFixed(4)}`;
    const bar = document.createElement("span");
    bar.className = "score-bar";
    bar.style.width = `${Math.max(1, s.score * 100)}%`;
    bar.setAttribute("aria-hidden", "true");
    li.append(bar);
    return li;
  });
  $("topk-list").replaceChildren(...items);
  $("topk-error").textContent = row.error ? `${row.error.code}: ${row.error.message}` : "";
  $("topk-dialog").showModal();
}

// ---------------------------------------------------------------- your jobs

/** The key's jobs from the server (`GET /v1/jobs`: made from any browser or client), newest
 * first; this browser's records add the names it gave them. Until the server answers (or when
 * it may not be asked: no key yet), this browser's records alone. */
async function loadJobs() {
  try {
    state.serverJobs = (await api.request("GET", `/v1/jobs?limit=${JOBS_LISTED}`, { attempts: 3 })).jobs;
  } catch (err) {
    if (!isAbort(err)) state.serverJobs = null;
  }
  renderRecent();
}

function listedJobs() {
  if (!state.serverJobs) return store.jobs();
  return state.serverJobs.map((job) => {
    const mine = store.getJob(job.job_id);
    // The job on screen is polled every second: its record here is newer than the list.
    const onView = state.view?.id === job.job_id && mine;
    return {
      id: job.job_id,
      name: mine?.name,
      created: job.created_at * 1000,
      count: Math.max(job.total, onView ? mine.count || 0 : 0),
      status: onView ? mine.status : job.status,
    };
  });
}

function renderRecent() {
  const list = listedJobs();
  $("recent-empty").hidden = list.length > 0;
  const box = $("recent");
  // Items are kept by job and changed in place: this runs on every poll of the job on screen,
  // and a rebuilt list would take the focus from the link a keyboard user is on.
  const drawn = new Map([...box.children].map((li) => [li.dataset.job, li]));
  const items = list.map((j) => {
    let li = drawn.get(j.id);
    drawn.delete(j.id); // (a job listed twice gets two items)
    if (!li) {
      li = document.createElement("li");
      li.dataset.job = j.id;
      const meta = document.createElement("span");
      meta.className = "meta";
      li.append(document.createElement("a"), meta);
    }
    const [a, meta] = li.children;
    setAttr(li, "aria-current", state.view?.id === j.id ? "true" : null);
    setAttr(a, "href", `#job=${j.id}`);
    setText(a, j.name || j.id);
    setAttr(a, "title", j.id);
    const when = new Date(j.created || Date.now());
    const text = [j.status || "…", j.count ? `${fmtInt(j.count)} images` : "", when.toLocaleString()]
      .filter(Boolean)
      .join(" · ");
    setText(meta, text);
    return li;
  });
  placeChildren(box, items);
}

function route() {
  const m = /^#job=([A-Za-z0-9_-]+)$/.exec(location.hash);
  if (m && state.view?.id !== m[1]) openJob(m[1]);
}

window.addEventListener("hashchange", route);
window.addEventListener("popstate", route);
// Leaving the page ends its uploads (the files are the page's): the browser asks first.
window.addEventListener("beforeunload", (event) => {
  if ([...state.sessions.values()].some((s) => s.uploading)) event.preventDefault();
});

$("key-input").value = state.key;
renderRecent();
probeAuth().then(route);
