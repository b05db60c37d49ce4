#!/usr/bin/env python3
"""bench_relay.py: what udpexposer.py costs per relayed datagram.

Drives real relay processes on loopback and reads the CPU time the relay
process itself spent (Linux: /proc/PID/task/*/schedstat), which is far
steadier than wall time on a shared machine.  Not a test: it asserts nothing.

    python3 bench/bench_relay.py                        # this udpexposer.py
    python3 bench/bench_relay.py --floor bench/floor.c
    python3 bench/bench_relay.py --compare old='python3 /tmp/old.py'

--compare NAME=COMMAND runs another implementation with the same flags
appended (listen address, -s or -a/-c, -n), interleaved A B A B with this one,
and prints each figure as a ratio to the first implementation named by
--baseline (default: floor when given, else this script).

Measured, for each implementation:
  server mode and client mode, 100- and 1400-byte payloads: CPU microseconds
    per relayed datagram under a paced load (--rate), datagrams lost;
  the same cases under a closed loop: datagrams per second, and how busy
    the relay was;
  one way (--mode bulk alone): the real server sends 1400-byte datagrams to
    one connectee, paced (--bulk-rate) and flat out: the client's CPU per
    datagram, datagrams per second, lost of sent;
  round trip p50/p99 through server + client + echo, and the direct one;
  server mode with 4, 1000 and 10000 connectees (this script only);
  server mode on 0.0.0.0, one connectee sending to 1 and to 2000 local
    addresses (--mode local alone);
  key derivation time for -P and start-up time to the first keepalive.

--metrics adds the row 'metrics': this udpexposer.py with --metrics on a
loopback port, which a thread here scrapes (GET /metrics) every second, as
Prometheus would, for as long as each relay runs.  Give a --count that makes
the paced runs last a few seconds (at --rate 50000, 200000 is 4 s).

Why the cost is measured under a paced load: under a closed loop (a window
of datagrams in flight, a new one sent for each that comes back), a relay
that is never idle when it looks for work uses 100 % of its core whatever its
code costs, so its CPU per datagram is 1 / (datagrams per second), and that
rate is set by the load generator.  A cheaper relay then only takes smaller
bursts.  At a fixed offered rate below every implementation's capacity, the
relay sleeps when idle and its CPU time is the work it did.  The closed loop
still says how much an implementation can carry: its datagrams per second.
"""

import argparse
import json
import os
import resource
import selectors
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "udpexposer.py")
LOCAL = "127.0.0.1"
WINDOW = 64            # datagrams in flight per load generator
GIVE_UP = 30.0         # seconds any one measurement may take


# ---------------------------------------------------------------- plumbing

# The relay gets a core of its own and the load generator the other one:
# fewer migrations, steadier figures.
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
RELAY_CPU = CPUS[-1] if len(CPUS) > 1 else None
LOAD_CPU = CPUS[0] if len(CPUS) > 1 else None


def pin(cpu):
    """A preexec_fn that pins the child to cpu (or does nothing)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def udp(host=LOCAL):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def cpu_ns(pid):
    """CPU time the process has used so far, all threads, in nanoseconds."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, task)) as f:
            total += int(f.read().split()[0])
    return total


class Scraper:
    """GET /metrics from a free loopback port (`address`, for --metrics)
    every `every` seconds, from a thread, until stop(): how many scrapes
    were answered.  The first try is at once, and tries go on every 0.05 s
    until the relay answers."""

    def __init__(self, every=1.0):
        with socket.socket() as s:
            s.bind((LOCAL, 0))
            self.port = s.getsockname()[1]
        self.address = "%s:%d" % (LOCAL, self.port)
        self.every, self.answered = every, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        wait = 0.0
        while not self.done.wait(wait):
            try:
                with socket.create_connection((LOCAL, self.port), 1.0) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = b""
                    while True:
                        more = s.recv(1 << 16)
                        if not more:
                            break
                        answer += more
            except OSError:
                wait = 0.05                 # not up yet
                continue
            self.answered += answer.startswith(b"HTTP/1.1 200 ")
            wait = self.every

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.answered


class Relay:
    """One relay process: COMMAND + udpexposer-style arguments."""

    def __init__(self, command, args, env=None, cpu=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.started = time.monotonic()
        self.p = subprocess.Popen(shlex.split(command) + [str(a) for a in args],
                                  stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=full_env,
                                  preexec_fn=pin(cpu))

    def cpu(self):
        return cpu_ns(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()


def wait_ready(send, recv_sock, deadline=10.0):
    """Send probes until one comes out the other end."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        send()
        r, _, _ = select_one(recv_sock, 0.05)
        if r:
            try:
                recv_sock.recvfrom(70000)
                drain(recv_sock)
                return True
            except BlockingIOError:
                pass
    raise RuntimeError("relay did not come up")


def select_one(sock, timeout):
    import select
    return select.select([sock], [], [], timeout)


def drain(sock):
    while True:
        try:
            sock.recvfrom(70000)
        except BlockingIOError:
            return


# ---------------------------------------------------------------- load

def pump(relay, far, near, forward, back, count, payload, rate=None):
    """Closed-loop load with WINDOW datagrams in flight, or `rate` per second.

    The sockets of `far` take turns sending through the relay; the datagram
    arrives at `near`, whose reply comes back through the relay to the
    sender.  forward(sock, i) sends one; back(data, src) answers at near.
    With a rate, sends are paced by the clock instead of by replies: the
    relay then sees the same arrival pattern whatever the load generator's
    own costs (which grow with the number of sockets it reads).
    Returns (relayed datagrams, seconds, CPU ns of the relay, lost).
    """
    sel = selectors.DefaultSelector()
    for s in far:
        sel.register(s, selectors.EVENT_READ, "far")
    sel.register(near, selectors.EVENT_READ, "near")
    sent = arrived_near = arrived_far = 0
    cpu0, t0 = relay.cpu(), time.monotonic()
    end = t0 + GIVE_UP
    for i in range(0 if rate else min(WINDOW, count)):
        forward(far[i % len(far)], i)
        sent += 1
    while arrived_far < count and time.monotonic() < end:
        if rate:
            now = time.monotonic()
            due = min(count, int((now - t0) * rate))
            while sent < due:
                forward(far[sent % len(far)], sent)
                sent += 1
            if sent >= count and now - t0 > count / rate + 0.5:
                break                       # the rest was lost
        events = sel.select(0.001 if rate else 0.2)
        if not events and rate:
            continue
        if not events:                      # losses: refill the window
            for i in range(WINDOW):
                if sent >= count + WINDOW * 4:
                    break
                forward(far[sent % len(far)], sent)
                sent += 1
            continue
        for key, _ in events:
            sock = key.fileobj
            while True:
                try:
                    data, src = sock.recvfrom(70000)
                except BlockingIOError:
                    break
                if key.data == "near":
                    arrived_near += 1
                    back(data, src)
                else:
                    arrived_far += 1
                    if sent < count and not rate:   # cycle through senders
                        forward(far[sent % len(far)], sent)
                        sent += 1
    seconds = time.monotonic() - t0
    cpu = relay.cpu() - cpu0
    sel.close()
    return arrived_near + arrived_far, seconds, cpu, 2 * sent - arrived_near - arrived_far


def bench_server(command, size, count, connectees=4, extra=(), rate=None,
                 listen=LOCAL):
    """Server mode: connectees <-> relay <-> a socket playing the client.
    The relay binds listen (0.0.0.0: it learns each datagram's local
    address, to reply from it); the others send to 127.0.0.1."""
    port = free_port()
    server = (LOCAL, port)
    relay = Relay(command, ["%s:%d" % (listen, port), "-s", "-n",
                            max(connectees, 4)] + list(extra), cpu=RELAY_CPU)
    client = udp()
    far = []
    try:
        # One source address per connectee: 127.0.x.y, all on loopback.
        for i in range(connectees):
            host = "127.0.%d.%d" % (1 + i // 250, 1 + i % 250) \
                if connectees > 4 else LOCAL
            far.append(udp(host))
        payload = os.urandom(size)
        wait_ready(lambda: (client.sendto(b"", server),
                            far[0].sendto(payload, server)), client)
        for s in far:                       # everyone has a tag: steady state
            s.sendto(payload, server)
            if len(far) > 4:
                time.sleep(0.00002)
        time.sleep(0.3)
        drain(client)

        def forward(sock, i):
            sock.sendto(payload, server)

        def back(data, src):
            client.sendto(data, server)     # the tag goes back as it came
        return pump(relay, far, client, forward, back, count, payload, rate)
    finally:
        relay.stop()
        for s in far + [client]:
            s.close()


def bench_local(command, addresses, count, rate, size=100):
    """Server mode bound to 0.0.0.0, one connectee sending to `addresses`
    of its local addresses in turn (127.3.x.y: all of 127/8 is local on
    lo), each reply leaving from the address it answers: the cost of
    learning and keeping local addresses (LocalReplies).  Each (source,
    local address) pair is a connectee of its own."""
    port = free_port()
    dests = [("127.3.%d.%d" % (i // 250, 1 + i % 250), port)
             for i in range(addresses)]
    relay = Relay(command, ["0.0.0.0:%d" % port, "-s", "-n",
                            max(addresses, 4)], cpu=RELAY_CPU)
    client, conn = udp(), udp()
    try:
        payload = os.urandom(size)
        wait_ready(lambda: (client.sendto(b"", (LOCAL, port)),
                            conn.sendto(payload, dests[0])), client)
        for dest in dests:                  # everyone has a tag: steady state
            conn.sendto(payload, dest)
            time.sleep(0.00002)
        time.sleep(0.3)
        drain(client)
        drain(conn)

        def forward(sock, i):
            sock.sendto(payload, dests[i % addresses])

        def back(data, src):
            client.sendto(data, (LOCAL, port))  # the tag goes back as it came
        return pump(relay, [conn], client, forward, back, count, payload, rate)
    finally:
        relay.stop()
        client.close()
        conn.close()


def local_addresses(impls, args, sizes=(1, 2000)):
    """Server-mode CPU us per datagram with one connectee sending to 1 and
    to 2000 local addresses, interleaved A B A B, at --rate round trips per
    second: {name: {addresses: median, "ratio": median of each round's
    2000 to 1}} (a round's pair ran side by side: steadier on a busy
    machine than the ratio of the medians)."""
    runs = {}
    for round_ in range(args.rounds):
        for name, command in impls:
            for n in sizes:
                r = bench_local(command, n, max(args.count, args.rate),
                                args.rate)
                runs.setdefault(name, {}).setdefault(n, []).append(
                    r[2] / 1000.0 / r[0])
        print("round %d of %d done" % (round_ + 1, args.rounds),
              file=sys.stderr)
    return {name: dict([(n, round(statistics.median(v), 3))
                        for n, v in by_n.items()]
                       + [("ratio", round(statistics.median(
                           b / a for a, b in zip(by_n[1], by_n[2000])), 2))])
            for name, by_n in runs.items()}


def bench_client(command, size, count, extra=(), rate=None, listen=LOCAL):
    """Client mode: a socket playing the server <-> relay <-> a real server."""
    server, real = udp(), udp()
    port = free_port()
    t0 = time.monotonic()
    relay = Relay(command, ["%s:%d" % (listen, port), "-a",
                            "%s:%d" % server.getsockname(), "-c",
                            "%s:%d" % real.getsockname(), "-n", 4]
                  + list(extra), cpu=RELAY_CPU)
    try:
        r, _, _ = select_one(server, 10)
        startup = time.monotonic() - t0
        _, caddr = server.recvfrom(70000)
        payload = os.urandom(size)
        frames = [bytes((0, tag)) + payload for tag in (1, 2, 3, 4)]
        wait_ready(lambda: server.sendto(frames[0], caddr), real)
        for f in frames:
            server.sendto(f, caddr)
        time.sleep(0.2)
        drain(real)

        def forward(sock, i):
            sock.sendto(frames[i % 4], caddr)

        def back(data, src):
            real.sendto(data, src)
        result = pump(relay, [server], real, forward, back, count, payload,
                      rate)
        return result + (startup,)
    finally:
        relay.stop()
        server.close()
        real.close()


def bench_bulk(command, count, rate=None, size=1400):
    """One way, as a hidden game or file server sends: the real server
    sends `count` datagrams of `size` bytes on one channel, towards one
    connectee, paced at `rate` per second or flat out (rate None: as fast
    as this process can send, with a send buffer the kernel may fill).
    Returns (arrived at the socket playing the server, seconds, CPU ns of
    the relay, lost)."""
    server, real = udp(), udp()
    for s in (server, real):
        try:                    # as root: past rmem_max / wmem_max
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)    # SO_RCVBUFFORCE
            s.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)    # SO_SNDBUFFORCE
        except OSError:
            pass
    port = free_port()
    relay = Relay(command, ["%s:%d" % (LOCAL, port), "-a",
                            "%s:%d" % server.getsockname(), "-c",
                            "%s:%d" % real.getsockname(), "-n", 4],
                  cpu=RELAY_CPU)
    try:
        select_one(server, 10)
        _, caddr = server.recvfrom(70000)
        payload = os.urandom(size)
        wait_ready(lambda: server.sendto(b"\0\1" + payload, caddr), real)
        time.sleep(0.2)
        drain(real)
        server.sendto(b"\0\1" + payload, caddr)  # the channel's address
        select_one(real, 2)
        _, channel = real.recvfrom(70000)
        drain(server)
        arrived = sent = 0

        def take():
            nonlocal arrived
            while True:
                try:
                    data, _ = server.recvfrom(70000)
                except BlockingIOError:
                    return
                arrived += data[2:] == payload

        cpu0, t0 = relay.cpu(), time.monotonic()
        end = t0 + GIVE_UP
        while sent < count and time.monotonic() < end:
            due = count if rate is None \
                else min(count, int((time.monotonic() - t0) * rate) + 1)
            while sent < due and sent - arrived < 4 * WINDOW * 64:
                try:
                    real.sendto(payload, channel)
                except BlockingIOError:
                    break
                sent += 1
            take()
            if rate is not None:
                time.sleep(0.0005)
        settle = time.monotonic() + 0.5
        while arrived < sent and time.monotonic() < settle:
            select_one(server, 0.05)
            take()
        seconds = time.monotonic() - t0
        return arrived, seconds, relay.cpu() - cpu0, sent - arrived
    finally:
        relay.stop()
        server.close()
        real.close()


def bench_rtt(command, pings, extra=()):
    """Round trips connectee -> server -> client -> echo and back."""
    import threading
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((LOCAL, 0))
    echo.settimeout(0.2)
    stop = threading.Event()

    def run_echo():
        while not stop.is_set():
            try:
                data, src = echo.recvfrom(70000)
            except socket.timeout:
                continue
            echo.sendto(data, src)
    t = threading.Thread(target=run_echo, daemon=True)
    t.start()
    sport, cport = free_port(), free_port()
    server = Relay(command, ["%s:%d" % (LOCAL, sport), "-s"] + list(extra))
    time.sleep(0.5)       # floor's client sends its one keepalive at start
    client = Relay(command, ["%s:%d" % (LOCAL, cport), "-a",
                             "%s:%d" % (LOCAL, sport), "-c",
                             "%s:%d" % echo.getsockname()] + list(extra))
    conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    conn.bind((LOCAL, 0))
    try:
        conn.setblocking(False)
        wait_ready(lambda: conn.sendto(b"warm", (LOCAL, sport)), conn)
        conn.settimeout(1.0)
        relayed = ping(conn, (LOCAL, sport), pings)
        direct = ping(conn, echo.getsockname(), pings)
        return relayed, direct
    finally:
        stop.set()
        server.stop()
        client.stop()
        conn.close()
        t.join()
        echo.close()


def ping(sock, dest, count):
    times = []
    for i in range(count):
        msg = b"%d" % i
        t0 = time.perf_counter()
        sock.sendto(msg, dest)
        try:
            while sock.recvfrom(100)[0] != msg:
                pass
        except socket.timeout:
            continue
        times.append(time.perf_counter() - t0)
    times.sort()
    return (times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6)


# ---------------------------------------------------------------- the runs

def derive_time(runs=5):
    out = subprocess.run(
        [sys.executable, "-c",
         "import statistics, sys, time\n"
         "sys.path.insert(0, %r)\n"
         "import udpexposer as u\n"
         "ts = []\n"
         "for _ in range(%d):\n"
         "    t = time.perf_counter(); u.derive_key('p')\n"
         "    ts.append(time.perf_counter() - t)\n"
         "print(statistics.median(ts))" % (os.path.dirname(SCRIPT), runs)],
        stdout=subprocess.PIPE, universal_newlines=True, check=True)
    return float(out.stdout)


SCALING_RATE = 20000      # round trips per second, the same for every size
BULK_RATE = 20000         # one way: 1400-byte datagrams a second, 224 Mbit/s
PACED_RATE = 50000        # round trips per second for the cost per datagram


def scaling(command, args, sizes=(4, 1000, 10000)):
    """Server-mode CPU us per datagram by number of connectees, interleaved,
    at one paced rate (SCALING_RATE round trips per second)."""
    runs = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            r = bench_server(command, 100, args.count, connectees=n,
                             rate=SCALING_RATE)
            runs[n].append(r[2] / 1000.0 / r[0])
    return {n: round(statistics.median(v), 3) for n, v in runs.items()}


def instructions(command, mode, batch, runs=(20, 120)):
    """User-space instructions per relayed datagram, counted by callgrind.

    The relay runs under valgrind; it is stopped (SIGSTOP) while `batch`
    datagrams are queued for it, then continued, so every wake-up finds
    exactly `batch` of them, both ways.  Two runs of runs[0] and runs[1]
    batches, and the difference, leave start-up out.  Kernel work is not
    counted: this is the interpreter's share only.  Runs of the same code
    have differed by up to 18 % at 1 datagram per wake-up, less at 8.
    """
    totals = []
    for batches in runs:
        out = tempfile.mktemp(prefix="callgrind.")
        port = free_port()
        dest = (LOCAL, port)
        payload = os.urandom(100)
        if mode == "server":
            args = ["%s:%d" % dest, "-s", "-n", 16]
        else:
            server, real = udp(), udp()
            for s in (server, real):
                s.setblocking(True)
                s.settimeout(GIVE_UP)
            args = ["%s:%d" % dest, "-a", "%s:%d" % server.getsockname(),
                    "-c", "%s:%d" % real.getsockname(), "-n", 16,
                    "-i", 1000000]
        relay = Relay("valgrind --tool=callgrind --callgrind-out-file=%s %s"
                      % (out, command), args)

        def held(send):
            """Queue datagrams while the relay is stopped.

            First let it finish relaying the last ones and go back to
            waiting; else it finds these without a wake-up."""
            time.sleep(0.02)
            relay.p.send_signal(signal.SIGSTOP)
            send()
            time.sleep(0.002)
            relay.p.send_signal(signal.SIGCONT)
        try:
            if mode == "server":
                client, conns = udp(), [udp() for _ in range(4)]
                wait_ready(lambda: (client.sendto(b"", dest),
                                    conns[0].sendto(payload, dest)), client,
                           deadline=GIVE_UP)
                for c in conns[1:]:
                    c.sendto(payload, dest)
                time.sleep(1.0)                 # valgrind is slow: settle
                for s in [client] + conns:
                    drain(s)
                    s.setblocking(True)
                    s.settimeout(GIVE_UP)
                for _ in range(batches):
                    held(lambda: [conns[i % 4].sendto(payload, dest)
                                  for i in range(batch)])
                    tagged = [client.recvfrom(70000)[0] for _ in range(batch)]
                    held(lambda: [client.sendto(d, dest) for d in tagged])
                    for i in range(batch):
                        conns[i % 4].recvfrom(70000)
            else:
                _, caddr = server.recvfrom(70000)
                frames = [bytes((0, t)) + payload for t in (1, 2, 3, 4)]
                for f in frames:
                    server.sendto(f, caddr)
                    real.recvfrom(70000)
                for _ in range(batches):
                    held(lambda: [server.sendto(frames[i % 4], caddr)
                                  for i in range(batch)])
                    got = [real.recvfrom(70000) for _ in range(batch)]
                    held(lambda: [real.sendto(d, src) for d, src in got])
                    back = 0
                    while back < batch:
                        back += len(server.recvfrom(70000)[0]) > 2
        finally:
            relay.p.send_signal(signal.SIGCONT)
            for _ in range(5):      # under valgrind a signal can get lost
                relay.p.send_signal(signal.SIGTERM)
                try:
                    relay.p.wait(5)
                    break
                except subprocess.TimeoutExpired:
                    pass
            else:
                relay.stop()
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    totals.append(int(line.split()[1]))
                    break
        os.unlink(out)
    return (totals[1] - totals[0]) / ((runs[1] - runs[0]) * batch * 2)


def build_floor(source):
    exe = os.path.join(tempfile.mkdtemp(prefix="floor-"), "floor")
    subprocess.run(["gcc", "-O2", "-o", exe, source], check=True)
    return exe


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="append", default=[],
                        metavar="NAME=COMMAND",
                        help="another implementation to run under the same load")
    parser.add_argument("--floor", metavar="FLOOR_C",
                        help="compile this floor.c and compare with it "
                             "(server mode plain and --batch, client mode)")
    parser.add_argument("--baseline", help="NAME the ratios are relative to")
    parser.add_argument("--count", type=int, default=40000,
                        help="round trips per measurement (default 40000)")
    parser.add_argument("--rate", type=int, default=PACED_RATE,
                        help="round trips per second of the paced load the "
                             "cost is measured under (default %d)"
                             % PACED_RATE)
    parser.add_argument("--rounds", type=int, default=3,
                        help="A B A B rounds; medians are reported (default 3)")
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--quick", action="store_true",
                        help="skip the connectee scaling and round trips")
    parser.add_argument("--scaling-only", action="store_true",
                        help="only the cost by number of connectees")
    parser.add_argument("--json", metavar="PATH", help="also write JSON here")
    parser.add_argument("--mode", choices=("both", "server", "client",
                                           "bulk", "local"),
                        default="both", help="which modes to measure "
                        "(default both; bulk: only the one-way case; local: "
                        "only a server on 0.0.0.0 answering one connectee "
                        "at 1 and at 2000 local addresses)")
    parser.add_argument("--bulk-rate", type=int, default=BULK_RATE,
                        help="datagrams per second of the paced one-way "
                             "case (default %d)" % BULK_RATE)
    parser.add_argument("--wildcard", action="store_true",
                        help="also run this udpexposer.py bound to 0.0.0.0 "
                             "(replies from each datagram's local address), "
                             "as the row 'wildcard'")
    parser.add_argument("--metrics", action="store_true",
                        help="also run this udpexposer.py with --metrics, "
                             "scraped every second, as the row 'metrics'")
    parser.add_argument("--instructions", action="store_true",
                        help="only user-space instructions per datagram, "
                             "counted by valgrind's callgrind, in bursts of "
                             "1 and 8")
    args = parser.parse_args()

    if LOAD_CPU is not None:
        os.sched_setaffinity(0, {LOAD_CPU})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    impls = [("udpexposer.py", "%s %s" % (shlex.quote(sys.executable),
                                          shlex.quote(SCRIPT)))]
    if args.scaling_only:
        s = scaling(impls[0][1], args)
        print("server mode, 100 bytes, CPU us per datagram by connectees: "
              + ", ".join("%s: %.2f" % kv for kv in s.items())
              + "  (10000 vs 4: %.2fx)" % (s[10000] / s[4]))
        return
    for spec in args.compare:
        name, _, command = spec.partition("=")
        impls.append((name, command))
    if args.instructions:
        print("user-space instructions per relayed datagram (callgrind), "
              "by datagrams per wake-up:")
        for name, command in impls:
            for mode in ("server", "client"):
                print("  %-16s %-6s  1: %6.0f   8: %6.0f" % (
                    name, mode, instructions(command, mode, 1),
                    instructions(command, mode, 8)), flush=True)
        return
    if args.metrics:
        impls.append(("metrics", impls[0][1]))
    if args.mode == "local":
        for name, by_n in local_addresses(impls, args).items():
            print("%-16s server on 0.0.0.0, CPU us per datagram, one "
                  "connectee to 1 local address: %.2f, to 2000: %.2f "
                  "(%.2fx; by round %.2fx)" % (
                      name, by_n[1], by_n[2000], by_n[2000] / by_n[1],
                      by_n["ratio"]))
        return
    if args.wildcard:
        impls.append(("wildcard", impls[0][1]))
    if args.floor:
        floor = build_floor(args.floor)
        impls.append(("floor", floor))
    baseline = args.baseline or ("floor" if args.floor else impls[0][0])

    cases = [(mode, size) for mode in ("server", "client")
             for size in (100, 1400) if args.mode in ("both", mode)]
    paced, closed = {}, {}      # name -> case -> [pump results]
    bulk = {}                   # name -> "paced" / "flat out" -> [results]

    scrapes = [0, 0.0]          # --metrics: answered, seconds measured

    def run(name, command, mode, size, extra=()):
        key = "%s/%d" % (mode, size)
        bench = bench_server if mode == "server" else bench_client
        for rate, into in ((args.rate, paced), (None, closed)):
            # Paced: as many round trips as a closed run, at least 1 s.
            count = max(args.count, args.rate) if rate else args.count
            scraper = Scraper() if name == "metrics" else None
            more = ["--metrics", scraper.address] if scraper else []
            r = bench(command, size, count, extra=list(extra) + more,
                      rate=rate,
                      listen="0.0.0.0" if name == "wildcard" else LOCAL)
            if scraper:
                scrapes[0] += scraper.stop()
                scrapes[1] += r[1]
            into.setdefault(name, {}).setdefault(key, []).append(r)

    for round_ in range(args.rounds):
        for mode, size in cases:
            for name, command in impls:             # interleaved: A B A B
                run(name, command, mode, size)
                if mode == "server" and name == "floor":
                    run("floor --batch", command, mode, size, ["--batch"])
        for name, command in impls:
            if args.mode not in ("both", "client", "bulk") \
                    or name == "wildcard":
                break
            if name == "metrics":
                continue
            for how, rate in (("paced", args.bulk_rate), ("flat out", None)):
                count = max(args.count, args.bulk_rate) if rate \
                    else 5 * args.count
                bulk.setdefault(name, {}).setdefault(how, []).append(
                    bench_bulk(command, count, rate))
        print("round %d of %d done" % (round_ + 1, args.rounds),
              file=sys.stderr)

    report = {"paced_round_trips_per_s": args.rate,
              "cpu_us_per_datagram": {}, "lost": {},
              "closed_loop_datagrams_per_s": {}, "closed_loop_busy": {},
              "startup_ms": {}, "bulk_paced_per_s": args.bulk_rate,
              "bulk": {}}
    for name, by_how in bulk.items():
        for how, runs in by_how.items():
            report["bulk"].setdefault(name, {})[how] = {
                "cpu_us_per_datagram": round(statistics.median(
                    r[2] / 1000.0 / max(r[0], 1) for r in runs), 3),
                "datagrams_per_s": round(statistics.median(
                    r[0] / r[1] for r in runs)),
                "lost": sum(r[3] for r in runs),
                "sent": sum(r[0] + r[3] for r in runs)}
    for name, by_case in paced.items():
        for key, runs in by_case.items():
            per = [r[2] / 1000.0 / r[0] for r in runs]
            report["cpu_us_per_datagram"].setdefault(name, {})[key] = \
                round(statistics.median(per), 3)
            report["lost"].setdefault(name, {})[key] = sum(r[3] for r in runs)
    for name, by_case in closed.items():
        for key, runs in by_case.items():
            rate = [r[0] / r[1] for r in runs]
            busy = [r[2] / 1e9 / r[1] for r in runs]
            report["closed_loop_datagrams_per_s"].setdefault(name, {})[key] \
                = round(statistics.median(rate))
            report["closed_loop_busy"].setdefault(name, {})[key] = \
                round(statistics.median(busy), 2)
            if len(runs[0]) > 4:
                report["startup_ms"].setdefault(name, []).extend(
                    round(r[4] * 1000, 1) for r in runs)

    if not args.quick:
        ours = impls[0][1]
        report["server_cpu_us_by_connectees"] = scaling(ours, args)
        rtt = {}
        for name, command in impls:
            try:
                relayed, direct = bench_rtt(command, args.pings)
            except RuntimeError as e:
                print("round trip through %s: %s" % (name, e), file=sys.stderr)
                continue
            rtt[name] = {"p50_us": round(relayed[0], 1),
                         "p99_us": round(relayed[1], 1)}
            rtt["direct"] = {"p50_us": round(direct[0], 1),
                             "p99_us": round(direct[1], 1)}
        report["rtt"] = rtt
        report["key_derivation_s"] = round(derive_time(), 3)
        pw = [bench_client(ours, 100, 2000, extra=["-P", "p"])[4]
              for _ in range(3)]
        report["startup_ms_password"] = [round(x * 1000, 1) for x in pw]

    if args.metrics:
        report["metrics_scrapes"] = {"answered": scrapes[0],
                                     "measured_s": round(scrapes[1], 1)}
    print_report(report, baseline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def print_report(report, baseline):
    if report["bulk"]:
        bulk = report["bulk"]
        base = bulk.get(baseline, next(iter(bulk.values())))
        print("\none way, real server -> client -> one connectee, 1400 B: "
              "CPU us per datagram (median), x %s's, datagrams per second, "
              "lost of sent:" % (baseline if baseline in bulk
                                 else next(iter(bulk))))
        for name, row in bulk.items():
            print("%-16s" % name + "".join(
                "  %s %6.2f (%.2fx) %7d/s %6d lost of %d" % (
                    how, r["cpu_us_per_datagram"],
                    r["cpu_us_per_datagram"] / base[how]["cpu_us_per_datagram"],
                    r["datagrams_per_s"], r["lost"], r["sent"])
                for how, r in row.items()))
    cpu = report["cpu_us_per_datagram"]
    if not cpu:
        return
    keys = sorted(next(iter(cpu.values())))
    print("\nCPU microseconds per relayed datagram (median) at %d round "
          "trips/s, and x %s's server mode:"
          % (report["paced_round_trips_per_s"], baseline))
    print("%-16s" % "" + "".join("%20s" % k for k in keys))
    for name, row in cpu.items():
        cells = []
        for k in keys:
            if k not in row:
                cells.append("%20s" % "-")
                continue
            # As in the issue: both modes relative to the baseline's server
            # mode at the same size.
            base = cpu.get(baseline, {}).get("server/" + k.split("/")[1])
            ratio = " (%.2fx)" % (row[k] / base) if base else ""
            cells.append("%20s" % ("%.2f%s" % (row[k], ratio)))
        print("%-16s" % name + "".join(cells))
    print("\ndatagrams lost under the paced load, over all rounds:")
    for name, row in report["lost"].items():
        print("%-16s" % name + "".join(
            "%20s" % row[k] if k in row else "%20s" % "-" for k in keys))
    print("\nclosed loop, %d in flight: datagrams per second (median) / "
          "relay busy:" % WINDOW)
    for name, row in report["closed_loop_datagrams_per_s"].items():
        busy = report["closed_loop_busy"][name]
        print("%-16s" % name + "".join(
            "%20s" % ("%d / %d%%" % (row[k], busy[k] * 100))
            if k in row else "%20s" % "-" for k in keys))
    if "metrics_scrapes" in report:
        print("\nmetrics: %(answered)d scrapes answered, %(measured_s)s s "
              "of load measured" % report["metrics_scrapes"])
    if "server_cpu_us_by_connectees" in report:
        s = report["server_cpu_us_by_connectees"]
        print("\nserver mode, 100 bytes, CPU us per datagram by connectees: "
              + ", ".join("%s: %.2f" % kv for kv in s.items())
              + "  (10000 vs 4: %.2fx)" % (s[10000] / s[4]))
    if "rtt" in report:
        print("\nround trip, us (p50 / p99):")
        for name, r in report["rtt"].items():
            print("  %-16s %8.1f / %8.1f" % (name, r["p50_us"], r["p99_us"]))
        print("\nkey derivation (-P): %.3f s" % report["key_derivation_s"])
        print("start-up to first keepalive, ms: plain %s, -P %s" % (
            report["startup_ms"].get("udpexposer.py"),
            report["startup_ms_password"]))


if __name__ == "__main__":
    main()
