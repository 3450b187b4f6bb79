-- A variant of src/redis/script.rs DEDUP_APPEND_LUA, measured against it with scripts/bench-script.py
-- (bench/RESULTS.md, "Goal 2"). Not used by the server.
local prefix = ARGV[1]
local window_secs = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local blob = ARGV[4]
local now = redis.call('TIME')
local bucket = math.floor(tonumber(now[1]) / window_secs)
local outcomes = {}
local position = 1
local groups = {}
local order = {}
local records = {}
for index = 1, count do
  local partition, player, seq, action_type, ts, recv_us, payload
  partition, player, seq, action_type, ts, recv_us, payload, position =
    struct.unpack('<Bc0Bc0Bc0Bc0Bc0Bc0I2c0', blob, position)
  local group = groups[partition]
  if not group then group = {members = {}, indexes = {}}; groups[partition] = group; order[#order+1] = partition end
  local n = #group.members + 1
  group.members[n] = player .. ':' .. seq
  group.indexes[n] = index
  records[index] = {player, seq, action_type, ts, recv_us, payload}
end
for _, partition in ipairs(order) do
  local group = groups[partition]
  local base = prefix .. ':{' .. partition .. '}:'
  local current = base .. 'seen:' .. bucket
  local previous = base .. 'seen:' .. (bucket - 1)
  local stream = base .. 'events'
  local in_current = redis.call('SMISMEMBER', current, unpack(group.members))
  local in_previous = redis.call('SMISMEMBER', previous, unpack(group.members))
  local fresh = {}
  local local_seen = {}
  for i = 1, #group.members do
    local m = group.members[i]
    if in_current[i] == 1 or in_previous[i] == 1 or local_seen[m] then
      outcomes[group.indexes[i]] = 'D'
    else
      local_seen[m] = true
      fresh[#fresh+1] = i
    end
  end
  if #fresh > 0 then
    local names = {}
    for j = 1, #fresh do names[j] = group.members[fresh[j]] end
    redis.call('SADD', current, unpack(names))
    redis.call('EXPIRE', current, 2 * window_secs, 'NX')
    for j = 1, #fresh do
      local index = group.indexes[fresh[j]]
      local r = records[index]
      local appended = redis.pcall('XADD', stream, '*', 'player', r[1], 'seq', r[2],
        'type', r[3], 'ts', r[4], 'recv_us', r[5], 'payload', r[6])
      if type(appended) == 'table' and appended.err then
        redis.call('SREM', current, names[j]); outcomes[index] = 'E'
      else outcomes[index] = 'A' end
    end
  end
end
return ARGV[5] .. ' ' .. table.concat(outcomes)
