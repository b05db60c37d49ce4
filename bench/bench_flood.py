#!/usr/bin/env python3
"""bench_flood.py: what hostile traffic costs, and whether peers notice.

A server and a client (-n 64 on both), a real server that answers only the
peers, and 4 peers doing paced round trips through it all, while a flood
arrives at the server at a fixed rate.  Not a test: it asserts nothing.

    python3 bench/bench_flood.py                    # this udpexposer.py
    python3 bench/bench_flood.py --rate 20000 --compare old='python3 old.py'

Floods (one per run, --rounds runs of each, interleaved):
  none        no flood: the peers alone
  data        plain mode, one known connectee sending ordinary datagrams:
              what relaying costs, the yardstick for the others
  strangers   plain mode, each datagram from one of 1024 source addresses
              (127.3.x.y), so with -n 64 each is a new connectee that
              nobody answers, on the server and on the client
  pw-data     password mode, ordinary datagrams from one connectee
  tokens      password mode, forged tokens of the right shape from one
              source: each costs an HMAC, and is dropped (relayed as
              data before issue 27)
  lookalikes  password mode, 1400-byte datagrams that start like a token

Printed per flood: the server's and the client's CPU microseconds per
flood datagram (their CPU over the flood, less what they used in the same
time with no flood, over the flood datagrams sent), and the peers' round
trips: p50, p99, lost.
"""

import argparse
import base64
import os
import selectors
import shlex
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_relay import (LOAD_CPU, LOCAL, RELAY_CPU, SCRIPT, Relay,  # noqa
                         free_port, udp)

TOKEN_PREFIX = b"eyJhbGciOiJIUzI1NiJ9."
PEERS, PEER_RATE = 4, 100       # round trips a second, each
SOURCES = 1024                  # spoofed source addresses, used in turn
FLOODS = ("none", "data", "strangers", "pw-data", "tokens", "lookalikes")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def flood_sources(kind):
    """(sockets to send from, payload maker) for a kind of flood."""
    if kind == "strangers":
        socks = [udp("127.3.%d.%d" % (i >> 8, i & 255)) for i in range(SOURCES)]
        return socks, lambda i: b"flood" + bytes(95)
    if kind == "tokens":
        claims = b64(b'{"nonce":%d}' % 12345678901234567890)
        return [udp()], lambda i: (TOKEN_PREFIX + claims + b"."
                                   + b64(os.urandom(32)))
    if kind == "lookalikes":
        return [udp()], lambda i: TOKEN_PREFIX + bytes(1379)
    return [udp()], lambda i: bytes(100)


def run(command, kind, rate, seconds):
    """One flood: (server and client CPU seconds, flood datagrams sent,
    sorted round trips, round trips lost)."""
    extra = ["-P", "bench"] if kind in ("pw-data", "tokens", "lookalikes") \
        else []
    real = udp()
    saddr = (LOCAL, free_port())
    server = Relay(command, ["%s:%d" % saddr, "-s", "-n", 64] + extra,
                   cpu=RELAY_CPU)
    client = Relay(command, ["%s:0" % LOCAL, "-a", "%s:%d" % saddr, "-c",
                             "%s:%d" % real.getsockname(), "-n", 64] + extra,
                   cpu=RELAY_CPU)
    peers = [udp() for _ in range(PEERS)]
    flooders, payload = flood_sources(kind) if kind != "none" else ([], None)
    sel = selectors.DefaultSelector()
    sel.register(real, selectors.EVENT_READ, "real")
    for p in peers:
        sel.register(p, selectors.EVENT_READ, "peer")
    sent_at, rtts = {}, []

    def serve(until, ping_every=None, flood_rate=0):
        """Echo peers at real, take replies, ping and flood on schedule."""
        t0 = now = time.monotonic()
        pings = floods = 0
        while now < until:
            if ping_every is not None:
                while pings * ping_every <= now - t0:
                    peer = peers[pings % PEERS]
                    msg = b"peer %d" % pings
                    sent_at[msg] = time.perf_counter()
                    peer.sendto(msg, saddr)
                    pings += 1
            while floods < flood_rate * (now - t0):
                flooders[floods % len(flooders)].sendto(payload(floods), saddr)
                floods += 1
            for key, _ in sel.select(0.0005):
                try:
                    data, src = key.fileobj.recvfrom(70000)
                except BlockingIOError:
                    continue
                if key.data == "real":
                    if data.startswith(b"peer "):   # nobody else is answered
                        real.sendto(data, src)
                elif data in sent_at:
                    rtts.append(time.perf_counter() - sent_at.pop(data))
            now = time.monotonic()
        return pings, floods

    try:
        deadline = time.monotonic() + 15
        while not rtts:                     # up, and every peer answered once
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not come up")
            sent_at.clear()
            for i, p in enumerate(peers):
                sent_at[b"peer %d" % i] = time.perf_counter()
                p.sendto(b"peer %d" % i, saddr)
            serve(time.monotonic() + 0.2)
        serve(time.monotonic() + 0.3)
        sent_at.clear()
        rtts.clear()
        cpu0 = server.cpu(), client.cpu()
        pings, floods = serve(time.monotonic() + seconds,
                              1.0 / (PEERS * PEER_RATE),
                              rate if flooders else 0)
        cpu1 = server.cpu(), client.cpu()
        serve(time.monotonic() + 0.3)       # late replies still count
    finally:
        server.stop()
        client.stop()
        for s in [real] + peers + flooders:
            s.close()
        sel.close()
    rtts.sort()
    return ((cpu1[0] - cpu0[0]) / 1e9, (cpu1[1] - cpu0[1]) / 1e9, floods,
            rtts, pings - len(rtts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="append", default=[],
                        metavar="NAME=COMMAND")
    parser.add_argument("--rate", type=int, default=5000,
                        help="flood datagrams a second (default 5000)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floods", default=",".join(FLOODS))
    args = parser.parse_args()
    if LOAD_CPU is not None:
        os.sched_setaffinity(0, {LOAD_CPU})
    impls = [("udpexposer.py", "%s %s" % (shlex.quote(sys.executable),
                                          shlex.quote(SCRIPT)))]
    impls += [tuple(spec.partition("=")[::2]) for spec in args.compare]
    floods = args.floods.split(",")
    results = {}
    for round_ in range(args.rounds):
        for kind in floods:
            for name, command in impls:
                r = run(command, kind, args.rate, args.seconds)
                results.setdefault((name, kind), []).append(r)
        print("round %d of %d done" % (round_ + 1, args.rounds),
              file=sys.stderr)
    print("flood of %d datagrams/s for %.0f s; %d peers x %d round trips/s; "
          "median of %d rounds" % (args.rate, args.seconds, PEERS, PEER_RATE,
                                   args.rounds))
    print("%-14s %-11s %10s %10s %8s %8s %6s" % (
        "", "flood", "server us", "client us", "p50 us", "p99 us", "lost"))
    med = statistics.median
    for (name, kind), runs in results.items():
        quiet = results.get((name, "none"), [(0, 0)])
        cost = ["%10.2f" % (1e6 * (med([r[i] for r in runs])
                                   - med([r[i] for r in quiet]))
                            / med([r[2] for r in runs]))
                if kind != "none" else "%9.3fs" % med([r[i] for r in runs])
                for i in (0, 1)]
        p50 = med([r[3][len(r[3]) // 2] * 1e6 for r in runs if r[3]])
        p99 = med([r[3][int(len(r[3]) * 0.99)] * 1e6 for r in runs if r[3]])
        print("%-14s %-11s %s %s %8.0f %8.0f %6d" % (
            name, kind, cost[0], cost[1], p50, p99, sum(r[4] for r in runs)))
    print("(us: CPU microseconds per flood datagram, beyond the same run "
          "with no flood; for 'none', CPU seconds; lost: the peers' round "
          "trips, over all rounds)")


if __name__ == "__main__":
    main()
