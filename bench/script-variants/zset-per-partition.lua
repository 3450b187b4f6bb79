-- A variant of src/redis/script.rs DEDUP_APPEND_LUA, measured against it with scripts/bench-script.py
-- and callgrind (bench/RESULTS.md, "Seventh session"; docs/design.md, "Redis's own phases"). Not used
-- by the server. One sorted set of markers per partition, scored by Redis TIME in ms: one ZMSCORE
-- and one ZADD per partition per call, expired markers trimmed by score every fourth call.
local prefix = ARGV[1]
local window_ms = tonumber(ARGV[2]) * 1000
local count = tonumber(ARGV[3])
local blob = ARGV[4]
local declared = #KEYS > 0
local confirm = ARGV[6] == '1'
local trim = tonumber(string.sub(ARGV[5], -3)) % 4 == 0
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cutoff = now_ms - window_ms
local wrote = false
local found_set, found_member, found_score
local outcomes = {}
local failures = {}
local position = 1
local members, players, seqs, types, times, receives, payloads = {}, {}, {}, {}, {}, {}, {}
local groups = {}
local order = {}
for index = 1, count do
  local partition
  partition, players[index], seqs[index], types[index], times[index], receives[index], payloads[index], position =
    struct.unpack('<Bc0Bc0Bc0Bc0Bc0Bc0I2c0', blob, position)
  members[index] = players[index] .. ':' .. seqs[index]
  local group = groups[partition]
  if not group then
    group = {}
    groups[partition] = group
    order[#order + 1] = partition
  end
  group[#group + 1] = index
end
if position ~= #blob + 1 then
  return redis.error_reply('batch blob has trailing bytes')
end
local function fail(index, key, err)
  outcomes[index] = 'E'
  failures[#failures + 1] = (index - 1) .. ' ' .. key .. ' ' .. err
end
for _, partition in ipairs(order) do
  local group = groups[partition]
  local stream = prefix .. ':{' .. partition .. '}:events'
  local set = prefix .. ':{' .. partition .. '}:seen'
  local names = {}
  for slot, index in ipairs(group) do
    names[slot] = members[index]
  end
  local scores
  if declared and (KEYS[1] ~= stream or KEYS[2] ~= set) then
    scores = { err = 'ERR key not declared in KEYS' }
  else
    if trim then
      local expired = redis.pcall('ZCOUNT', set, '-inf', '(' .. cutoff)
      if type(expired) == 'number' and expired > 0 then
        if expired > 4096 then
          redis.pcall('ZREMRANGEBYRANK', set, 0, 4095)
        else
          redis.pcall('ZREMRANGEBYSCORE', set, '-inf', '(' .. cutoff)
        end
      end
    end
    scores = redis.pcall('ZMSCORE', set, unpack(names))
  end
  if type(scores) == 'table' and scores.err then
    for _, index in ipairs(group) do
      fail(index, set, scores.err)
    end
  else
    local fresh = {}
    local taken = {}
    for slot, index in ipairs(group) do
      local member = names[slot]
      local score = scores[slot]
      if taken[member] then
        fail(index, set, 'ERR the same event twice in one call')
      elseif score and tonumber(score) >= cutoff then
        outcomes[index] = 'D'
        found_set, found_member, found_score = set, member, tonumber(score)
      else
        taken[member] = true
        fresh[#fresh + 1] = now_ms
        fresh[#fresh + 1] = member
      end
    end
    local marked = true
    if #fresh > 0 then
      marked = redis.pcall('ZADD', set, unpack(fresh))
    end
    if type(marked) == 'table' and marked.err then
      for _, index in ipairs(group) do
        if taken[members[index]] then
          taken[members[index]] = nil
          fail(index, set, marked.err)
        end
      end
    else
      for _, index in ipairs(group) do
        if taken[members[index]] then
          taken[members[index]] = nil
          local appended = redis.pcall('XADD', stream, '*', 'player', players[index], 'seq', seqs[index],
            'type', types[index], 'ts', times[index], 'recv_us', receives[index], 'payload', payloads[index])
          wrote = true
          if type(appended) == 'table' and appended.err then
            redis.call('ZREM', set, members[index])
            fail(index, stream, appended.err)
          else
            outcomes[index] = 'A'
          end
        end
      end
    end
  end
end
if confirm and not wrote and found_set then
  redis.pcall('ZADD', found_set, 'XX', found_score + 1, found_member)
end
local reply = ARGV[5] .. ' ' .. table.concat(outcomes)
if #failures > 0 then
  reply = reply .. '\n' .. table.concat(failures, '\n')
end
return reply
