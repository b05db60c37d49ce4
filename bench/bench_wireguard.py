#!/usr/bin/env python3
"""bench_wireguard.py: TCP through a WireGuard tunnel, direct and relayed.

Three network namespaces, as in the NAT tests: on the internet side (wan)
the remote WireGuard peer and the udpexposer server, then a router doing
stateful source NAT that drops unsolicited datagrams, then the hidden lan
with the client and the hidden WireGuard peer.  iperf3 sends TCP through the
tunnel from the remote peer to the hidden one (--reverse: from the hidden
peer to the remote one) for --seconds, in these ways, interleaved round by
round:

  direct         the router forwards the WireGuard port (no relay)
  udpexposer.py  the remote peer's endpoint is the server; the client next
                 to the hidden peer relays for it
  NAME           the same with --compare NAME=COMMAND (server and client
                 get the same arguments as udpexposer.py)

Printed: Mbit/s (median of --rounds) and the relay processes' CPU seconds
per GB carried (server + client).  Needs root, ip, nft, iperf3 and a
wireguard-go (the system's, or --wg PATH: a current one sends and receives
UDP in GSO/GRO trains, as Debian's package newer than Debian 12 does).  Not a
test: it asserts nothing.

    python3 bench/bench_wireguard.py --wg /tmp/wgc/usr/bin/wireguard-go \\
        --compare rust=/path/to/rust/udpexposer
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "udpexposer.py")
HELPER, REMOTE, PUBLIC, HIDDEN = ("198.51.100.1", "198.51.100.2",
                                  "203.0.113.10", "10.200.0.2")
WG_PORT, RELAY_PORT = 51820, 5566
TUNNEL_A, TUNNEL_B = "10.9.0.1", "10.9.0.2"


def sh(*cmd, stdin=None, check=True):
    return subprocess.run(cmd, input=stdin, universal_newlines=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          check=check).stdout


def cpu_seconds(pid):
    """(user, kernel) CPU seconds the process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class Net:
    """wan (remote peer, server) - router (NAT) - lan (client, hidden peer)."""

    def __init__(self):
        tag = "%x" % (os.getpid() & 0xFFFFF)
        self.wan, self.router, self.lan = ("wgb%s%s" % (k, tag) for k in "wrl")
        self.wan_if, self.lan_if = "wga%s" % tag, "wgl%s" % tag
        self.wg_a, self.wg_b = "wgA%s" % tag, "wgB%s" % tag
        self.procs = []

    def __enter__(self):
        for ns in (self.wan, self.router, self.lan):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "a" + self.wan_if, "netns", self.wan, "type",
           "veth", "peer", "name", self.wan_if, "netns", self.router)
        sh("ip", "link", "add", self.lan_if, "netns", self.router, "type",
           "veth", "peer", "name", "b" + self.lan_if, "netns", self.lan)
        for ns, addr, dev in (
                (self.wan, "203.0.113.1/24", "a" + self.wan_if),
                (self.wan, HELPER + "/24", "lo"),
                (self.wan, REMOTE + "/32", "lo"),
                (self.router, PUBLIC + "/24", self.wan_if),
                (self.router, "10.200.0.1/24", self.lan_if),
                (self.lan, HIDDEN + "/24", "b" + self.lan_if)):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.lan, "route", "add", "default", "via", "10.200.0.1")
        sh("ip", "-n", self.router, "route", "add", "198.51.100.0/24", "via",
           "203.0.113.1")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw",
           "net.ipv4.ip_forward=1")
        sh("ip", "netns", "exec", self.router, "nft", "-f", "-", stdin="""
            table ip wgbench {
              chain prerouting {
                type nat hook prerouting priority dstnat;
                iifname "%(wan)s" udp dport %(port)d dnat to %(hidden)s
              }
              chain postrouting {
                type nat hook postrouting priority srcnat;
                oifname "%(wan)s" snat to %(public)s
              }
              chain forward {
                type filter hook forward priority filter; policy drop;
                ct state established,related accept
                iifname "%(lan)s" oifname "%(wan)s" accept
                iifname "%(wan)s" udp dport %(port)d ct status dnat accept
              }
            }""" % dict(wan=self.wan_if, lan=self.lan_if, port=WG_PORT,
                        hidden=HIDDEN, public=PUBLIC))
        return self

    def __exit__(self, *exc):
        self.stop_all()
        for ns in (self.wan, self.router, self.lan):
            sh("ip", "netns", "del", ns, check=False)

    def start(self, ns, argv, env=None):
        full = dict(os.environ, **(env or {}))
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv,
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=full)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def tunnel(self, wg, keys, endpoint):
        """Both wireguard-go peers up; A's endpoint is `endpoint`."""
        env = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        for ns, dev in ((self.wan, self.wg_a), (self.lan, self.wg_b)):
            self.start(ns, [wg, "-f", dev], env)
        deadline = time.monotonic() + 10
        for dev in (self.wg_a, self.wg_b):
            while not os.path.exists("/var/run/wireguard/%s.sock" % dev):
                if time.monotonic() > deadline:
                    raise RuntimeError("wireguard-go did not start")
                time.sleep(0.05)
        (a_priv, a_pub), (b_priv, b_pub) = keys
        sh("ip", "netns", "exec", self.wan, "wg", "set", self.wg_a,
           "private-key", a_priv, "peer", b_pub, "endpoint", endpoint,
           "allowed-ips", TUNNEL_B + "/32")
        sh("ip", "netns", "exec", self.lan, "wg", "set", self.wg_b,
           "private-key", b_priv, "listen-port", str(WG_PORT), "peer", a_pub,
           "allowed-ips", TUNNEL_A + "/32")
        for ns, dev, addr in ((self.wan, self.wg_a, TUNNEL_A),
                              (self.lan, self.wg_b, TUNNEL_B)):
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")


def make_keys(tmp):
    keys = []
    for name in "ab":
        priv = os.path.join(tmp, name)
        with open(priv, "w") as f:
            f.write(sh("wg", "genkey"))
        with open(priv) as f:
            keys.append((priv, sh("wg", "pubkey", stdin=f.read()).strip()))
    return keys


def iperf(net, seconds, reverse=False):
    """(Mbit/s, bytes) of TCP from the remote peer to the hidden one, or
    the other way round."""
    for _ in range(10):     # until the iperf3 server listens
        server = net.start(net.lan, ["iperf3", "-s", "-1", "-B", TUNNEL_B])
        time.sleep(0.3)
        r = subprocess.run(["ip", "netns", "exec", net.wan, "iperf3", "-c",
                            TUNNEL_B, "-t", str(seconds), "-J"]
                           + ["-R"] * reverse,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True, timeout=seconds + 60)
        server.wait(10)
        report = json.loads(r.stdout)
        if "end" in report and "sum_received" in report["end"]:
            end = report["end"]["sum_received"]
            return end["bits_per_second"] / 1e6, end["bytes"]
    raise RuntimeError("iperf3: %s" % report.get("error"))


def run(net, wg, keys, name, command, seconds, reverse):
    """One case: (Mbit/s, relay CPU seconds per GB or None)."""
    relays = []
    try:
        if command is None:
            net.tunnel(wg, keys, "%s:%d" % (PUBLIC, WG_PORT))
        else:
            argv = shlex.split(command)
            relays.append(net.start(net.wan, argv + [
                "%s:%d" % (HELPER, RELAY_PORT), "-s", "-n", "4"]))
            relays.append(net.start(net.lan, argv + [
                "0.0.0.0:0", "-a", "%s:%d" % (HELPER, RELAY_PORT), "-c",
                "127.0.0.1:%d" % WG_PORT, "-n", "4", "-i", "1000"]))
            time.sleep(0.5)
            net.tunnel(wg, keys, "%s:%d" % (HELPER, RELAY_PORT))
        cpu0 = [cpu_seconds(p.pid) for p in relays]
        mbits, size = iperf(net, seconds, reverse)
        user = kernel = 0.0
        for p, (user0, kernel0) in zip(relays, cpu0):
            now = cpu_seconds(p.pid)
            user += now[0] - user0
            kernel += now[1] - kernel0
        if not relays:
            return mbits, None, None
        return mbits, (user + kernel) / (size / 1e9), \
            kernel / max(user + kernel, 1e-9)
    finally:
        net.stop_all()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wg", default=shutil.which("wireguard-go"),
                        help="wireguard-go to run (default: the system's)")
    parser.add_argument("--compare", action="append", default=[],
                        metavar="NAME=COMMAND")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reverse", action="store_true",
                        help="TCP from the hidden peer to the remote one")
    parser.add_argument("--floor-gso", metavar="FLOOR_GSO_C",
                        help="compile this floor_gso.c (a relay in C with "
                             "trains) and run it as one more row; the others "
                             "are also shown as a ratio to it")
    args = parser.parse_args()
    for tool in ("ip", "nft", "iperf3", "wg"):
        if shutil.which(tool) is None:
            sys.exit("bench_wireguard.py needs %s" % tool)
    if not args.wg or os.geteuid() != 0:
        sys.exit("bench_wireguard.py needs root and a wireguard-go (--wg)")
    version = sh(args.wg, "--version").split("\n")[0]
    cases = [("direct", None),
             ("udpexposer.py", "%s %s" % (shlex.quote(sys.executable),
                                          shlex.quote(SCRIPT)))]
    cases += [tuple(spec.partition("=")[::2]) for spec in args.compare]
    if args.floor_gso:
        exe = os.path.join(tempfile.mkdtemp(prefix="floor-gso-"), "floor_gso")
        subprocess.run(["gcc", "-O2", "-o", exe, args.floor_gso], check=True)
        cases.append(("floor_gso", exe))
    results = {}
    tmp = tempfile.mkdtemp()
    try:
        keys = make_keys(tmp)
        with Net() as net:
            for round_ in range(args.rounds):
                for name, command in cases:
                    try:
                        r = run(net, args.wg, keys, name, command,
                                args.seconds, args.reverse)
                    except (subprocess.TimeoutExpired, RuntimeError) as e:
                        print("round %d, %s: no result (%s)"
                              % (round_ + 1, name, e), file=sys.stderr)
                        continue
                    results.setdefault(name, []).append(r)
                print("round %d of %d done" % (round_ + 1, args.rounds),
                      file=sys.stderr)
    finally:
        shutil.rmtree(tmp)
    print("%s, TCP for %d s through the tunnel %s, median of %d rounds"
          % (version, args.seconds, "from the hidden peer" if args.reverse
             else "to the hidden peer", args.rounds))
    direct = statistics.median(r[0] for r in results["direct"])
    floor = None
    if "floor_gso" in results:
        runs = results["floor_gso"]
        floor = (statistics.median(r[0] for r in runs),
                 statistics.median(r[1] for r in runs))
    for name, runs in results.items():
        mbits = statistics.median(r[0] for r in runs)
        cpu = [r[1] for r in runs if r[1] is not None]
        line = "  %-14s %7.0f Mbit/s (%3.0f %% of direct)" % (
            name, mbits, 100 * mbits / direct)
        if cpu:
            line += "  relays %.1f CPU s per GB (%d %% in the kernel)" % (
                statistics.median(cpu),
                100 * statistics.median(r[2] for r in runs))
        if floor and cpu and name != "floor_gso":
            line += "  (%.2fx floor_gso's Mbit/s, %.2fx its CPU per GB)" % (
                mbits / floor[0], statistics.median(cpu) / floor[1])
        print(line)


if __name__ == "__main__":
    main()
