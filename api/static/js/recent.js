// This browser's records of its jobs (the names it gave them, skipped files) and the API key,
// in localStorage (they survive a reload). The list of jobs itself comes from the server.

const JOBS = "batchvision.recentJobs.v1";
const KEY = "batchvision.apiKey";
const MAX_JOBS = 50;
const MAX_SKIPPED = 500; // names of skipped files kept per job, to show them when reopened

function read() {
  try {
    const list = JSON.parse(localStorage.getItem(JOBS) || "[]");
    return Array.isArray(list) ? list.filter((j) => j && typeof j.id === "string") : [];
  } catch {
    return [];
  }
}

function write(list) {
  try {
    localStorage.setItem(JOBS, JSON.stringify(list.slice(0, MAX_JOBS)));
  } catch {
    // storage full or disabled: the list is a convenience, the jobs live on the server
  }
}

/** Jobs, newest first: {id, name, created, count, status, done, failed, skipped: [{filename, code, message}]}. */
export function jobs() {
  return read();
}

export function getJob(id) {
  return read().find((j) => j.id === id) || null;
}

/** Add or update a job (fields merged); a new job goes first. */
export function saveJob(id, fields) {
  const list = read();
  const at = list.findIndex((j) => j.id === id);
  const skipped = fields.skipped ? fields.skipped.slice(0, MAX_SKIPPED) : undefined;
  const merged = { ...(at >= 0 ? list[at] : { id, created: Date.now() }), ...fields };
  if (skipped) merged.skipped = skipped;
  if (at >= 0) list[at] = merged;
  else list.unshift(merged);
  write(list);
  return merged;
}

export function apiKey() {
  try {
    return localStorage.getItem(KEY) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
  } catch {
    // no storage: the key lasts for this page only
  }
}
