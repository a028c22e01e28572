// What the user dropped or picked -> image files with relative paths, and skipped files.
//
// Images are recognised by content, like the CLI (batchvision/core/sniff.py): the first 16
// bytes must start like JPEG, PNG, GIF, WebP or BMP. Everything else is listed as skipped.

const MAGIC = [
  [0xff, 0xd8, 0xff], // JPEG
  [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], // PNG
  [...new TextEncoder().encode("GIF87a")],
  [...new TextEncoder().encode("GIF89a")],
  [0x42, 0x4d], // BM
];

/** True if `head` (a Uint8Array of a file's first bytes) starts like an accepted image. */
export function looksLikeImage(head) {
  const at = (bytes, offset = 0) => bytes.every((b, i) => head[offset + i] === b);
  if (at([0x52, 0x49, 0x46, 0x46]) && at([0x57, 0x45, 0x42, 0x50], 8)) return true; // RIFF....WEBP
  return MAGIC.some((m) => at(m));
}

/** Entries {path, file} of a file input (a folder picker keeps webkitRelativePath). */
export function fromInput(fileList) {
  return [...fileList].map((file) => ({ path: file.webkitRelativePath || file.name, file }));
}

/**
 * Entries {path, file} of a drop, folders walked recursively. The entries must be taken from
 * the DataTransfer synchronously, inside the drop handler: it is emptied when the handler returns.
 */
export function fromDrop(dataTransfer) {
  const roots = [];
  const loose = [];
  for (const item of dataTransfer.items || []) {
    if (item.kind !== "file") continue;
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    if (entry) roots.push(entry);
    else {
      const file = item.getAsFile();
      if (file) loose.push({ path: file.webkitRelativePath || file.name, file });
    }
  }
  if (!roots.length && !loose.length) {
    for (const file of dataTransfer.files || []) loose.push({ path: file.name, file });
  }
  return (async () => {
    const out = [...loose];
    await Promise.all(roots.map((entry) => walk(entry, out)));
    return out;
  })();
}

async function walk(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ path: entry.fullPath.replace(/^\/+/, ""), file });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    // readEntries answers in batches (100 in Chromium) until it answers an empty one.
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      await Promise.all(batch.map((child) => walk(child, out)));
    }
  }
}

/**
 * Relative paths as the CLI sends them: one folder's files relative to that folder, several
 * folders' files under their folder's name, loose files by name. Sorted; duplicates made unique.
 */
export function normalise(entries) {
  const split = entries.map((e) => e.path.split("/").filter(Boolean));
  const first = split.length && split.every((p) => p.length > 1) ? split[0][0] : null;
  const oneRoot = first !== null && split.every((p) => p[0] === first);
  const seen = new Map();
  const out = entries.map((e, i) => {
    const parts = oneRoot ? split[i].slice(1) : split[i];
    return { path: parts.join("/") || e.file.name, file: e.file };
  });
  out.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  for (const e of out) {
    const n = (seen.get(e.path) || 0) + 1;
    seen.set(e.path, n);
    if (n > 1) e.path = `${e.path}#${n}`;
  }
  return { entries: out, root: oneRoot ? first : null };
}

/**
 * The first `n` bytes of a file. A stream's first chunk rather than `slice(0, n)`: in Chromium
 * a slice of a picked file registers a new blob synchronously, about three times the cost.
 */
export async function firstBytes(file, n) {
  if (!file.stream) return new Uint8Array(await file.slice(0, n).arrayBuffer());
  const reader = file.stream().getReader();
  const out = new Uint8Array(n);
  let got = 0;
  try {
    while (got < n) {
      const { value, done } = await reader.read();
      if (done) break;
      const take = Math.min(n - got, value.length);
      out.set(value.subarray(0, take), got);
      got += take;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  return out.subarray(0, got);
}

/** Split entries into images and skipped files by their first bytes (`concurrency` reads at once). */
export async function sniff(entries, { concurrency = 32, onProgress = () => {} } = {}) {
  const isImage = new Array(entries.length);
  let next = 0;
  let done = 0;
  async function worker() {
    while (next < entries.length) {
      const i = next++;
      let head;
      try {
        head = await firstBytes(entries[i].file, 16);
      } catch {
        head = new Uint8Array(0); // unreadable (removed since): skipped
      }
      isImage[i] = looksLikeImage(head);
      if (++done % 500 === 0) onProgress(done, entries.length);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, entries.length) }, worker));
  const images = [];
  const skipped = [];
  entries.forEach((e, i) => (isImage[i] ? images : skipped).push(e));
  return { images, skipped };
}
