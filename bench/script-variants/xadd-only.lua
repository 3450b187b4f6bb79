-- A variant of src/redis/script.rs DEDUP_APPEND_LUA, measured against it with scripts/bench-script.py
-- (bench/RESULTS.md, "Goal 2"). Not used by the server.
local prefix = ARGV[1]
local count = tonumber(ARGV[3])
local blob = ARGV[4]
local outcomes = {}
local position = 1
local streams = {}
for index = 1, count do
  local partition, player, seq, action_type, ts, recv_us, payload
  partition, player, seq, action_type, ts, recv_us, payload, position =
    struct.unpack('<Bc0Bc0Bc0Bc0Bc0Bc0I2c0', blob, position)
  local stream = streams[partition]
  if not stream then stream = prefix .. ':{' .. partition .. '}:events'; streams[partition] = stream end
  redis.pcall('XADD', stream, '*', 'player', player, 'seq', seq,
      'type', action_type, 'ts', ts, 'recv_us', recv_us, 'payload', payload)
  outcomes[index] = 'A'
end
return ARGV[5] .. ' ' .. table.concat(outcomes)
