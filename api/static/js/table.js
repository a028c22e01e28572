// The results table: filter and sort over the loaded rows, and a virtual list, so that only
// the rows in view (plus a few) are in the DOM and 10,000 rows scroll as smoothly as 10.
//
// Thumbnails come from the local File (an object URL), never from the server; an URL is
// revoked as soon as its row leaves the DOM. A job reopened without its files has none.

import { fmtInt } from "./progress.js";

const OVERSCAN = 8;
const COLUMNS = 7;
const collator = new Intl.Collator("en", { numeric: true, sensitivity: "base" });

export function errorText(row) {
  if (row.status === "pending") return "pending";
  if (row.error) return `${row.error.code}: ${row.error.message}`;
  return "";
}

function scoreText(row) {
  return typeof row.score === "number" ? row.score.toFixed(3) : "";
}

const COMPARE = {
  index: (a, b) => a.index - b.index,
  filename: (a, b) => collator.compare(a.filename, b.filename),
  label: (a, b) => collator.compare(a.label, b.label),
  score: (a, b) => a.score - b.score,
  error: (a, b) => collator.compare(errorText(a), errorText(b)),
};

/** Rows without the sorted value (no label or score, no error) go last in either direction. */
const MISSING = {
  index: () => false,
  filename: () => false,
  label: (r) => !r.label,
  score: (r) => typeof r.score !== "number",
  error: (r) => !errorText(r),
};

export class ResultsTable {
  constructor({ scroller, table, tbody, count, labelSelect, sortSelect, onTopK }) {
    this.scroller = scroller;
    this.table = table;
    this.tbody = tbody;
    this.count = count;
    this.labelSelect = labelSelect;
    this.sortSelect = sortSelect;
    this.onTopK = onTopK;
    this.rows = [];
    this.loaded = 0;
    this.expected = 0;
    this.files = null;
    this.view = [];
    this.sort = { key: "index", dir: 1 };
    this.filter = { label: "", status: "", below: null, text: "" };
    this.urls = new Map(); // filename -> object URL, for rows in the DOM
    this.range = null;
    this.labels = "";
    this.rowH = 0;
    this.frame = 0;
    scroller.addEventListener("scroll", () => this.schedule(), { passive: true });
    new ResizeObserver(() => {
      this.rowH = 0;
      this.schedule(true);
    }).observe(scroller);
    tbody.addEventListener("click", (e) => {
      const btn = e.target.closest("button[data-topk]");
      if (btn) this.onTopK(this.rows[Number(btn.dataset.topk)]);
    });
    for (const btn of table.querySelectorAll("thead button[data-sort]")) {
      btn.addEventListener("click", () => this.sortBy(btn.dataset.sort));
    }
    sortSelect?.addEventListener("change", () => {
      const [key, dir] = sortSelect.value.split(":");
      if (key) this.sortBy(key, Number(dir));
    });
  }

  /** A new job: no rows, thumbnails from `files` (filename -> File) when given. */
  reset(files = null) {
    this.releaseThumbnails();
    this.rows = [];
    this.loaded = 0;
    this.expected = 0;
    this.files = files;
    this.labels = "";
    this.labelSelect.replaceChildren(new Option("All labels", ""));
    this.filter.label = "";
    this.scroller.scrollTop = 0;
    this.update();
  }

  /** Merge result rows (from /results, by their index). */
  merge(rows, expected) {
    for (const row of rows) {
      if (this.rows[row.index] === undefined) this.loaded++;
      this.rows[row.index] = row;
    }
    this.expected = expected;
    this.update();
  }

  setFilter(patch) {
    Object.assign(this.filter, patch);
    this.update();
    this.scroller.scrollTop = 0;
  }

  sortBy(key, dir = this.sort.key === key ? -this.sort.dir : 1) {
    this.sort = { key, dir };
    for (const th of this.table.querySelectorAll("thead th")) {
      const b = th.querySelector("button[data-sort]");
      if (!b) continue;
      const on = b.dataset.sort === key;
      th.setAttribute("aria-sort", on ? (this.sort.dir > 0 ? "ascending" : "descending") : "none");
    }
    if (this.sortSelect) {
      const value = `${key}:${dir}`;
      const known = [...this.sortSelect.options].some((o) => o.value === value);
      this.sortSelect.value = known ? value : "";
    }
    this.update();
  }

  /** Recompute the filtered, sorted view (a few ms for 10,000 rows) and redraw. */
  update() {
    const { label, status, below, text } = this.filter;
    const needle = text.trim().toLowerCase();
    const all = this.rows.filter(Boolean);
    this.view = all.filter(
      (r) =>
        (!label || r.label === label) &&
        (!status || r.status === status) &&
        (below === null || (typeof r.score === "number" && r.score < below)) &&
        (!needle || r.filename.toLowerCase().includes(needle)),
    );
    const cmp = COMPARE[this.sort.key];
    const missing = MISSING[this.sort.key];
    const dir = this.sort.dir;
    this.view.sort((a, b) => {
      const ma = missing(a);
      const mb = missing(b);
      if (ma || mb) return ma === mb ? a.index - b.index : ma ? 1 : -1;
      return dir * cmp(a, b) || a.index - b.index;
    });
    this.refreshLabels(all);
    this.table.setAttribute("aria-rowcount", String(this.view.length + 1));
    this.table.dataset.loaded = String(this.loaded);
    this.table.dataset.rows = String(this.view.length);
    let msg = `Showing ${fmtInt(this.view.length)} of ${fmtInt(all.length)} images`;
    if (this.expected > this.loaded) msg += ` (results loaded: ${fmtInt(this.loaded)} of ${fmtInt(this.expected)})`;
    this.count.textContent = msg;
    this.schedule(true);
  }

  refreshLabels(all) {
    const counts = new Map();
    for (const r of all) if (r.label) counts.set(r.label, (counts.get(r.label) || 0) + 1);
    const names = [...counts.keys()].sort(collator.compare);
    const key = names.map((n) => `${n}:${counts.get(n)}`).join("|");
    if (key === this.labels) return;
    this.labels = key;
    const current = this.labelSelect.value;
    const options = [new Option("All labels", "")];
    for (const n of names) options.push(new Option(`${n} (${fmtInt(counts.get(n))})`, n));
    this.labelSelect.replaceChildren(...options);
    this.labelSelect.value = names.includes(current) ? current : "";
  }

  schedule(force = false) {
    if (force) this.range = null;
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  rowHeight() {
    if (!this.rowH) this.rowH = parseFloat(getComputedStyle(this.scroller).getPropertyValue("--row-h")) || 48;
    return this.rowH;
  }

  render() {
    const h = this.rowHeight();
    const head = this.table.tHead ? this.table.tHead.offsetHeight : 0;
    const top = Math.max(0, this.scroller.scrollTop - head);
    const first = Math.max(0, Math.floor(top / h) - OVERSCAN);
    const last = Math.min(this.view.length, Math.ceil((top + this.scroller.clientHeight) / h) + OVERSCAN);
    if (this.range && this.range[0] === first && this.range[1] === last) return;
    this.range = [first, last];
    const frag = document.createDocumentFragment();
    frag.append(spacer(first * h));
    const keep = new Map();
    for (let i = first; i < last; i++) frag.append(this.rowElement(this.view[i], i, keep));
    frag.append(spacer((this.view.length - last) * h));
    this.tbody.replaceChildren(frag);
    for (const [name, url] of this.urls) if (!keep.has(name)) URL.revokeObjectURL(url);
    this.urls = keep;
    // The spacers assume every row is `h` tall: measure a real one (borders, zoom, fonts).
    const sample = this.tbody.querySelector("tr:not(.spacer)");
    const real = sample ? sample.getBoundingClientRect().height : 0;
    if (real && Math.abs(real - h) > 0.01) {
      this.rowH = real;
      this.schedule(true);
    }
  }

  rowElement(row, i, keep) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(row.index);
    tr.dataset.status = row.status;
    tr.setAttribute("aria-rowindex", String(i + 2));
    const thumb = document.createElement("td");
    const local = this.files?.get(row.filename);
    if (local) {
      let url = keep.get(row.filename) || this.urls.get(row.filename);
      if (!url) url = URL.createObjectURL(local);
      keep.set(row.filename, url);
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";
      img.decoding = "async";
      img.src = url;
      thumb.append(img);
    }
    thumb.className = "c-thumb";
    const err = errorText(row);
    const file = document.createElement("td");
    file.className = "c-file";
    file.title = row.filename;
    const name = document.createElement("span");
    name.className = "fname";
    name.textContent = row.filename;
    const sub = document.createElement("span"); // the next columns, shown on narrow screens
    sub.className = "sub";
    sub.textContent = err || `${row.label} · ${scoreText(row)}`;
    file.append(name, sub);
    tr.append(
      thumb,
      cell(String(row.index), "c-index"),
      file,
      cell(row.label ?? "", "c-label"),
      cell(scoreText(row), "c-score"),
      this.topkCell(row),
      cell(err, "c-error", err),
    );
    return tr;
  }

  topkCell(row) {
    const td = document.createElement("td");
    td.className = "c-topk";
    if (row.top_k && row.top_k.length) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "topk-btn secondary";
      b.dataset.topk = String(row.index);
      b.textContent = `Top ${row.top_k.length}`;
      b.setAttribute("aria-label", `Top ${row.top_k.length} classes of ${row.filename}`);
      td.append(b);
    }
    return td;
  }

  /** Drop every thumbnail URL (when the job view changes). */
  releaseThumbnails() {
    for (const url of this.urls.values()) URL.revokeObjectURL(url);
    this.urls = new Map();
    this.tbody.replaceChildren();
    this.range = null;
  }
}

function cell(text, cls = "", title = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function spacer(height) {
  const tr = document.createElement("tr");
  tr.className = "spacer";
  tr.setAttribute("aria-hidden", "true");
  const td = document.createElement("td");
  td.colSpan = COLUMNS;
  td.style.height = `${height}px`;
  tr.append(td);
  return tr;
}
