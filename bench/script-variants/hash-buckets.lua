-- A variant of src/redis/script.rs DEDUP_APPEND_LUA, measured against it with scripts/bench-script.py
-- (bench/RESULTS.md, "Goal 2"). Not used by the server.
local prefix = ARGV[1]
local window_secs = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local blob = ARGV[4]
local now = redis.call('TIME')
local bucket = math.floor(tonumber(now[1]) / window_secs)
local outcomes = {}
local failures = {}
local position = 1
local currents = {}
local previouses = {}
local streams = {}
for index = 1, count do
  local partition, player, seq, action_type, ts, recv_us, payload
  partition, player, seq, action_type, ts, recv_us, payload, position =
    struct.unpack('<Bc0Bc0Bc0Bc0Bc0Bc0I2c0', blob, position)
  local current = currents[partition]
  if not current then
    local base = prefix .. ':{' .. partition .. '}:'
    current = base .. 'seen:' .. bucket
    currents[partition] = current
    local previous = base .. 'seen:' .. (bucket - 1)
    if redis.call('EXISTS', previous) == 1 then previouses[partition] = previous else previouses[partition] = false end
    streams[partition] = base .. 'events'
  end
  local field = player .. ':' .. seq
  local previous = previouses[partition]
  local marked
  if previous and redis.call('HEXISTS', previous, field) == 1 then
    marked = 0
  else
    marked = redis.pcall('HSETNX', current, field, '')
  end
  if type(marked) == 'table' and marked.err then
    outcomes[index] = 'E'
    failures[#failures + 1] = (index - 1) .. ' ' .. current .. ' ' .. marked.err
  elseif marked == 1 then
    local stream = streams[partition]
    local appended = redis.pcall('XADD', stream, '*', 'player', player, 'seq', seq,
      'type', action_type, 'ts', ts, 'recv_us', recv_us, 'payload', payload)
    if type(appended) == 'table' and appended.err then
      redis.call('HDEL', current, field)
      outcomes[index] = 'E'
      failures[#failures + 1] = (index - 1) .. ' ' .. stream .. ' ' .. appended.err
    else
      outcomes[index] = 'A'
    end
  else
    outcomes[index] = 'D'
  end
end
for partition, current in pairs(currents) do
  redis.call('EXPIRE', current, 2 * window_secs, 'NX')
end
if position ~= #blob + 1 then
  return redis.error_reply('batch blob has trailing bytes')
end
local reply = ARGV[5] .. ' ' .. table.concat(outcomes)
if #failures > 0 then
  reply = reply .. '\n' .. table.concat(failures, '\n')
end
return reply
