// Upload a job in parts through the parts API, as the CLI does (batchvision/client/bulk.py):
// POST /v1/jobs {"expected": N} -> POST /v1/jobs/<id>/files (parts) -> POST /v1/jobs/<id>/seal.
// Re-sending a part is idempotent on the server (files are keyed by relative path), so a
// retried part never duplicates an image.

import { ApiError } from "./api.js";

export const PART_FILES = 64;
export const PART_BYTES = 32 * 1024 * 1024;
export const IN_FLIGHT = 3;

/** Group entries {path, file} into parts bounded by count and bytes (one big file stands alone). */
export function makeParts(images, maxFiles = PART_FILES, maxBytes = PART_BYTES) {
  const parts = [];
  let part = [];
  let size = 0;
  for (const e of images) {
    const n = e.file.size;
    if (part.length && (part.length >= maxFiles || size + n > maxBytes)) {
      parts.push({ entries: part, bytes: size });
      part = [];
      size = 0;
    }
    part.push(e);
    size += n;
  }
  if (part.length) parts.push({ entries: part, bytes: size });
  return parts;
}

/**
 * Send every part to job `jobId`, at most `inFlight` at once, then seal the job.
 *
 * `onProgress({files, bytes})` reports what the server has acknowledged plus the bytes of
 * parts in flight. Returns {rejected, refused}: files the API took as per-image errors, and
 * files of parts it refused whole (422: no usable image in the part), with the reasons.
 */
export async function uploadJob(api, jobId, images, { signal, onProgress = () => {}, inFlight = IN_FLIGHT } = {}) {
  const parts = makeParts(images);
  const local = new AbortController();
  const stop = () => local.abort();
  signal?.addEventListener("abort", stop, { once: true });
  const rejected = [];
  const refused = [];
  let doneFiles = 0;
  let doneBytes = 0;
  const moving = new Map(); // part index -> bytes sent so far
  const report = () => {
    let bytes = doneBytes;
    for (const b of moving.values()) bytes += b;
    onProgress({ files: doneFiles, bytes });
  };
  let next = 0;
  async function worker() {
    while (next < parts.length && !local.signal.aborted) {
      const n = next++;
      const part = parts[n];
      const form = new FormData();
      for (const e of part.entries) form.append("files", e.file, e.path);
      moving.set(n, 0);
      try {
        const body = await api.request("POST", `/v1/jobs/${jobId}/files`, {
          form,
          signal: local.signal,
          // Multipart overhead makes `total` a little larger than the files: scale to them.
          onUploadProgress: (loaded, total) => {
            moving.set(n, total ? (part.bytes * loaded) / total : 0);
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
          local.abort();
          throw err;
        }
      } finally {
        moving.delete(n);
      }
      doneFiles += part.entries.length;
      doneBytes += part.bytes;
      report();
    }
  }
  try {
    // Promise.all rejects with the first failure, which aborted the other parts.
    await Promise.all(Array.from({ length: Math.min(inFlight, parts.length) }, worker));
  } finally {
    signal?.removeEventListener("abort", stop);
  }
  if (signal?.aborted) throw new DOMException("aborted", "AbortError");
  await api.request("POST", `/v1/jobs/${jobId}/seal`, { signal });
  return { rejected, refused };
}
