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

/**
 * Parts of `entries` bounded by count and bytes (one big file stands alone), formed lazily:
 * for a picked folder each `file.size` is a synchronous metadata lookup in Chromium, about
 * 0.15 ms, so sizing 10,000 files up front would freeze the page for seconds. Each part is
 * bounded by `limit` as it is when the part is formed (`refused` lowers it).
 */
export function partsOf(entries, limit = { files: PART_FILES, bytes: PART_BYTES }) {
  let i = 0;
  return {
    limit,
    get done() {
      return i >= entries.length;
    },
    /** A part of `files` files and `bytes` bytes was refused as too large: at most half. */
    refused(files, bytes) {
      limit.files = Math.max(1, Math.min(limit.files, Math.floor(files / 2)));
      limit.bytes = Math.max(1, Math.min(limit.bytes, Math.floor(bytes / 2)));
    },
    next() {
      const part = [];
      let size = 0;
      while (i < entries.length) {
        const n = entries[i].file.size;
        if (part.length && (part.length >= limit.files || size + n > limit.bytes)) break;
        part.push(entries[i++]);
        size += n;
      }
      return part;
    },
  };
}

const bytesOf = (entries) => entries.reduce((n, e) => n + e.file.size, 0);

/**
 * Send the images among `entries` to a job, at most `inFlight` parts at once, then seal it.
 *
 * `jobId`: an existing job (resume), else `createJob()` makes one when the first image is
 * found and `onJob(id)` is told. `onSkipped(entries)`: files that are not images.
 * `onProgress({files, bytes, acknowledged})`: images and bytes sent (parts in flight counted by
 * the fraction sent), and images the server acknowledged.
 * Resolves to {jobId (null if there was no image), rejected, refused}: files the API took as
 * per-image errors, and files of parts it refused whole (422: no usable image; 413: a file
 * alone in its part and over the request size limit), with reasons.
 */
export async function uploadFolder(api, entries, opts = {}) {
  const { createJob, onJob = () => {}, onSkipped = () => {}, onProgress = () => {}, signal } = opts;
  const inFlight = opts.inFlight ?? IN_FLIGHT;
  const source = partsOf(entries);
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
  const moving = new Map(); // part -> [images, bytes, fraction sent]
  const report = () => {
    let files = doneFiles;
    let bytes = doneBytes;
    for (const [n, b, f] of moving.values()) {
      files += n * f;
      bytes += b * f;
    }
    onProgress({ files, bytes, acknowledged: doneFiles });
  };
  // Parts are read (first bytes: image or not) while the parts before them upload: up to
  // `inFlight` parts ahead of the ones being sent.
  const ready = [];
  const topUp = () => {
    while (ready.length < inFlight && !source.done) {
      const part = source.next();
      ready.push(sniff(part, { concurrency: 16 }));
    }
  };
  async function worker() {
    for (;;) {
      topUp();
      if (!ready.length || local.signal.aborted) return;
      const found = ready.shift();
      topUp();
      const { images, skipped } = await found;
      if (local.signal.aborted) return;
      if (skipped.length) onSkipped(skipped);
      if (!images.length) continue;
      await send(await ensureJob(), images);
    }
  }
  // One part. A part refused as too large (413: the API's or a proxy's body limit, the files a
  // request may carry, the key's quota) lowers the limit to half of it and goes again in parts
  // within the limit, as does a part formed before the limit fell: about one refusal a halving.
  async function send(jobId, images) {
    const bytes = bytesOf(images);
    const { limit } = source;
    if (images.length > 1 && (images.length > limit.files || bytes > limit.bytes)) {
      const pieces = partsOf(images, limit);
      while (!pieces.done) await send(jobId, pieces.next());
      return;
    }
    const form = new FormData();
    for (const e of images) form.append("files", e.file, e.path);
    const key = {};
    moving.set(key, [images.length, bytes, 0]);
    try {
      const body = await api.request("POST", `/v1/jobs/${jobId}/files`, {
        form,
        signal: local.signal,
        onUploadProgress: (loaded, total) => {
          moving.set(key, [images.length, bytes, total ? loaded / total : 0]);
          report();
        },
      });
      rejected.push(...(body?.rejected || []));
    } catch (err) {
      if (err instanceof ApiError && err.status === 422 && /^no_(valid_)?images$/.test(err.code)) {
        for (const d of Array.isArray(err.details) ? err.details : []) {
          refused.push({ filename: d.filename, code: d.code, message: d.message });
        }
      } else if (err instanceof ApiError && err.status === 413 && images.length > 1) {
        moving.delete(key);
        source.refused(images.length, bytes);
        await send(jobId, images);
        return;
      } else if (err instanceof ApiError && err.status === 413) {
        // One file over what a request may carry (alone in its part): that file is refused,
        // the folder goes on. Sent again it would be refused again (Resume too).
        refused.push({ filename: images[0].path, code: err.code, message: err.message });
      } else {
        throw err;
      }
    } finally {
      moving.delete(key);
    }
    doneFiles += images.length;
    doneBytes += bytes;
    report();
  }
  const workers = Array.from({ length: inFlight }, () =>
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
