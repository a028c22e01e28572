// The results table: filter and sort over the loaded rows, and a virtual list, so that only
// the rows in view (plus a few) are in the DOM and 10,000 rows scroll as smoothly as 10.
//
// Thumbnails are made from the local File (thumbs.js), never fetched from the server; a job
// reopened without its files (another page, after a reload) has none.

import { placeChildren, setAttr, setText } from "./dom.js";
import { fmtInt } from "./progress.js";
import { THUMB_SIZE, Thumbnails } from "./thumbs.js";

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
    this.thumbs = new Thumbnails();
    this.range = null;
    this.labels = "";
    this.rowH = 0;
    this.frame = 0;
    this.drawn = new Map(); // row index -> its <tr>, while in the DOM
    this.spacers = [spacer(), spacer()]; // above and below the rows drawn
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
    this.thumbs.clear();
    this.tbody.replaceChildren();
    this.drawn = new Map();
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
    // A spacer spanning more columns than are shown (phone width hides some) would add empty ones.
    const cols = [...this.table.tHead.rows[0].cells].filter((th) => th.offsetWidth > 0).length || COLUMNS;
    const [above, below] = this.spacers;
    sizeSpacer(above, first * h, cols);
    sizeSpacer(below, (this.view.length - last) * h, cols);
    // Rows still in view are kept (by index) and changed in place: this runs whenever results
    // arrive, and a rebuilt row would take the focus from its Top-k button.
    const drawn = new Map();
    const nodes = [above];
    for (let i = first; i < last; i++) {
      const row = this.view[i];
      const tr = this.drawn.get(row.index);
      if (tr) this.refreshRow(tr, row, i);
      drawn.set(row.index, tr || this.rowElement(row, i));
      nodes.push(drawn.get(row.index));
    }
    nodes.push(below);
    this.drawn = drawn;
    placeChildren(this.tbody, nodes);
    // The spacers assume every row is `h` tall: measure a real one (borders, zoom, fonts).
    const sample = this.tbody.querySelector("tr:not(.spacer)");
    const real = sample ? sample.getBoundingClientRect().height : 0;
    if (real && Math.abs(real - h) > 0.01) {
      this.rowH = real;
      this.schedule(true);
    }
  }

  rowElement(row, i) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(row.index);
    tr.dataset.status = row.status;
    tr.setAttribute("aria-rowindex", String(i + 2));
    const thumb = document.createElement("td");
    const local = this.files?.get(row.filename);
    if (local) {
      const canvas = document.createElement("canvas");
      canvas.className = "thumb";
      canvas.width = THUMB_SIZE;
      canvas.height = THUMB_SIZE;
      canvas.setAttribute("aria-hidden", "true"); // decorative: the file name is beside it
      thumb.append(canvas);
      this.thumbs.draw(canvas, row.filename, local);
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
    const topk = document.createElement("td");
    topk.className = "c-topk";
    this.fillTopk(topk, row);
    tr.append(
      thumb,
      cell(String(row.index), "c-index"),
      file,
      cell(row.label ?? "", "c-label"),
      cell(scoreText(row), "c-score"),
      topk,
      cell(err, "c-error", err),
    );
    return tr;
  }

  /** Bring a row drawn before up to date (a pending image got its result), changing only what
   * differs; its thumbnail, file name and index stay. */
  refreshRow(tr, row, i) {
    setAttr(tr, "aria-rowindex", String(i + 2));
    setAttr(tr, "data-status", row.status);
    const [, , file, label, score, topk, error] = tr.cells;
    const err = errorText(row);
    setText(file.querySelector(".sub"), err || `${row.label} · ${scoreText(row)}`);
    setText(label, row.label ?? "");
    setText(score, scoreText(row));
    this.fillTopk(topk, row);
    setText(error, err);
    setAttr(error, "title", err || null);
  }

  fillTopk(td, row) {
    const k = row.top_k ? row.top_k.length : 0;
    let b = td.querySelector("button");
    if (!k && !row.error) {
      b?.remove();
      return;
    }
    // Top-k on demand; for a failed image the same dialog shows the whole error message.
    if (!b) {
      b = document.createElement("button");
      b.type = "button";
      b.className = "topk-btn secondary";
      td.append(b);
    }
    setAttr(b, "data-topk", String(row.index));
    setText(b, k ? `Top ${k}` : "Error");
    setAttr(b, "aria-label", k ? `Top ${k} classes of ${row.filename}` : `Error of ${row.filename}`);
  }
}

function cell(text, cls = "", title = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function spacer() {
  const tr = document.createElement("tr");
  tr.className = "spacer";
  tr.setAttribute("aria-hidden", "true");
  tr.append(document.createElement("td"));
  return tr;
}

function sizeSpacer(tr, height, cols) {
  const td = tr.cells[0];
  if (td.colSpan !== cols) td.colSpan = cols;
  if (td.style.height !== `${height}px`) td.style.height = `${height}px`;
}
