"""The job store's Lua scripts. Each runs atomically in Redis and starts with
:data:`~batchvision.server.keys.LUA_KEYS`, so every script names its keys the same way
(``KEYS`` is always :meth:`JobKeys.lua() <batchvision.server.keys.JobKeys.lua>`)."""

from __future__ import annotations

from batchvision.server.keys import LUA_KEYS

#: A finish publishes the rows of a job created with ``reply_to`` only up to this many rows ...
REPLY_MAX_ROWS = 64
#: ... and this many bytes of filenames and results (a `/v2` result keeps every class's score:
#: about 5 kB an image for 1,000 classes); a larger job's rows are read by the request.
REPLY_MAX_BYTES = 64 * 1024

# What the queue holds for whom: images and bytes without a result, over all jobs (pending,
# pending bytes), per job (hash fields <id>, <id>:b, and <id>:o its owner) and per owner (quota
# hash fields i:<owner>, b:<owner>). ADD raises them, RECORD lowers them by the results it
# stores, and release_job gives back whatever a job still holds when it finishes or expires,
# then forgets the job: each image leaves every counter exactly once.
_ACCOUNTS = """
local function quota_add(k_quota, owner, images, bytes)
  for field, by in pairs({['i:' .. owner] = images, ['b:' .. owner] = bytes}) do
    if by ~= 0 and redis.call('HINCRBY', k_quota, field, by) <= 0 then redis.call('HDEL', k_quota, field) end
  end
end
local function release_job(k_pending, k_jobpending, k_pending_bytes, k_quota, id)
  local v = redis.call('HMGET', k_jobpending, id, id .. ':b', id .. ':o')
  local n, b = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  -- A delete first: Redis at maxmemory (noeviction) refuses a script whose first write could
  -- grow memory (DECRBY), and releasing, deleting a job, is how memory is given back.
  redis.call('HDEL', k_jobpending, id, id .. ':b', id .. ':o')
  if n > 0 then redis.call('DECRBY', k_pending, n) end
  if b > 0 then redis.call('DECRBY', k_pending_bytes, b) end
  if v[3] then quota_add(k_quota, v[3], -math.max(n, 0), -math.max(b, 0)) end
end
"""

# Shared tail: finish the job if it is sealed and every image has a result (status,
# finished_at, wake the waiters, TTLs, tombstone, the completion webhook if the job has one).
# ARGV[1] result TTL, ARGV[2] now, ARGV[3] job id.
# Publishing from a script is allowed: Redis replicates the script's effects, PUBLISH included.
# (It carries its own copy of the accounting functions, so any script may end with it.)
# The news is the job id. A job created with ``reply_to`` (a request waits to answer with its
# rows) is first announced on that channel, its waiter's own, with a newline and the JSON array
# [job hash as HGETALL, filenames, results] after the id: the request answers without reading
# them again (see JobStore.snapshot), and no other process receives them. A job of more than
# REPLY_MAX_ROWS files or REPLY_MAX_BYTES of rows is announced on CH_FINISHED alone.
_FINISH = (
    _ACCOUNTS
    + f"""
local REPLY_MAX_ROWS, REPLY_MAX_BYTES = {REPLY_MAX_ROWS}, {REPLY_MAX_BYTES}"""
    + """
local v = redis.call('HMGET', K_JOB, 'total', 'done', 'failed', 'canceled', 'sealed', 'finished_at')
if v[5] == '1' and not v[6] and
   (tonumber(v[2] or '0') + tonumber(v[3] or '0') + tonumber(v[4] or '0')) >= tonumber(v[1] or '0') then
  redis.call('HSET', K_JOB, 'finished_at', ARGV[2])
  for _, k in ipairs(K_DATA) do redis.call('EXPIRE', k, ARGV[1]) end
  -- the tombstone names the job's owner: another API key's request gets 404, not 410
  local tomb = 'o:' .. (redis.call('HGET', K_JOB, 'owner') or '')
  redis.call('SET', K_TOMB, tomb, 'EX', tonumber(ARGV[1]) + 7 * 86400)
  redis.call('ZREM', K_ACTIVE, ARGV[3])
  release_job(K_PENDING, K_JOBPENDING, K_PENDING_BYTES, K_QUOTA, ARGV[3])
  -- a completion webhook is queued in the same step (durable: no process holds it)
  if redis.call('HEXISTS', K_JOB, 'cb_url') == 1 then
    redis.call('HSET', K_JOB, 'cb_state', 'pending')
    redis.call('ZADD', K_WEBHOOKS, math.floor(tonumber(ARGV[2]) * 1000), ARGV[3])
  end
  -- and so are its output files, when it names an output prefix
  if redis.call('HEXISTS', K_JOB, 'out_url') == 1 then
    redis.call('ZADD', K_EXPORTS, math.floor(tonumber(ARGV[2]) * 1000), ARGV[3])
  end
  -- last: the news carries the job as it is now
  local reply_to = redis.call('HGET', K_JOB, 'reply_to')
  local total = tonumber(v[1] or '0')
  if reply_to and total <= REPLY_MAX_ROWS then
    local idx, names, res, size = {}, {}, {}, 0
    for i = 1, total do idx[i] = tostring(i - 1) end
    if total > 0 then
      names = redis.call('HMGET', K_FILES, unpack(idx))
      res = redis.call('HMGET', K_RES, unpack(idx))
    end
    for i = 1, total do size = size + #(names[i] or '') + #(res[i] or '') end
    if size <= REPLY_MAX_BYTES then
      local rows = cjson.encode({redis.call('HGETALL', K_JOB), names, res})
      redis.call('PUBLISH', reply_to, ARGV[3] .. '\\n' .. rows)
    end
  end
  redis.call('PUBLISH', CH_FINISHED, ARGV[3])
end
"""
)
#: Store results: ARGV[4..] = (index, result JSON, counter) triples. ``HSETNX`` per image, and a
#: counter is raised only when the write stored something: a redelivered chunk counts nothing.
#: A job with ``part_rows`` (its results written in parts, :mod:`batchvision.server.exports`)
#: stores nothing below its ``spilled`` parts and counts each part's results in ``p:<part>``.
RECORD = (
    LUA_KEYS
    + _ACCOUNTS
    + """
if redis.call('EXISTS', K_JOB) == 0 then return {0, 0, 0} end
local n = {done = 0, failed = 0, canceled = 0}
local bytes = 0
-- a job written in parts: results below the parts already written left the hash (a late copy
-- of one must not count again), and each part counts its stored results
local part = tonumber(redis.call('HGET', K_JOB, 'part_rows') or '0')
local spilled = 0
if part > 0 then spilled = tonumber(redis.call('HGET', K_JOB, 'spilled') or '0') * part end
for i = 4, #ARGV, 3 do
  if tonumber(ARGV[i]) >= spilled and redis.call('HSETNX', K_RES, ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', K_JOB, ARGV[i + 2], 1)
    if part > 0 then redis.call('HINCRBY', K_JOB, 'p:' .. math.floor(tonumber(ARGV[i]) / part), 1) end
    n[ARGV[i + 2]] = n[ARGV[i + 2]] + 1
    local size = redis.call('HGET', K_FILES, 's:' .. ARGV[i])
    if size then
      bytes = bytes + tonumber(size)
      redis.call('HDEL', K_FILES, 's:' .. ARGV[i])
    end
  end
end
local stored = n.done + n.failed + n.canceled
if stored > 0 then
  redis.call('DECRBY', K_PENDING, stored)
  redis.call('HINCRBY', K_JOBPENDING, ARGV[3], -stored)
  if bytes > 0 then
    redis.call('DECRBY', K_PENDING_BYTES, bytes)
    redis.call('HINCRBY', K_JOBPENDING, ARGV[3] .. ':b', -bytes)
  end
  local owner = redis.call('HGET', K_JOBPENDING, ARGV[3] .. ':o')
  if owner then quota_add(K_QUOTA, owner, -stored, -bytes) end
end
-- an open upload's results expire with it (the hash may have been created just now)
local ttl = redis.call('TTL', K_JOB)
if ttl > 0 then redis.call('EXPIRE', K_RES, ttl) end
"""
    + _FINISH
    + "return {n.done, n.failed, n.canceled}"
)

#: Seal: no more files. A sealed job is kept until it finishes (every image then has a result,
#: at the latest an expired-upload error): only open, abandoned uploads expire.
SEAL = (
    LUA_KEYS
    + """
if redis.call('EXISTS', K_JOB) == 0 then return 0 end
-- a finished job keeps its result TTL: sealing (or canceling) it again changes nothing
if redis.call('HEXISTS', K_JOB, 'finished_at') == 1 then return 1 end
redis.call('HSET', K_JOB, 'sealed', '1')
for _, k in ipairs({K_JOB, K_FILES, K_PATHS, K_RES, K_TRIES}) do redis.call('PERSIST', k) end
redis.call('ZADD', K_ACTIVE, '+inf', ARGV[3])
"""
    + _FINISH
    + "return 1"
)

#: Flag a job canceled (ARGV[1]: ``1``, or ``open`` for an upload cut short) if it still exists:
#: a plain HSET after a DELETE that ran in between would make a job hash of that one field.
CANCEL_FLAG = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
return 1
"""

#: Add files: ARGV[1] open-upload TTL, ARGV[2] now, ARGV[3] job id, ARGV[4..] = (file key,
#: filename, bytes of its blob: 0 for a file refused at upload) triples. A key the job has keeps
#: its index. Returns (index, is_new) pairs, -1 for an unknown job, -2 if sealed. With
#: :data:`~batchvision.server.keys.UNCONFIRMED_PARTS` after the job's keys, the new indexes are
#: recorded there as unconfirmed.
ADD = (
    LUA_KEYS
    + _ACCOUNTS
    + """
if redis.call('EXISTS', K_JOB) == 0 then return -1 end
local flags = redis.call('HMGET', K_JOB, 'sealed', 'cancel')
if flags[1] == '1' or (flags[2] and flags[2] ~= '0') then return -2 end
local out = {}
local added, bytes, first = 0, 0, nil
for i = 4, #ARGV, 3 do
  local idx = redis.call('HGET', K_PATHS, ARGV[i])
  if idx then
    table.insert(out, tonumber(idx)); table.insert(out, 0)
  else
    idx = redis.call('HINCRBY', K_JOB, 'total', 1) - 1
    first = first or idx
    redis.call('HSET', K_PATHS, ARGV[i], idx)
    redis.call('HSET', K_FILES, idx, ARGV[i + 1])
    local size = tonumber(ARGV[i + 2])
    if size > 0 then
      redis.call('HSET', K_FILES, 's:' .. idx, size)
      bytes = bytes + size
    end
    table.insert(out, idx); table.insert(out, 1)
    added = added + 1
  end
end
if added > 0 then
  local owner = redis.call('HGET', K_JOB, 'owner') or ''
  redis.call('INCRBY', K_PENDING, added)
  redis.call('INCRBY', K_PENDING_BYTES, bytes)
  redis.call('HINCRBY', K_JOBPENDING, ARGV[3], added)
  redis.call('HINCRBY', K_JOBPENDING, ARGV[3] .. ':b', bytes)
  redis.call('HSET', K_JOBPENDING, ARGV[3] .. ':o', owner)
  quota_add(K_QUOTA, owner, added, bytes)
  -- With a key after LUA_KEYS: the new indexes (consecutive) stay unconfirmed until the caller
  -- has written their refusals and ledger entries (recovery.part_member names the member).
  if KEYS[14] then
    redis.call('ZADD', KEYS[14], ARGV[2], ARGV[3] .. ':' .. first .. ':' .. (first + added - 1))
  end
end
-- an open upload lives as long as its blobs; seal makes the job permanent until it finishes
for _, k in ipairs({K_JOB, K_FILES, K_PATHS, K_RES}) do redis.call('EXPIRE', k, ARGV[1]) end
redis.call('ZADD', K_ACTIVE, tonumber(ARGV[2]) + tonumber(ARGV[1]), ARGV[3])
return out
"""
)

#: Release jobs that will never finish: KEYS = :data:`~batchvision.server.keys.RELEASE_KEYS`
#: (active, pending, per-job pending, pending bytes, quota); ARGV[1] is now and ARGV[2] a job id
#: (release that job now: the worker found it gone) or "" (release every open upload whose
#: expiry passed, at most ARGV[3] of them). What each job still holds (images, bytes, its
#: owner's share) leaves the counters exactly once. Returns how many jobs it released.
RELEASE = (
    _ACCOUNTS
    + """
local ids
if ARGV[2] ~= '' then
  ids = {ARGV[2]}
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
end
local released = 0
for _, id in ipairs(ids) do
  release_job(KEYS[2], KEYS[3], KEYS[4], KEYS[5], id)
  released = released + redis.call('ZREM', KEYS[1], id)
end
return released
"""
)

#: Queue a finished job's failed images again: ARGV[1] (unused), ARGV[2] now, ARGV[3] job id,
#: ARGV[4..] = (index, bytes of its blob) pairs. Each index whose result is still stored loses
#: it (once: a second run finds none) and counts as waiting again, in the job's ``failed``
#: counter, the queue's counters and its owner's quota, as :data:`ADD` counts a new file; the
#: job runs again (no ``finished_at``, no expiry, no tombstone, its delivery counts reset) and
#: its webhook and its output prefix's files (``out_state`` back to ``pending``) wait for the new
#: end. Returns how many were queued again; -1 for an unknown
#: job, -2 for one not finished, -3 for a canceled one. With KEYS[14], the listing of the blobs a
#: file or S3 store keeps (:data:`~batchvision.server.keys.KEPT_BLOBS`): an image whose blob is
#: no longer listed (reaped, or being reaped) stays as it is, and the reply is ``{n, index...}``
#: with those indexes; the others leave the listing (the worker deletes their blobs).
RETRY = (
    LUA_KEYS
    + _ACCOUNTS
    + """
local K_KEPT = KEYS[14]
if redis.call('EXISTS', K_JOB) == 0 then return -1 end
local v = redis.call('HMGET', K_JOB, 'finished_at', 'cancel', 'owner')
if not v[1] then return -2 end
if v[2] and v[2] ~= '0' then return -3 end
local n, bytes, gone = 0, 0, {}
for i = 4, #ARGV, 2 do
  local member = ARGV[3] .. ':' .. ARGV[i]
  if K_KEPT and not redis.call('ZSCORE', K_KEPT, member) then
    gone[#gone + 1] = ARGV[i]
  elseif redis.call('HDEL', K_RES, ARGV[i]) == 1 then
    if K_KEPT then redis.call('ZREM', K_KEPT, member) end
    n = n + 1
    local size = tonumber(ARGV[i + 1])
    if size > 0 then
      redis.call('HSET', K_FILES, 's:' .. ARGV[i], size)
      bytes = bytes + size
    end
  end
end
local reply = n
if K_KEPT then
  reply = {n}
  for _, index in ipairs(gone) do reply[#reply + 1] = index end
end
if n == 0 then return reply end
local owner = v[3] or ''
redis.call('HINCRBY', K_JOB, 'failed', -n)
redis.call('HINCRBY', K_JOB, 'retries', 1)
redis.call('HDEL', K_JOB, 'finished_at')
redis.call('INCRBY', K_PENDING, n)
redis.call('INCRBY', K_PENDING_BYTES, bytes)
redis.call('HINCRBY', K_JOBPENDING, ARGV[3], n)
redis.call('HINCRBY', K_JOBPENDING, ARGV[3] .. ':b', bytes)
redis.call('HSET', K_JOBPENDING, ARGV[3] .. ':o', owner)
quota_add(K_QUOTA, owner, n, bytes)
redis.call('DEL', K_TRIES, K_TOMB)
for _, k in ipairs(K_DATA) do redis.call('PERSIST', k) end
redis.call('ZADD', K_ACTIVE, '+inf', ARGV[3])
redis.call('ZREM', K_WEBHOOKS, ARGV[3])
-- its output is written again at the new end (FINISH queues it): none is due before
redis.call('ZREM', K_EXPORTS, ARGV[3])
if redis.call('HEXISTS', K_JOB, 'out_url') == 1 then
  redis.call('HSET', K_JOB, 'out_state', 'pending')
  redis.call('HDEL', K_JOB, 'out_error', 'out_attempts', 'out_files', 'out_written_at')
end
if redis.call('HEXISTS', K_JOB, 'cb_url') == 1 then
  redis.call('HSET', K_JOB, 'cb_state', 'waiting', 'cb_attempts', '0')
  redis.call('HDEL', K_JOB, 'cb_last_status', 'cb_last_error', 'cb_last_attempt_at', 'cb_delivered_at')
end
return reply
"""
)

#: Remove a job: what it still holds leaves the queue's counters (once: nothing if its finish
#: or a release gave it back already), its keys and tombstone go, and it leaves the active and
#: webhook and export sets. ARGV[3] job id. Returns how many of its keys existed.
REMOVE = (
    LUA_KEYS
    + _ACCOUNTS
    + """
release_job(K_PENDING, K_JOBPENDING, K_PENDING_BYTES, K_QUOTA, ARGV[3])
redis.call('ZREM', K_ACTIVE, ARGV[3])
redis.call('ZREM', K_WEBHOOKS, ARGV[3])
redis.call('ZREM', K_EXPORTS, ARGV[3])
return redis.call('DEL', K_JOB, K_FILES, K_PATHS, K_RES, K_TRIES, K_TOMB)
"""
)
