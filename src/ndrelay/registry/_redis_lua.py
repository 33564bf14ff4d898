"""The Lua scripts of the Redis backend: each one step that must be atomic (DESIGN.md,
"Redis backend"). Every script takes one key, the stream's base key `B`
(`ndrelay:s:{name}:<incarnation>`), and derives the others from it:

- `B:m`  hash: `spec` (JSON), `next` (next seq), `held` (items stored, pending included),
  `pending`, `bytes`, `first` (oldest retained seq), `delivered` (queue: next seq never
  delivered), `ord` (delivery counter), `term` (terminal frame, JSON), `aborted`, counters
- `B:x`  the Redis stream: entry id `<seq>-1`, fields `h` (item header), `d` (payload)
- `B:sz` hash seq -> payload bytes of every stored entry
- `B:ret` zset of seqs given back (released, lease ran out), score = seq
- `B:cs` set of queue consumer ids with pending items or a connection
- `B:p:<id>` zset: the seqs pending for consumer `id`, score = delivery order
- `B:a:<id>` zset: seqs `id` acknowledged lately (a repeated ack is not a conflict)
- `B:c:<id>` string: the token of `id`'s connection (TTL: lease + 3 s, refreshed every
  second while it lives), `gone` while its lease runs, absent once it ran out
- `B:f:<id>` string: the token of fanout consumer `id`'s connection
- `B:fb` zset token -> next seq of each fanout `block` consumer; `B:fbt` token -> deadline
- `B:prod` hash producer -> next producer seq expected; `B:claim` producer -> newest claim
- `B:n`  hash `<replica>:p` / `<replica>:c` -> that replica's producers / consumers now;
  a replica counts while its key `ndrelay:alive:<replica>` lives (refreshed every second,
  so a replica killed without a goodbye stops counting a few seconds later)

Notifications go to the channel `ndrelay:n:<name>` as `<incarnation>:<what>`: `d` (data or
a terminal frame), `s` (space), `x` (deleted, or a connection superseded).
"""

from __future__ import annotations

__all__ = [
    "ACK",
    "CLOSE",
    "COMMIT",
    "COUNT",
    "COUNTS",
    "CREATE",
    "DELETE",
    "FINISH",
    "OFFER",
    "OPEN",
    "REFRESH",
    "ROOM",
    "TAKE",
]

# ARGV: field (`<replica>:p` or `<replica>:c`), n. Counts this replica's producers or
# consumers of a live stream up or down (a deleted stream's counts are gone with it).
COUNT = """
local m = KEYS[1] .. ':m'
if redis.call('EXISTS', m) == 0 or redis.call('HGET', m, 'aborted') == '1' then return 0 end
local v = redis.call('HINCRBY', KEYS[1] .. ':n', ARGV[1], ARGV[2])
if v == 0 then redis.call('HDEL', KEYS[1] .. ':n', ARGV[1]) end
return v
"""

# ARGV: the replicas' key prefix. Returns {producers, consumers} over live replicas.
COUNTS = """
local p, c = 0, 0
local f = redis.call('HGETALL', KEYS[1] .. ':n')
for i = 1, #f, 2 do
  local replica, kind = string.match(f[i], '^(.*):(%a)$')
  if replica and redis.call('EXISTS', ARGV[1] .. replica) == 1 then
    if kind == 'p' then p = p + tonumber(f[i + 1]) else c = c + tonumber(f[i + 1]) end
  end
end
return {p, c}
"""

# KEYS[1]: a connection key; ARGV: token, ttl_ms. Keeps it alive if it is still ours.
REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# ARGV: name, spec, inc, max_streams, now, streams-key, base
CREATE = """
local streams = ARGV[6]
local cur = redis.call('HGET', streams, ARGV[1])
if cur then return {'exists', cur} end
if redis.call('HLEN', streams) >= tonumber(ARGV[4]) then return {'toomany', ''} end
local B = KEYS[1]
redis.call('HSET', streams, ARGV[1], ARGV[3])
redis.call('HSET', B .. ':m', 'spec', ARGV[2], 'next', 0, 'held', 0, 'pending', 0,
  'bytes', 0, 'first', 0, 'delivered', 0, 'ord', 0, 'created', ARGV[5],
  'produced_bytes', 0, 'consumed', 0, 'consumed_bytes', 0, 'acked', 0,
  'redelivered', 0, 'dropped', 0, 'expired', 0)
redis.call('XGROUP', 'CREATE', B .. ':x', 'g', '0', 'MKSTREAM')
return {'created', ARGV[3]}
"""

# ARGV: name, inc, reason, streams-key, channel. Returns 1 if deleted.
DELETE = """
local B = KEYS[1]
local streams = ARGV[4]
if redis.call('HGET', streams, ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', streams, ARGV[1])
local m = B .. ':m'
local term = redis.call('HGET', m, 'term')
local nxt = redis.call('HGET', m, 'next') or '0'
if not (term and cjson.decode(term)['kind'] == 'error') then
  term = cjson.encode({kind='error', seq=tonumber(nxt), origin='relay',
    type='StreamClosed', message=ARGV[3], traceback=''})
end
redis.call('HSET', m, 'aborted', 1, 'term', term, 'reason', ARGV[3], 'held', 0,
  'pending', 0, 'bytes', 0)
for _, id in ipairs(redis.call('SMEMBERS', B .. ':cs')) do
  redis.call('DEL', B .. ':p:' .. id, B .. ':a:' .. id)
end
redis.call('DEL', B .. ':x', B .. ':sz', B .. ':ret', B .. ':cs', B .. ':fb', B .. ':fbt',
  B .. ':prod', B .. ':claim', B .. ':n')
redis.call('PEXPIRE', m, 300000)
redis.call('PUBLISH', ARGV[5], ARGV[2] .. ':x')
return 1
"""

# Prune fanout block consumers whose replica stopped refreshing them; the lowest cursor.
# And make room for an item (fanout evicts), shared by OFFER, COMMIT and ROOM.
_FLOOR = """
local function block_floor(B, now)
  local stale = redis.call('ZRANGEBYSCORE', B .. ':fbt', '-inf', now)
  for _, t in ipairs(stale) do
    redis.call('ZREM', B .. ':fbt', t)
    redis.call('ZREM', B .. ':fb', t)
  end
  local low = redis.call('ZRANGE', B .. ':fb', 0, 0, 'WITHSCORES')
  if #low == 0 then return nil end
  return tonumber(low[2])
end

-- Whether an item of nb bytes fits now. A fanout stream first drops its oldest entries
-- that no `block` consumer still needs (with delete false, only counts them: ROOM).
-- Returns fits and the new held, bytes, first, floor_known, floor.
local function make_room(B, nb, size, maxb, queue, now, delete,
                         held, bytes, first, floor_known, floor)
  local fits = held == 0 or (held + 1 <= size and bytes + nb <= maxb)
  if fits or queue then return fits, held, bytes, first, floor_known, floor end
  if not floor_known then
    floor = block_floor(B, now)
    floor_known = true
  end
  while held > 0 and (held + 1 > size or bytes + nb > maxb) do
    if floor and first >= floor then break end
    local old = redis.call('HGET', B .. ':sz', first)
    if delete then
      redis.call('XDEL', B .. ':x', first .. '-1')
      redis.call('HDEL', B .. ':sz', first)
    end
    bytes = bytes - tonumber(old or '0')
    held = held - 1
    first = first + 1
  end
  fits = held == 0 or (held + 1 <= size and bytes + nb <= maxb)
  return fits, held, bytes, first, floor_known, floor
end
"""

# ARGV: channel, inc, now, producer ('' = none), claim, mode ('q'/'f'), size, max_bytes,
#       n, then n times: pseq, nbytes, header, payload
# Returns {placed, status, expected, dups, index, next}; status ok|full|closed|claim|gap
OFFER = (
    _FLOOR
    + """
local B = KEYS[1]
local m = B .. ':m'
local st = redis.call('HMGET', m, 'aborted', 'term', 'next', 'held', 'bytes', 'first',
  'produced_bytes')
if st[3] == false then return {0, 'closed', 0, 0, 0, 0} end
if st[1] == '1' or st[2] then return {0, 'closed', 0, 0, 0, 0} end
local producer = ARGV[4]
local expected = 0
if producer ~= '' then
  if redis.call('HGET', B .. ':claim', producer) ~= ARGV[5] then
    return {0, 'claim', 0, 0, 0, 0}
  end
  expected = tonumber(redis.call('HGET', B .. ':prod', producer) or '0')
end
local nxt, held, bytes = tonumber(st[3]), tonumber(st[4]), tonumber(st[5])
local first, produced = tonumber(st[6]), tonumber(st[7])
local queue = ARGV[6] == 'q'
local size, maxb = tonumber(ARGV[7]), tonumber(ARGV[8])
local n = tonumber(ARGV[9])
local placed, dups, status, index = 0, 0, 'ok', 0
local floor_known, floor = false, nil
for i = 0, n - 1 do
  local base = 10 + i * 4
  local pseq = tonumber(ARGV[base])
  local nb = tonumber(ARGV[base + 1])
  local skip = false
  if producer ~= '' then
    if pseq < 0 then pseq = expected end
    if pseq < expected then
      dups = dups + 1
      skip = true
    elseif pseq > expected then
      status, index = 'gap', i
      break
    end
  end
  if not skip then
    local fits
    fits, held, bytes, first, floor_known, floor = make_room(
      B, nb, size, maxb, queue, ARGV[3], true, held, bytes, first, floor_known, floor)
    if not fits then
      status, index = 'full', i
      break
    end
    redis.call('XADD', B .. ':x', nxt .. '-1', 'h', ARGV[base + 2], 'd', ARGV[base + 3])
    redis.call('HSET', B .. ':sz', nxt, nb)
    nxt = nxt + 1
    held = held + 1
    bytes = bytes + nb
    produced = produced + nb
    placed = placed + 1
    if producer ~= '' then expected = expected + 1 end
  end
end
redis.call('HSET', m, 'next', nxt, 'held', held, 'bytes', bytes, 'first', first,
  'produced_bytes', produced)
if producer ~= '' then redis.call('HSET', B .. ':prod', producer, expected) end
if placed > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2] .. ':d') end
return {placed, status, expected, dups, index, nxt}
"""
)

# OFFER without the payloads: it runs in one MULTI right after `XADD B:x NOMKSTREAM
# <guess + i>-1 h .. d ..` of each item, so a payload never passes through Lua (a 1 MiB
# script argument costs Redis about ten times its XADD). It keeps the first items that
# fit and deletes the entries of the others, then sets the stream's last id back, so
# the next XADD of those seqs is accepted; nobody sees the entries in between (MULTI).
# If the guess was not the stream's next seq (another replica appended meanwhile, or a
# retried MULTI), or a producer seq is not the expected one (a retried upload: dups,
# or a gap), it deletes every entry it was given and answers `retry`: the replica then
# runs OFFER for those items. An XADD at or below the stream's last id fails inside the
# MULTI, so a retried write cannot add an item twice.
# ARGV: channel, inc, now, producer ('' = none), claim, mode ('q'/'f'), size, max_bytes,
#       guess, n, then n times: pseq, nbytes
# Returns {placed, status, expected, dups, index, next};
#         status ok|full|closed|claim|retry
COMMIT = (
    _FLOOR
    + """
local B = KEYS[1]
local m = B .. ':m'
local x = B .. ':x'
local guess, n = tonumber(ARGV[9]), tonumber(ARGV[10])
-- delete the entries of seqs from..guess+n-1 that these XADDs added; last id back
local function undo(from, last)
  if redis.call('EXISTS', x) == 0 then return end
  local ids = {}
  for s = math.max(from, guess), guess + n - 1 do
    ids[#ids + 1] = s .. '-1'
    if #ids >= 1000 then
      redis.call('XDEL', x, unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then redis.call('XDEL', x, unpack(ids)) end
  if last > 0 then
    redis.call('XSETID', x, (last - 1) .. '-1')
  else
    redis.call('XSETID', x, '0-0')
  end
end
local st = redis.call('HMGET', m, 'aborted', 'term', 'next', 'held', 'bytes', 'first',
  'produced_bytes')
if st[3] == false or st[1] == '1' or st[2] then
  if st[3] ~= false and st[1] ~= '1' then undo(tonumber(st[3]), tonumber(st[3])) end
  return {0, 'closed', 0, 0, 0, 0}
end
local nxt, held, bytes = tonumber(st[3]), tonumber(st[4]), tonumber(st[5])
local first, produced = tonumber(st[6]), tonumber(st[7])
if nxt ~= guess then
  undo(nxt, nxt)
  return {0, 'retry', 0, 0, 0, nxt}
end
local producer = ARGV[4]
local expected = 0
if producer ~= '' then
  if redis.call('HGET', B .. ':claim', producer) ~= ARGV[5] then
    undo(nxt, nxt)
    return {0, 'claim', 0, 0, 0, nxt}
  end
  expected = tonumber(redis.call('HGET', B .. ':prod', producer) or '0')
  for i = 0, n - 1 do
    local pseq = tonumber(ARGV[11 + i * 2])
    if pseq >= 0 and pseq ~= expected + i then
      undo(nxt, nxt)
      return {0, 'retry', 0, 0, 0, nxt}
    end
  end
end
local queue = ARGV[6] == 'q'
local size, maxb = tonumber(ARGV[7]), tonumber(ARGV[8])
local placed, status, index = 0, 'ok', 0
local floor_known, floor = false, nil
for i = 0, n - 1 do
  local nb = tonumber(ARGV[12 + i * 2])
  local fits
  fits, held, bytes, first, floor_known, floor = make_room(
    B, nb, size, maxb, queue, ARGV[3], true, held, bytes, first, floor_known, floor)
  if not fits then
    status, index = 'full', i
    break
  end
  redis.call('HSET', B .. ':sz', nxt, nb)
  nxt = nxt + 1
  held = held + 1
  bytes = bytes + nb
  produced = produced + nb
  placed = placed + 1
end
if placed < n then undo(nxt, nxt) end
if producer ~= '' then expected = expected + placed end
redis.call('HSET', m, 'next', nxt, 'held', held, 'bytes', bytes, 'first', first,
  'produced_bytes', produced)
if producer ~= '' then redis.call('HSET', B .. ':prod', producer, expected) end
if placed > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2] .. ':d') end
return {placed, status, expected, 0, index, nxt}
"""
)

# How many of the next items fit now (what COMMIT would keep of them), changing nothing
# but departed fanout `block` consumers (pruned, as OFFER and COMMIT prune them):
# a replica that found the stream full asks this before it sends payloads again, so a
# waiting producer does not send (and take back) every item it holds at each wake.
# ARGV: now, mode ('q'/'f'), size, max_bytes, then each item's nbytes
# Returns the count, or -1 if the stream is closed or gone.
ROOM = (
    _FLOOR
    + """
local B = KEYS[1]
local m = B .. ':m'
local st = redis.call('HMGET', m, 'aborted', 'term', 'next', 'held', 'bytes', 'first')
if st[3] == false or st[1] == '1' or st[2] then return -1 end
local held, bytes, first = tonumber(st[4]), tonumber(st[5]), tonumber(st[6])
local nxt = tonumber(st[3])
local queue = ARGV[2] == 'q'
local size, maxb = tonumber(ARGV[3]), tonumber(ARGV[4])
local floor_known, floor = false, nil
local count = 0
for i = 5, #ARGV do
  local nb = tonumber(ARGV[i])
  local fits
  fits, held, bytes, first, floor_known, floor = make_room(
    B, nb, size, maxb, queue, ARGV[1], false, held, bytes, first, floor_known, floor)
  if not fits then break end
  held = held + 1
  bytes = bytes + nb
  count = count + 1
end
return count
"""
)

# ARGV: term-json-without-seq (a JSON object), channel, inc. Returns {status, term}.
FINISH = """
local m = KEYS[1] .. ':m'
local st = redis.call('HMGET', m, 'aborted', 'term', 'next')
if st[3] == false or st[1] == '1' then return {'aborted', st[2] or ''} end
if st[2] then return {'finished', st[2]} end
local frame = cjson.decode(ARGV[1])
frame['seq'] = tonumber(st[3])
local term = cjson.encode(frame)
redis.call('HSET', m, 'term', term)
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':d')
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ':s')
return {'ok', term}
"""

_INCR = """
-- HINCRBY, but never of 0 (Lua writes -0 as "-0", which HINCRBY refuses)
local function incr(key, field, n)
  if n ~= 0 then redis.call('HINCRBY', key, field, n) end
end
"""

# Queue consumers. ARGV: consumer, token, ttl_ms, channel, inc.
# Returns {status, pending seqs in delivery order...}
OPEN = """
local B = KEYS[1]
local m = B .. ':m'
local st = redis.call('HMGET', m, 'aborted', 'next')
if st[2] == false or st[1] == '1' then return {'closed'} end
local ckey = B .. ':c:' .. ARGV[1]
local old = redis.call('GET', ckey)
redis.call('SET', ckey, ARGV[2], 'PX', ARGV[3])
redis.call('SADD', B .. ':cs', ARGV[1])
if old and old ~= 'gone' then redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':x') end
local out = {'ok'}
for _, s in ipairs(redis.call('ZRANGE', B .. ':p:' .. ARGV[1], 0, -1)) do
  out[#out + 1] = s
end
return out
"""

# ARGV: consumer ('' for fanout), token, lease_ms, channel, inc, fanout ('1'/'0')
CLOSE = """
local B = KEYS[1]
if ARGV[6] == '1' then
  redis.call('ZREM', B .. ':fb', ARGV[2])
  redis.call('ZREM', B .. ':fbt', ARGV[2])
  local fkey = B .. ':f:' .. ARGV[1]
  if redis.call('GET', fkey) == ARGV[2] then redis.call('DEL', fkey) end
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':s')
  return 1
end
local ckey = B .. ':c:' .. ARGV[1]
if redis.call('GET', ckey) ~= ARGV[2] then return 0 end
if redis.call('ZCARD', B .. ':p:' .. ARGV[1]) > 0 and tonumber(ARGV[3]) > 0 then
  redis.call('SET', ckey, 'gone', 'PX', ARGV[3])
else
  redis.call('DEL', ckey)
end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':d')
return 1
"""

# Return the pending items of consumers whose connection key is gone (lease over, or
# their replica died and stopped refreshing it). Needs B, m, group.
_REAP = (
    _INCR
    + """
local function reap(B, m, except)
  local back = 0
  for _, id in ipairs(redis.call('SMEMBERS', B .. ':cs')) do
    if id ~= except and redis.call('EXISTS', B .. ':c:' .. id) == 0 then
      local pkey = B .. ':p:' .. id
      local seqs = redis.call('ZRANGE', pkey, 0, -1)
      for _, s in ipairs(seqs) do redis.call('ZADD', B .. ':ret', s, s) end
      back = back + #seqs
      redis.call('DEL', pkey, B .. ':a:' .. id)
      redis.call('SREM', B .. ':cs', id)
      redis.call('XGROUP', 'DELCONSUMER', B .. ':x', 'g', id)
    end
  end
  if back > 0 then
    incr(m, 'expired', back)
    incr(m, 'pending', -back)
  end
  return back
end

-- put entries into `consumer`'s pending entries list without reading them (no copy)
local function claim(x, consumer, ids)
  local last = ids[#ids]
  ids[#ids + 1] = 'FORCE'
  ids[#ids + 1] = 'JUSTID'
  ids[#ids + 1] = 'LASTID'
  ids[#ids + 1] = last
  redis.call('XCLAIM', x, 'g', consumer, 0, unpack(ids))
end

local function leased(B, except)
  for _, id in ipairs(redis.call('SMEMBERS', B .. ':cs')) do
    if id ~= except and redis.call('GET', B .. ':c:' .. id) == 'gone'
        and redis.call('ZCARD', B .. ':p:' .. id) > 0 then
      return true
    end
  end
  return false
end
"""
)

# Queue take. ARGV: consumer, token, max_items, max_bytes, channel, inc
# Returns {'items', nret, seqs...} | {'none'} | {'term', json} | {'closed', json}
#         | {'superseded'}
TAKE = (
    _REAP
    + """
local B = KEYS[1]
local m = B .. ':m'
local consumer = ARGV[1]
local st = redis.call('HMGET', m, 'aborted', 'term', 'next', 'delivered', 'ord')
if st[3] == false then return {'closed', ''} end
if st[1] == '1' then return {'closed', st[2] or ''} end
if redis.call('GET', B .. ':c:' .. consumer) ~= ARGV[2] then return {'superseded'} end
local back = reap(B, m, consumer)
local maxi, maxb = tonumber(ARGV[3]), tonumber(ARGV[4])
local pkey = B .. ':p:' .. consumer
local ord = tonumber(st[5])
local count, taken = 0, 0
local out = {'items', 0}
local x = B .. ':x'
while count < maxi and taken < maxb do
  local r = redis.call('ZRANGE', B .. ':ret', 0, 0)
  if #r == 0 then break end
  local s = r[1]
  redis.call('ZREM', B .. ':ret', s)
  redis.call('XCLAIM', x, 'g', consumer, 0, s .. '-1', 'FORCE', 'JUSTID')
  redis.call('ZADD', pkey, ord, s)
  ord = ord + 1
  count = count + 1
  taken = taken + tonumber(redis.call('HGET', B .. ':sz', s) or '0')
  out[#out + 1] = s
end
local nret = count
local d, nxt = tonumber(st[4]), tonumber(st[3])
local fresh_bytes = 0
local ids = {}
while count < maxi and taken < maxb and d < nxt do
  local nb = tonumber(redis.call('HGET', B .. ':sz', d) or '0')
  redis.call('ZADD', pkey, ord, d)
  ids[#ids + 1] = d .. '-1'
  out[#out + 1] = d
  ord = ord + 1
  count = count + 1
  taken = taken + nb
  fresh_bytes = fresh_bytes + nb
  d = d + 1
  if #ids >= 1000 then
    claim(x, consumer, ids)
    ids = {}
  end
end
if #ids > 0 then claim(x, consumer, ids) end
if count == 0 then
  if st[2] and not leased(B, consumer) then return {'term', st[2]} end
  if back > 0 then redis.call('PUBLISH', ARGV[5], ARGV[6] .. ':d') end
  return {'none'}
end
local fresh = count - nret
redis.call('HSET', m, 'delivered', d, 'ord', ord)
incr(m, 'pending', count)
incr(m, 'consumed', fresh)
incr(m, 'consumed_bytes', taken)
if nret > 0 then incr(m, 'redelivered', nret) end
redis.call('SADD', B .. ':cs', consumer)
out[2] = nret
return out
"""
)

# ARGV: consumer, upto (-1: none), release ('1'/'0'), channel, inc
# Returns {status, acked, released, pending}; status ok|notfound|conflict|closed
ACK = (
    _REAP
    + """
local B = KEYS[1]
local m = B .. ':m'
local consumer = ARGV[1]
local st = redis.call('HMGET', m, 'aborted', 'term', 'next')
if st[3] == false or st[1] == '1' then return {'closed', 0, 0, 0} end
reap(B, m, consumer)
local ckey = B .. ':c:' .. consumer
local pkey = B .. ':p:' .. consumer
local akey = B .. ':a:' .. consumer
local conn = redis.call('GET', ckey)
local npend = redis.call('ZCARD', pkey)
if not ((conn and conn ~= 'gone') or npend > 0) then return {'notfound', 0, 0, 0} end
local upto = tonumber(ARGV[2])
local acked, released = 0, 0
if upto >= 0 then
  local score = redis.call('ZSCORE', pkey, upto)
  if not score then
    if not redis.call('ZSCORE', akey, upto) then return {'conflict', 0, 0, npend} end
  else
    local seqs = redis.call('ZRANGEBYSCORE', pkey, '-inf', score)
    local freed = 0
    for _, s in ipairs(seqs) do
      local id = s .. '-1'
      redis.call('XACK', B .. ':x', 'g', id)
      redis.call('XDEL', B .. ':x', id)
      freed = freed + tonumber(redis.call('HGET', B .. ':sz', s) or '0')
      redis.call('HDEL', B .. ':sz', s)
      redis.call('ZADD', akey, s, s)
    end
    acked = #seqs
    redis.call('ZREMRANGEBYSCORE', pkey, '-inf', score)
    redis.call('ZREMRANGEBYRANK', akey, 0, -4097)
    incr(m, 'held', -acked)
    incr(m, 'pending', -acked)
    incr(m, 'bytes', -freed)
    incr(m, 'acked', acked)
    redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':s')
  end
end
if ARGV[3] == '1' then
  local rest = redis.call('ZRANGE', pkey, 0, -1)
  for _, s in ipairs(rest) do redis.call('ZADD', B .. ':ret', s, s) end
  released = #rest
  redis.call('DEL', pkey)
  incr(m, 'pending', -released)
  if conn then
    redis.call('DEL', ckey)
    redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':x')
  end
  redis.call('SREM', B .. ':cs', consumer)
  redis.call('XGROUP', 'DELCONSUMER', B .. ':x', 'g', consumer)
end
local left = redis.call('ZCARD', pkey)
if left == 0 and conn == 'gone' then
  redis.call('DEL', ckey)
  redis.call('SREM', B .. ':cs', consumer)
end
if released > 0 or (acked > 0 and st[2]) then
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':d')
end
return {'ok', acked, released, left}
"""
)
