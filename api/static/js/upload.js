// Upload a folder in parts through the parts API, as the CLI does (batchvision/client/bulk.py):
// POST /v1/jobs {"expected": N} -> POST /v1/jobs/<id>/files (parts) -> POST /v1/jobs/<id>/seal.
// Re-sending a part is idempotent on the server (files are keyed by relative path), so a
// retried part never duplicates an image.
//
// Each part's files are recognised (first bytes) just before the part is sent, so reading
// 10,000 file headers (about 1 ms each in Chromium) overlaps the upload instead of delaying it.
// The job is created when the first image is found: a folder without images makes no job.

import { ApiError } from "./api.js";
import { sniff } from "./scan.js";

export const PART_FILES = 64;
export const PART_BYTES = 32 * 1024 * 1024;
export const IN_FLIGHT = 3;

/** Group entries {path, file} into parts bounded by count and bytes (one big file stands alone). */
export function makeParts(entries, maxFiles = PART_FILES, maxBytes = PART_BYTES) {
  const parts = [];
  let part = [];
  let size = 0;
  for (const e of entries) {
    const n = e.file.size;
    if (part.length && (part.length >= maxFiles || size + n > maxBytes)) {
      parts.push(part);
      part = [];
      size = 0;
    }
    part.push(e);
    size += n;
  }
  if (part.length) parts.push(part);
  return parts;
}

const bytesOf = (entries) => entries.reduce((n, e) => n + e.file.size, 0);

/**
 * Send the images among `entries` to a job, at most `inFlight` parts at once, then seal it.
 *
 * `jobId`: an existing job (resume), else `createJob()` makes one when the first image is
 * found and `onJob(id)` is told. `onSkipped(entries)`: files that are not images.
 * `onProgress({files, bytes})`: images the server acknowledged, plus bytes of parts in flight.
 * Resolves to {jobId (null if there was no image), rejected, refused}: files the API took as
 * per-image errors, and files of parts it refused whole (422: no usable image), with reasons.
 */
export async function uploadFolder(api, entries, opts = {}) {
  const { createJob, onJob = () => {}, onSkipped = () => {}, onProgress = () => {}, signal } = opts;
  const inFlight = opts.inFlight ?? IN_FLIGHT;
  const parts = makeParts(entries);
  const local = new AbortController();
  const stop = () => local.abort();
  signal?.addEventListener("abort", stop, { once: true });
  let job = opts.jobId ? Promise.resolve(opts.jobId) : null;
  const ensureJob = () => {
    job ??= createJob().then((id) => {
      onJob(id);
      return id;
    });
    return job;
  };
  const rejected = [];
  const refused = [];
  let doneFiles = 0;
  let doneBytes = 0;
  const moving = new Map(); // part number -> bytes sent so far
  const report = () => {
    let bytes = doneBytes;
    for (const b of moving.values()) bytes += b;
    onProgress({ files: doneFiles, bytes });
  };
  // A part's files are read while the parts before it upload: up to `inFlight` parts ahead.
  const sniffed = new Map();
  const sniffPart = (n) => {
    if (n < parts.length && !sniffed.has(n)) sniffed.set(n, sniff(parts[n], { concurrency: 16 }));
    return sniffed.get(n);
  };
  let next = 0;
  async function worker() {
    while (next < parts.length && !local.signal.aborted) {
      const n = next++;
      const found = sniffPart(n);
      for (let k = 0; k < inFlight; k++) sniffPart(next + k); // parts no worker has taken yet
      const { images, skipped } = await found;
      sniffed.delete(n);
      if (local.signal.aborted) break;
      if (skipped.length) onSkipped(skipped);
      if (!images.length) continue;
      const jobId = await ensureJob();
      const bytes = bytesOf(images);
      const form = new FormData();
      for (const e of images) form.append("files", e.file, e.path);
      moving.set(n, 0);
      try {
        const body = await api.request("POST", `/v1/jobs/${jobId}/files`, {
          form,
          signal: local.signal,
          // Multipart overhead makes `total` a little larger than the files: scale to them.
          onUploadProgress: (loaded, total) => {
            moving.set(n, total ? (bytes * loaded) / total : 0);
            report();
          },
        });
        rejected.push(...(body?.rejected || []));
      } catch (err) {
        if (err instanceof ApiError && err.status === 422 && /^no_(valid_)?images$/.test(err.code)) {
          for (const d of Array.isArray(err.details) ? err.details : []) {
            refused.push({ filename: d.filename, code: d.code, message: d.message });
          }
        } else {
          throw err;
        }
      } finally {
        moving.delete(n);
      }
      doneFiles += images.length;
      doneBytes += bytes;
      report();
    }
  }
  const workers = Array.from({ length: Math.min(inFlight, parts.length) }, () =>
    worker().catch((err) => {
      local.abort(); // the first failure stops the other parts
      throw err;
    }),
  );
  try {
    // Promise.all rejects with the first failure (the others then fail with AbortError).
    await Promise.all(workers);
  } finally {
    signal?.removeEventListener("abort", stop);
  }
  if (signal?.aborted) throw new DOMException("aborted", "AbortError");
  if (!job) return { jobId: null, rejected, refused };
  const jobId = await job;
  await api.request("POST", `/v1/jobs/${jobId}/seal`, { signal });
  return { jobId, rejected, refused };
}
