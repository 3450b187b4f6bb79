#!/usr/bin/env python3
"""Redis's cost of the dedup-and-append script alone, by batch size (issue 14, goal 2).

    python3 scripts/bench-script.py PORT SCRIPT.lua [SCRIPT.lua ...]    (BATCHES="4 24 64" to choose sizes)

Against a redis-server you started for it on 127.0.0.1:PORT (it runs FLUSHALL!), it sends 120 000 events per
batch size as EVALSHA calls of B events each, four calls pipelined, 30% of the events copies of earlier ones,
64-byte payloads, in the blob layout of src/redis/script.rs, and prints Redis's CPU (INFO cpu) per event and per call,
and its used_memory per stored event. To measure the server's own script, extract it first:
    python3 -c "import re;s=open('src/redis/script.rs').read();print(s.split('DEDUP_APPEND_LUA: &str = r#\"')[1].split('\"#;')[0])" > /tmp/dedup.lua
Variants are measured against each other in one run, since the machine's noise moves all of them."""
import socket, sys, time, random, subprocess, os, tempfile, struct

def resp(*args):
    out = [b'*%d\r\n' % len(args)]
    for a in args:
        if isinstance(a, int): a = str(a).encode()
        if isinstance(a, str): a = a.encode()
        out.append(b'$%d\r\n%s\r\n' % (len(a), a))
    return b''.join(out)

class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(('127.0.0.1', port)); self.buf = b''
    def send(self, data): self.s.sendall(data)
    def _line(self):
        while b'\r\n' not in self.buf: self.buf += self.s.recv(1 << 20)
        line, self.buf = self.buf.split(b'\r\n', 1); return line
    def read(self):
        line = self._line(); t = line[:1]
        if t in (b'+', b':'): return line[1:]
        if t == b'-': raise RuntimeError(line)
        if t == b'$':
            n = int(line[1:])
            if n < 0: return None
            while len(self.buf) < n + 2: self.buf += self.s.recv(1 << 20)
            v, self.buf = self.buf[:n], self.buf[n+2:]; return v
        if t == b'*':
            return [self.read() for _ in range(int(line[1:]))]
    def call(self, *a): self.send(resp(*a)); return self.read()

def dec(v): s = str(v).encode(); return bytes([len(s)]) + s

def record(p, player, seq, payload):
    return dec(p) + dec(player) + dec(seq) + dec(7) + dec(1700000000000000 + seq) + dec(1700000000000000 + seq) + struct.pack('<H', len(payload)) + payload

def cpu(c):
    info = c.call('INFO', 'cpu').decode()
    d = dict(l.split(':') for l in info.split('\r\n') if ':' in l)
    return float(d['used_cpu_user']) + float(d['used_cpu_sys'])

def mem(c):
    info = c.call('INFO', 'memory').decode()
    d = dict(l.split(':') for l in info.split('\r\n') if ':' in l)
    return int(d['used_memory'])

def run(port, script_path, batch, calls, dup_ratio=0.3, depth=4, variant_args=lambda: []):
    c = Conn(port); c.call('FLUSHALL')
    sha = c.call('SCRIPT', 'LOAD', open(script_path).read()).decode()
    payload = os.urandom(64)
    seen = []
    seq = 0
    blobs = []
    for _ in range(calls):
        recs = []
        for _ in range(batch):
            if seen and random.random() < dup_ratio:
                player, s = random.choice(seen[-5000:])
            else:
                seq += 1; player = random.randrange(1, 100000); s = seq; seen.append((player, s))
            recs.append(record(player % 16, player, s, payload))
        blobs.append(b''.join(recs))
    m0 = mem(c); c0 = cpu(c); t0 = time.time()
    sent = 0; got = 0; nonce = 0
    while got < calls:
        while sent < calls and sent - got < depth:
            nonce += 1
            c.send(resp('EVALSHA', sha, 0, 'sg', 600, batch, blobs[sent], nonce, *variant_args())); sent += 1
        r = c.read(); got += 1
    c1 = cpu(c); m1 = mem(c)
    stored = sum(int(c.call('XLEN', 'sg:{%d}:events' % p)) for p in range(16))
    print(f"{os.path.basename(script_path):24s} batch={batch:4d} calls={calls:5d} redis_us_per_event={(c1-c0)*1e6/(batch*calls):6.2f} "
          f"us_per_call={(c1-c0)*1e6/calls:7.1f} stored={stored} mem_per_stored={(m1-m0)/max(stored,1):6.0f}B wall={time.time()-t0:.2f}s", flush=True)

if __name__ == '__main__':
    port = int(sys.argv[1]); scripts = sys.argv[2:]
    for b in [int(x) for x in os.environ.get("BATCHES","4 24 64").split()]:
        for s in scripts:
            random.seed(1)
            run(port, s, b, max(200, 120000 // b))
