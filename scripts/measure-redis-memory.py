#!/usr/bin/env python3
"""Measures Redis memory per stored event: runs shardgate's own script (read
from src/redis/script.rs) on N synthetic events with 64-byte payloads against a
Redis, reads INFO memory before and after, then deletes its keys.

    python3 scripts/measure-redis-memory.py [HOST] [PORT] [EVENTS]
"""
import re
import socket
import struct
import sys
import time

host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
port = int(sys.argv[2]) if len(sys.argv) > 2 else 6379
events = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
batch = 250
prefix = "memtest%d" % int(time.time())

source = open(__file__.rsplit("/", 2)[0] + "/src/redis/script.rs").read()
lua = source[source.index('r#"') + 3:source.index('"#;')]
connection = socket.create_connection((host, port))
reader = connection.makefile("rb")


def call(*arguments):
    message = b"*%d\r\n" % len(arguments)
    for argument in arguments:
        argument = argument if isinstance(argument, bytes) else str(argument).encode()
        message += b"$%d\r\n%s\r\n" % (len(argument), argument)
    connection.sendall(message)
    line = reader.readline()
    if line[:1] == b"$":
        return reader.read(int(line[1:]) + 2)[:-2]
    if line[:1] == b"-":
        raise RuntimeError(line.decode())
    return line


def used_memory():
    return int(re.search(r"used_memory:(\d+)", call("INFO", "memory").decode()).group(1))


def record(*fields, payload):
    out = b""
    for field in fields:
        digits = str(field).encode()
        out += bytes([len(digits)]) + digits
    return out + struct.pack("<H", len(payload)) + payload


before = used_memory()
now_us = int(time.time() * 1e6)
for start in range(0, events, batch):
    blob = b"".join(record(i % 16, 10**6 + i, i, 3, now_us, now_us, payload=b"x" * 64) for i in range(start, start + batch))
    assert call("EVAL", lua, 0, prefix, 600, batch, blob) == b"A" * batch
after = used_memory()
call("EVAL", "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 1", 0, prefix + ":*:events")
markers_only = used_memory()
call("EVAL", "for _,k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 1", 0, prefix + ":*")
print("events: %d, payload 64 bytes" % events)
print("total bytes per event:        %.1f" % ((after - before) / events))
print("  marker bytes per event:     %.1f" % ((markers_only - before) / events))
print("  stream bytes per event:     %.1f" % ((after - markers_only) / events))
