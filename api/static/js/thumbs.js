// Thumbnails made in the browser from the user's own files (never fetched from the server).
//
// createImageBitmap() decodes and downscales off the main thread, so a 12-megapixel photo
// costs the table nothing while it scrolls; the small bitmaps are kept in an LRU, so scrolling
// back is instant and memory stays bounded (800 x 80 px x 80 px x 4 B, about 20 MB at most).

const SIZE = 80; // canvas pixels (40 CSS px at 2x)
const KEEP = 800;
const DECODING = 4;

export class Thumbnails {
  constructor() {
    this.cache = new Map(); // key -> ImageBitmap, in least-recently-used order
    this.queue = []; // [key, file, canvas], newest last
    this.running = 0;
    this.scheduled = false;
    this.generation = 0;
  }

  /** Forget every bitmap (another job is shown). */
  clear() {
    for (const bmp of this.cache.values()) bmp.close();
    this.cache.clear();
    this.queue = [];
    this.generation++;
  }

  /** Draw `file`'s thumbnail on `canvas` now if known, else once decoded (if still shown). */
  draw(canvas, key, file) {
    canvas.dataset.key = key;
    const bmp = this.cache.get(key);
    if (bmp) {
      this.cache.delete(key);
      this.cache.set(key, bmp);
      paint(canvas, bmp);
      return;
    }
    this.queue.push([key, file, canvas]);
    // After the current task: the table appends its new rows (and this canvas) first.
    if (!this.scheduled) {
      this.scheduled = true;
      queueMicrotask(() => {
        this.scheduled = false;
        this.pump();
      });
    }
  }

  pump() {
    while (this.running < DECODING && this.queue.length) {
      // Newest first: the rows just scrolled to; rows that left the table are dropped.
      const [key, file, canvas] = this.queue.pop();
      if (!canvas.isConnected || canvas.dataset.key !== key) continue;
      this.running++;
      const generation = this.generation;
      createImageBitmap(file, { resizeWidth: SIZE, resizeQuality: "medium" })
        .then((bmp) => {
          if (generation !== this.generation) return bmp.close();
          this.cache.set(key, bmp);
          if (this.cache.size > KEEP) {
            const [oldest, old] = this.cache.entries().next().value;
            this.cache.delete(oldest);
            old.close();
          }
          for (const c of document.querySelectorAll("canvas.thumb")) {
            if (c.dataset.key === key) paint(c, bmp);
          }
        })
        .catch(() => {
          if (canvas.isConnected && canvas.dataset.key === key) canvas.dataset.state = "undecodable";
        })
        .finally(() => {
          this.running--;
          this.pump();
        });
    }
  }
}

/** The bitmap, scaled to fit the square canvas and centred. */
function paint(canvas, bmp) {
  const ctx = canvas.getContext("2d");
  const scale = Math.min(SIZE / bmp.width, SIZE / bmp.height);
  const w = bmp.width * scale;
  const h = bmp.height * scale;
  ctx.clearRect(0, 0, SIZE, SIZE);
  ctx.drawImage(bmp, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
  canvas.dataset.state = "drawn";
}

export const THUMB_SIZE = SIZE;
