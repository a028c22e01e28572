// The HTTP API (same origin): key header, JSON errors, retries after Retry-After.
//
// XMLHttpRequest rather than fetch: it reports upload progress, which the upload bar needs.

/** Statuses a request is retried on, as the CLI does (batchvision/client/bulk.py). */
const RETRYABLE = new Set([429, 500, 502, 503, 504]);

export class ApiError extends Error {
  constructor(status, code, message, details = null, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }

  /** "401 unauthorized: an API key is required …" */
  describe() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

export function isAbort(err) {
  return err && err.name === "AbortError";
}

function abortError() {
  return new DOMException("aborted", "AbortError");
}

/** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
}

export function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError());
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, seconds * 1000);
    function onAbort() {
      clearTimeout(timer);
      reject(abortError());
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function send(method, url, { headers, body, responseType, onUploadProgress, signal }) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError());
    const req = new XMLHttpRequest();
    req.open(method, url);
    for (const [name, value] of Object.entries(headers)) req.setRequestHeader(name, value);
    req.responseType = responseType === "blob" ? "blob" : "text";
    if (onUploadProgress) {
      req.upload.onprogress = (e) => onUploadProgress(e.loaded, e.lengthComputable ? e.total : 0);
    }
    const onAbort = () => req.abort();
    signal?.addEventListener("abort", onAbort, { once: true });
    const done = () => signal?.removeEventListener("abort", onAbort);
    req.onload = () => {
      done();
      resolve(req);
    };
    req.onerror = () => {
      done();
      reject(new ApiError(0, "network_error", "the API is unreachable (network error)"));
    };
    req.onabort = () => {
      done();
      reject(abortError());
    };
    req.send(body ?? null);
  });
}

async function errorOf(req) {
  let text = "";
  try {
    text = req.responseType === "blob" ? await req.response.text() : req.responseText;
  } catch {
    text = "";
  }
  let code = "http_error";
  let message = req.statusText || "request failed";
  let details = null;
  try {
    const err = JSON.parse(text).error;
    if (err) {
      code = err.code || code;
      message = err.message || message;
      details = err.details ?? null;
    }
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  return new ApiError(req.status, code, message, details, parseRetryAfter(req.getResponseHeader("Retry-After")));
}

export class Api {
  /**
   * @param {object} opts
   * @param {() => string} opts.getKey   the API key, or "" for none
   * @param {(n: object|null) => void} opts.onNotice  retries under way ({status, message, seconds}), or null
   * @param {(e: ApiError) => void} opts.onUnauthorized  a 401 answer
   */
  constructor({ getKey = () => "", onNotice = () => {}, onUnauthorized = () => {}, attempts = 8 } = {}) {
    this.getKey = getKey;
    this.onNotice = onNotice;
    this.onUnauthorized = onUnauthorized;
    this.attempts = attempts;
  }

  headers(key = this.getKey()) {
    const h = { Accept: "application/json" };
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  /**
   * One API call, retried on network errors, 429 and 5xx gateways (after Retry-After, else
   * exponential backoff). Resolves to the parsed JSON body (or a Blob with responseType "blob").
   * `opts.idempotent`: send an Idempotency-Key, the same on every try (for a POST that creates).
   */
  async request(method, path, opts = {}) {
    const { json, form, responseType = "json", onUploadProgress, signal, key } = opts;
    const attempts = opts.attempts ?? this.attempts;
    const headers = this.headers(key);
    // The same key on every try: a retry after an answer lost on its way back (a 504 from a
    // proxy) finds the job the first try made instead of making a second one.
    if (opts.idempotent) headers["Idempotency-Key"] = newKey();
    let body = null;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form) {
      body = form;
    }
    let retried = false;
    try {
      for (let attempt = 0; ; attempt++) {
        let req;
        let err = null;
        try {
          req = await send(method, path, { headers, body, responseType, onUploadProgress, signal });
          if (req.status >= 200 && req.status < 300) {
            if (responseType === "blob") return req.response;
            return req.responseText ? JSON.parse(req.responseText) : null;
          }
          err = await errorOf(req);
        } catch (e) {
          if (!(e instanceof ApiError)) throw e; // aborted
          err = e;
        }
        if (err.status === 401) this.onUnauthorized(err);
        const retryable = err.status === 0 || RETRYABLE.has(err.status);
        if (!retryable || attempt + 1 >= attempts) {
          throw err;
        }
        const backoff = Math.min(30, 0.5 * 2 ** attempt) * (0.8 + 0.4 * Math.random());
        const seconds = err.retryAfter ?? backoff;
        retried = true;
        this.onNotice({ status: err.status, code: err.code, message: err.describe(), seconds, method, path });
        await sleep(seconds, signal);
      }
    } finally {
      // However the request ends (an answer, an error, an abort during a back-off): no
      // "Retrying in 0 s…" left on screen.
      if (retried) this.onNotice(null);
    }
  }
}

/** A random Idempotency-Key (crypto.randomUUID needs a secure context; a page on plain http
 * in a LAN has only getRandomValues). */
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
