// Progress bars (ARIA progressbar) and a rate / time-left estimate over a sliding window.

const nf = new Intl.NumberFormat("en");

export function fmtInt(n) {
  return nf.format(n);
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}

export function fmtDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  if (seconds < 1) return "< 1 s";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

/** Rate of a growing count over the last `windowS` seconds. */
export class Rate {
  constructor(windowS = 8) {
    this.windowS = windowS;
    this.samples = [];
  }

  add(value, t = performance.now() / 1000) {
    this.samples.push([t, value]);
    while (this.samples.length > 2 && t - this.samples[0][0] > this.windowS) this.samples.shift();
  }

  /** Units per second, or 0 before two samples a little apart. */
  perSecond() {
    if (this.samples.length < 2) return 0;
    const [t0, v0] = this.samples[0];
    const [t1, v1] = this.samples[this.samples.length - 1];
    return t1 - t0 >= 0.25 ? Math.max(0, (v1 - v0) / (t1 - t0)) : 0;
  }

  /** Seconds until `total` at the current rate (Infinity when it is not moving). */
  timeLeft(total) {
    const rate = this.perSecond();
    const last = this.samples.length ? this.samples[this.samples.length - 1][1] : 0;
    return rate > 0 ? Math.max(0, total - last) / rate : Infinity;
  }
}

/**
 * Set a progress bar: `fractions` (0..1) are the widths of its .fill children; aria-valuenow
 * and aria-valuemax are `now` and `max` (counts of files or images), aria-valuetext `text`.
 */
export function setBar(bar, { fractions, now, max, text }) {
  const fills = bar.querySelectorAll(".fill");
  fractions.forEach((f, i) => {
    if (fills[i]) fills[i].style.width = `${Math.max(0, Math.min(1, f || 0)) * 100}%`;
  });
  bar.setAttribute("aria-valuemax", String(max));
  bar.setAttribute("aria-valuenow", String(Math.min(now, max)));
  bar.setAttribute("aria-valuetext", text);
}
