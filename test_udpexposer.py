"""Tests for udpexposer.py: pure parts called directly, behaviour through a
subprocess started from a lone copy of the script, on real loopback sockets.

Run:  python3 -m unittest -v        (or: python3 -m pytest -v)
"""

import errno
import json
import os
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import udpexposer as ux

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 5.0
# The Rust udpexposer 0.3.0, where the project's shared folder is beside the
# repository (tests that need it skip elsewhere).
RUST = os.path.join(HERE, "..", "shared", "ref", "udpexposer-0.3.0")

# Bytes captured from the Rust udpexposer 0.3.0 (shared/vectors.json, "plain").
V_FIRST_CONNECTEE = bytes.fromhex("000168656c6c6f")       # tag 1 + b"hello"
V_SECOND_CONNECTEE = bytes.fromhex("00027365636f6e64")    # tag 2 + b"second"
V_CLIENT_TO_SERVER = bytes.fromhex("0001706f6e67")        # tag 1 + b"pong"
V_DELIVERED = bytes.fromhex("70696e67")                   # b"ping"
V_RUST_SERVER_LOG = [
    "New client address: 127.0.0.1:37154",
    "Connectee seqn 1 from 127.0.0.1:55632",
    "Connectee seqn 2 from 127.0.0.1:60645",
    "Failed to find channel 9",
    "Too short datagram from client",
    "New client address: 127.0.0.1:60645",
]
V_RUST_CLIENT_LOG = ["New incoming channel 1", "New incoming channel 4660"]

# Password mode, from shared/vectors.json: the Rust tool's own tokens.
V_PASSWORD = "p"
V_KEY = bytes.fromhex(
    "36db9cb6d7aa23e3bd02b7d52a0e14c1689f4290532b61863110ef8c8acdc435")
V_KEY_CHBS = bytes.fromhex(      # "correct horse battery staple"
    "a8dac802f08969b520cd73b8f4cc533495257ea47b6e9b81b42a5becdf188ca5")
V_INITIAL_REQUEST = (b"eyJhbGciOiJIUzI1NiJ9.eyJub25jZSI6bnVsbH0."
                     b"05tN53zhy3rQJ1dz5E3WNHQh_e7-fn9mFrZSVQeNZ3M")
V_RETRY_REPLY = (b"eyJhbGciOiJIUzI1NiJ9.eyJSZXRyeSI6ODU5NTExMjk2NDE5Nzc3NzMxN30."
                 b"i7N70x5Cn8kaoXnvLbXYliTi--l10avjaED7ZD4A26Y")
V_RETRY_NONCE = 8595112964197777317
V_ANSWER_TO_RETRY = (
    b"eyJhbGciOiJIUzI1NiJ9.eyJub25jZSI6ODU5NTExMjk2NDE5Nzc3NzMxN30."
    b"8GhCeSUsV16zEBbNxlwFamS0adgGh--FREPlPW9jlSA")
V_REGISTERED = (b"eyJhbGciOiJIUzI1NiJ9.IlJlZ2lzdGVyZWQi."
                b"_6rdA4w-Rk6IHmdZid77Bruzr-d2R4cPSuJ6pu7riA8")
V_STATS_REQUEST = (
    b"eyJhbGciOiJIUzI1NiJ9.eyJub25jZSI6MTg0NDY3NDQwNzM3MDk1NTE2MTV9."
    b"wBDmzMnrfxgwurT-MJWuCIkNWOxfTdr4NYS7CmQEEeE")
V_INITIAL_REQUEST_CHBS = (b"eyJhbGciOiJIUzI1NiJ9.eyJub25jZSI6bnVsbH0."
                          b"M7STFRZcb9j1cuQjBa9WPxsGs7_BFwKifjjm5NgFIv4")
V_STATS_BLOB = bytes.fromhex(
    "0000000000000000000000000000000400000000000000010000000000000000"
    "0000000000000002000000000000000100000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000001"
    "000000006b0aa30800000000000000000000000000000000")
V_STATS_JSON = (
    '{"err1":0,"signed_looking":4,"refresh_address":1,"invalid_auths":0,'
    '"auth_in_progress":2,"auth_completeds":1,"err2":0,'
    '"simple_keepalives":0,"simple_address_switches":0,"dwarfs":0,'
    '"ch_not_founds":0,"err3":0,"dropped_no_client_address":0,'
    '"new_connectees":0,"err4":0,"from_connectee_bytes":0,'
    '"from_connectee_msgs":0,"from_client_bytes":0,"from_client_msgs":0,'
    '"stats_requests":1,"last_ka_s":1795859208,"last_client_s":0,'
    '"last_connectee_s":0}')
V_RUST_PASSWORD_CLIENT_LOG = ["Received a reply from server", "Authenticated"]


def has_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


_copy_dir = None


def lone_copy():
    """Path of a copy of udpexposer.py alone in a fresh directory."""
    global _copy_dir
    if _copy_dir is None:
        _copy_dir = tempfile.mkdtemp(prefix="udpexposer-test-")
        shutil.copy(os.path.join(HERE, "udpexposer.py"), _copy_dir)
    return os.path.join(_copy_dir, "udpexposer.py")


def tearDownModule():
    if _copy_dir is not None:
        shutil.rmtree(_copy_dir, ignore_errors=True)


class Proc:
    """A running udpexposer.py with its stdout lines collected by a thread."""

    def __init__(self, args, env=None, netns=None, nofile=None):
        full_env = dict(os.environ)
        full_env.pop("PYTHONUNBUFFERED", None)   # lines must flush by themselves
        full_env.update(env or {})
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.p = subprocess.Popen(
            prefix + [sys.executable, lone_copy()] + [
                a if isinstance(a, bytes) else str(a) for a in args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=full_env, universal_newlines=True,
            preexec_fn=None if nofile is None else lambda: limit_files(nofile))
        self.lines = []
        self.stderr = None
        self.q = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))

    def wait_line(self, pattern, timeout=TIMEOUT):
        """The first new stdout line matching regex pattern, or fail."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no line matching %r in %r"
                                     % (pattern, self.lines))
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def drain(self, settle=0.2):
        """All lines printed so far (waits `settle` for stragglers)."""
        deadline = time.monotonic() + settle
        while True:
            left = deadline - time.monotonic()
            try:
                self.lines.append(self.q.get(timeout=max(left, 0.01)))
            except queue.Empty:
                if left <= 0:
                    return self.lines

    def stop(self):
        """Kill it if it still runs; returns everything it wrote to stderr."""
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(TIMEOUT)
        if self.stderr is None:
            self.stderr = self.p.stderr.read()
            self.p.stdout.close()
            self.p.stderr.close()
        return self.stderr


class RelayCase(unittest.TestCase):
    """Helpers: sockets and processes that clean up after themselves."""

    def udp(self, host="127.0.0.1", port=0, netns=None):
        """A bound UDP socket with a timeout; in network namespace netns."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if netns is None:
            s = socket.socket(family, socket.SOCK_DGRAM)
        else:
            s = in_netns(netns, socket.socket, family, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind((host, port))
        s.settimeout(TIMEOUT)
        return s

    def run_tool(self, *args, env=None, netns=None, nofile=None):
        proc = Proc(args, env=env, netns=netns, nofile=nofile)
        self.addCleanup(proc.stop)
        return proc

    def start(self, *args, env=None, netns=None, nofile=None):
        """Start the tool, wait for its start-up line; (proc, bound address)."""
        proc = self.run_tool(*args, env=env, netns=netns, nofile=nofile)
        m = proc.wait_line(r" mode on (\S+),")
        return proc, ux.resolve(m.group(1))[1]

    def recv(self, sock, size=70000):
        data, src = sock.recvfrom(size)
        return data, src

    def assert_silent(self, sock, wait=0.3):
        """Nothing arrives on sock within `wait` seconds."""
        sock.settimeout(wait)
        try:
            data, src = sock.recvfrom(70000)
        except socket.timeout:
            return
        finally:
            sock.settimeout(TIMEOUT)
        self.fail("unexpected datagram %r from %r" % (data[:40], src))

    def echo(self, sock, reply_from=None):
        """Echo every datagram on sock back to its sender, from reply_from."""
        stop = threading.Event()
        t = threading.Thread(target=echo_forever, args=(sock, stop, reply_from),
                             daemon=True)
        t.start()
        self.addCleanup(t.join, TIMEOUT)    # cleanups run last in, first out:
        self.addCleanup(stop.set)           # stop it, then wait for it

    def relay(self, host="127.0.0.1", n=4, extra=()):
        """Server + client + echo real server: (server addr, server, client)."""
        real = self.udp(host)
        server, saddr = self.start("-s", "%s:0" % fmt_host(host), "-n", n,
                                   *extra)
        client, caddr = self.start(
            "%s:0" % fmt_host(host), "-a", ux.format_addr(saddr),
            "-c", ux.format_addr(real.getsockname()), "-n", n, *extra)
        server.wait_line("New client address")
        self.echo(real)
        return saddr, server, client

    def relayed(self, *extra):
        """Server and client (both with extra) before a real server, and a
        connectee that has said hello through them, both reading trains:
        (real server, connectee, the server's address, the channel's,
        server, client)."""
        real, conn = gro_socket(self), gro_socket(self)
        server, saddr = self.start("-s", "127.0.0.1:0", *extra)
        client, _ = self.start("127.0.0.1:0", "-a", ux.format_addr(saddr),
                               "-c", ux.format_addr(real.getsockname()),
                               "-i", 200, *extra)
        deadline = time.monotonic() + TIMEOUT
        conn.settimeout(0.2)
        while True:                     # password mode: once registered
            conn.sendto(b"hello", saddr)
            real.settimeout(0.2)
            try:
                data, chan = real.recvfrom(100)
                break
            except socket.timeout:
                self.assertLess(time.monotonic(), deadline)
            finally:
                real.settimeout(TIMEOUT)
        self.assertEqual(data, b"hello")
        while True:                     # the later hellos
            real.settimeout(0.3)
            try:
                real.recvfrom(100)
            except socket.timeout:
                break
        real.settimeout(TIMEOUT)
        conn.settimeout(TIMEOUT)
        return real, conn, saddr, chan, server, client

def limit_files(count):
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def fmt_host(host):
    return "[%s]" % host if ":" in host else host


def echo_forever(sock, stop, reply_from=None):
    """Send every datagram back where it came from, until stop is set; a
    train (on a socket with UDP_GRO on) goes back as one."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            sources = []
            got, trains = receive_trains(sock, 1, sources)
            if trains[0]:
                send_train(reply_from or sock, got, sources[0])
            else:
                (reply_from or sock).sendto(got[0], sources[0])
        except socket.timeout:
            continue
        except OSError:
            return


def in_netns(name, fn, *args):
    """fn(*args) called in a thread that entered network namespace `name`.

    A socket made there stays in that namespace wherever it is used later.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    result = {}

    def run():
        try:
            with open("/var/run/netns/" + name) as f:
                if libc.setns(f.fileno(), 0x40000000) != 0:   # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns " + name)
            result["value"] = fn(*args)
        except BaseException as e:
            result["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


# ====================================================================== pure parts

class TestAddresses(unittest.TestCase):
    def test_split(self):
        self.assertEqual(ux.split_host_port("1.2.3.4:5566"), ("1.2.3.4", 5566))
        self.assertEqual(ux.split_host_port("[::1]:5"), ("::1", 5))
        self.assertEqual(ux.split_host_port("example.net:0"), ("example.net", 0))

    def test_split_rejects(self):
        for bad in ("1.2.3.4", "1.2.3.4:", ":5", "1.2.3.4:x", "1.2.3.4:65536",
                    "::1:5", "[::1]5", "[]:5", "[::1]", "1.2.3.4:-1", ""):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ux.split_host_port(bad)

    def test_resolve_literals_and_names(self):
        self.assertEqual(ux.resolve("127.0.0.1:9"),
                         (socket.AF_INET, ("127.0.0.1", 9)))
        family, addr = ux.resolve("localhost:9")
        self.assertIn(family, (socket.AF_INET, socket.AF_INET6))
        self.assertEqual(addr[1], 9)
        if has_ipv6():
            family, addr = ux.resolve("[::1]:9")
            self.assertEqual((family, addr[:2]), (socket.AF_INET6, ("::1", 9)))

    def test_resolve_rejects(self):
        for bad in ("999.1.1.1:5", "[zz::1]:5", "no-such-host.invalid:5"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ux.resolve(bad)

    def test_format(self):
        self.assertEqual(ux.format_addr(("1.2.3.4", 5)), "1.2.3.4:5")
        self.assertEqual(ux.format_addr(("::1", 5, 0, 0)), "[::1]:5")
        self.assertEqual(ux.format_addr(("fe80::1", 5, 0, 3)), "[fe80::1%3]:5")

    def test_ipv4_peer_through_ipv6_socket(self):
        self.assertEqual(ux.peer_addr(socket.AF_INET6, ("1.2.3.4", 5)),
                         ("::ffff:1.2.3.4", 5, 0, 0))
        self.assertEqual(ux.peer_addr(socket.AF_INET, ("1.2.3.4", 5)),
                         ("1.2.3.4", 5))
        with self.assertRaises(ValueError):
            ux.peer_addr(socket.AF_INET, ("::1", 5, 0, 0))


class TestLRU(unittest.TestCase):
    def test_evicts_least_recently_used(self):
        lru = ux.LRU(2)
        self.assertIsNone(lru.put("a", 1))
        self.assertIsNone(lru.put("b", 2))
        self.assertEqual(lru.get("a"), 1)           # b is now the oldest
        self.assertEqual(lru.put("c", 3), ("b", 2, False))
        self.assertIsNone(lru.get("b"))
        self.assertEqual(lru.put("d", 5), ("a", 1, False))
        self.assertEqual(len(lru), 2)

    def test_unanswered_go_before_answered(self):
        lru = ux.LRU(3)
        for key in "abc":
            lru.put(key, key.upper())
        self.assertEqual(lru.answer("a"), "A")      # the oldest, but answered
        self.assertIsNone(lru.answer("zz"))
        self.assertEqual(lru.put("d", "D"), ("b", "B", False))
        self.assertEqual(lru.put("e", "E"), ("c", "C", False))
        self.assertEqual(lru.answer("d"), "D")
        self.assertEqual(lru.get("a"), "A")         # d is now the older one
        self.assertEqual(lru.put("f", "F"), ("e", "E", False))
        self.assertEqual(lru.put("g", "G"), ("f", "F", False))
        lru.answer("g")                             # all answered now
        self.assertEqual(lru.put("h", "H"), ("d", "D", True))
        self.assertEqual(lru.answer("a"), "A")      # answered again: touched
        self.assertEqual(lru.put("i", "I"), ("h", "H", False))
        self.assertEqual(lru.put("j", "J"), ("i", "I", False))
        self.assertEqual(len(lru), 3)

    def test_bounded_forgets_the_oldest_only(self):
        cache = ux.Bounded(3)
        for key in "abc":
            cache[key] = key.upper()
        self.assertEqual(cache["a"], "A")           # a hit changes no order
        cache["b"] = "B2"                           # nor a key stored anew
        cache["d"] = "D"
        self.assertEqual(list(cache.items()),
                         [("b", "B2"), ("c", "C"), ("d", "D")])
        for i in range(100):                        # keeps its bound
            cache[i] = i
            self.assertEqual(len(cache), 3)
        self.assertEqual(list(cache), [97, 98, 99])
        del cache[98]                               # room: nothing forgotten
        cache["e"] = "E"
        self.assertEqual(list(cache), [97, 99, "e"])

    def test_local_replies_forget_the_oldest_address_only(self):
        local = ux.LocalReplies(socket.AF_INET)
        local.capacity = 2

        def pktinfo(ip):
            return struct.pack("@Nii", local.HEADER + 12, socket.IPPROTO_IP,
                               ux.IP_PKTINFO) + bytes(4) \
                + socket.inet_aton(ip) * 2

        key = lambda ip: bytes(16) + local[pktinfo(ip)]   # a source's tail
        tails = [key("127.3.0.%d" % i) for i in (1, 2, 3)]
        self.assertEqual([local.address(t) for t in tails],
                         ["127.3.0.1", "127.3.0.2", "127.3.0.3"])
        self.assertEqual(len(local), 2)
        self.assertEqual(list(local), [pktinfo("127.3.0.2"),
                                       pktinfo("127.3.0.3")])

    def test_connectees_evict_both_directions_together(self):
        t = ux.Connectees(2)
        a, b, c = ("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)
        self.assertEqual(t.add(a), (1, None))
        self.assertEqual(t.add(b), (2, None))
        self.assertEqual(t.table.answer(1), a)      # a's reply, as the relay
        self.assertEqual(t.add(c), (3, (b, False)))
        self.assertIsNone(t.table.get(2))
        self.assertEqual(t.add(b), (4, (c, False)))   # b comes back: new tag
        self.assertEqual(t.add(c), (5, (b, False)))
        self.assertEqual(t.tag_of, {a: 1, c: 5})
        self.assertEqual(len(t), 2)

    def test_tags_rest_as_long_as_they_can(self):
        t = ux.Connectees(3)
        for i in range(65535):
            t.add(i)
        # 1..65535 were handed out in order; the three newest are held
        self.assertEqual(sorted(t.tag_of.values()), [65533, 65534, 65535])
        # then the freed tags come back, the longest free first: 1, 2, ...
        self.assertEqual(t.add("x"), (1, (65532, False)))
        self.assertEqual(t.add("y"), (2, (65533, False)))

    def test_a_full_tag_space_hands_on_the_evicted_tag(self):
        for reserved, usable in (((), 65535), ((0x6579,), 65534)):
            with self.subTest(reserved=reserved):
                t = ux.Connectees(65535, reserved)
                tags = [t.add(i)[0] for i in range(usable)]
                self.assertEqual(len(set(tags)), usable)
                self.assertEqual(0x6579 in tags, not reserved)
                t.table.answer(1)                   # connectee 0 is answered
                tag, evicted = t.add("newcomer")    # every tag is in use
                self.assertEqual((tag, evicted), (tags[1], (1, False)))
                self.assertEqual(t.tag_of["newcomer"], tags[1])
                self.assertEqual(len(t), usable)
                for i in range(2, 5):               # and so on, in O(1)
                    self.assertEqual(t.add(-i)[0], tags[i])

    def test_connectees_never_reuse_a_tag_in_use(self):
        t = ux.Connectees(100)
        for i in range(70000):                      # wraps round the tags
            tag = t.add(i)[0]
            self.assertNotIn(tag, (0, 0x10000))
            if i % 7 == 0:
                t.table.answer(tag)                 # some are answered
        self.assertEqual(len(set(t.tag_of.values())), 100)
        self.assertEqual(sorted(t.tag_of.values()),
                         sorted(list(t.table.answered)
                                + list(t.table.unanswered)))


# ====================================================================== server

class TestServer(RelayCase):
    """The tool as a server, with test sockets playing client and connectees.

    On Linux this runs the recvmmsg and trains path; TestServerPortable below
    runs the same tests on the portable recvfrom/sendto path.
    """

    SERVER = ("-s", "127.0.0.1:0")

    def test_matches_rust_bytes_and_log(self):
        proc, saddr = self.start(*self.SERVER)
        client, c1, c2 = self.udp(), self.udp(), self.udp()

        c1.sendto(b"early", saddr)                  # no client yet: dropped
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        self.assert_silent(client)                  # keepalives get no reply
        c1.sendto(b"hello", saddr)
        self.assertEqual(self.recv(client), (V_FIRST_CONNECTEE, saddr))
        c2.sendto(b"second", saddr)
        self.assertEqual(self.recv(client)[0], V_SECOND_CONNECTEE)
        client.sendto(V_CLIENT_TO_SERVER, saddr)
        self.assertEqual(self.recv(c1), (b"pong", saddr))
        client.sendto(b"\x00\x09nobody", saddr)
        client.sendto(b"\x01", saddr)
        c2.sendto(b"", saddr)                       # plain mode: c2 takes over
        proc.wait_line("New client address: %s"
                       % re.escape(ux.format_addr(c2.getsockname())))

        def shape(line):
            return re.sub(r"127\.0\.0\.1:\d+", "ADDR", line)
        got = [l for l in proc.lines if "mode on" not in l]
        self.assertEqual([shape(l) for l in got],
                         [shape(l) for l in V_RUST_SERVER_LOG])
        self.assertEqual(got[0], "New client address: %s"
                         % ux.format_addr(client.getsockname()))
        self.assertEqual(got[1], "Connectee seqn 1 from %s"
                         % ux.format_addr(c1.getsockname()))

        c1.sendto(b"after", saddr)                  # now goes to c2, tag 1
        self.assertEqual(self.recv(c2), (b"\x00\x01after", saddr))

    def test_empty_payload_from_client_is_relayed_as_empty(self):
        proc, saddr = self.start(*self.SERVER)
        client, c1 = self.udp(), self.udp()
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        c1.sendto(b"x", saddr)
        self.recv(client)
        client.sendto(b"\x00\x01", saddr)
        self.assertEqual(self.recv(c1), (b"", saddr))

    def test_big_datagrams_pass_whole_and_too_big_are_dropped(self):
        proc, saddr = self.start(*self.SERVER)
        client, c1 = self.udp(), self.udp()
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        big = os.urandom(65000)
        c1.sendto(big, saddr)
        self.assertEqual(self.recv(client)[0], b"\x00\x01" + big)
        client.sendto(b"\x00\x01" + big, saddr)
        self.assertEqual(self.recv(c1)[0], big)
        largest = os.urandom(65507)                 # the largest IPv4 payload
        client.sendto(b"\x00\x01" + largest[:65505], saddr)
        self.assertEqual(len(self.recv(c1)[0]), 65505)
        c1.sendto(largest, saddr)                   # cannot take a tag
        proc.wait_line("Dropped a datagram too big")
        self.assert_silent(client)
        c1.sendto(b"still alive", saddr)
        self.assertEqual(self.recv(client)[0], b"\x00\x01still alive")

    def test_garbage_from_everyone_never_kills_it(self):
        proc, saddr = self.start(*self.SERVER, "-n", "3")
        client = self.udp()
        strangers = [self.udp() for _ in range(6)]
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        for i in range(300):
            size = (0, 1, 2, 3, 100, 1400, 9000)[i % 7]
            strangers[i % 6].sendto(os.urandom(size) if size else b"x", saddr)
            client.sendto(os.urandom(1 + i % 5), saddr)
        client.settimeout(0.5)
        try:
            while True:
                client.recvfrom(70000)
        except socket.timeout:
            pass
        client.settimeout(TIMEOUT)
        strangers[0].sendto(b"ok?", saddr)
        data, _ = self.recv(client)
        self.assertEqual(data[2:], b"ok?")
        self.assertIsNone(proc.p.poll())
        self.assertNotIn("Traceback", proc.stop())


class TestServerPortable(TestServer):
    SERVER = ("-s", "127.0.0.1:0", "--portable-io")


class TestBurstIO(RelayCase):
    """Both I/O paths of the server, called directly."""

    def check(self, make, host):
        sock = self.udp(host)
        sock.setblocking(False)
        errors = []
        io = make(sock, lambda where, exc: errors.append((where, exc)))
        a, b = self.udp(host), self.udp(host)
        here = sock.getsockname()
        a.sendto(b"one", here)
        b.sendto(b"", here)
        a.sendto(b"x" * 65000, here)
        deadline = time.monotonic() + TIMEOUT
        got = []
        ats = []
        while len(got) < 3 and time.monotonic() < deadline:
            at_list, lengths, sources, trains = io.receive()
            self.assertEqual(trains, {})
            self.assertEqual(len(lengths), len(sources))
            for at, n, src in zip(at_list, lengths, sources):
                ats.append(at)
                at += ux.TAG_SIZE
                got.append((bytes(io.buf[at:at + n]), io.address(src), src))
        self.assertEqual([(d[:5], addr) for d, addr, _ in got],
                         [(b"one", a.getsockname()), (b"", b.getsockname()),
                          (b"xxxxx", a.getsockname())])
        self.assertEqual(len(got[2][0]), 65000)
        self.assertEqual(got[0][2], got[2][2])      # same source, same key
        self.assertEqual(io.key_of(a.getsockname()), got[0][2])
        self.assertNotEqual(got[0][2], got[1][2])
        # relay the first datagram, tagged, to b and the big one to a
        io.buf[ats[0]:ats[0] + 2] = b"\x00\x07"
        io.send(ats[0], 2 + 3, got[1][2], "err4")
        io.send(ats[2] + ux.TAG_SIZE, 65000, got[0][2], "err3")
        io.send(ats[2], 65000 + 2, got[0][2], "err4")  # fits on IPv6 only
        io.flush()
        self.assertEqual(self.recv(b), (b"\x00\x07one", here))
        self.assertEqual(self.recv(a)[0], b"x" * 65000)
        if ":" in host:
            self.assertEqual(self.recv(a)[0][2:], b"x" * 65000)
        self.assertEqual(errors, [])
        io.send_now(b"now", got[1][2], "err2")
        self.assertEqual(self.recv(b)[0], b"now")

    def test_portable(self):
        self.check(ux.PortableIO, "127.0.0.1")

    @unittest.skipUnless(has_ipv6(), "no IPv6 loopback")
    def test_portable_ipv6(self):
        self.check(ux.PortableIO, "::1")

    @unittest.skipUnless(sys.platform.startswith("linux"), "Linux only")
    def test_mmsg_loads_on_linux(self):
        # Else the tool falls back to the portable path without a word, and
        # the tests of the batched one skip (as they once did on PyPy).
        self.assertIsNotNone(ux._load_mmsg())

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_mmsg(self):
        self.check(lambda s, r: ux.MmsgIO(s, r, *ux._load_mmsg()), "127.0.0.1")

    @unittest.skipIf(ux._load_mmsg() is None or not has_ipv6(),
                     "no recvmmsg or no IPv6 loopback")
    def test_mmsg_ipv6(self):
        self.check(lambda s, r: ux.MmsgIO(s, r, *ux._load_mmsg()), "::1")

    def makers(self):
        """Both I/O classes, or the portable one where there is no mmsg."""
        yield ux.PortableIO
        if ux._load_mmsg() is not None:
            yield lambda s, r: ux.MmsgIO(s, r, *ux._load_mmsg())

    def test_more_sends_than_a_burst_before_flush(self):
        for make in self.makers():
            sock, peer = self.udp(), self.udp()
            io = make(sock, lambda where, exc: self.fail((where, exc)))
            io.buf[:ux.BURST + 5] = bytes(range(ux.BURST + 5))
            key = io.key_of(peer.getsockname())
            for i in range(ux.BURST + 5):
                io.send(i, 1, key, "err4")
            io.flush()
            got = [self.recv(peer)[0] for _ in range(ux.BURST + 5)]
            self.assertEqual(got, [bytes((i,)) for i in range(ux.BURST + 5)])

    def test_wait_in_receive(self):
        # The server waits inside receive() where the platform allows it: until
        # a datagram comes, or for the time given when none does.
        waits = []
        for make in self.makers():
            sock, peer = self.udp(), self.udp()
            sock.setblocking(False)
            io = make(sock, lambda where, exc: self.fail((where, exc)))
            waits.append(io.wait_in_receive(0.3))
            if not waits[-1]:
                continue
            start = time.monotonic()
            self.assertEqual(io.receive(), ((), (), (), {}))
            self.assertGreater(time.monotonic() - start, 0.25)
            self.assertTrue(io.wait_in_receive(TIMEOUT))
            later = threading.Timer(0.1, peer.sendto,
                                    (b"late", sock.getsockname()))
            later.start()
            self.addCleanup(later.cancel)
            _, lengths, sources, _ = io.receive()
            self.assertEqual(list(lengths), [4])
            self.assertEqual(io.address(sources[0]), peer.getsockname())
            io.send_now(b"back", sources[0], "err2")
            self.assertEqual(self.recv(peer)[0], b"back")
        # Only the batched path can wait.
        self.assertEqual(waits, [False, True][:len(waits)])

    def test_send_errors_are_reported_not_raised(self):
        for make in self.makers():
            sock = self.udp()
            errors = []
            io = make(sock, lambda where, exc: errors.append(where))
            peer = self.udp()
            key = make(sock, None).key_of(peer.getsockname())
            io.send(0, 65509, key, "err4")          # too big for IPv4
            io.send(0, 10, key, "err3")
            io.send(0, 11, key, "err3")
            io.send(0, 65509, key, "err1")          # after some were sent
            io.send(0, 12, key, "err3")
            io.flush()
            self.assertEqual(errors, ["err4", "err1"])
            self.assertEqual([len(self.recv(peer)[0]) for _ in range(3)],
                             [10, 11, 12])


def send_train(sock, parts, dest=None):
    """Send parts as one UDP GSO train (the first part's size)."""
    segment = [(ux.SOL_UDP, ux.UDP_SEGMENT, struct.pack("=H", len(parts[0])))]
    if dest is None:
        return sock.sendmsg(parts, segment)
    return sock.sendmsg(parts, segment, 0, dest)


def receive_trains(sock, count, sources=None):
    """count datagrams from a socket with UDP_GRO on: (datagrams, sizes of
    the trains they came in); each one's source added to sources."""
    got, trains = [], []
    while len(got) < count:
        data, ancillary, _, src = sock.recvmsg(70000, 64)
        size, before = len(data), len(got)
        for level, kind, value in ancillary:
            if (level, kind) == (ux.SOL_UDP, ux.UDP_GRO):
                size = struct.unpack("=i", value[:4])[0] or size
        if not data:
            got.append(data)
        else:
            got += [data[i:i + size] for i in range(0, len(data), size)]
        trains.append(size if len(data) > size else None)
        if sources is not None:
            sources += [src] * (len(got) - before)
    return got, trains


def wait_for(receive):
    """What receive() returns once it returns something."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = receive()
        if got[0]:
            return got
        time.sleep(0.001)
    raise AssertionError("nothing came")


def datagrams_of(io, ats, lengths, trains):
    """What a receive() brought, each train cut into its datagrams: (the
    datagrams, whether a train brought any)."""
    got = []
    for at, n in zip(ats, lengths):
        data = bytes(io.buf[at + 2:at + 2 + n])
        size = trains.get(at, n) or 1
        got += [data[i:i + size] for i in range(0, n, size)] or [b""]
    return got, any(at in trains for at in ats)


def gro_socket(case):
    sock = case.udp()
    if not ux.enable_gro(sock):
        case.skipTest("no UDP_GRO in this kernel")
    return sock


@unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
class TestTrains(RelayCase):
    """UDP GRO trains in, GSO trains out, in the batched I/O."""

    def io(self, sock, notices=None):
        return ux.MmsgIO(sock, lambda where, exc: self.fail((where, exc)),
                         *ux._load_mmsg(),
                         notice=[].append if notices is None
                         else notices.append)

    def test_the_local_address_of_datagrams_queued_early(self):
        """A server bound to 0.0.0.0 keys peers by the address they sent to
        as well: datagrams that arrive before its loop starts must carry
        it too, or one peer gets two keys (a client taken for a
        connectee, its datagrams sent round again)."""
        sock = ux.udp_socket(socket.AF_INET, ("0.0.0.0", 0), local=True)
        self.addCleanup(sock.close)
        peer = self.udp()
        here = ("127.0.0.1", sock.getsockname()[1])
        peer.sendto(b"early", here)
        time.sleep(0.05)
        io = ux.MmsgIO(sock, lambda where, exc: self.fail((where, exc)),
                       *ux._load_mmsg(), reply_from_local=True)
        peer.sendto(b"late", here)
        got = []
        while len(got) < 2:
            got += zip(*wait_for(io.receive)[:3])
        self.assertEqual([bytes(io.buf[at + 2:at + 2 + n]) for at, n, _ in got],
                         [b"early", b"late"])
        self.assertEqual(got[0][2], got[1][2])
        self.assertEqual(io.local_address(got[0][2]), "127.0.0.1")
        self.assertEqual(io.address(got[0][2]), peer.getsockname())
        io.send_now(b"back", got[0][2], "err2")
        self.assertEqual(self.recv(peer), (b"back", here))

    def test_tag_runs(self):
        tagged = [b"\x00\x01ab", b"\x00\x01cd", b"\x01\x01ef", b"\x00\x01gh",
                  b"\x00\x01i"]
        buf = bytearray(b"xx" + b"".join(tagged))
        self.assertEqual(ux.tag_runs(buf, 2, 19, 4),
                         [(2, 8, 1), (10, 4, 257), (14, 7, 1)])
        one = bytearray(b"\x12\x34abc" * 9 + b"\x12\x34")
        self.assertEqual(ux.tag_runs(one, 0, len(one), 5),
                         [(0, len(one), 0x1234)])
        self.assertEqual(ux.train_length(47, 5), 10)
        self.assertEqual(ux.train_length(45, 5), 9)

    def test_split_train_makes_room_for_a_tag_before_each(self):
        buf = bytearray(ux.SLOT)
        train = bytes(range(256)) * 8 + b"tail"     # 2,052 bytes
        for size in (1, 17, 100, 2052):
            n = len(train) if size > 1 else ux.TRAIN_IN
            buf[ux.HEADROOM:ux.HEADROOM + n] = train[:n]
            ats, lengths = ux.split_train(buf, 0, n, size)
            self.assertEqual([bytes(buf[at + 2:at + 2 + k])
                              for at, k in zip(ats, lengths)],
                             [train[i:min(i + size, n)]
                              for i in range(0, n, size)])
            self.assertEqual(ats[0], 0)
        with self.assertRaises(OSError):
            ux.split_train(buf, 0, ux.TRAIN_IN + 1, 1)

    def test_a_train_in_is_one_item_and_a_train_out(self):
        sock = gro_socket(self)
        io = self.io(sock)
        sender, peer = self.udp(), gro_socket(self)
        here = sock.getsockname()
        sizes = [1200] * 20 + [700]
        parts = [bytes([i]) * size for i, size in enumerate(sizes)]
        sender.sendto(b"single before", here)
        send_train(sender, parts, here)
        sender.sendto(b"single after", here)
        got, deadline = [], time.monotonic() + TIMEOUT
        while len(got) < 3 and time.monotonic() < deadline:
            ats, lengths, sources, trains = io.receive()
            got += [(at, n, trains.get(at), src)
                    for at, n, src in zip(ats, lengths, sources)]
        self.assertEqual(io.counts["trains_in"], 1)     # it came as a train
        self.assertEqual([(n, size) for _, n, size, _ in got],
                         [(13, None), (sum(sizes), 1200), (12, None)])
        self.assertEqual(len({src for _, _, _, src in got}), 1)
        train_at = got[1][0]
        self.assertEqual(bytes(io.buf[train_at + 2:train_at + 2 + got[1][1]]),
                         b"".join(parts))
        # The relay tags each and sends them on: the train as one again.
        dest = io.key_of(peer.getsockname())
        for i, (at, n, size, _) in enumerate(got):
            if size:
                io.send_train(at + 2, n, size, dest, "err4", tag=i)
            else:
                io.buf[at:at + 2] = struct.pack(">H", i)
                io.send(at, n + 2, dest, "err4")
        io.flush()
        datagrams, trains = receive_trains(peer, 23)
        self.assertEqual(datagrams, [b"\x00\x00single before"]
                         + [b"\x00\x01" + p for p in parts]
                         + [b"\x00\x02single after"])
        self.assertIn(1202, trains)                 # 20 + 1 went as one
        # ... and back: the tags left out, one train again.
        io.send_train(train_at + 2, got[1][1], 1200, io.key_of(
            sender.getsockname()), "err3")
        io.flush()
        self.assertEqual([self.recv(sender)[0] for _ in parts],
                         [p[2:] for p in parts])
        # The next burst has no train: nothing of the last one lingers.
        sender.sendto(b"x" * 3000, here)
        ats, lengths, _, trains = wait_for(io.receive)
        self.assertEqual(trains, {})
        self.assertEqual(bytes(io.buf[ats[0] + 2:ats[0] + 2 + lengths[0]]),
                         b"x" * 3000)

    def test_train_shapes_out(self):
        """send_train() and send_tagged() against what arrives: 1-byte
        datagrams, a short last one, one of only a tag (empty without it),
        trains above TRAIN_OUT and MAX_TRAIN_BYTES, mixed with lone ones
        in one queue, order kept."""
        sock = gro_socket(self)
        io = self.io(sock)
        peer = self.udp()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        dest = io.key_of(peer.getsockname())
        cases = [(1, 100), (1000, 20), (1000, 5), (1472, 64), (9000, 7)]
        at = 2
        expected = []
        for size, count in cases:
            data = bytes((at + i) % 251 for i in range(size * count - 1))
            io.buf[at:at + len(data)] = data
            io.send_train(at, len(data), size, dest, "err4", tag=0x0102)
            expected += [b"\x01\x02" + data[i:i + size]
                         for i in range(0, len(data), size)]
            at += len(data) + 10
            io.buf[at:at + 3] = b"one"
            io.send(at, 3, dest, "err4")
            expected.append(b"one")
            at += 10
        # tags left out; the last datagram is a tag alone: an empty one
        data = b"\x00\x05abc" * 10 + b"\x00\x05"
        io.buf[at:at + len(data)] = data
        io.send_train(at, len(data), 5, dest, "err3")
        expected += [b"abc"] * 10 + [b""]
        io.flush()
        got = []
        while len(got) < len(expected):
            got.append(self.recv(peer)[0])
        self.assertEqual(got, expected)

    def test_datagrams_too_big_to_pair_go_alone(self):
        """Two datagrams of one size that no train can hold two of (a busy
        channel reading the largest a real server sends): each goes alone,
        and one too big for IPv4 with its tag is reported, never fatal."""
        errors = []
        io = ux.MmsgIO(self.udp(), lambda where, exc: errors.append(
            (where, exc.errno)), *ux._load_mmsg())
        peer, chan = self.udp(), self.udp()
        dest = io.key_of(peer.getsockname())
        for size in (40000, 65507):
            for q in range(2):
                io.buf[ux.PLAIN_ATS[q] + 2:ux.PLAIN_ATS[q] + 2 + size] = \
                    bytes([q]) * size
            io.channels.send_tagged(chan, 0, [size, size], [0, 0], 5, dest,
                                    "x")
            io.flush()
        self.assertEqual([self.recv(peer)[0] for _ in range(2)],
                         [b"\x00\x05" + bytes([q]) * 40000 for q in range(2)])
        self.assertEqual(errors, [("x", errno.EMSGSIZE)] * 2)

    def test_only_a_udp_gro_control_message_makes_a_train(self):
        sock = gro_socket(self)
        sock.setsockopt(socket.IPPROTO_IP,
                        getattr(socket, "IP_RECVTOS", 13), 1)  # Linux: 13
        io = self.io(sock)
        sender = self.udp()
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x20)
        sender.sendto(b"y" * 100, sock.getsockname())
        ats, lengths, _, trains = wait_for(io.receive)
        self.assertEqual(bytes(io.buf[ats[0] + 2:ats[0] + 2 + lengths[0]]),
                         b"y" * 100)         # not cut at the TOS byte, 0x20
        self.assertEqual(trains, {})

    def test_a_refused_train_falls_back_once_and_loses_nothing(self):
        sock = gro_socket(self)
        # UDP without checksums: the kernel refuses to make trains (EINVAL)
        sock.setsockopt(socket.SOL_SOCKET, 11, 1)       # SO_NO_CHECK
        notices = []
        io = self.io(sock, notices)
        sender, peer = self.udp(), self.udp()
        here, dest = sock.getsockname(), io.key_of(peer.getsockname())
        for round_ in range(2):
            send_train(sender, [b"%02d" % i * 50 for i in range(10)], here)
            ats, lengths, _, trains = wait_for(io.receive)
            io.send(ats[0] + 2, 4, dest, "err4")    # a lone one first
            io.send_train(ats[0] + 2, lengths[0], trains[ats[0]],
                          dest, "err4", tag=7)
            io.flush()
            self.assertEqual([self.recv(peer)[0] for _ in range(11)],
                             [b"0000"] + [b"\x00\x07" + b"%02d" % i * 50
                                          for i in range(10)])
        self.assertFalse(io.trains_out.on)
        self.assertEqual(len(notices), 1)
        self.assertEqual((io.counts["trains_refused"],
                          io.counts["sent_one_by_one"]), (1, 1))
        self.assertRegex(notices[0], "refuses UDP trains .*one by one")

    def test_channels_read_and_send_trains(self):
        sock = gro_socket(self)
        io = self.io(sock)
        server, real = self.udp(), gro_socket(self)
        to_server = io.key_of(server.getsockname())
        chan = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                             real.getsockname())
        self.addCleanup(chan.close)
        real.sendto(b"alone", chan.getsockname())   # a lone datagram
        select.select([chan], [], [], TIMEOUT)
        self.assertEqual(io.forward(chan, 1, to_server, "x"), (1, 5))
        self.assertEqual(self.recv(server)[0], b"\x00\x01alone")  # at once
        # A train comes from the server for this channel: it goes on to
        # the real server as a train, and the channel reads trains now.
        parts = [b"s%02d" % i + bytes(997) for i in range(30)] + [b"last"]
        send_train(server, [b"\x00\x01" + p for p in parts],
                   sock.getsockname())
        ats, lengths, _, trains = wait_for(io.receive)
        self.assertEqual(len(ats), 1)
        io.send_on(chan, ats[0] + 2, 2, "y")        # a lone one first
        io.send_train_on(chan, ats[0] + 2, lengths[0], trains[ats[0]],
                         "send to the real server")
        io.send_on(chan, ats[0] + 2, 2, "y")        # a lone one after: waits
        io.flush()
        datagrams, trains = receive_trains(real, 33)
        self.assertEqual(datagrams, [b"\x00\x01"] + parts + [b"\x00\x01"])
        self.assertIn(1000, trains)
        self.assertIn(chan, io.channels.gro.left)
        back = [b"r%02d" % i + bytes(1197) for i in range(20)]
        send_train(real, back, chan.getsockname())
        select.select([chan], [], [], TIMEOUT)
        self.assertEqual(io.forward(chan, 2, to_server, "x"),
                         (20, 20 * 1200))
        io.flush()
        self.assertEqual([self.recv(server)[0] for _ in back],
                         [b"\x00\x02" + d for d in back])
        real.sendto(b"alone again", chan.getsockname())
        select.select([chan], [], [], TIMEOUT)
        self.assertEqual(io.forward(chan, 2, to_server, "x"), (1, 11))
        self.assertEqual(self.recv(server)[0], b"\x00\x02alone again")
        io.forget(chan)             # the client closes it
        self.assertNotIn(chan, io.channels.gro.left)

    def test_a_busy_channel_is_read_in_bursts(self):
        """A channel readable in two selector rounds in a row is read with
        one recvmmsg; what it brought leaves at the round's end, as one
        train where the sizes allow, else datagram by datagram."""
        sock = self.udp()
        io = self.io(sock)
        server, real = gro_socket(self), self.udp()
        to_server = io.key_of(server.getsockname())
        chan = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                             real.getsockname())
        self.addCleanup(chan.close)
        for sizes in ([1400] * 30 + [3], [100, 200, 100], [1400] * 3):
            first = b"first"
            real.sendto(first, chan.getsockname())
            select.select([chan], [], [], TIMEOUT)
            self.assertEqual(io.forward(chan, 9, to_server, "x"), (1, 5))
            self.assertEqual(self.recv(server)[0], b"\x00\x09first")
            io.end_round()
            sent = [bytes([i]) * size for i, size in enumerate(sizes)]
            for data in sent:
                real.sendto(data, chan.getsockname())
            time.sleep(0.05)
            self.assertEqual(io.forward(chan, 9, to_server, "x"),
                             (len(sizes), sum(sizes)))
            self.assertEqual(io.channels.filled, len(sizes))     # queued
            io.end_round()
            got, trains = receive_trains(server, len(sizes))
            self.assertEqual(got, [b"\x00\x09" + d for d in sent])
            if sizes[0] == 1400:
                self.assertIn(1402, trains)
            else:
                self.assertEqual(trains, [None] * 3)
            io.end_round()          # a round without it: not busy then

    def test_a_channel_read_never_overwrites_trains_waiting(self):
        """A train for a channel waits in the channel outbox, pointing into
        the slot the server's burst was read into; a channel read before
        it leaves (forward() reads into the same slots) sends it first."""
        sock = gro_socket(self)
        io = self.io(sock)
        server, real = self.udp(), gro_socket(self)
        other = self.udp()
        chan = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                             real.getsockname())
        chan2 = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                              other.getsockname())
        self.addCleanup(chan.close)
        self.addCleanup(chan2.close)
        parts = [b"\x00\x01" + bytes([i]) * 998 for i in range(20)]
        send_train(server, parts, sock.getsockname())
        ats, lengths, _, trains = wait_for(io.receive)
        io.send_train_on(chan, ats[0] + 2, lengths[0], trains[ats[0]], "x")
        other.sendto(b"z" * 3000, chan2.getsockname())     # into slot 0
        select.select([chan2], [], [], TIMEOUT)
        self.assertEqual(io.forward(chan2, 2, io.key_of(
            server.getsockname()), "x"), (1, 3000))
        io.flush()
        self.assertEqual(receive_trains(real, 20)[0], [p[2:] for p in parts])
        self.assertEqual(self.recv(server)[0], b"\x00\x02" + b"z" * 3000)

    def test_a_flush_on_the_way_keeps_the_slots_queued(self):
        """A channel's train that leaves as two messages, the queue full
        after the first: what is queued after the flush still takes its
        slot, so that the next channel's read goes after it."""
        sock = self.udp()
        io = self.io(sock)
        sink, server, real = self.udp(), self.udp(), gro_socket(self)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        to_sink, to_server = io.key_of(sink.getsockname()), \
            io.key_of(server.getsockname())
        for q in range(ux.BURST - 1):       # other channels' datagrams
            io.send(ux.PLAIN_ATS[q], 3, to_sink, "x")
        io.channels.filled = ux.BURST - 1
        chan = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                             real.getsockname())
        self.addCleanup(chan.close)
        io.channels.gro.start(chan)
        self.assertIn(chan, io.channels.gro.left)
        train = [bytes([i]) * 1023 for i in range(64)]  # two, tagged
        send_train(real, train, chan.getsockname())
        select.select([chan], [], [], TIMEOUT)
        self.assertEqual(io.forward(chan, 5, to_server, "x"), (64, 64 * 1023))
        self.assertEqual(io.channels.filled, ux.BURST)   # its slot is still taken
        io.end_round()
        self.assertEqual([self.recv(server)[0] for _ in train],
                         [b"\x00\x05" + d for d in train])

    def test_the_socket_reads_trains_from_the_start(self):
        """The main socket reads with UDP_GRO on from its start, and for
        good: a train is one item in any burst, between lone datagrams and
        after a burst that filled every slot."""
        sock = gro_socket(self)
        sock.setblocking(False)             # as udp_socket() makes it
        io = self.io(sock)
        sender = self.udp()
        here = sock.getsockname()
        train = [b"%02d" % i * 300 for i in range(6)]

        def receive():
            ats, lengths, _, trains = io.receive()
            self.last = trains
            return ats, lengths

        def lone(data):
            return lambda: sender.sendto(data, here)

        def a_train():
            send_train(sender, train, here)

        def got(*sends):
            for send in sends:
                send()
            ats, lengths = wait_for(receive)
            return datagrams_of(io, ats, lengths, self.last)
        for _ in range(3):
            self.assertEqual(got(lone(b"a")), ([b"a"], False))
            self.assertEqual(got(a_train), (train, True))
        for i in range(ux.BURST):
            sender.sendto(b"f%d" % i, here)
        send_train(sender, train, here)
        time.sleep(0.05)
        self.assertEqual(got(), ([b"f%d" % i for i in range(ux.BURST)], False))
        self.assertEqual(got(), (train, True))
        self.assertEqual(io.counts["trains_in"], 4)

    def test_a_channel_reads_trains_after_a_run_of_one_size(self):
        """A channel reads with UDP_GRO once a busy read finds datagrams of
        one size, and stops after TRIAL_READS reads without a train, unless
        something waits then."""
        sock = gro_socket(self)
        with mock.patch.object(ux, "TRIAL_READS", 3):
            io = self.io(sock)
            real, server = self.udp(), gro_socket(self)
            chan = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0),
                                 real.getsockname())
            self.addCleanup(chan.close)
            here = chan.getsockname()
            to_server = io.key_of(server.getsockname())
            gro = io.channels.gro.left

            def read(count, busy=False):
                """count reads from chan, each in a selector round, busy
                ones in rounds one after the other: the datagrams each
                sent on, and whether as a train."""
                got = []
                for _ in range(count):
                    select.select([chan], [], [], TIMEOUT)
                    k, _ = io.forward(chan, 1, to_server, "x")
                    io.end_round()
                    if not busy:
                        io.end_round()      # a round without it
                    datagrams, trains = receive_trains(server, k)
                    self.assertEqual({d[:2] for d in datagrams},
                                     {b"\x00\x01"})
                    got.append(([d[2:] for d in datagrams],
                                trains != [None] * len(trains)))
                return got

            train = [b"%02d" % i * 300 for i in range(7)]
            real.sendto(b"lone", here)
            self.assertEqual(read(1), [([b"lone"], False)])
            self.assertNotIn(chan, gro)
            send_train(real, train, here)       # cut by the kernel
            time.sleep(0.05)
            self.assertEqual(read(2, busy=True), [([train[0]], False),
                                       (train[1:], True)])     # busy
            self.assertIn(chan, gro)            # a run of one size
            send_train(real, train, here)
            self.assertEqual(read(1), [(train, True)])
            # 3 reads without a train end it, but a train queued then is
            # still read as one: UDP_GRO stays on for it.
            for i in range(3):
                real.sendto(b"more %d" % i, here)
            send_train(real, train, here)
            time.sleep(0.05)            # all of it queued
            self.assertEqual(read(4), [([b"more %d" % i], False)
                                       for i in range(3)] + [(train, True)])
            self.assertIn(chan, gro)
            for i in range(3):          # nothing waits after these: off
                real.sendto(b"last %d" % i, here)
                read(1)
            self.assertNotIn(chan, gro)
            io.forget(chan)

    def test_trains_through_server_and_client(self):
        real, conn, saddr, chan = self.relayed()[:4]
        for round_ in range(3):
            there = [bytes([round_, i]) * 650 for i in range(25)] + [b"end"]
            send_train(conn, there, saddr)
            got, trains = receive_trains(real, 26)
            self.assertEqual(got, there)
            self.assertIn(1300, trains)             # the client made one
            back = [bytes([i]) * 1000 for i in range(40)]
            send_train(real, back, chan)
            got, trains = receive_trains(conn, 40)
            self.assertEqual(got, back)
            self.assertIn(1000, trains)             # the server made one

    def test_trains_from_the_real_server_alone(self):
        """A download: the real server sends trains, the connectee none.
        A channel reads with UDP_GRO once it reads a run of one size; from
        then on the trains stay trains all the way."""
        real, conn, saddr, chan = self.relayed()[:4]
        trains, deadline = [], time.monotonic() + 30
        for i in range(200):
            back = [struct.pack(">HH", i, j) * 300 for j in range(8)]
            send_train(real, back, chan)
            got, sizes = receive_trains(conn, 8)
            self.assertEqual(got, back)
            trains += [size for size in sizes if size]
            if len(trains) > 10 or time.monotonic() > deadline:
                break
        self.assertGreater(len(trains), 10)
        self.assertEqual(set(trains), {1200})


# ====================================================================== client

class TestTrainShapes(RelayCase):
    """Trains end to end through both I/O paths: batched, where they stay
    trains, and portable, where each datagram goes alone."""

    EXTRA = ()

    def test_train_shapes_end_to_end(self):
        """Byte for byte, every datagram of each shape, both ways through
        server and client, lone datagrams between trains: 1-byte
        datagrams, a last one shorter, a train of 64 KB, 2-byte ones (only
        a tag on the wire between server and client)."""
        real, conn, saddr, chan = self.relayed(*self.EXTRA)[:4]
        shapes = [(1, 50, 0), (1400, 46, 0), (700, 10, 699), (2, 20, 1),
                  (1000, 30, 0)]
        for size, count, short in shapes:
            for sender, dest, receiver in ((conn, saddr, real),
                                           (real, chan, conn)):
                train = [os.urandom(size) for _ in range(count - 1)] \
                    + [os.urandom(size - short)]
                sender.sendto(b"lone before %d" % size, dest)
                send_train(sender, train, dest)
                sender.sendto(b"lone after", dest)
                got, _ = receive_trains(receiver, count + 2)
                self.assertEqual(got, [b"lone before %d" % size] + train
                                 + [b"lone after"])

    def test_mixed_tags_from_the_client(self):
        """The server cuts a train from the client where the tag changes:
        each connectee gets its datagrams, in order, without the tags."""
        client, conns = gro_socket(self), [self.udp() for _ in range(3)]
        server, saddr = self.start("-s", "127.0.0.1:0", *self.EXTRA)
        client.sendto(b"", saddr)                   # the client's keepalive
        server.wait_line("New client address")
        tags = {}
        for i, conn in enumerate(conns):
            conn.sendto(b"hi %d" % i, saddr)
            data, _ = self.recv(client)
            tags[i] = data[:2]
        tags[3] = b"\x00\x63"                     # nobody's: dropped
        order = [0, 0, 1, 1, 1, 0, 3, 3, 3, 2, 0]
        parts = [tags[i] + bytes([i, j]) * 300 for j, i in enumerate(order)]
        with stopped(server):
            send_train(client, parts, saddr)
            client.sendto(tags[2] + b"lone", saddr)
        for i, conn in enumerate(conns):
            want = [p[2:] for p in parts if p[:2] == tags[i]]
            if i == 2:
                want.append(b"lone")
            self.assertEqual([self.recv(conn)[0] for _ in want], want)
        stats = usr1_stats(server, "server")
        self.assertEqual((stats["from_client_msgs"], stats["ch_not_founds"]),
                         (len(parts) - 3 + 1, 3))


class TestTrainShapesPortable(TestTrainShapes):
    EXTRA = ("--portable-io",)


class TestClient(RelayCase):
    """The tool as a client, with test sockets playing server and real server."""

    FLAGS = ()

    def start_client(self, n=4, interval=25000):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "-n", n, "-i", interval, *self.FLAGS)
        self.assertEqual(self.recv(server), (b"", caddr))   # keepalive at start
        return proc, server, real, caddr

    def test_matches_rust_bytes_and_log(self):
        proc, server, real, caddr = self.start_client()
        server.sendto(b"\x00\x01" + V_DELIVERED, caddr)
        data, worker = self.recv(real)
        self.assertEqual(data, V_DELIVERED)
        real.sendto(b"pong", worker)
        self.assertEqual(self.recv(server), (V_CLIENT_TO_SERVER, caddr))
        server.sendto(b"\x12\x34x", caddr)
        data, worker2 = self.recv(real)
        self.assertEqual(data, b"x")
        self.assertNotEqual(worker, worker2)        # one socket per tag
        server.sendto(b"\x00\x01", caddr)           # exactly 2 bytes: empty
        self.assertEqual(self.recv(real), (b"", worker))
        proc.wait_line("New incoming channel 4660")
        got = [l for l in proc.lines if "mode on" not in l]
        self.assertEqual(got, V_RUST_CLIENT_LOG)

    def test_keepalive_every_interval(self):
        proc, server, real, caddr = self.start_client(interval=100)
        t0 = time.monotonic()
        for _ in range(3):
            self.assertEqual(self.recv(server), (b"", caddr))
        self.assertLess(time.monotonic() - t0, 2.0)

    def test_strangers_are_not_relayed(self):
        proc, server, real, caddr = self.start_client()
        stranger = self.udp()
        stranger.sendto(b"\x00\x01inject", caddr)   # not from the server
        server.sendto(b"\x00\x01real", caddr)
        data, worker = self.recv(real)
        self.assertEqual(data, b"real")
        stranger.sendto(b"to the worker", worker)   # not from the real server
        other_port = self.udp()                     # real server, wrong port
        other_port.sendto(b"wrong port", worker)
        self.assert_silent(server)
        self.assert_silent(real)
        real.sendto(b"right", worker)
        self.assertEqual(self.recv(server)[0], b"\x00\x01right")

    @unittest.skipUnless(has_ipv6(), "no IPv6 loopback")
    def test_ipv6_server_side_ipv4_real_server(self):
        # The main socket and the channel sockets differ in family: the
        # addresses read from each must still compare right, in turn.
        server, real = self.udp("::1"), self.udp()
        proc, caddr = self.start("[::1]:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 *self.FLAGS)
        self.assertEqual(self.recv(server)[0], b"")
        for i in range(3):
            server.sendto(b"\x00\x03to real %d" % i, caddr)
            data, worker = self.recv(real)
            self.assertEqual(data, b"to real %d" % i)
            real.sendto(b"back %d" % i, worker)
            self.assertEqual(self.recv(server), (b"\x00\x03back %d" % i, caddr))

    def test_big_datagrams_pass_whole(self):
        proc, server, real, caddr = self.start_client()
        big = os.urandom(65000)
        server.sendto(b"\x00\x07" + big, caddr)
        data, worker = self.recv(real)
        self.assertEqual(data, big)
        real.sendto(big, worker)
        self.assertEqual(self.recv(server)[0], b"\x00\x07" + big)
        real.sendto(os.urandom(65507), worker)      # cannot take a tag
        proc.wait_line("Dropped a datagram too big")
        self.assert_silent(server)

    @unittest.skipUnless(os.path.isdir("/proc/self/fd"), "needs /proc")
    def test_worker_sockets_closed_on_eviction(self):
        proc, server, real, caddr = self.start_client(n=3)
        fd_dir = "/proc/%d/fd" % proc.p.pid
        before = len(os.listdir(fd_dir))
        workers = []
        for tag in range(1, 41):
            # (one payload on many new channels, none answered, would make
            # the client probe for a loop: another datagram at real)
            server.sendto(bytes((0, tag)) + b"x%d" % tag, caddr)
            workers.append(self.recv(real)[1])
        # (a closed channel's port may come back for a later one)
        self.assertEqual(len(set(workers[-3:])), 3)
        self.assertLessEqual(len(os.listdir(fd_dir)), before + 3)
        # the three most recent channels still work, the oldest do not
        real.sendto(b"back", workers[-1])
        self.assertEqual(self.recv(server)[0], b"\x00\x28back")
        real.sendto(b"gone", workers[0])
        self.assert_silent(server)

    def test_garbage_from_the_server_never_kills_it(self):
        proc, server, real, caddr = self.start_client()
        for i in range(200):
            server.sendto(os.urandom(i % 4), caddr)
        real.settimeout(0.5)
        try:
            while True:
                real.recvfrom(70000)
        except socket.timeout:
            pass
        real.settimeout(TIMEOUT)
        server.sendto(b"\x00\x05alive", caddr)
        self.assertEqual(self.recv(real)[0], b"alive")
        self.assertIsNone(proc.p.poll())


    def test_says_once_when_the_server_answers_from_another_address(self):
        if not sys.platform.startswith("linux"):
            self.skipTest("needs 127.0.0.2")
        right = self.udp("127.0.0.2")
        wrong = self.udp("127.0.0.1", right.getsockname()[1])
        real = self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(right.getsockname()), "-c",
                                 ux.format_addr(real.getsockname()),
                                 *self.FLAGS)
        self.recv(right)                        # its keepalive
        for _ in range(3):
            wrong.sendto(b"\x00\x01hello", caddr)
        proc.wait_line(r"Dropped datagrams from 127\.0\.0\.1:%d, the server's "
                       r"port at another address than 127\.0\.0\.2:%d.*-s "
                       r"127\.0\.0\.2:%d" % ((right.getsockname()[1],) * 3))
        self.assert_silent(real)
        right.sendto(b"\x00\x01hello", caddr)
        self.assertEqual(self.recv(real)[0], b"hello")
        self.assertEqual(len([l for l in proc.drain()
                              if "Dropped datagrams" in l]), 1)


class TestClientPortable(TestClient):
    FLAGS = ("--portable-io",)


# ====================================================================== end to end

class TestEndToEnd(RelayCase):
    def exchange(self, conn, saddr, msg):
        conn.sendto(msg, saddr)
        data, src = self.recv(conn)
        self.assertEqual(data, msg)
        self.assertEqual(src[:2], tuple(saddr[:2]))

    def test_ipv4_several_connectees(self):
        saddr, server, client = self.relay()
        connectees = [self.udp() for _ in range(4)]
        for round_ in range(3):
            for i, c in enumerate(connectees):
                self.exchange(c, saddr, b"%d/%d " % (i, round_) * 20)
        lines = server.drain()
        self.assertEqual(sum("Connectee seqn" in l for l in lines), 4)

    @unittest.skipUnless(has_ipv6(), "no IPv6 loopback")
    def test_ipv6_several_connectees(self):
        saddr, server, client = self.relay(host="::1")
        connectees = [self.udp("::1") for _ in range(3)]
        for round_ in range(2):
            for i, c in enumerate(connectees):
                self.exchange(c, saddr, b"six %d/%d" % (i, round_))
        self.assertIn("Connectee seqn 1 from [::1]:", "\n".join(server.drain()))

    def test_big_datagrams(self):
        saddr, server, client = self.relay()
        c = self.udp()
        for size in (1, 1400, 9000, 65000):     # 0 would be a keepalive
            with self.subTest(size=size):
                self.exchange(c, saddr, os.urandom(size))

    def test_eviction_keeps_replies_for_active_connectees(self):
        # -n 2 and three connectees taking turns: the Rust tool's two LRUs
        # drift apart here; one table must route every reply correctly.
        saddr, server, client = self.relay(n=2)
        a, b, c = self.udp(), self.udp(), self.udp()
        for who in (a, b, c, b, c, a, c, a, b, b, a, c, c, c, a):
            self.exchange(who, saddr, b"from %d" % who.getsockname()[1])

    def test_tags_wrap_without_mixups(self):
        saddr, server, client = self.relay(n=3)
        pool = [self.udp() for _ in range(8)]
        for i in range(40):
            self.exchange(pool[(i * 3) % 8], saddr, b"turn %d" % i)


# ====================================================================== password mode

class TestCrypto(unittest.TestCase):
    def test_argon2i_rfc9106_vector(self):
        tag = ux.argon2i(b"\x01" * 32, b"\x02" * 16, memory_kib=32, passes=3,
                         lanes=4, size=32, secret=b"\x03" * 8,
                         associated=b"\x04" * 12)
        self.assertEqual(tag.hex(), "c814d9d1dc7f37aa13f0d77f2494bda1"
                                    "c8de6b016dd388d29952a4c4672b6ce8")

    def test_keys_match_the_rust_tool(self):
        self.assertEqual(ux.derive_key("p"), V_KEY)
        self.assertEqual(ux.derive_key("correct horse battery staple"),
                         V_KEY_CHBS)

    def test_tokens_byte_for_byte(self):
        self.assertEqual(ux.sign(V_KEY, ux.request_claims()), V_INITIAL_REQUEST)
        self.assertEqual(ux.sign(V_KEY_CHBS, ux.request_claims()),
                         V_INITIAL_REQUEST_CHBS)
        self.assertEqual(ux.sign(V_KEY, ux.REGISTERED_CLAIMS), V_REGISTERED)
        self.assertEqual(ux.sign(V_KEY, ux.request_claims(ux.STATS_NONCE)),
                         V_STATS_REQUEST)
        self.assertEqual(ux.sign(V_KEY, ux.retry_claims(V_RETRY_NONCE)),
                         V_RETRY_REPLY)
        self.assertEqual(ux.sign(V_KEY, ux.request_claims(V_RETRY_NONCE)),
                         V_ANSWER_TO_RETRY)

    def test_verify_reads_the_rust_tokens(self):
        self.assertEqual(ux.verify(V_KEY, V_RETRY_REPLY), {"Retry": V_RETRY_NONCE})
        self.assertEqual(ux.retry_nonce(ux.verify(V_KEY, V_RETRY_REPLY)),
                         V_RETRY_NONCE)
        self.assertEqual(ux.verify(V_KEY, V_REGISTERED), "Registered")
        self.assertEqual(ux.request_nonce(ux.verify(V_KEY, V_INITIAL_REQUEST)),
                         (True, None))
        self.assertEqual(ux.request_nonce(ux.verify(V_KEY, V_STATS_REQUEST)),
                         (True, ux.STATS_NONCE))

    def test_verify_rejects_forgeries(self):
        good = V_REGISTERED
        last = good[-1:]
        other = b"A" if last != b"A" else b"B"
        for bad in (good[:-1] + other,                 # MAC changed
                    good[:-1],                         # MAC cut short
                    good + b"=",                       # MAC padded
                    good.replace(b".Il", b".Im", 1),   # claims changed
                    good[1:],                          # header changed
                    b"eyJhbGciOiJIUzI1NiJ9." + good.split(b".", 1)[1][:5],
                    b"eyJhbGciOiJIUzI1NiJ9.",
                    b""):
            with self.subTest(bad=bad):
                self.assertIsNone(ux.verify(V_KEY, bad))
        self.assertIsNone(ux.verify(V_KEY_CHBS, good))  # another password

    def test_ours_whatever_the_key(self):
        """What a server drops when it does not verify: the Rust tool's
        messages, under any key, MAC unchecked; not lookalikes."""
        for token in (V_INITIAL_REQUEST, V_INITIAL_REQUEST_CHBS, V_REGISTERED,
                      V_STATS_REQUEST, V_RETRY_REPLY, V_ANSWER_TO_RETRY,
                      V_REGISTERED[:-3] + b"AAA"):
            with self.subTest(token=token):
                self.assertTrue(ux.ours(token))
        for data in (ux.sign(V_KEY, b'{"sub":"x"}'),        # another JWT
                     ux.sign(V_KEY, b'{"nonce":-1}'),
                     ux.sign(V_KEY, b'{"nonce":null} '),
                     V_REGISTERED + b"x", V_REGISTERED[:-1],
                     V_REGISTERED.replace(b".", b"!", 2),
                     ux.TOKEN_PREFIX + b"A" * 81,
                     ux.TOKEN_PREFIX + b"x.y",
                     ux.TOKEN_PREFIX + os.urandom(1200), b""):
            with self.subTest(data=data):
                self.assertFalse(ux.ours(data))

    def test_claims_that_are_not_requests(self):
        for claims in ("Registered", {"nonce": -1}, {"nonce": 1 << 64},
                       {"nonce": "1"}, {"nonce": True}, {"nonce": 1, "x": 2},
                       [1], None):
            with self.subTest(claims=claims):
                self.assertEqual(ux.request_nonce(claims), (False, None))
        self.assertIsNone(ux.retry_nonce({"Retry": -5}))
        self.assertIsNone(ux.retry_nonce("Registered"))

    def test_the_proxy_question_and_answer(self):
        self.assertEqual(ux.request_claims(None, 5),
                         b'{"nonce":null,"proxy":5}')
        self.assertEqual(ux.request_nonce({"nonce": 7, "proxy": 5}), (True, 7))
        self.assertEqual(ux.request_nonce({"proxy": 5}), (False, None))
        self.assertEqual(ux.retry_nonce(json.loads(ux.proxy_claims(ux.M64)),
                                        "ProxyV2"), ux.M64)
        longest = ux.sign(V_KEY, ux.request_claims(ux.M64, ux.M64))
        self.assertEqual(len(longest), ux.MAX_TOKEN)
        self.assertEqual(ux.verify(V_KEY, longest),
                         {"nonce": ux.M64, "proxy": ux.M64})

    def test_stats_blob(self):
        self.assertEqual(ux.stats_json(V_STATS_BLOB), V_STATS_JSON)
        stats = dict(zip(ux.STAT_NAMES, range(1, 24)))
        blob = ux.pack_stats(stats)
        self.assertEqual(len(blob), 184)
        self.assertEqual(blob[:16], bytes(7) + b"\x01" + bytes(7) + b"\x02")
        self.assertTrue(ux.stats_json(blob).startswith(
            '{"err1":1,"signed_looking":2,'))
        self.assertTrue(ux.stats_json(blob).endswith(',"last_connectee_s":23}'))


class TestPasswordSources(unittest.TestCase):
    def args(self, *argv):
        return ux.build_parser().parse_args(["-s", "127.0.0.1:0"] + list(argv))

    def test_flag_file_and_environment(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("from file\nsecond line\n")
        self.addCleanup(os.unlink, f.name)
        env = {ux.PASSWORD_ENV: "from env"}
        self.assertEqual(ux.read_password(self.args("-P", "flag"), env),
                         b"flag")
        self.assertEqual(ux.read_password(self.args("--password-file", f.name),
                                          env), b"from file")
        self.assertEqual(ux.read_password(self.args(), env), b"from env")
        self.assertIsNone(ux.read_password(self.args(), {}))
        with self.assertRaises(ux.UsageError):
            ux.read_password(self.args("-P", "x", "--password-file", f.name), {})
        with self.assertRaises(ux.UsageError):
            ux.read_password(self.args("--password-file", f.name + ".none"), {})

    def test_an_empty_password_is_refused_from_every_source(self):
        for args, env in ((self.args("-P", ""), {}),
                          (self.args("--password-file", "/dev/null"), {}),
                          (self.args(), {ux.PASSWORD_ENV: ""})):
            with self.subTest(args=args, env=env):
                with self.assertRaisesRegex(ux.UsageError, "empty"):
                    ux.read_password(args, env)
        # -P is the one source given: an empty variable beside it is unused.
        self.assertEqual(ux.read_password(self.args("-P", "x"),
                                          {ux.PASSWORD_ENV: ""}), b"x")

    def test_bytes_that_are_not_utf8_give_one_key_from_every_source(self):
        raw = b"pw\xff\xfe"
        as_decoded = os.fsdecode(raw)   # how Python hands argv and environ
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(raw + b"\r\n")
        self.addCleanup(os.unlink, f.name)
        for args, env in ((self.args("-P", as_decoded), {}),
                          (self.args("--password-file", f.name), {}),
                          (self.args(), {ux.PASSWORD_ENV: as_decoded})):
            self.assertEqual(ux.read_password(args, env), raw)
        self.assertEqual(ux.derive_key("p"), ux.derive_key(b"p"))

    def test_a_file_without_an_end_of_line_is_read_no_further(self):
        for path, text in (("/dev/zero", "longer than 4096 bytes"),
                           ("/dev/null", "holds an empty first line")):
            with self.subTest(path=path):
                with self.assertRaisesRegex(ux.UsageError, text):
                    ux.read_password(self.args("--password-file", path), {})


class TestPasswordServer(RelayCase):
    """The tool as a password-mode server, driven with the Rust client's bytes."""

    SERVER = ("-s", "127.0.0.1:0")

    def register(self, proc, saddr, client):
        client.sendto(V_INITIAL_REQUEST, saddr)
        retry, src = self.recv(client)
        self.assertEqual(src, saddr)
        nonce = ux.retry_nonce(ux.verify(V_KEY, retry))
        self.assertIsNotNone(nonce, retry)
        proc.wait_line("Authenticating: %s"
                       % re.escape(ux.format_addr(client.getsockname())))
        client.sendto(ux.sign(V_KEY, ux.request_claims(nonce)), saddr)
        self.assertEqual(self.recv(client), (V_REGISTERED, saddr))
        proc.wait_line("New client address: %s"
                       % re.escape(ux.format_addr(client.getsockname())))
        return nonce

    def test_handshake_relay_and_stats(self):
        proc, saddr = self.start(*self.SERVER, "-P", V_PASSWORD)
        client, c1, stranger = self.udp(), self.udp(), self.udp()
        nonce = self.register(proc, saddr, client)
        client.sendto(V_INITIAL_REQUEST, saddr)     # keepalive: accepted at once
        self.assertEqual(self.recv(client), (V_REGISTERED, saddr))

        c1.sendto(b"hello", saddr)
        self.assertEqual(self.recv(client)[0], V_FIRST_CONNECTEE)
        client.sendto(V_CLIENT_TO_SERVER, saddr)
        self.assertEqual(self.recv(c1), (b"pong", saddr))

        # A replayed answer from another address is bound to the wrong address.
        stranger.sendto(ux.sign(V_KEY, ux.request_claims(nonce)), saddr)
        retry = ux.verify(V_KEY, self.recv(stranger)[0])
        self.assertIsNotNone(ux.retry_nonce(retry))
        stranger.sendto(V_STATS_REQUEST, saddr)
        blob, _ = self.recv(stranger)
        stats = dict(zip(ux.STAT_NAMES, struct.unpack(">23Q", blob)))
        self.assertEqual(stats["signed_looking"], 5)
        self.assertEqual(stats["auth_in_progress"], 3)
        self.assertEqual(stats["auth_completeds"], 1)
        self.assertEqual(stats["refresh_address"], 1)
        self.assertEqual(stats["stats_requests"], 1)
        self.assertEqual(stats["new_connectees"], 1)
        self.assertEqual(stats["from_connectee_msgs"], 1)
        self.assertEqual(stats["from_connectee_bytes"], 5)
        self.assertEqual(stats["from_client_msgs"], 1)
        self.assertAlmostEqual(stats["last_ka_s"], time.time(), delta=10)
        self.assertEqual(stats["simple_keepalives"], 0)

    def test_a_wrong_password_is_named_for_what_it_is(self):
        proc, saddr = self.start(*self.SERVER, "-P", V_PASSWORD)
        other = ux.derive_key(b"another password")
        stats, client = self.udp(), self.udp()
        stats.sendto(ux.sign(other, ux.request_claims(ux.STATS_NONCE)), saddr)
        proc.wait_line(r"^A stats request \(-S\) from 127\.0\.0\.1:%d failed "
                       r"to authenticate \(another password\?\)$"
                       % stats.getsockname()[1])
        client.sendto(ux.sign(other, ux.request_claims()), saddr)
        proc.wait_line(r"^A client from 127\.0\.0\.1:%d failed to "
                       r"authenticate" % client.getsockname()[1])

    def test_forgeries_get_no_reply_and_take_nothing_over(self):
        proc, saddr = self.start(*self.SERVER, "-P", V_PASSWORD)
        client, stranger = self.udp(), self.udp()
        forged = V_REGISTERED[:-3] + b"AAA"
        stranger.sendto(forged, saddr)              # no client yet: dropped
        stranger.sendto(b"", saddr)                 # not a keepalive here
        other_password = ux.sign(V_KEY_CHBS, ux.request_claims())
        stranger.sendto(other_password, saddr)
        self.assert_silent(stranger)
        proc.wait_line("A client from %s failed to authenticate"
                       % re.escape(ux.format_addr(stranger.getsockname())))

        self.register(proc, saddr, client)
        # A client with another password: dropped, and no connectee.
        stranger.sendto(V_INITIAL_REQUEST_CHBS, saddr)
        stranger.sendto(ux.sign(V_KEY_CHBS, ux.request_claims(7)), saddr)
        lookalikes = [ux.TOKEN_PREFIX + b"data",    # not a token: data
                      ux.sign(V_KEY_CHBS, b'{"sub":"x"}')]   # not ours
        for data in [b""] + lookalikes:
            stranger.sendto(data, saddr)
        # These arrive at the client as a connectee's data, in order, not
        # as a takeover.
        for data in [b""] + lookalikes:
            self.assertEqual(self.recv(client)[0], b"\x00\x01" + data)
        self.assert_silent(client)
        self.assert_silent(stranger)
        client.sendto(b"\x00\x01back", saddr)       # client still in charge
        self.assertEqual(self.recv(stranger), (b"back", saddr))
        lines = proc.drain()
        self.assertEqual(sum("Connectee seqn" in line for line in lines), 1,
                         lines)
        stats = usr1_stats(proc, "server")
        self.assertEqual(stats["from_connectee_msgs"], 3)
        self.assertEqual(stats["invalid_auths"], 6)


class TestPasswordServerPortable(TestPasswordServer):
    SERVER = ("-s", "127.0.0.1:0", "--portable-io")


class TestPasswordClient(RelayCase):
    """The tool as a password-mode client, driven with the Rust server's bytes."""

    def start_client(self, interval=25000):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "-i", interval,
                                 env={ux.PASSWORD_ENV: V_PASSWORD})
        self.assertEqual(self.recv(server), (V_INITIAL_REQUEST, caddr))
        return proc, server, real, caddr

    def test_handshake_with_rust_bytes(self):
        proc, server, real, caddr = self.start_client()
        server.sendto(V_RETRY_REPLY, caddr)
        self.assertEqual(self.recv(server), (V_ANSWER_TO_RETRY, caddr))
        server.sendto(V_REGISTERED, caddr)
        proc.wait_line("Authenticated")
        self.assertEqual([l for l in proc.lines if "mode on" not in l],
                         V_RUST_PASSWORD_CLIENT_LOG)
        server.sendto(V_FIRST_CONNECTEE, caddr)
        data, worker = self.recv(real)
        self.assertEqual(data, b"hello")
        real.sendto(b"pong", worker)
        self.assertEqual(self.recv(server), (V_CLIENT_TO_SERVER, caddr))

    def test_tokens_that_do_not_verify_are_dropped(self):
        proc, server, real, caddr = self.start_client()
        server.sendto(V_RETRY_REPLY[:-2] + b"xx", caddr)
        server.sendto(ux.sign(V_KEY_CHBS, ux.REGISTERED_CLAIMS), caddr)
        proc.wait_line("does not verify")
        self.assert_silent(real)
        self.assert_silent(server)
        self.assertNotIn("Authenticated", proc.drain())

    def test_says_when_the_server_stops_answering(self):
        proc, server, real, caddr = self.start_client(interval=100)
        proc.wait_line("is not answering", timeout=3)
        server.sendto(V_REGISTERED, caddr)
        proc.wait_line("Authenticated")
        proc.wait_line("answers again")


class TestStatsDump(RelayCase):
    def dump(self, saddr, env=None, *extra):
        args = ["127.0.0.1:0", "-S", "-a", ux.format_addr(saddr)] + list(extra)
        full_env = dict(os.environ)
        full_env.update(env or {ux.PASSWORD_ENV: V_PASSWORD})
        return subprocess.run([sys.executable, lone_copy()] + args,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              env=full_env, timeout=30)

    def test_prints_the_rust_blob_as_the_rust_tool_does(self):
        fake = self.udp()
        result = {}

        def answer():
            data, src = fake.recvfrom(70000)
            result["request"] = data
            fake.sendto(V_STATS_BLOB, src)
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        self.addCleanup(t.join, TIMEOUT)
        p = self.dump(fake.getsockname())
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout, V_STATS_JSON + "\n")
        t.join(TIMEOUT)
        self.assertEqual(result["request"], V_STATS_REQUEST)

    def test_against_our_own_server(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        p = self.dump(saddr)
        self.assertEqual(p.returncode, 0, p.stderr)
        stats = json.loads(p.stdout)
        self.assertEqual(list(stats), list(ux.STAT_NAMES))
        self.assertEqual(stats["stats_requests"], 1)
        self.assertEqual(stats["signed_looking"], 1)

    def test_no_answer_is_one_line_and_failure(self):
        silent = self.udp()
        p = self.dump(silent.getsockname())
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stdout, "")
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("no stats", p.stderr)

    def test_wrong_password_gets_nothing(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        p = self.dump(saddr, {ux.PASSWORD_ENV: "not it"})
        self.assertNotEqual(p.returncode, 0)


class TestPasswordEndToEnd(RelayCase):
    def test_relay_with_password_file(self):
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("correct horse battery staple\n")
        self.addCleanup(os.unlink, f.name)
        saddr, server, client = self.relay(extra=("--password-file", f.name))
        client.wait_line("Authenticated")
        conns = [self.udp() for _ in range(3)]
        for i in range(6):
            c = conns[i % 3]
            msg = b"pw %d " % i + os.urandom(1000)
            c.sendto(msg, saddr)
            self.assertEqual(self.recv(c), (msg, saddr))
        # A message of ours under another password is dropped; a payload
        # shaped as another token is data, and passes whole.
        foreign = ux.sign(V_KEY, b'{"sub":"x"}')
        conns[0].sendto(V_REGISTERED, saddr)
        conns[0].sendto(foreign, saddr)
        self.assertEqual(self.recv(conns[0]), (foreign, saddr))

    def test_wrong_password_never_registers(self):
        real = self.udp()
        server, saddr = self.start("-s", "127.0.0.1:0", "-P", "right")
        client, caddr = self.start("127.0.0.1:0", "-a", ux.format_addr(saddr),
                                   "-c", ux.format_addr(real.getsockname()),
                                   "-P", "wrong", "-i", "100")
        client.wait_line("is not answering", timeout=3)
        c = self.udp()
        c.sendto(b"anyone?", saddr)
        self.assert_silent(real)
        self.assertNotIn("New client address", "\n".join(server.drain()))


# ====================================================================== through a real NAT

def netns_missing():
    """Why the NAT tests cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return "needs the %s command" % tool
    return None


def sh(*cmd, stdin=None):
    subprocess.run(cmd, input=stdin, check=True, universal_newlines=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=30)


NETNS_MISSING = netns_missing()
# CI sets UDPEXPOSER_REQUIRE_NETNS=1: there a missing tool fails, never skips.
NETNS_REQUIRED = os.environ.get("UDPEXPOSER_REQUIRE_NETNS") == "1"


@unittest.skipIf(NETNS_MISSING and not NETNS_REQUIRED, NETNS_MISSING)
class TestThroughNat(RelayCase):
    """Three namespaces: the internet (wan), a NAT router, the hidden lan.

    wan:    198.51.100.1 helper (server), 198.51.100.2-9 connectees/strangers,
            203.0.113.1 towards the router
    router: 203.0.113.10 public (SNAT), 10.200.0.1 lan; forwards new flows
            from the lan only, drops everything else but replies
    lan:    10.200.0.2: the client and the hidden real server
    """

    HELPER = ("198.51.100.1", 5566)
    HIDDEN = "10.200.0.2"
    INTERVAL_MS = 500

    def setUp(self):
        if NETNS_MISSING:
            self.fail(NETNS_MISSING)
        run = "%x%04x" % (os.getpid() % 0xFFFF, id(self) % 0xFFFF)
        self.wan, self.router, self.lan = ("ux%s%s" % (k, run) for k in "wrl")
        self.wan_if, self.lan_if = "uxa%s" % run, "uxb%s" % run
        for ns in (self.wan, self.router, self.lan):
            sh("ip", "netns", "add", ns)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns],
                            stderr=subprocess.DEVNULL)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "a" + self.wan_if, "netns", self.wan, "type",
           "veth", "peer", "name", self.wan_if, "netns", self.router)
        sh("ip", "link", "add", self.lan_if, "netns", self.router, "type",
           "veth", "peer", "name", "b" + self.lan_if, "netns", self.lan)
        for ns, addr, dev in (
                (self.wan, "203.0.113.1/24", "a" + self.wan_if),
                (self.wan, "198.51.100.1/24", "lo"),
                (self.router, "203.0.113.10/24", self.wan_if),
                (self.router, "10.200.0.1/24", self.lan_if),
                (self.lan, "10.200.0.2/24", "b" + self.lan_if)):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.lan, "route", "add", "default", "via", "10.200.0.1")
        sh("ip", "-n", self.router, "route", "add", "198.51.100.0/24", "via",
           "203.0.113.1")
        # The internet knows where the lan is; only the firewall stops it.
        sh("ip", "-n", self.wan, "route", "add", "10.200.0.0/24", "via",
           "203.0.113.10")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw",
           "net.ipv4.ip_forward=1")
        self.nat_rules("203.0.113.10")

    def nat_rules(self, public):
        """(Re)load the router's rules: SNAT to public, drop unsolicited."""
        rules = """
            table ip uxnat
            delete table ip uxnat
            table ip uxnat {
              chain postrouting {
                type nat hook postrouting priority srcnat;
                oifname "%(wan)s" snat to %(public)s
              }
              chain forward {
                type filter hook forward priority filter; policy drop;
                ct state established,related accept
                iifname "%(lan)s" oifname "%(wan)s" accept
              }
            }
        """ % dict(wan=self.wan_if, lan=self.lan_if, public=public)
        sh("ip", "netns", "exec", self.router, "nft", "-f", "-", stdin=rules)

    def nat_reboot(self, public):
        """The router comes back with a new public address and no memory."""
        sh("ip", "-n", self.router, "addr", "flush", "dev", self.wan_if)
        sh("ip", "-n", self.router, "addr", "add", public + "/24", "dev",
           self.wan_if)
        sh("ip", "-n", self.router, "route", "replace", "198.51.100.0/24",
           "via", "203.0.113.1")
        sh("ip", "-n", self.wan, "route", "replace", "10.200.0.0/24", "via",
           public)
        self.nat_rules(public)
        sh("ip", "netns", "exec", self.router, "conntrack", "-F")

    def hidden_service(self, reply_from_other_port=False):
        real = self.udp(self.HIDDEN, netns=self.lan)
        other = self.udp(self.HIDDEN, netns=self.lan)
        self.echo(real, other if reply_from_other_port else None)
        return real

    def start_server(self, *extra):
        return self.start("-s", "%s:%d" % self.HELPER, "-n", 16, *extra,
                          netns=self.wan)[0]

    def start_client(self, real, *extra):
        return self.start("0.0.0.0:0", "-a", "%s:%d" % self.HELPER,
                          "-c", ux.format_addr(real.getsockname()), "-n", 16,
                          "-i", self.INTERVAL_MS, *extra, netns=self.lan)[0]

    def connectee(self, i):
        return self.udp("198.51.100.%d" % i, netns=self.wan)

    def exchange(self, conn, msg):
        conn.sendto(msg, self.HELPER)
        self.assertEqual(self.recv(conn), (msg, self.HELPER))

    def exchange_until(self, conn, msg, deadline):
        """Retry one exchange until it works; the time it took."""
        t0 = time.monotonic()
        conn.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                conn.sendto(msg, self.HELPER)
                try:
                    data, src = conn.recvfrom(70000)
                except socket.timeout:
                    continue
                if (data, src) == (msg, self.HELPER):
                    return time.monotonic() - t0
        finally:
            conn.settimeout(TIMEOUT)
        self.fail("no answer through the relay")

    def relay(self, *extra):
        real = self.hidden_service()
        server = self.start_server(*extra)
        client = self.start_client(real, *extra)
        m = server.wait_line(r"New client address: (203\.0\.113\.10:\d+)")
        return server, client, m.group(1)

    def test_without_the_relay_the_service_is_unreachable(self):
        real = self.udp(self.HIDDEN, netns=self.lan)    # no echo: read here
        outsider = self.connectee(2)
        port = real.getsockname()[1]
        outsider.sendto(b"direct", (self.HIDDEN, port))
        outsider.sendto(b"to the NAT", ("203.0.113.10", port))
        self.assert_silent(real, 0.5)
        # Outgoing works, and so do replies to it, from the same peer only.
        real.sendto(b"out", outsider.getsockname())
        data, public = self.recv(outsider)
        self.assertEqual((data, public[0]), (b"out", "203.0.113.10"))
        outsider.sendto(b"reply", public)
        self.assertEqual(self.recv(real)[0], b"reply")
        self.connectee(3).sendto(b"stranger", public)
        self.assert_silent(real, 0.5)

    def test_connectees_reach_the_hidden_service(self):
        server, client, public = self.relay()
        conns = [self.connectee(i) for i in (2, 3, 4)]
        for round_ in range(3):
            for i, c in enumerate(conns):
                self.exchange(c, b"%d:%d " % (i, round_) + os.urandom(1200))
        self.exchange(conns[0], os.urandom(60000))   # fragments cross the NAT

    @unittest.skipUnless(shutil.which("unbound") and shutil.which("dig")
                         or NETNS_REQUIRED,
                         "needs unbound and dig (Debian: unbound, dnsutils)")
    def test_proxy_protocol_to_unbound(self):
        """A DNS resolver behind the NAT that reads PROXY v2 headers and
        lets only 198.51.100.0/29 in: through the relay with
        --proxy-protocol it sees who asks; without, it answers nobody.
        198.51.100.9 forging a header that names 198.51.100.2 is refused:
        the server's header comes first, or (password mode, a server that
        does not say it adds them) the client relays nothing."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        conf, logfile, port = os.path.join(tmp, "unbound.conf"), \
            os.path.join(tmp, "unbound.log"), 5353
        with open(conf, "w") as f:
            f.write("""server:
  interface: %(hidden)s
  port: %(port)d
  proxy-protocol-port: %(port)d
  do-ip6: no
  do-daemonize: no
  use-syslog: no
  logfile: "%(log)s"
  log-queries: yes
  verbosity: 1
  username: ""
  chroot: ""
  directory: "%(tmp)s"
  pidfile: ""
  access-control: 0.0.0.0/0 refuse
  access-control: 10.200.0.0/24 allow
  access-control: 198.51.100.0/29 allow
  local-zone: "test." static
  local-data: "who.test. A 192.0.2.1"
  local-data: "forged.test. A 192.0.2.2"
remote-control:
  control-enable: no
""" % dict(hidden=self.HIDDEN, port=port, log=logfile, tmp=tmp))
        unbound = subprocess.Popen(
            ["ip", "netns", "exec", self.lan, "unbound", "-d", "-c", conf],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(unbound.wait, TIMEOUT)
        self.addCleanup(unbound.terminate)
        def log():
            if not os.path.exists(logfile):
                return ""
            with open(logfile) as f:
                return f.read()
        deadline = time.monotonic() + 3 * TIMEOUT
        while "start of service" not in log():
            self.assertLess(time.monotonic(), deadline, "unbound did not start")
            time.sleep(0.05)

        def dig(i):
            """Ask through the relay from 198.51.100.i: dig's output."""
            return subprocess.run(
                ["ip", "netns", "exec", self.wan, "dig", "@%s" % self.HELPER[0],
                 "-p", str(self.HELPER[1]), "-b", "198.51.100.%d" % i,
                 "who.test", "A", "+tries=1", "+time=2"],
                stdout=subprocess.PIPE, universal_newlines=True,
                timeout=30).stdout

        def forge():
            """From 198.51.100.9, a query for forged.test behind a header
            that names 198.51.100.2: the reply's (rcode, answers) or None."""
            conn = self.connectee(9)
            conn.settimeout(2)
            query = struct.pack(">6H", 0x5858, 0x0100, 1, 0, 0, 0) \
                + b"\x06forged\x04test\x00" + struct.pack(">HH", 1, 1)
            conn.sendto(ux.proxy_header(("198.51.100.2", 5300), self.HELPER)
                        + query, self.HELPER)
            try:
                reply = conn.recv(4096)
            except socket.timeout:
                return None
            return reply[3] & 15, struct.unpack(">H", reply[6:8])[0]

        real = "%s:%d" % (self.HIDDEN, port)
        flag, pw = ("--proxy-protocol",), {ux.PASSWORD_ENV: "p"}
        rust = os.access(RUST, os.X_OK)
        # server (ours' flags, or "rust"), client flags, env, answered
        cases = [(flag, flag, {}, True), ((), (), {}, False),
                 (flag, flag, pw, True), ((), flag, pw, False)] \
            + [("rust", flag, pw, False)] * rust
        for server_flags, extra, env, answered in cases:
            with self.subTest(server=server_flags, client=extra, env=env):
                if server_flags == "rust":
                    server = subprocess.Popen(
                        ["ip", "netns", "exec", self.wan, RUST, "-s", "-P",
                         "p", "%s:%d" % self.HELPER],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    self.addCleanup(server.wait, TIMEOUT)
                    self.addCleanup(server.kill)
                else:
                    server = self.start("-s", "%s:%d" % self.HELPER, "-n", 16,
                                        *server_flags, env=env,
                                        netns=self.wan)[0]
                client = self.start("0.0.0.0:0", "-a", "%s:%d" % self.HELPER,
                                    "-c", real, "-n", 16, "-i",
                                    self.INTERVAL_MS, "-v", *extra, env=env,
                                    netns=self.lan)[0]
                if env and answered:
                    client.wait_line("adds PROXY protocol headers$")
                elif env:
                    client.wait_line("does not say that it adds PROXY")
                else:
                    server.wait_line(r"New client address: 203\.0\.113\.10:")
                out = dig(2)
                if answered:
                    self.assertRegex(out, r"who\.test\.\s+\d+\s+IN\s+A\s+"
                                          r"192\.0\.2\.1")
                    client.wait_line(r"New incoming channel \d+ for "
                                     r"198\.51\.100\.2:\d+$")
                    self.assertRegex(log(), r"info: 198\.51\.100\.2 "
                                            r"who\.test\. A IN")
                    # Outside the access list: refused, by its real address.
                    self.assertIn("status: REFUSED", dig(9))
                else:
                    self.assertIn("timed out", out)
                if extra:       # REFUSED by .9, or never relayed
                    self.assertEqual(forge(), (5, 0) if answered else None)
                    self.assertNotIn("forged.test", log())
                if env and not answered:
                    self.assertEqual(usr1_stats(client, "client")[
                        "proxy_unconfirmed"], 2)
                if server_flags == "rust":
                    server.kill()
                    server.wait(TIMEOUT)
                else:
                    server.stop()
                client.stop()

    def test_nat_reboot_with_a_new_address(self):
        server, client, public = self.relay()
        conn = self.connectee(2)
        self.exchange(conn, b"before")
        self.nat_reboot("203.0.113.20")
        t0 = time.monotonic()
        server.wait_line(r"New client address: 203\.0\.113\.20:",
                         timeout=2 * self.INTERVAL_MS / 1000.0 + 1)
        self.assertLess(time.monotonic() - t0, 2 * self.INTERVAL_MS / 1000.0)
        self.exchange_until(conn, b"after", time.monotonic() + TIMEOUT)

    def test_server_restart(self):
        server, client, public = self.relay()
        conn = self.connectee(2)
        self.exchange(conn, b"before")
        server.stop()
        server = self.start_server()
        server.wait_line("New client address: 203.0.113.10:",
                         timeout=2 * self.INTERVAL_MS / 1000.0 + 1)
        self.exchange_until(conn, b"after", time.monotonic() + TIMEOUT)

    def test_strangers_and_wrong_ports_get_nothing_through(self):
        real = self.hidden_service(reply_from_other_port=True)
        server = self.start_server()
        client = self.start_client(real)
        public = server.wait_line(r"New client address: (\S+)").group(1)
        conn = self.connectee(2)
        conn.sendto(b"hello", self.HELPER)          # reaches real, which
        self.assert_silent(conn, 0.5)               # answers from elsewhere
        # A stranger who learned the client's public mapping sends to it.
        stranger = self.connectee(9)
        host, port = ux.split_host_port(public)
        for payload in (b"\x00\x01inject", b"", b"\x00\x02x" * 100):
            stranger.sendto(payload, (host, port))
        watcher = self.udp(self.HIDDEN, netns=self.lan)
        self.assert_silent(watcher, 0.3)
        self.assertNotIn("inject", "".join(client.drain()))

    def test_password_mode_through_the_nat(self):
        env = {ux.PASSWORD_ENV: "through the NAT"}
        real = self.hidden_service()
        server = self.start("-s", "%s:%d" % self.HELPER, env=env,
                            netns=self.wan)[0]
        client = self.start("0.0.0.0:0", "-a", "%s:%d" % self.HELPER,
                            "-c", ux.format_addr(real.getsockname()),
                            "-i", self.INTERVAL_MS, env=env, netns=self.lan)[0]
        server.wait_line(r"New client address: 203\.0\.113\.10:")
        client.wait_line("Authenticated")
        conn = self.connectee(2)
        self.exchange(conn, b"signed")
        # A stranger tries to become the client address.
        stranger = self.connectee(9)
        for payload in (b"", V_INITIAL_REQUEST, V_REGISTERED[:-4] + b"AAAA",
                        ux.sign(os.urandom(32), ux.request_claims())):
            stranger.sendto(payload, self.HELPER)
        time.sleep(2 * self.INTERVAL_MS / 1000.0)   # keepalives keep coming
        self.exchange(conn, b"still ours")
        taken = [l for l in server.drain() if "New client address" in l]
        self.assertEqual(len(taken), 1, taken)
        # The NAT reboots: the handshake runs again from the new address.
        self.nat_reboot("203.0.113.20")
        server.wait_line(r"New client address: 203\.0\.113\.20:",
                         timeout=2 * self.INTERVAL_MS / 1000.0 + 1)
        self.exchange_until(conn, b"after", time.monotonic() + TIMEOUT)


@unittest.skipIf(NETNS_MISSING and not NETNS_REQUIRED, NETNS_MISSING)
class TestMultiHomed(RelayCase):
    """A helper host with two addresses in one network (helper namespace),
    the rest of the world in another (net): replies to the secondary
    address must come from it, though the route prefers the primary.

    helper: 198.51.100.1/24 and .7 (secondary), 2001:db8::1/64 and ::7
    net:    198.51.100.2, 2001:db8::2: connectees, the client, the real server
    """

    def setUp(self):
        if NETNS_MISSING:
            self.fail(NETNS_MISSING)
        run = "%x%04x" % (os.getpid() % 0xFFFF, id(self) % 0xFFFF)
        self.helper, self.net = "uxh%s" % run, "uxn%s" % run
        for ns in (self.helper, self.net):
            sh("ip", "netns", "add", ns)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns],
                            stderr=subprocess.DEVNULL)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "h" + run, "netns", self.helper, "type",
           "veth", "peer", "name", "n" + run, "netns", self.net)
        for ns, dev, addrs in (
                (self.helper, "h" + run, ("198.51.100.1/24", "198.51.100.7/24",
                                          "2001:db8::1/64", "2001:db8::7/64")),
                (self.net, "n" + run, ("198.51.100.2/24", "2001:db8::2/64"))):
            for addr in addrs:
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev,
                   *(("nodad",) if ":" in addr else ()))
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def check(self, bind, hosts, *extra):
        """A server on bind, our client talking to its secondary address,
        and a connectee for each of its addresses."""
        server, saddr = self.start("-s", bind, *extra, netns=self.helper)
        port = saddr[1]
        v6 = ":" in hosts[0]
        near = "2001:db8::2" if v6 else "198.51.100.2"
        real = self.udp(near, netns=self.net)
        self.echo(real)
        client, _ = self.start("%s:0" % fmt_host(near), "-a", "%s:%d" % (
            fmt_host(hosts[1]), port), "-c", ux.format_addr(
                real.getsockname()), "-i", 200, *extra, netns=self.net)
        for host in hosts:
            conn = self.udp(near, netns=self.net)
            deadline = time.monotonic() + TIMEOUT
            conn.settimeout(0.2)
            while True:     # until the client has registered
                conn.sendto(b"to " + host.encode(), (host, port))
                try:
                    data, src = conn.recvfrom(100)
                    break
                except socket.timeout:
                    self.assertLess(time.monotonic(), deadline,
                                    "no reply via %s" % host)
            self.assertEqual((data, src[0]), (b"to " + host.encode(), host))
        # A train to the secondary address, and the burst of replies.
        train = [bytes([i]) * 500 for i in range(20)]
        send_train(conn, train, (host, port))
        got = [conn.recvfrom(1000) for _ in train]
        self.assertEqual(sorted(data for data, _ in got), train)
        self.assertEqual({src[0] for _, src in got}, {host})
        self.assertNotIn("not the server", "\n".join(client.drain()))

    @unittest.skipUnless(os.access(RUST, os.X_OK), "no Rust udpexposer "
                         "0.3.0 beside the repository (../shared/ref)")
    def test_a_rust_server_there_gets_a_hint_not_silence(self):
        """The Rust server on 0.0.0.0 answers the client at the secondary
        address from the primary one: our client says so, once."""
        rust = subprocess.Popen(
            ["ip", "netns", "exec", self.helper, RUST, "-s", "0.0.0.0:5566"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(rust.wait, TIMEOUT)
        self.addCleanup(rust.kill)
        real = self.udp("198.51.100.2", netns=self.net)
        client, _ = self.start("198.51.100.2:0", "-a", "198.51.100.7:5566",
                               "-c", ux.format_addr(real.getsockname()),
                               "-i", 200, netns=self.net)
        conn = self.udp("198.51.100.2", netns=self.net)
        conn.settimeout(0.2)
        deadline = time.monotonic() + TIMEOUT
        while True:
            conn.sendto(b"anyone?", ("198.51.100.7", 5566))
            try:
                client.wait_line(r"Dropped datagrams from 198\.51\.100\.1:"
                                 r"5566, the server's port at another "
                                 r"address than 198\.51\.100\.7:5566",
                                 timeout=0.3)
                break
            except AssertionError:
                self.assertLess(time.monotonic(), deadline)

    def test_replies_leave_from_the_address_a_peer_used(self):
        port = 5566
        for bind, hosts in (("0.0.0.0", ("198.51.100.1", "198.51.100.7")),
                            ("[::]", ("2001:db8::1", "2001:db8::7")),
                            ("[::]", ("198.51.100.1", "198.51.100.7"))):
            for extra in ((), ("-P", V_PASSWORD)):
                port += 1
                with self.subTest(bind=bind, hosts=hosts, extra=extra):
                    self.check("%s:%d" % (bind, port), hosts, *extra)


@unittest.skipIf(NETNS_MISSING and not NETNS_REQUIRED, NETNS_MISSING)
class TestLocalByRoute(RelayCase):
    """A helper whose IPv6 addresses are local by a route alone, as anycast
    and some hosting set-ups make them (`ip -6 route add local PREFIX dev
    lo`), on no interface: a reply leaves from the address it answers.
    One namespace; connectees, the client and the real server on ::1."""

    PREFIX = "2001:db8:1::"
    HOSTS = ("2001:db8:1::1", "2001:db8:1::5", "2001:db8:1::abcd", "::1")

    def setUp(self):
        if NETNS_MISSING:
            self.fail(NETNS_MISSING)
        self.ns = "uxv6%x%04x" % (os.getpid() % 0xFFFF, id(self) % 0xFFFF)
        sh("ip", "netns", "add", self.ns)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns],
                        stderr=subprocess.DEVNULL)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns, "-6", "route", "add", "local",
           self.PREFIX + "/64", "dev", "lo")

    def exchange(self, conn, dest):
        """Send to dest until a reply comes (a -P client registers first):
        the reply and where it came from."""
        msg = b"to " + dest[0].encode()
        deadline = time.monotonic() + TIMEOUT
        conn.settimeout(0.2)
        try:
            while True:
                conn.sendto(msg, dest)
                try:
                    data, src = conn.recvfrom(100)
                    break
                except socket.timeout:
                    self.assertLess(time.monotonic(), deadline,
                                    "no reply via %s" % dest[0])
        finally:
            conn.settimeout(TIMEOUT)
        self.assertEqual(data, msg)
        return src

    def check(self, *extra):
        server, saddr = self.start("-s", "[::]:0", *extra, netns=self.ns)
        port = saddr[1]
        real = self.udp("::1", netns=self.ns)
        self.echo(real)
        self.start("[::1]:0", "-a", "[::1]:%d" % port, "-c", ux.format_addr(
            real.getsockname()), "-i", 200, *extra, netns=self.ns)
        conn = self.udp("::1", netns=self.ns)
        froms = [self.exchange(conn, (host, port))[0] for host in self.HOSTS]
        batched = "--portable-io" not in extra
        if batched:                     # from the address each one used
            self.assertEqual(froms, list(self.HOSTS))
        else:                           # from the kernel's choice
            self.assertEqual(set(froms), {"::1"})
        for host in self.HOSTS[1:3]:    # trains, and their bursts of replies
            train = [bytes([i]) * 500 for i in range(20)]
            send_train(conn, train, (host, port))
            got = [conn.recvfrom(1000) for _ in train]
            self.assertEqual(sorted(data for data, _ in got), train)
            self.assertEqual({src[0] for _, src in got},
                             {host if batched else "::1"})
        stats = usr1_stats(server, "server")
        self.assertEqual(stats["sources_refused"], 0)
        self.assertEqual(stats["err3"], 0)
        self.assertNotIn("Socket error", "\n".join(server.drain()))

    def test_replies_leave_from_the_address_a_connectee_used(self):
        for extra in ((), ("-P", V_PASSWORD), ("--portable-io",),
                      ("--portable-io", "-P", V_PASSWORD)):
            with self.subTest(extra=extra):
                self.check(*extra)

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_a_source_the_kernel_refuses_leaves_from_its_choice(self):
        """Without IP_FREEBIND the kernel refuses a source local by a
        route (as kernels did that checked it whatever the flag): every
        reply still goes, from the kernel's choice, each counted, the
        operator told once; every way a reply leaves."""
        sock = in_netns(self.ns, ux.udp_socket, socket.AF_INET6, ("::", 0),
                        None, True)
        self.addCleanup(sock.close)
        reports, notices = [], []
        io = ux.burst_io(sock, lambda where, exc: reports.append(
            (where, exc and exc.errno)), notice=notices.append,
            reply_from_local=True)
        sock.setsockopt(socket.IPPROTO_IP, ux.IP_FREEBIND, 0)
        conn = self.udp("::1", netns=self.ns)
        port = sock.getsockname()[1]
        keys = {}
        for host in self.HOSTS:             # each connectee's key
            conn.sendto(b"key", (host, port))
            select.select([sock], [], [], TIMEOUT)
            _, _, sources, _ = io.receive()
            keys[host] = sources[0]
        self.assertEqual([io.local_address(keys[h]) for h in self.HOSTS],
                         list(self.HOSTS))
        route_local = [keys[h] for h in self.HOSTS[:3]]
        io.buf[:3000] = os.urandom(3000)
        sent = []

        def expect(start, length, times=1):
            sent.extend([bytes(io.buf[start:start + length])] * times)
        io.send_now(b"now", route_local[0], "err2")     # at once
        sent.append(b"now")
        io.send(0, 10, route_local[1], "err3")          # a lone one: sendmsg
        io.flush()
        expect(0, 10)
        for i, key in enumerate(route_local + [keys["::1"]] * 2):
            io.send(100 * i, 50 + i, key, "err3")       # sendmmsg
            expect(100 * i, 50 + i)
        io.flush()
        io.send_train(1000, 1000, 100, route_local[2], "err3")  # a train
        io.flush()
        for j in range(10):
            expect(1000 + 100 * j + ux.TAG_SIZE, 100 - ux.TAG_SIZE)
        got = []
        while len(got) < len(sent):
            data, src = conn.recvfrom(2000)
            got.append(data)
            self.assertEqual(src[:2], ("::1", port))
        self.assertEqual(sorted(got), sorted(sent))
        self.assertEqual(reports, [])
        self.assertEqual(io.counts["sources_refused"], len(sent) - 2)
        # all but the two to ::1
        self.assertEqual(len(notices), 1)
        self.assertIn("refuses to send from 2001:db8:1::", notices[0])
        self.assertTrue(io.trains_out.on)   # a refused source: no GSO verdict


# ====================================================================== for operators

class LineSink:
    """A log stream for in-process runs: lines, and a wait for one."""

    def __init__(self):
        self.lines = queue.Queue()
        self.seen = []

    def write(self, text):
        for line in text.splitlines():
            self.lines.put(line)

    def flush(self):
        pass

    def wait_line(self, pattern, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(),
                                                  0.01))
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError("no line matching %r in %r" % (pattern, self.seen))


class TestNames(RelayCase):
    def test_client_resolves_a_host_name(self):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 "localhost:%d" % server.getsockname()[1],
                                 "-c", "localhost:%d" % real.getsockname()[1])
        self.assertEqual(self.recv(server), (b"", caddr))
        server.sendto(b"\x00\x01by name", caddr)
        self.assertEqual(self.recv(real)[0], b"by name")

    def run_client_in_thread(self, server, real, resolver, interval=100):
        sock = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0))
        self.addCleanup(sock.close)
        sink, stop = LineSink(), threading.Event()
        t = threading.Thread(target=ux.run_client, daemon=True, kwargs=dict(
            sock=sock, server=server, real_family=socket.AF_INET,
            real_server=real, max_clients=4, interval=interval,
            log=ux.Log(sink), server_name="relay.example.net:5566",
            resolve_every=0.2, resolver=resolver, stop=stop))
        t.start()
        self.addCleanup(t.join, TIMEOUT)
        self.addCleanup(stop.set)
        return sock.getsockname(), sink

    def test_client_follows_a_server_that_moves(self):
        old, new, real = self.udp(), self.udp(), self.udp()
        answers = {"now": old.getsockname()}

        def resolver(text):
            self.assertEqual(text, "relay.example.net:5566")
            if isinstance(answers["now"], Exception):
                raise answers["now"]
            return socket.AF_INET, answers["now"]
        caddr, sink = self.run_client_in_thread(old.getsockname(),
                                                real.getsockname(), resolver)
        self.assertEqual(self.recv(old), (b"", caddr))
        old.sendto(b"\x00\x01before", caddr)
        self.assertEqual(self.recv(real)[0], b"before")

        answers["now"] = ValueError("no such name")   # DNS trouble: keep it
        sink.wait_line("Cannot resolve relay.example.net:5566 again")
        answers["now"] = new.getsockname()
        sink.wait_line("Server address changed: %s -> %s" % (
            ux.format_addr(old.getsockname()),
            ux.format_addr(new.getsockname())))
        self.assertEqual(self.recv(new), (b"", caddr))
        new.sendto(b"\x00\x01after", caddr)
        self.assertEqual(self.recv(real)[0], b"after")
        old.sendto(b"\x00\x01stale", caddr)         # the old one is a stranger
        self.assert_silent(real)

    @unittest.skipIf(NETNS_MISSING and not NETNS_REQUIRED, NETNS_MISSING)
    def test_a_name_that_resolves_only_later(self):
        """In a namespace whose /etc/hosts (ip netns exec's bind mount) does
        not know the name yet and whose resolver (127.0.0.1) is nobody."""
        ns = "uxdns%x%04x" % (os.getpid() % 0xFFFF, id(self) % 0xFFFF)
        etc = os.path.join("/etc/netns", ns)
        os.makedirs(etc)
        self.addCleanup(shutil.rmtree, etc)
        sh("ip", "netns", "add", ns)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns],
                        stderr=subprocess.DEVNULL)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = os.path.join(etc, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n")
        with open(os.path.join(etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\n")
        server, real = self.udp(netns=ns), self.udp(netns=ns)
        name = "helper.test:%d" % server.getsockname()[1]
        proc, caddr = self.start("127.0.0.1:0", "-a", name, "-c",
                                 ux.format_addr(real.getsockname()),
                                 netns=ns)
        self.assertIn("server %s (not resolved yet)" % name, proc.lines[-1])
        proc.wait_line(r"Cannot resolve %s yet, trying again in 1 s"
                       % re.escape(name))
        with open(hosts, "w") as f:             # the same file, bind-mounted
            f.write("127.0.0.1 localhost helper.test\n")
        proc.wait_line(r"Server address: %s is 127\.0\.0\.1:%d"
                       % (re.escape(name), server.getsockname()[1]))
        self.assertEqual(self.recv(server), (b"", caddr))
        server.sendto(b"\x00\x01late", caddr)
        self.assertEqual(self.recv(real)[0], b"late")


class TestAllowLists(RelayCase):
    def test_allow_and_client_from_ipv4(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "--allow", "127.0.0.2/32",
                                 "--allow", "127.0.5.0/24",
                                 "--client-from", "127.0.0.1/32")
        client, good, other_good = self.udp(), self.udp("127.0.0.2"), \
            self.udp("127.0.5.9")
        bad = self.udp("127.0.0.3")
        bad.sendto(b"", saddr)                      # may not become the client
        client.sendto(b"", saddr)
        proc.wait_line("New client address: %s"
                       % re.escape(ux.format_addr(client.getsockname())))
        for c in (good, other_good):
            c.sendto(b"allowed", saddr)
            self.assertEqual(self.recv(client)[0][2:], b"allowed")
        bad.sendto(b"refused", saddr)
        bad.sendto(b"", saddr)
        self.assert_silent(client)
        proc.p.send_signal(signal.SIGUSR1)
        stats = json.loads(proc.wait_line(r'^\{"mode":"server"').string)
        self.assertEqual(stats["not_allowed"], 1)
        self.assertEqual(stats["client_not_allowed"], 2)
        self.assertEqual(stats["new_connectees"], 2)
        self.assertEqual(stats["simple_address_switches"], 1)

    @unittest.skipUnless(has_ipv6(), "no IPv6 loopback")
    def test_ipv6_networks(self):
        proc, saddr = self.start("-s", "[::1]:0", "--allow", "2001:db8::/32",
                                 "--client-from", "::1/128")
        client, conn = self.udp("::1"), self.udp("::1")
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        conn.sendto(b"not in 2001:db8::/32", saddr)
        self.assert_silent(client)

    def test_password_mode_client_from(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD,
                                 "--client-from", "127.0.0.9/32", "-v")
        outsider = self.udp()
        outsider.sendto(V_INITIAL_REQUEST, saddr)
        self.assert_silent(outsider)                # not even a Retry
        proc.wait_line("Ignored a keepalive from .*not in --client-from")
        inside = self.udp("127.0.0.9")
        inside.sendto(V_INITIAL_REQUEST, saddr)
        self.assertIsNotNone(ux.retry_nonce(ux.verify(V_KEY,
                                                      self.recv(inside)[0])))


def many_sources(count, first=0):
    """count distinct IPv4 source addresses from 127.2.0.0 up (on Linux all
    of 127.0.0.0/8 is local): as many strangers as an attacker likes."""
    for i in range(first, first + count):
        yield "127.%d.%d.%d" % (2 + (i >> 16), (i >> 8) & 255, i & 255)


def send_from(hosts, dest, payload):
    """One datagram to dest from each host, from a socket used once."""
    for host in hosts:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            s.sendto(payload, dest)


def cpu_seconds(pid):
    """User + system CPU time a process has used (Linux /proc)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def usr1_stats(proc, mode):
    """The counters a running tool logs on SIGUSR1."""
    proc.p.send_signal(signal.SIGUSR1)
    return json.loads(proc.wait_line(r'^\{"mode":"%s"' % mode).string)


@unittest.skipUnless(sys.platform.startswith("linux") and
                     os.path.isdir("/proc/self"), "needs Linux: 127/8, /proc")
class TestHostileTraffic(RelayCase):
    """Attacks from loopback: many source addresses, forged tokens, loops."""

    def assert_goes_idle(self, *procs):
        """Each process uses next to no CPU for a while, within a deadline."""
        deadline = time.monotonic() + 3 * TIMEOUT
        for proc in procs:
            while True:
                before = cpu_seconds(proc.p.pid)
                time.sleep(0.5)
                if cpu_seconds(proc.p.pid) - before <= 0.05:
                    break
                self.assertLess(time.monotonic(), deadline, "still busy")

    def check_full_table(self, *extra):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-n", 65535, *extra)
        client = self.udp()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        if extra:
            TestPasswordServer.register(self, proc, saddr, client)
        else:
            client.sendto(b"", saddr)
            proc.wait_line("New client address")
        usable = 65534 if extra else 65535
        tags = set()
        for first in range(0, usable, 64):      # paced: none may be lost
            count = min(64, usable - first)
            send_from(many_sources(count, first), saddr, b"fill")
            tags.update(self.recv(client)[0][:2] for _ in range(count))
        self.assertEqual(len(tags), usable)
        self.assertEqual(b"ey" in tags, not extra)
        # Every tag is in use: a newcomer takes the oldest connectee's tag
        # and is relayed both ways; then the next one.
        for newcomer, tag in ((self.udp("127.1.0.1"), b"\x00\x01"),
                              (self.udp("127.1.0.2"), b"\x00\x02")):
            newcomer.sendto(b"newcomer", saddr)
            self.assertEqual(self.recv(client)[0], tag + b"newcomer")
            client.sendto(tag + b"welcome", saddr)
            self.assertEqual(self.recv(newcomer), (b"welcome", saddr))
        self.assert_goes_idle(proc)
        stats = usr1_stats(proc, "server")
        self.assertEqual((stats["new_connectees"],
                          stats["evicted_unanswered"]), (usable + 2, 2))

    def test_full_table_plain(self):
        self.check_full_table()

    def test_full_table_password(self):
        self.check_full_table("-P", V_PASSWORD)

    def test_spoofed_flood_keeps_answered_peers(self):
        """6,400 strangers against -n 64 on both sides while 4 peers talk."""
        real = self.udp()
        seen = {}           # peer -> the source addresses the real server saw
        stop = threading.Event()

        def real_server():      # answers the peers, never the strangers
            real.settimeout(0.05)
            while not stop.is_set():
                try:
                    data, src = real.recvfrom(70000)
                except socket.timeout:
                    continue
                if data.startswith(b"peer"):
                    seen.setdefault(data.split()[0], set()).add(src)
                    real.sendto(data, src)
        t = threading.Thread(target=real_server, daemon=True)
        t.start()
        self.addCleanup(t.join, TIMEOUT)
        self.addCleanup(stop.set)
        server, saddr = self.start("-s", "127.0.0.1:0", "-n", 64, "-v")
        client, caddr = self.start("127.0.0.1:0", "-a", ux.format_addr(saddr),
                                   "-c", ux.format_addr(real.getsockname()),
                                   "-n", 64, "-v")
        server.wait_line("New client address")
        peers = [self.udp() for _ in range(4)]
        for rnd in range(101):
            if rnd:
                send_from(many_sources(64, 64 * rnd), saddr, b"flood")
            for i, peer in enumerate(peers):
                msg = b"peer%d %d" % (i, rnd)
                peer.sendto(msg, saddr)
                self.assertEqual(self.recv(peer), (msg, saddr))
        self.assertEqual(sorted(seen), [b"peer%d" % i for i in range(4)])
        for peer, sources in seen.items():
            self.assertEqual(len(sources), 1, (peer, sources))
        server.wait_line("Forgot connectee .* unanswered one")
        client.wait_line("Closed channel .* unanswered one")
        s_stats, c_stats = usr1_stats(server, "server"), \
            usr1_stats(client, "client")
        self.assertEqual(s_stats["evicted_answered"], 0)
        self.assertGreater(s_stats["evicted_unanswered"], 6000)
        self.assertEqual(c_stats["evicted_answered"], 0)
        self.assertGreater(c_stats["evicted_unanswered"], 6000)
        self.assertEqual(c_stats["loops_broken"], 0)
        self.assertFalse([l for l in client.drain() if "(a loop)" in l])

    def test_out_of_file_descriptors_closes_channels(self):
        server, real = self.udp(), self.udp()
        self.echo(real)
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "-n", 2000, nofile=64)
        self.recv(server)                           # the first keepalive
        for tag in range(1, 201):                   # 200 channels of 64 fds
            msg = ux.TAG.pack(tag) + b"fd %d" % tag
            server.sendto(msg, caddr)
            self.assertEqual(self.recv(server), (msg, caddr))
        proc.wait_line(r"Out of file descriptors with \d+ channels open: "
                       r"the open-file limit \(ulimit -n\), not -n 2000")
        self.assertEqual(len([l for l in proc.drain()
                              if "Out of file" in l]), 1)   # said once
        # The most recent channels still work as before.
        msg = ux.TAG.pack(200) + b"again"
        server.sendto(msg, caddr)
        self.assertEqual(self.recv(server), (msg, caddr))

    def test_client_pointed_at_its_own_server_refuses_to_start(self):
        server, saddr = self.start("-s", "127.0.0.1:0")
        p = subprocess.run([sys.executable, lone_copy(), "127.0.0.1:0", "-a",
                            ux.format_addr(saddr), "-c", "localhost:%d"
                            % saddr[1]], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=30)
        self.assertEqual(p.returncode, 2)
        self.assertRegex(p.stderr, r"^udpexposer: -c localhost:\d+: the "
                                   r"server at -a: the relay would loop\n$")

    def test_a_loop_the_addresses_hide_is_broken(self):
        # The server listens on 0.0.0.0, the client reaches it at 127.0.0.1
        # and is told the real server is at 127.0.0.3: the same socket.
        server, saddr = self.start("-s", "0.0.0.0:0", "-n", 64)
        port = saddr[1]
        client, caddr = self.start("127.0.0.1:0", "-a", "127.0.0.1:%d" % port,
                                   "-c", "127.0.0.3:%d" % port, "-n", 64)
        server.wait_line("New client address")
        conn = self.udp()
        conn.sendto(b"round and round", ("127.0.0.1", port))
        client.wait_line("come back from the server as new connectees: -c "
                         "leads back to the server \\(a loop\\)")
        self.assert_goes_idle(server, client)
        self.assertEqual(usr1_stats(client, "client")["loops_broken"], 1)

    def test_stats_replies_are_rationed(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        thief = self.udp()
        for _ in range(50):                         # a captured request
            thief.sendto(V_STATS_REQUEST, saddr)
        replies = 0
        thief.settimeout(0.5)
        try:
            while True:
                self.assertEqual(len(thief.recvfrom(1000)[0]), 184)
                replies += 1
        except socket.timeout:
            pass
        self.assertGreaterEqual(replies, 1)
        self.assertLessEqual(replies, 2 * ux.STATS_REPLIES_PER_SECOND)
        proc.wait_line(r"Refused a stats request from 127\.0\.0\.1:\d+: "
                       r"over 5 a second")
        stats = usr1_stats(proc, "server")
        self.assertEqual(stats["stats_requests"], 50)
        self.assertEqual(stats["stats_refused"], 50 - replies)
        # A second later the budget is back: -S still works.
        time.sleep(1.0)
        thief.settimeout(TIMEOUT)
        thief.sendto(V_STATS_REQUEST, saddr)
        self.assertEqual(len(self.recv(thief)[0]), 184)

    def test_forgeries_are_dropped_and_peers_keep_talking(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        client, peer, forger = self.udp(), self.udp(), self.udp()
        TestPasswordServer.register(self, proc, saddr, client)
        forged = [V_INITIAL_REQUEST[:-43] + ux._b64url(os.urandom(32)),
                  ux.sign(V_KEY_CHBS, ux.request_claims(7)),
                  ux.TOKEN_PREFIX + os.urandom(1200),     # starts like one
                  V_INITIAL_REQUEST + b"x"]
        for rnd in range(100):
            for data in forged * 10:
                forger.sendto(data, saddr)
            peer.sendto(b"peer %d" % rnd, saddr)
            # The lookalikes reach the client as the forger's data, in
            # order; the messages of ours that do not verify do not.
            for data in forged[2:] * 10:
                got = self.recv(client)[0]
                self.assertEqual(got[2:], data)
            tagged = self.recv(client)[0]
            self.assertEqual(tagged[2:], b"peer %d" % rnd)
            client.sendto(tagged[:2] + b"reply %d" % rnd, saddr)
            self.assertEqual(self.recv(peer), (b"reply %d" % rnd, saddr))
        self.assert_silent(forger)                  # never a reply
        stats = usr1_stats(proc, "server")
        self.assertEqual(stats["signed_looking"] - stats["invalid_auths"], 2)
        self.assertEqual(stats["invalid_auths"], 4000)
        self.assertEqual(stats["auth_completeds"], 1)


def tool(*args, stdin=subprocess.DEVNULL, **popen):
    """Popen of the lone copy with args, stderr piped, for tests that need
    its stdout set up in some special way."""
    return subprocess.Popen([sys.executable, lone_copy()] + list(args),
                            stdin=stdin, stderr=subprocess.PIPE, **popen)


class TestService(RelayCase):
    """What a supervisor, a stuck log reader or systemd does to the tool."""

    def started(self, p):
        self.addCleanup(p.stderr.close)
        self.addCleanup(lambda: p.poll() is None and (p.kill(), p.wait()))
        return p

    def without_stdout(self, *args):
        """The tool started as `... >&-` (some supervisors do it)."""
        return self.started(subprocess.Popen(
            ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, lone_copy()]
            + list(args), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))

    @unittest.skipUnless(hasattr(signal, "pthread_kill"), "no pthread_kill")
    def test_a_signal_in_another_thread_ends_the_wait(self):
        """The kernel may hand a signal to the log writer's thread; the
        main thread, waiting in the selector, must still run the handler."""
        stop = threading.Event()
        old = signal.signal(signal.SIGUSR1, lambda signum, frame: stop.set())
        self.addCleanup(signal.signal, signal.SIGUSR1, old)
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        waiting = threading.Event()

        def elsewhere():
            waiting.wait(TIMEOUT)
            time.sleep(0.2)                 # the main thread waits by now
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        helper = threading.Thread(target=elsewhere)
        helper.start()
        self.addCleanup(helper.join)
        started = time.monotonic()
        ux.run_loop(sel, lambda: waiting.set() or 30.0, stop)
        self.assertLess(time.monotonic() - started, TIMEOUT)
        self.assertEqual(len(sel.get_map()), 0)     # the wakeup pipe is gone

    def test_closed_stdout_both_modes(self):
        real = self.udp()
        self.echo(real)
        unused = self.udp()
        port = unused.getsockname()[1]
        unused.close()                              # a port for the server
        saddr = ("127.0.0.1", port)
        sp = self.without_stdout("-s", "127.0.0.1:%d" % port)
        cp = self.without_stdout("127.0.0.1:0", "-a", "127.0.0.1:%d" % port,
                                 "-c", ux.format_addr(real.getsockname()),
                                 "-i", "100")
        conn = self.udp()
        deadline = time.monotonic() + 3 * TIMEOUT
        conn.settimeout(0.2)
        while True:
            conn.sendto(b"anyone there?", saddr)
            try:
                if conn.recvfrom(1000) == (b"anyone there?", saddr):
                    break
            except socket.timeout:
                pass
            self.assertLess(time.monotonic(), deadline, "nothing relayed")
        for p in (sp, cp):
            self.assertIsNone(p.poll())
            p.terminate()
            self.assertEqual(p.wait(TIMEOUT), 0)
            self.assertEqual(p.stderr.read(), b"")

    def test_a_stuck_log_reader_never_stops_the_relay(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        p = self.started(tool("-s", "127.0.0.1:0", stdout=w))
        os.close(w)
        first = b""
        while b"\n" not in first:                  # the start-up line
            first += os.read(r, 1000)
        saddr = ux.resolve(re.search(rb" mode on (\S+),", first)
                           .group(1).decode())[1]
        b, conn = self.udp(), self.udp()
        # Each SIGUSR1 is a line of counters; nobody reads them.  A pipe
        # holds about 100 of them and the tool's queue 1,000.
        for i in range(4000):           # PyPy too: most lead to a line of
            p.send_signal(signal.SIGUSR1)   # their own, far more than the
            time.sleep(0.0005)              # pipe and the queue hold
        b.settimeout(0.1)
        for i in range(20):                         # relaying goes on
            deadline = time.monotonic() + TIMEOUT
            while True:
                self.assertLess(time.monotonic(), deadline, "relay stuck")
                b.sendto(b"", saddr)                # b is the client
                conn.sendto(b"still there %d" % i, saddr)
                try:
                    if self.recv(b)[0].endswith(b"still there %d" % i):
                        break
                except socket.timeout:
                    pass
        # The reader comes back: what fitted, then how many were dropped
        # (PyPy's writer thread may take seconds over 1,000 queued lines).
        os.set_blocking(r, False)
        text = b""
        deadline = time.monotonic() + 4 * TIMEOUT
        while b"were dropped" not in text:
            self.assertLess(time.monotonic(), deadline, text[-300:])
            try:
                text += os.read(r, 1 << 16)
            except BlockingIOError:
                time.sleep(0.02)
        m = re.search(rb"\((\d+) log lines were dropped: the log reader was "
                      rb"not reading\)\n", text)
        self.assertGreater(int(m.group(1)), 0)
        self.assertGreater(text.count(b'{"mode":"server"'), 500)

    def dump_stats_to(self, saddr, **popen):
        p = tool("127.0.0.1:0", "-S", "-a", ux.format_addr(saddr),
                 "-P", V_PASSWORD, **popen)
        err = p.communicate(timeout=30)[1].decode()
        return p.returncode, err

    def test_stats_that_cannot_be_printed(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        with open("/dev/full", "wb") as full:
            self.assertEqual(self.dump_stats_to(saddr, stdout=full), (
                1, "udpexposer: cannot print the stats: No space left on "
                   "device\n"))
        r, w = os.pipe()
        os.close(r)
        try:
            self.assertEqual(self.dump_stats_to(saddr, stdout=w), (
                1, "udpexposer: cannot print the stats: Broken pipe\n"))
        finally:
            os.close(w)
        p = self.without_stdout("127.0.0.1:0", "-S", "-a",
                                ux.format_addr(saddr), "-P", V_PASSWORD)
        self.assertEqual((p.wait(30), p.stderr.read()), (
            1, b"udpexposer: stdout is closed: nowhere to print the stats\n"))

    def test_signals_during_start_up(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        for n, signum in enumerate((signal.SIGTERM, signal.SIGINT,
                                    signal.SIGUSR1)):
            with self.subTest(signal=signum):
                fifo = os.path.join(tmp, "pw%d" % n)
                os.mkfifo(fifo)
                p = self.started(tool("-s", "127.0.0.1:0", "--password-file",
                                      fifo, stdout=subprocess.PIPE))
                self.addCleanup(p.stdout.close)
                # It waits for the password: a start-up that takes time.
                deadline = time.monotonic() + TIMEOUT
                while True:
                    try:        # (works once the tool opens it to read)
                        w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                        break
                    except OSError:
                        self.assertLess(time.monotonic(), deadline)
                        time.sleep(0.01)
                self.addCleanup(os.close, w)
                time.sleep(0.1)                 # now it waits in read()
                p.send_signal(signum)
                if signum == signal.SIGUSR1:    # harmless: it starts
                    os.write(w, V_PASSWORD.encode() + b"\n")
                    self.assertIn(b"server mode on", p.stdout.readline())
                    p.terminate()
                self.assertEqual(p.wait(TIMEOUT), 0)
                self.assertEqual(p.stderr.read(), b"")
        # And while the key is derived: the signal right after the password.
        fifo = os.path.join(tmp, "pw-derive")
        os.mkfifo(fifo)
        p = self.started(tool("-s", "127.0.0.1:0", "--password-file", fifo,
                              stdout=subprocess.DEVNULL))
        with open(fifo, "w") as f:
            f.write(V_PASSWORD + "\n")
        p.send_signal(signal.SIGINT)
        self.assertEqual(p.wait(TIMEOUT), 0)
        self.assertEqual(p.stderr.read(), b"")

    def test_a_password_that_is_not_utf8_works_end_to_end(self):
        raw = b"caf\xe9 au lait"                 # Latin-1, not UTF-8
        pwfile = tempfile.NamedTemporaryFile("wb", delete=False)
        pwfile.write(raw + b"\n")
        pwfile.close()
        self.addCleanup(os.unlink, pwfile.name)
        real = self.udp()
        self.echo(real)
        server, saddr = self.start("-s", "127.0.0.1:0", b"-P", raw)
        client, _ = self.start("127.0.0.1:0", "-a", ux.format_addr(saddr),
                               "-c", ux.format_addr(real.getsockname()),
                               "--password-file", pwfile.name, "-i", "200")
        client.wait_line("Authenticated")
        conn = self.udp()
        conn.sendto(b"bonjour", saddr)
        self.assertEqual(self.recv(conn), (b"bonjour", saddr))

    def notify_socket(self, abstract=False):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = "udpexposer-test-%d-%d" % (os.getpid(), id(sock))
            sock.bind("\0" + name)
            name = "@" + name
        else:
            tmp = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, tmp)
            name = os.path.join(tmp, "notify")
            sock.bind(name)
        sock.settimeout(TIMEOUT)
        return sock, name

    def test_systemd_notify_and_watchdog_server(self):
        sock, name = self.notify_socket()
        proc, saddr = self.start("-s", "127.0.0.1:0", env={
            "NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"})
        self.assertEqual(sock.recv(1000), b"READY=1\nSTATUS=client unknown, "
                                          b"0 connectees, 0 datagrams relayed")
        client, conn = self.udp(), self.udp()
        client.sendto(b"", saddr)
        conn.sendto(b"x", saddr)
        self.recv(client)
        times, status = [], b""
        while len(times) < 6:
            msg = sock.recv(1000)
            self.assertTrue(msg.startswith(b"WATCHDOG=1\nSTATUS="), msg)
            times.append(time.monotonic())
            status = msg
        self.assertRegex(status, rb"STATUS=client 127\.0\.0\.1:\d+, 1 "
                                 rb"connectee, 1 datagram relayed$")
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertLess(max(gaps), 0.2)             # half of WATCHDOG_USEC
        proc.p.terminate()
        while sock.recv(1000) != b"STOPPING=1":
            pass
        self.assertEqual(proc.p.wait(TIMEOUT), 0)

    def test_systemd_notify_client_abstract_socket(self):
        sock, name = self.notify_socket(abstract=True)
        server, real = self.udp(), self.udp()
        proc, caddr = self.start(
            "127.0.0.1:0", "-a", ux.format_addr(server.getsockname()),
            "-c", ux.format_addr(real.getsockname()),
            env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000",
                 "WATCHDOG_PID": "1"})          # the watchdog is not ours
        self.recv(server)                       # the keepalive comes first
        self.assertRegex(sock.recv(1000), rb"^READY=1\nSTATUS=server "
                                          rb"127\.0\.0\.1:\d+, 0 channels, "
                                          rb"0 datagrams relayed$")
        sock.settimeout(0.5)
        with self.assertRaises(socket.timeout):
            sock.recv(1000)                     # no WATCHDOG=1 for pid 1
        proc.p.send_signal(signal.SIGINT)
        sock.settimeout(TIMEOUT)
        self.assertEqual(sock.recv(1000), b"STOPPING=1")
        self.assertEqual(proc.p.wait(TIMEOUT), 0)

    def test_journald_gets_priorities(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        st = os.fstat(w)
        self.started(tool("-s", "127.0.0.1:0", "-v", stdout=w, env=dict(
            os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))))
        os.close(w)
        reader = os.fdopen(r, "rb", closefd=False)
        first = reader.readline()
        self.assertTrue(first.startswith(b"<4>udpexposer.py "), first)
        saddr = ux.resolve(re.search(rb" mode on (\S+),", first)
                           .group(1).decode())[1]
        conn = self.udp()
        conn.sendto(b"too early", saddr)            # -v: a drop, <7>
        self.assertRegex(reader.readline(), rb"^<7>Dropped a datagram from")
        client = self.udp()
        client.sendto(b"", saddr)
        self.assertRegex(reader.readline(), rb"^<6>New client address: ")

    def test_a_real_server_that_refuses_and_comes_back(self):
        server = self.udp()
        gone = self.udp()
        real_addr = gone.getsockname()
        gone.close()                                # nothing listens there
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real_addr))
        self.recv(server)
        for i in range(3):
            server.sendto(b"\x00\x01knock %d" % i, caddr)
            time.sleep(0.05)
        proc.wait_line(r"Real server 127\.0\.0\.1:\d+ refuses datagrams "
                       r"\(port unreachable\)")
        real = self.udp(port=real_addr[1])
        self.echo(real)
        server.sendto(b"\x00\x01hello", caddr)
        self.assertEqual(self.recv(server)[0], b"\x00\x01hello")
        proc.wait_line(r"Real server 127\.0\.0\.1:\d+ answers again")
        self.assertEqual(len([l for l in proc.drain() if "refuses" in l]), 1)
        self.assertGreaterEqual(
            usr1_stats(proc, "client")["real_server_refusals"], 1)


class TestOperatorFeatures(RelayCase):
    def test_selftest(self):
        p = subprocess.run([sys.executable, lone_copy(), "--selftest"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"plain mode: sizes 1\.\.65505 both ways.*"
                                   r": ok; \d+ round trips/s")
        self.assertRegex(p.stdout, r"password mode: .*empty datagram both ways"
                                   r": ok")
        self.assertTrue(p.stdout.rstrip().endswith("selftest passed"))
        self.assertNotIn("Traceback", p.stderr)

    def test_sigusr1_on_the_client(self):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()))
        self.recv(server)
        server.sendto(b"\x00\x01abc", caddr)
        self.recv(real)
        # The counters are added up once the burst is relayed: ask until then.
        deadline = time.monotonic() + TIMEOUT
        while True:
            proc.p.send_signal(signal.SIGUSR1)
            stats = json.loads(proc.wait_line(r'^\{"mode":"client"').string)
            if stats["from_server_msgs"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(list(stats)[1:], list(ux.CLIENT_STATS))
        self.assertEqual((stats["from_server_msgs"], stats["from_server_bytes"],
                          stats["channels_opened"], stats["keepalives"]),
                         (1, 5, 1, 1))

    def test_sigusr1_on_the_server_lists_the_wire_counters_first(self):
        proc, saddr = self.start("-s", "127.0.0.1:0")
        proc.p.send_signal(signal.SIGUSR1)
        stats = json.loads(proc.wait_line(r'^\{"mode":"server"').string)
        self.assertEqual(list(stats)[1:24], list(ux.STAT_NAMES))

    def test_sigusr1_during_logging(self):
        # Signals that land while a line is being written must neither kill
        # the relay nor tear a line.  (Signals do not queue: one line each
        # time, so wait for it before the next.)
        proc, saddr = self.start("-s", "127.0.0.1:0", "-n", "2")
        client = self.udp()
        client.sendto(b"", saddr)
        conns = [self.udp() for _ in range(6)]
        for i in range(30):
            for c in conns:
                c.sendto(b"x", saddr)               # logs and evictions
            proc.p.send_signal(signal.SIGUSR1)
            stats = json.loads(proc.wait_line(r'^\{"mode":"server"').string)
            self.assertEqual(len(stats), 1 + len(ux.server_stats()))
        self.assertTrue(all(l.startswith(("{", "udpexposer.py", "New client",
                                          "Connectee seqn", "("))
                            for l in proc.drain()), proc.lines)
        self.assertIsNone(proc.p.poll())
        self.assertNotIn("Traceback", proc.stop())

    def test_quiet_logs_warnings_only(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-q")
        client, conn = self.udp(), self.udp()
        client.sendto(b"", saddr)
        conn.sendto(b"x", saddr)
        self.recv(client)
        client.sendto(b"\x01", saddr)               # a warning
        proc.wait_line("Too short datagram from client")
        self.assertEqual([l for l in proc.drain() if "mode on" not in l],
                         ["Too short datagram from client"])

    def test_verbose_logs_evictions_and_drops(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-v", "-n", "1")
        client, a, b = self.udp(), self.udp(), self.udp()
        a.sendto(b"too early", saddr)
        proc.wait_line("Dropped a datagram from .*: no client address yet")
        client.sendto(b"", saddr)
        a.sendto(b"a", saddr)
        b.sendto(b"b", saddr)
        proc.wait_line("Forgot connectee %s, the least recently used"
                       % re.escape(ux.format_addr(a.getsockname())))

    def test_version(self):
        p = subprocess.run([sys.executable, lone_copy(), "--version"],
                           stdout=subprocess.PIPE, universal_newlines=True,
                           timeout=TIMEOUT * 2)
        self.assertEqual(p.stdout.strip(), "udpexposer.py %s (wire protocol "
                         "of udpexposer 0.3.0)" % ux.__version__)
        self.assertRegex(ux.__version__, r"^\d+\.\d+\.\d+$")
        self.assertNotEqual(ux.__version__, ux.WIRE_VERSION)
        proc, _ = self.start("-s", "127.0.0.1:0")
        self.assertIn(ux.VERSION_TEXT, proc.lines[-1])

    def test_a_stopped_client_closes_its_channels(self):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 env={"PYTHONDEVMODE": "1"})
        self.recv(server)
        for tag in (1, 2, 3):
            server.sendto(b"\x00%cx" % tag, caddr)
            self.recv(real)
        proc.p.terminate()
        self.assertEqual(proc.p.wait(TIMEOUT), 0)
        self.assertNotIn("ResourceWarning", proc.stop())

    def test_selftest_closes_what_it_opens(self):
        p = subprocess.run([sys.executable, "-X", "dev", lone_copy(),
                            "--selftest"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertNotIn("ResourceWarning", p.stderr)


# ====================================================================== as a user runs it

class TestCommandLine(RelayCase):
    def assert_usage_error(self, *args):
        p = subprocess.run([sys.executable, lone_copy()] + list(args),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           timeout=TIMEOUT * 2)
        self.assertNotEqual(p.returncode, 0, args)
        self.assertNotIn("Traceback", p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertTrue(lines[0].startswith("udpexposer: "), lines[0])
        return lines[0]

    def test_bad_command_lines(self):
        for args in (["-s", "127.0.0.1:0", "-n", "0"],
                     ["-s", "127.0.0.1:0", "-n", "70000"],
                     ["-s", "127.0.0.1:0", "-n", "many"],
                     ["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "127.0.0.1:9",
                      "-i", "0"],
                     ["-s", "127.0.0.1"],
                     ["-s", "300.0.0.1:5"],
                     ["-s", "::1:5"],
                     ["127.0.0.1:0"],
                     ["127.0.0.1:0", "-a", "127.0.0.1:9"],
                     ["-s", "127.0.0.1:0", "-a", "127.0.0.1:9"],
                     ["127.0.0.1:0", "-a", "no such host:9",
                      "-c", "127.0.0.1:9"],
                     ["127.0.0.1:0", "-a", "-dash-.example:9",
                      "-c", "127.0.0.1:9"],
                     ["-s", "127.0.0.1:0", "--no-such-flag"],
                     ["-s", "127.0.0.1:0", "--allow", "10.0.0.0/33"],
                     ["-s", "127.0.0.1:0", "--client-from", "nonsense"],
                     ["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "127.0.0.1:9",
                      "--allow", "10.0.0.0/8"],
                     ["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "127.0.0.1:9",
                      "--resolve-interval", "0"],
                     ["-s", "127.0.0.1:0", "-q", "-v"],
                     ["-s", "127.0.0.1:0", "-P", ""],
                     ["-s", "127.0.0.1:0", "-i", "10"],
                     ["-s", "127.0.0.1:0", "--resolve-interval", "5"],
                     ["127.0.0.1:0", "-S", "-a", "127.0.0.1:9", "-P", "x",
                      "-i", "10"],
                     ["-s", "999.1.1.1:5566"],
                     ["127.0.0.1:0", "-a", "999.1.1.1:9", "-c", "127.0.0.1:9"],
                     []):
            with self.subTest(args=args):
                self.assert_usage_error(*args)

    def test_errors_say_what_they_are_about(self):
        for args, text in (
                (["-s", "999.1.1.1:5566"], "udpexposer: listen_addr "
                 "999.1.1.1:5566: '999.1.1.1' is not an IP address"),
                (["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "bad name:9"],
                 "udpexposer: -c bad name:9: bad host name 'bad name'"),
                (["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "127.0.0.1:9"],
                 "udpexposer: -c 127.0.0.1:9: the server at -a: the relay "
                 "would loop"),
                (["-a", "127.0.0.1:5566", "-c", "127.0.0.1:1234"],
                 "udpexposer: the listen address is missing, e.g. 0.0.0.0:0 "
                 "(any port) for a client"),
                (["-s", "127.0.0.1:0", "-P", ""],
                 "udpexposer: -P gives an empty password: give one, or "
                 "none for plain mode"),
                (["-s", "127.0.0.1:0", "-i", "10"], "udpexposer: -i and "
                 "--resolve-interval are for client mode (-a and -c)")):
            with self.subTest(args=args):
                self.assertEqual(self.assert_usage_error(*args), text)

    def test_a_name_that_does_not_resolve_names_its_flag(self):
        getaddrinfo = socket.getaddrinfo

        def nobody(host, *args):
            if host == "real.example":      # no lookup leaves the host
                raise socket.gaierror(socket.EAI_NONAME,
                                      "Name or service not known")
            return getaddrinfo(host, *args)
        args = ux.build_parser().parse_args(
            ["127.0.0.1:0", "-a", "127.0.0.1:9", "-c", "real.example:9"])
        with mock.patch.object(socket, "getaddrinfo", nobody):
            with self.assertRaises(ux.UsageError) as caught:
                ux.setup(args, {})
        self.assertEqual(str(caught.exception), "-c real.example:9: cannot "
                         "resolve 'real.example': Name or service not known")

    def test_counts_of_one(self):
        proc = self.start("-s", "127.0.0.1:0", "-n", "1")[0]
        self.assertRegex(proc.lines[-1], r"plain mode, up to 1 connectee$")

    def test_port_in_use(self):
        taken = self.udp()
        line = self.assert_usage_error(
            "-s", ux.format_addr(taken.getsockname()))
        self.assertIn("cannot bind", line)

    def test_help_shows_every_flag_and_default(self):
        out = subprocess.run([sys.executable, lone_copy(), "--help"],
                             stdout=subprocess.PIPE, universal_newlines=True,
                             timeout=TIMEOUT * 2).stdout
        for flag in ("--local-connect-addr", "--server-addr", "--server-mode",
                     "--max-clients", "--ping-interval-ms", "--password",
                     "--dump-stats", "(default: 4)", "(default: 25000)"):
            self.assertIn(flag, out)

    def check_signal(self, signum):
        proc, saddr = self.start("-s", "127.0.0.1:0")
        t0 = time.monotonic()
        proc.p.send_signal(signum)
        self.assertEqual(proc.p.wait(TIMEOUT), 0)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertNotIn("Traceback", proc.stop())

    def test_sigterm_exits_cleanly(self):
        self.check_signal(signal.SIGTERM)

    def test_ctrl_c_exits_cleanly(self):
        self.check_signal(signal.SIGINT)

    def test_client_exits_cleanly_too(self):
        real = self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a", "127.0.0.1:9", "-c",
                                 ux.format_addr(real.getsockname()))
        proc.p.send_signal(signal.SIGTERM)
        self.assertEqual(proc.p.wait(TIMEOUT), 0)
        self.assertNotIn("Traceback", proc.stop())


# ====================================================================== PROXY protocol v2

# HAProxy's spec, section 2.2: signature, 0x21 (v2, PROXY), family, length.
PP_SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")


class TestProxyHeaders(unittest.TestCase):
    def test_ipv4_ipv6_and_mapped(self):
        self.assertEqual(
            ux.proxy_header(("192.0.2.55", 37368), ("198.51.100.1", 5566)),
            PP_SIG + bytes.fromhex("2112000c" "c0000237" "c6336401"
                                   "91f8" "15be"))
        self.assertEqual(
            ux.proxy_header(("::ffff:192.0.2.55", 37368, 0, 0),
                            ("::ffff:198.51.100.1", 5566, 0, 0)),
            PP_SIG + bytes.fromhex("2112000c" "c0000237" "c6336401"
                                   "91f8" "15be"))
        self.assertEqual(
            ux.proxy_header(("2001:db8::55", 37368, 0, 0),
                            ("2001:db8::1", 5566, 0, 0)),
            PP_SIG + bytes.fromhex("21220024"
                                   "20010db8000000000000000000000055"
                                   "20010db8000000000000000000000001"
                                   "91f8" "15be"))
        # An IPv4-mapped connectee of a server bound to [::] (portable I/O:
        # no local address known): the IPv4 form with 0.0.0.0.
        self.assertEqual(
            ux.proxy_header(("::ffff:192.0.2.55", 37368, 0, 0), ("::", 5566)),
            PP_SIG + bytes.fromhex("2112000c" "c0000237" "00000000"
                                   "91f8" "15be"))

    def test_what_the_client_accepts(self):
        good = ux.proxy_header(("192.0.2.55", 37368), ("198.51.100.1", 5566))
        six = ux.proxy_header(("2001:db8::55", 37368, 0, 0),
                              ("2001:db8::1", 5566, 0, 0))
        tlv = good[:14] + b"\x00\x0f" + good[16:] + b"\x04\x00\x00"
        # LOCAL (the spec: a receiver must accept it, whatever its family,
        # and use the real endpoints): relayed as any header.
        local = PP_SIG + b"\x20\x00\x00\x00"
        for data, length in ((good + b"payload", 28), (six, 52),
                             (tlv + b"x", 31), (good, 28),
                             (good[:-1], 0),            # cut short
                             (b"x" + good, 0),
                             (local + b"query", 16),
                             (good[:12] + b"\x20" + good[13:], 28),
                             (local[:14] + b"\x00\x03" + b"\x04\x00\x00", 19),
                             (local[:14] + b"\x00\x03" + b"\x04\x00", 0),
                             (PP_SIG + b"\x22\x12\x00\x0c" + good[16:], 0),
                             (PP_SIG + b"\x11\x12\x00\x0c" + good[16:], 0),
                             (good[:13] + b"\x00" + good[14:], 0),  # UNSPEC
                             (good[:13] + b"\x11" + good[14:], 0),  # TCP
                             (good[:14] + b"\x00\x0b" + good[16:], 0),
                             (b"", 0)):
            with self.subTest(data=data):
                buf = bytearray(b"\x00\x01" + data)
                self.assertEqual(ux.proxy_length(buf, 2, len(buf)), length)
        self.assertEqual(ux.proxy_source(good), ("192.0.2.55", 37368))
        self.assertEqual(ux.proxy_source(six), ("2001:db8::55", 37368, 0, 0))
        self.assertIsNone(ux.proxy_source(local))


class TestProxyProtocol(RelayCase):
    """--proxy-protocol: the header between tag and payload, byte for byte."""

    def server(self, host="127.0.0.1", *extra):
        proc, saddr = self.start("-s", "%s:0" % fmt_host(host),
                                 "--proxy-protocol", *extra)
        client = self.udp("::1" if ":" in host else "127.0.0.1")
        if extra:                       # password mode: register
            TestPasswordServer.register(self, proc, saddr, client)
        else:
            client.sendto(b"", saddr)
            proc.wait_line("New client address")
        return proc, saddr, client

    def test_server_plain_and_password(self):
        for extra in ((), ("-P", V_PASSWORD)):
            with self.subTest(extra=extra):
                proc, saddr, client = self.server("127.0.0.1", *extra)
                conn = self.udp()
                # (In plain mode an empty datagram is a keepalive.)
                for payload in (b"hello", b"x" * 1400) + ((b"",) if extra
                                                          else ()):
                    conn.sendto(payload, saddr)
                    self.assertEqual(self.recv(client)[0], b"\x00\x01"
                                     + ux.proxy_header(conn.getsockname(),
                                                       saddr) + payload)
                client.sendto(b"\x00\x01back", saddr)  # no header back
                self.assertEqual(self.recv(conn), (b"back", saddr))
                self.assertEqual(usr1_stats(proc, "server")["proxy_headers"],
                                 3 if extra else 2)

    @unittest.skipUnless(has_ipv6(), "no IPv6")
    def test_ipv6_and_ipv4_mapped_connectees(self):
        proc, saddr, client = self.server("::")
        for host, size in (("::1", 52), ("127.0.0.1", 28)):
            conn = self.udp(host)
            dest = (host, saddr[1])
            conn.sendto(b"who?", dest)
            data = self.recv(client)[0]
            self.assertEqual(len(data), 2 + size + 4)
            self.assertEqual(data[2:2 + size],
                             ux.proxy_header(conn.getsockname(), dest))

    def test_the_largest_datagram_no_longer_fits(self):
        proc, saddr, client = self.server()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        conn = self.udp()
        room = 65507 - 2 - 28
        conn.sendto(b"f" * room, saddr)
        self.assertEqual(len(self.recv(client)[0]), 65507)
        conn.sendto(b"g" * 65507, saddr)
        proc.wait_line("Dropped a datagram too big to tag and send to the "
                       "client")
        self.assert_silent(client)
        self.assertEqual(usr1_stats(proc, "server")["err4"], 1)
        self.assertNotIn("Traceback", proc.stop())

    def test_client_checks_and_names_the_connectee(self):
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "--proxy-protocol", "-v")
        self.recv(server)
        header = ux.proxy_header(("192.0.2.55", 37368), ("198.51.100.1", 5566))
        server.sendto(b"\x00\x03" + header + b"query", caddr)
        self.assertEqual(self.recv(real)[0], header + b"query")
        proc.wait_line(r"^New incoming channel 3 for 192\.0\.2\.55:37368$")
        local = PP_SIG + b"\x20\x00\x00\x00"      # LOCAL: no address
        server.sendto(b"\x00\x04" + local + b"health", caddr)
        self.assertEqual(self.recv(real)[0], local + b"health")
        proc.wait_line(r"^New incoming channel 4$")
        server.sendto(b"\x00\x03no header", caddr)
        proc.wait_line("Dropped a datagram from the server without a PROXY "
                       "protocol header")
        self.assert_silent(real)
        stats = usr1_stats(proc, "client")
        self.assertEqual((stats["proxy_headers"], stats["proxy_malformed"]),
                         (2, 1))

    def password_client(self, *extra):
        """A password-mode client with --proxy-protocol before a fake
        server: (proc, server, real, its address, the first challenge)."""
        server, real = self.udp(), self.udp()
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "--proxy-protocol", *extra,
                                 env={ux.PASSWORD_ENV: V_PASSWORD})
        claims = ux.verify(V_KEY, self.recv(server)[0])
        self.assertEqual(list(claims), ["nonce", "proxy"])
        self.assertIsNone(claims["nonce"])
        return proc, server, real, caddr, claims["proxy"]

    def test_a_password_client_relays_only_while_the_server_says_so(self):
        proc, server, real, caddr, challenge = self.password_client()
        header = ux.proxy_header(("192.0.2.55", 37368), ("198.51.100.1", 5566))
        query = b"\x00\x01" + header + b"query"
        server.sendto(query, caddr)             # before any answer
        server.sendto(ux.sign(V_KEY, ux.retry_claims(7)), caddr)
        self.assertEqual(ux.verify(V_KEY, self.recv(server)[0]),
                         {"nonce": 7, "proxy": challenge})
        server.sendto(V_REGISTERED, caddr)      # what the Rust server says
        proc.wait_line(r"^Authenticated$")
        proc.wait_line(r"does not say that it adds PROXY protocol headers")
        server.sendto(V_REGISTERED, caddr)      # said again only rarely
        server.sendto(query, caddr)
        for forged in (ux.sign(V_KEY, ux.proxy_claims(challenge ^ 1)),
                       ux.sign(V_KEY_CHBS, ux.proxy_claims(challenge)),
                       ux.sign(V_KEY, b'{"ProxyV2":%d,"x":1}' % challenge)):
            server.sendto(forged, caddr)
        server.sendto(query, caddr)
        self.assert_silent(real)
        server.sendto(ux.sign(V_KEY, ux.proxy_claims(challenge)), caddr)
        proc.wait_line(r"adds PROXY protocol headers$")
        self.assertEqual(sum("does not say" in l for l in proc.lines), 1)
        server.sendto(query, caddr)
        self.assertEqual(self.recv(real)[0], header + b"query")
        # A server restarted without the flag: said again at once.
        server.sendto(V_REGISTERED, caddr)
        proc.wait_line(r"does not say that it adds PROXY protocol headers")
        server.sendto(query, caddr)
        self.assert_silent(real)
        stats = usr1_stats(proc, "client")
        self.assertEqual((stats["proxy_headers"], stats["proxy_unconfirmed"],
                          stats["proxy_malformed"]), (1, 4, 0))

    def test_each_keepalive_asks_with_a_fresh_challenge(self):
        proc, server, real, caddr, first = self.password_client("-i", 1000)
        second = ux.verify(V_KEY, self.recv(server)[0])["proxy"]
        third = ux.verify(V_KEY, self.recv(server)[0])["proxy"]
        self.assertEqual(len({first, second, third}), 3)
        query = b"\x00\x01" + ux.proxy_header(("192.0.2.55", 37368),
                                              ("198.51.100.1", 5566))
        server.sendto(ux.sign(V_KEY, ux.proxy_claims(first)), caddr)
        server.sendto(query, caddr)             # the answer came too late
        self.assert_silent(real)
        server.sendto(ux.sign(V_KEY, ux.proxy_claims(second)), caddr)
        proc.wait_line(r"adds PROXY protocol headers$")
        server.sendto(query, caddr)
        self.assertEqual(self.recv(real)[0], query[2:])

    def test_a_server_that_moves_must_say_so_again(self):
        old, new, real = self.udp(), self.udp(), self.udp()
        now = [old.getsockname()]
        sock = ux.udp_socket(socket.AF_INET, ("127.0.0.1", 0))
        self.addCleanup(sock.close)
        sink, stop, caddr = LineSink(), threading.Event(), sock.getsockname()
        t = threading.Thread(target=ux.run_client, daemon=True, kwargs=dict(
            sock=sock, server=now[0], real_family=socket.AF_INET,
            real_server=real.getsockname(), max_clients=4, interval=1000,
            log=ux.Log(sink), key=V_KEY, server_name="relay.example.net:53",
            resolve_every=0.2, resolver=lambda text: (socket.AF_INET, now[0]),
            stop=stop, proxy_protocol=True))
        t.start()
        self.addCleanup(t.join, TIMEOUT)
        self.addCleanup(stop.set)
        query = b"\x00\x01" + ux.proxy_header(("192.0.2.55", 37368),
                                              ("198.51.100.1", 5566))
        for server in (old, new):
            if server is new:
                now[0] = new.getsockname()
                sink.wait_line("Server address changed")
            challenge = ux.verify(V_KEY, self.recv(server)[0])["proxy"]
            server.sendto(query, caddr)     # before it says so: dropped
            self.assert_silent(real)
            server.sendto(ux.sign(V_KEY, ux.proxy_claims(challenge)), caddr)
            sink.wait_line("adds PROXY protocol headers$")
            server.sendto(query, caddr)
            self.assertEqual(self.recv(real)[0], query[2:])

    def test_the_server_says_so_to_a_client_that_asks(self):
        for flag in (("--proxy-protocol",), ()):
            with self.subTest(flag=flag):
                proc, saddr = self.start("-s", "127.0.0.1:0", "-P",
                                         V_PASSWORD, *flag)
                client = self.udp()
                client.sendto(ux.sign(V_KEY, ux.request_claims(None, 5)),
                              saddr)
                nonce = ux.retry_nonce(ux.verify(V_KEY, self.recv(client)[0]))
                for challenge in (6, ux.M64):
                    client.sendto(ux.sign(V_KEY, ux.request_claims(
                        nonce, challenge)), saddr)
                    self.assertEqual(self.recv(client), (ux.sign(
                        V_KEY, ux.proxy_claims(challenge) if flag
                        else ux.REGISTERED_CLAIMS), saddr))
                client.sendto(V_INITIAL_REQUEST, saddr)     # no question
                self.assertEqual(self.recv(client), (V_REGISTERED, saddr))
                proc.stop()

    def test_password_end_to_end_a_forged_header_stays_payload(self):
        env = {ux.PASSWORD_ENV: V_PASSWORD}
        for flag in (("--proxy-protocol",), ()):
            with self.subTest(flag=flag):
                real = self.udp()
                server, saddr = self.start("-s", "127.0.0.1:0", *flag,
                                           env=env)
                client, _ = self.start(
                    "127.0.0.1:0", "-a", ux.format_addr(saddr), "-c",
                    ux.format_addr(real.getsockname()), "--proxy-protocol",
                    env=env)
                client.wait_line("adds PROXY protocol headers$" if flag
                                 else "does not say that it adds")
                conn = self.udp()
                forged = ux.proxy_header(("192.0.2.1", 53), saddr)
                conn.sendto(forged + b"query", saddr)
                if flag:
                    self.assertEqual(self.recv(real)[0], ux.proxy_header(
                        conn.getsockname(), saddr) + forged + b"query")
                else:
                    self.assert_silent(real)
                    self.assertEqual(usr1_stats(client, "client")[
                        "proxy_unconfirmed"], 1)
                server.stop()
                client.stop()

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_trains_each_segment_with_its_header(self):
        real, conn = gro_socket(self), self.udp()
        server, saddr = self.start("-s", "127.0.0.1:0", "--proxy-protocol")
        self.start("127.0.0.1:0", "-a", ux.format_addr(saddr), "-c",
                   ux.format_addr(real.getsockname()), "--proxy-protocol")
        server.wait_line("New client address")
        header = ux.proxy_header(conn.getsockname(), saddr)
        train = [bytes([i]) * 1000 for i in range(20)]
        send_train(conn, train, saddr)
        got, _ = receive_trains(real, 20)
        self.assertEqual(got, [header + d for d in train])

    @unittest.skipUnless(os.access(RUST, os.X_OK), "no Rust udpexposer 0.3.0 "
                         "beside the repository (../shared/ref)")
    def test_the_rust_client_in_the_middle(self):
        """A Rust client never asks whether headers are added, and hears
        nothing new: in password mode a token it does not know would reach
        the real server as data (on channel 0x6579)."""
        for password in ((), ("-P", V_PASSWORD)):
            with self.subTest(password=password):
                real = self.udp()
                server, saddr = self.start("-s", "127.0.0.1:0",
                                           "--proxy-protocol", *password)
                rust = subprocess.Popen(
                    [RUST, "127.0.0.1:0", "-a", ux.format_addr(saddr), "-c",
                     ux.format_addr(real.getsockname())] + list(password),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.addCleanup(rust.wait, TIMEOUT)
                self.addCleanup(rust.kill)
                server.wait_line("New client address")
                conn = self.udp()
                conn.sendto(b"through rust", saddr)
                data, chan = self.recv(real)
                self.assertEqual(data, ux.proxy_header(
                    conn.getsockname(), saddr) + b"through rust")
                real.sendto(b"back", chan)
                self.assertEqual(self.recv(conn), (b"back", saddr))
                self.assert_silent(real)
                rust.kill()
                server.stop()


# ====================================================================== the edges

def stopped(proc):
    """A context in which proc is stopped (SIGSTOP): what is sent to it
    meanwhile waits in its socket and is read in one burst after."""
    class Stopped:
        def __enter__(self):
            proc.p.send_signal(signal.SIGSTOP)

        def __exit__(self, *exc):
            proc.p.send_signal(signal.SIGCONT)
    return Stopped()


def storm(pid, count):
    """Two processes that each send pid count SIGUSR1s as fast as they can."""
    code = "import os, sys\nfor _ in range(%d): os.kill(%d, %d)" % (
        count, pid, signal.SIGUSR1)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    for p in procs:
        p.wait(60)


class TestEdges(RelayCase):
    """Datagrams at the edges of trains, a manager that stops reading,
    signal storms, floods of lines: nothing is lost, nothing stalls."""

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_empty_datagrams_from_a_client_in_one_burst(self):
        conn = gro_socket(self)
        proc, saddr = self.start("-s", "127.0.0.1:0")
        client = self.udp()
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        conn.sendto(b"hi", saddr)
        self.assertEqual(self.recv(client)[0], b"\x00\x01hi")
        with stopped(proc):
            send_train(client, [b"\x00\x01"] * 5, saddr)     # tags alone
            send_train(client, [b"\x00\x01" + bytes([i]) * 100
                                for i in range(5)], saddr)
            for _ in range(3):
                client.sendto(b"\x00\x01", saddr)
        got, _ = receive_trains(conn, 13)
        self.assertEqual(got, [b""] * 5 + [bytes([i]) * 100 for i in range(5)]
                         + [b""] * 3)
        self.assertEqual(usr1_stats(proc, "server")["from_client_msgs"], 13)

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_empty_datagrams_with_trains_both_ways(self):
        # (In plain mode an empty datagram to the server is a keepalive:
        # connectees can send none.)
        for extra, empty in (((), []), (("-P", V_PASSWORD), [b""] * 3)):
            with self.subTest(extra=extra):
                real, conn, saddr, chan, server, client = \
                    self.relayed(*extra)
                train = [bytes([i]) * 100 for i in range(5)]
                with stopped(client):
                    send_train(conn, train, saddr)
                    for data in empty:
                        conn.sendto(data, saddr)
                    time.sleep(0.1)     # the server has sent it all
                self.assertEqual(receive_trains(real, 5 + len(empty))[0],
                                 train + empty)
                with stopped(server):
                    send_train(real, train, chan)
                    for _ in range(3):
                        real.sendto(b"", chan)
                    time.sleep(0.1)
                self.assertEqual(receive_trains(conn, 8)[0],
                                 train + [b""] * 3)
                self.assertNotIn("Traceback", server.stop() + client.stop())

    @unittest.skipIf(NETNS_MISSING, NETNS_MISSING)
    def test_trains_above_the_path_mtu(self):
        """lo with an MTU of 1500: a connectee's train of 1472-byte
        datagrams fits, the tagged one does not.  The relay sends those
        one by one (the kernel fragments them), and trains that fit still
        go as trains."""
        ns = "uxmtu%x%04x" % (os.getpid() % 0xFFFF, id(self) % 0xFFFF)
        sh("ip", "netns", "add", ns)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns],
                        stderr=subprocess.DEVNULL)
        sh("ip", "-n", ns, "link", "set", "lo", "mtu", "1500", "up")
        for host, biggest in (("127.0.0.1", 1472), ("::1", 1452)):
            with self.subTest(host=host):
                def gro(host=host):
                    sock = self.udp(host, netns=ns)
                    self.assertTrue(ux.enable_gro(sock))
                    return sock
                real, conn = gro(), gro()
                server, saddr = self.start("-s", "%s:0" % fmt_host(host),
                                           netns=ns)
                self.start("%s:0" % fmt_host(host), "-a",
                           ux.format_addr(saddr), "-c",
                           ux.format_addr(real.getsockname()), netns=ns)
                server.wait_line("New client address")
                conn.sendto(b"hello", saddr)
                _, chan = real.recvfrom(100)
                for size in (biggest, 1000, biggest, 1000):
                    there = [bytes([i]) * size for i in range(40)]
                    send_train(conn, there, saddr)
                    got, trains = receive_trains(real, 40)
                    self.assertEqual(got, there)
                    back = [bytes([i, 1]) * (size // 2) for i in range(40)]
                    send_train(real, back, chan)
                    got, back_trains = receive_trains(conn, 40)
                    self.assertEqual(got, back)
                    if size == 1000:    # fits: still trains all the way
                        self.assertIn(1000, trains)
                        self.assertIn(1000, back_trains)
                self.assertNotIn("too big", "\n".join(server.drain()))

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_a_channel_evicted_in_the_burst_that_fills_it(self):
        server, real = self.udp(), gro_socket(self)
        proc, caddr = self.start("127.0.0.1:0", "-a",
                                 ux.format_addr(server.getsockname()),
                                 "-c", ux.format_addr(real.getsockname()),
                                 "-n", 1)
        self.recv(server)                       # the keepalive
        with stopped(proc):
            send_train(server, [b"\x00\x01A%d" % i for i in range(10)],
                       caddr)
            server.sendto(b"\x00\x02B", caddr)
        got, _ = receive_trains(real, 11)
        self.assertEqual(sorted(got), sorted([b"A%d" % i for i in range(10)]
                                             + [b"B"]))
        # A train whose second tag opens a channel in place of the first's,
        # which still has datagrams queued: those leave before it closes;
        # and the third tag's one datagram after.
        parts = [b"\x00\x03" + b"C%02d" % i * 100 for i in range(5)] \
            + [b"\x00\x04" + b"D%02d" % i * 100 for i in range(5)] \
            + [b"\x00\x05" + b"E%02d" % 0 * 100]
        send_train(server, parts, caddr)
        got, _ = receive_trains(real, 11)
        self.assertEqual(got, [p[2:] for p in parts])
        stats = usr1_stats(proc, "client")
        self.assertEqual((stats["errors"], stats["channels_closed"],
                          stats["from_server_msgs"]), (0, 4, 22))
        self.assertNotIn("Bad file descriptor", "\n".join(proc.lines))

    def test_a_notify_socket_nobody_reads(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        for mode in ("server", "client"):
            with self.subTest(mode=mode):
                notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.addCleanup(notify.close)
                path = os.path.join(tmp, mode)
                notify.bind(path)               # and never read
                env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"}
                peer, real = self.udp(), self.udp()
                if mode == "server":
                    proc, addr = self.start("-s", "127.0.0.1:0", env=env)
                    peer.sendto(b"", addr)      # peer is the client
                    proc.wait_line("New client address")
                else:
                    proc, addr = self.start(
                        "127.0.0.1:0", "-a",
                        ux.format_addr(peer.getsockname()),
                        "-c", ux.format_addr(real.getsockname()), env=env)
                    self.recv(peer)             # peer is the server
                time.sleep(0.5)                 # the queue is full by now
                for i in range(3):
                    if mode == "server":
                        conn = self.udp()
                        conn.sendto(b"ping %d" % i, addr)
                        self.assertEqual(self.recv(peer)[0][2:],
                                         b"ping %d" % i)
                    else:
                        peer.sendto(b"\x00\x07ping %d" % i, addr)
                        self.assertEqual(self.recv(real)[0], b"ping %d" % i)
                t0 = time.monotonic()
                proc.p.terminate()
                self.assertEqual(proc.p.wait(TIMEOUT), 0)
                self.assertLess(time.monotonic() - t0, 1.0)
                self.assertNotIn("Traceback", proc.stop())

    def test_sigusr1_storms(self):
        for mode in ("server", "client"):
            with self.subTest(mode=mode):
                peer, real = self.udp(), self.udp()
                if mode == "server":
                    proc, addr = self.start("-s", "127.0.0.1:0")
                else:
                    proc, addr = self.start(
                        "127.0.0.1:0", "-a",
                        ux.format_addr(peer.getsockname()),
                        "-c", ux.format_addr(real.getsockname()))
                for _ in range(2):
                    storm(proc.p.pid, 100000)
                self.assertIsNone(proc.p.poll())        # alive
                lines = proc.drain()
                self.assertTrue(any(l.startswith('{"mode":"%s"' % mode)
                                    for l in lines))
                self.assertEqual(usr1_stats(proc, mode)["mode"], mode)
                proc.p.terminate()
                self.assertEqual(proc.p.wait(TIMEOUT), 0)
                self.assertNotIn("Traceback", proc.stop())

    def test_watchdog_usec_that_is_odd(self):
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notify.close)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "notify")
        notify.bind(path)
        notify.settimeout(TIMEOUT)
        proc, _ = self.start("-s", "127.0.0.1:0", env={
            "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "\u00b2"})
        self.assertIn("WATCHDOG_USEC=%r is not a number of microseconds: "
                      "no watchdog" % "\u00b2", proc.drain())
        self.assertTrue(notify.recv(1000).startswith(b"READY=1"))
        proc.p.terminate()
        self.assertEqual(proc.p.wait(TIMEOUT), 0)
        self.assertEqual(proc.stop(), "")
        self.assertEqual(notify.recv(1000), b"STOPPING=1")
        # One microsecond: as often as the loop can, not never.
        proc, _ = self.start("-s", "127.0.0.1:0", env={
            "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1"})
        self.assertTrue(notify.recv(1000).startswith(b"READY=1"))
        for _ in range(5):
            self.assertTrue(notify.recv(1000).startswith(b"WATCHDOG=1\n"))

    def test_lines_strangers_provoke_are_limited(self):
        proc, saddr = self.start("-s", "127.0.0.1:0")
        a, b = self.udp(), self.udp()
        for i in range(400):
            (a if i % 2 else b).sendto(b"", saddr)
            if i % 50 == 0:
                time.sleep(0.01)        # no socket buffer overflows
        deadline = time.monotonic() + TIMEOUT
        while usr1_stats(proc, "server")["simple_address_switches"] < 400:
            self.assertLess(time.monotonic(), deadline)
        lines = [l for l in proc.drain() if "New client address" in l]
        self.assertEqual(len(lines), ux.Log.BUDGET)

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs 127/8")
    def test_retry_replies_are_limited(self):
        proc, saddr = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD)
        socks = [self.udp(host) for host in many_sources(200)]
        for s in socks:                 # one replayed keepalive each
            s.sendto(V_INITIAL_REQUEST, saddr)
        one = socks[0]
        for _ in range(10):             # and ten more from one of them
            one.sendto(V_INITIAL_REQUEST, saddr)
        replies = 0
        for s in socks:
            s.settimeout(0.02 if replies else TIMEOUT)
            try:
                while True:
                    s.recvfrom(1000)
                    replies += 1
                    s.settimeout(0.02)
            except socket.timeout:
                pass
        self.assertLessEqual(replies, ux.RETRIES_PER_SECOND)
        self.assertGreater(replies, 0)
        stats = usr1_stats(proc, "server")
        self.assertEqual(stats["retries_refused"], 210 - replies)



# ====================================================================== bursts

def roomy(sock):
    """sock with room to receive a whole burst (as root beyond rmem_max)."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 1 << 22)
            break
        except OSError:
            continue
    return sock


def is_token(data):
    return data.startswith(ux.TOKEN_PREFIX)


def take(sock, count, controls=0, control=is_token, wait=2.0):
    """What sock receives, trains cut into datagrams, until count of them
    that are no control message and `controls` that are came, or `wait`
    passed without any: ([(source, datagram)], control messages), each in
    order."""
    got, controlled = [], []
    sock.settimeout(wait)
    try:
        while len(got) < count or len(controlled) < controls:
            sources = []
            datagrams = receive_trains(sock, 1, sources)[0]
            for src, data in zip(sources, datagrams):
                (controlled if control(data) else got).append((src, data))
    except socket.timeout:
        pass
    finally:
        sock.settimeout(TIMEOUT)
    return got, [data for _, data in controlled]


def noise(rng, size):
    """size random bytes from rng."""
    return rng.getrandbits(8 * size).to_bytes(size, "big") if size else b""


class TestBursts(RelayCase):
    """Bursts built on purpose (the relay stopped while they queue, read in
    one go after) from random mixes of what a relay meets: lone datagrams,
    trains from known and new sources, trains of mixed tags, tokens,
    keepalives, dwarfs, empty datagrams, strangers, with evictions (small
    -n), batched and portable.  Every datagram reaches its peer byte for
    byte and in order, or is one the relay is documented to drop (counted);
    the relay lives.  A model (the tool's own LRU) says where each goes.

    Seeded: a failure names its seed in its subtest; UDPEXPOSER_BURST_SEED
    replays it, UDPEXPOSER_BURST_ROUNDS runs more rounds (a soak)."""

    ROUNDS = int(os.environ.get("UDPEXPOSER_BURST_ROUNDS") or 6)
    BYTES = 150000          # sent in one burst at most: no buffer overflows

    def seeds(self):
        seed = os.environ.get("UDPEXPOSER_BURST_SEED")
        return int(seed) if seed else random.randrange(1 << 32)

    def same(self, got, want, what):
        """got == want, a list of datagrams each; a short message if not."""
        if got == want:
            return
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                  min(len(got), len(want)))
        self.fail("%s: %d datagrams, %d wanted; the first difference at %d: "
                  "%r, wanted %r" % (
                      what, len(got), len(want), at,
                      got[at][:30] if at < len(got) else None,
                      want[at][:30] if at < len(want) else None))

    def assert_alive(self, proc, what):
        if proc.p.poll() is not None:
            self.fail("%s: the relay died: %s" % (what, proc.stop()[-600:]))

    def assert_quiet(self, socks):
        """Nothing more arrives on socks (all they should have came)."""
        ready, _, _ = select.select(socks, [], [], 0.02)
        for sock in ready:
            data = sock.recv(70000, socket.MSG_DONTWAIT)
            if not (is_token(data) or data == b"" and sock is socks[0]):
                self.fail("an extra datagram %r" % data[:30])

    def assert_counters(self, proc, mode, want):
        stats = usr1_stats(proc, mode)
        self.assertEqual({name: stats[name] for name in want}, want)
        self.assertIsNone(proc.p.poll())
        self.assertNotIn("Traceback", proc.stop())

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_a_newcomers_train_fills_the_send_queue(self):
        """Issue 24: a newcomer's train goes datagram by datagram (63 sends
        here), a known connectee's train is one more, a lone datagram one
        more: more than a send queue holds, in one burst.  The server died
        of it."""
        proc, saddr = self.start("-s", "127.0.0.1:0")
        client, known, new = roomy(gro_socket(self)), self.udp(), self.udp()
        client.sendto(b"", saddr)
        proc.wait_line("New client address")
        known.sendto(b"hello", saddr)
        self.assertEqual(self.recv(client)[0], b"\x00\x01hello")
        first = [bytes([i]) * 100 for i in range(63)]
        with stopped(proc):
            send_train(new, first, saddr)
            send_train(known, [b"A" * 100, b"B" * 100], saddr)
            known.sendto(b"lone", saddr)
        got, _ = take(client, 66)
        self.assert_alive(proc, "after the burst")
        self.same([data for _, data in got],
                  [b"\x00\x02" + data for data in first]
                  + [b"\x00\x01A" + b"A" * 99, b"\x00\x01B" + b"B" * 99,
                     b"\x00\x01lone"], "to the client")
        self.assertNotIn("Traceback", proc.stop())

    @unittest.skipIf(ux._load_mmsg() is None, "no recvmmsg on this platform")
    def test_a_train_that_ends_in_a_tag_alone(self):
        """A train of tagged datagrams whose last is only its tag (an empty
        datagram, which a kernel's GRO may well put last): the datagrams
        queued after it in the same burst go where they should, whole.
        (Its queued iovecs were one too many: each later message in the
        burst took the one before's, to its own peer.)"""
        for role in ("server", "client"):
            with self.subTest(role=role):
                peer = roomy(gro_socket(self))
                if role == "server":
                    proc, addr = self.start("-s", "127.0.0.1:0")
                    peer.sendto(b"", addr)          # peer: the client
                    proc.wait_line("New client address")
                    a, b = self.udp(), self.udp()   # connectees 1 and 2
                    for conn in (a, b):
                        conn.sendto(b"hi", addr)
                        self.recv(peer)
                else:
                    real = roomy(self.udp())        # peer: the server
                    proc, addr = self.start(
                        "127.0.0.1:0",
                        "-a", ux.format_addr(peer.getsockname()),
                        "-c", ux.format_addr(real.getsockname()))
                    self.recv(peer)                 # its keepalive
                train = [b"\x00\x01" + bytes([i]) * 100 for i in range(3)]
                with stopped(proc):
                    send_train(peer, train + [b"\x00\x01"], addr)
                    peer.sendto(b"\x00\x02after", addr)
                    peer.sendto(b"\x00\x01last", addr)
                if role == "server":
                    self.same([d for _, d in take(a, 5)[0]],
                              [p[2:] for p in train] + [b"", b"last"],
                              "to connectee 1")
                    self.same([d for _, d in take(b, 1)[0]], [b"after"],
                              "to connectee 2")
                else:
                    ports = {}                      # one per channel
                    for src, data in take(real, 6)[0]:
                        ports.setdefault(src, []).append(data)
                    two, one = sorted(ports.values(), key=len)
                    self.same(one, [p[2:] for p in train] + [b"", b"last"],
                              "on channel 1")
                    self.same(two, [b"after"], "on channel 2")
                self.assertNotIn("Traceback", proc.stop())

    def test_500_connectees_with_trains_run_clean(self):
        """500 connectees, 200 datagrams in flight, 30 % of the sends GSO
        trains, through a server and a client to a real server that echoes
        (a train as a train): every datagram back byte for byte, in order,
        plain and -P.  (Issue 24: this killed 1.1.0's server in about half
        the runs.)"""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 2048 and (hard == resource.RLIM_INFINITY or hard > soft):
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                2048 if hard == resource.RLIM_INFINITY else min(2048, hard),
                hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE,
                            (soft, hard))
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
            self.skipTest("needs 1200 open files (ulimit -n)")
        seed = self.seeds()
        rng = random.Random("500 %d" % seed)
        window = 200
        for extra in ((), ("-P", V_PASSWORD)):
            with self.subTest(seed=seed, extra=extra):
                real, _, saddr, _, server, client = self.relayed("-n", 600,
                                                                 *extra)
                self.echo(roomy(real))
                before = usr1_stats(server, "server")
                conns = [roomy(self.udp()) for _ in range(500)]
                sel = selectors.DefaultSelector()
                self.addCleanup(sel.close)
                items = []
                for i, conn in enumerate(conns):
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, i)
                    for j in range(3):
                        size = rng.choice((6, 100, 600, 1400))
                        count = rng.randint(2, 8) if rng.random() < 0.3 else 1
                        parts = [struct.pack(">HI", i, j * 8 + k)
                                 + noise(rng, size - 6) for k in range(count)]
                        parts[-1] = parts[-1][:rng.randint(6, size)]
                        items.append((i, parts))
                rng.shuffle(items)
                waiting = [[] for _ in conns]
                flying, done = 0, 0
                while items or flying:
                    while items and flying + len(items[-1][1]) <= window:
                        i, parts = items.pop()
                        if len(parts) > 1:
                            send_train(conns[i], parts, saddr)
                        else:
                            conns[i].sendto(parts[0], saddr)
                        waiting[i].extend(parts)
                        flying += len(parts)
                    events = sel.select(TIMEOUT)
                    if not events:
                        self.assert_alive(server, "the server")
                        self.assert_alive(client, "the client")
                        self.fail("stuck with %d in flight, %d back, %d "
                                  "sends to go" % (flying, done, len(items)))
                    for key, _ in events:
                        i = key.data
                        while True:
                            try:
                                data = conns[i].recv(70000)
                            except BlockingIOError:
                                break
                            self.assertTrue(waiting[i], "an extra datagram "
                                            "to connectee %d" % i)
                            self.assertEqual(data, waiting[i].pop(0),
                                             "to connectee %d" % i)
                            flying -= 1
                            done += 1
                stats = usr1_stats(server, "server")
                self.assertEqual([stats[name] - before[name] for name in (
                    "from_connectee_msgs", "from_client_msgs",
                    "new_connectees")], [done, done, 500])
                self.assertEqual(usr1_stats(client, "client")["errors"], 0)
                self.assertNotIn("Traceback", server.stop() + client.stop())

    # ------------------------------------------------------------ server

    def test_random_bursts_on_the_server(self):
        seed = self.seeds()
        for password in (False, True):
            for portable in (False, True):
                with self.subTest(seed=seed, password=password,
                                  portable=portable):
                    self.server_bursts(random.Random(
                        "server %d %s %s" % (seed, password, portable)),
                        password, portable)

    def server_bursts(self, rng, password, portable):
        n = rng.randint(2, 5)
        proxy = rng.random() < 0.25         # a header before each payload
        extra = ("-n", n) + (("-P", V_PASSWORD) if password else ()) \
            + (("--portable-io",) if portable else ()) \
            + (("--proxy-protocol",) if proxy else ())
        # Bound to a wildcard address, replies leave from the one each peer
        # used (LocalReplies): a control message in every send.
        bind = rng.choice(("127.0.0.1", "0.0.0.0", "::1", "::")
                          if has_ipv6() else ("127.0.0.1", "0.0.0.0"))
        host = "::1" if ":" in bind else "127.0.0.1"
        proc, saddr = self.start("-s", "%s:0" % fmt_host(bind), *extra)
        saddr = (host, saddr[1]) + ((0, 0) if ":" in host else ())
        # Where a datagram came to as a PROXY header says: the wildcard
        # where the socket cannot tell (portable).
        here = ((bind if portable else host),) + saddr[1:]
        # Peers: the client, at socks[client[0]]; in plain mode an empty
        # datagram from socks[1] moves it there and back; every other is a
        # connectee.
        socks = [roomy(self.udp(host)) for _ in range(n + 5)]
        if not ux.enable_gro(socks[0]) or not ux.enable_gro(socks[1]):
            self.skipTest("no UDP_GRO in this kernel")
        client = [0]
        if password:
            TestPasswordServer.register(self, proc, saddr, socks[0])
        else:
            socks[0].sendto(b"", saddr)
            proc.wait_line("New client address")
        # The model: the server's table, as the server keeps it.
        model = ux.Connectees(n, (ux.TOKEN_LOOKALIKE_TAG,) if password
                              else ())
        table = model.table
        want = dict.fromkeys((
            "from_connectee_msgs", "from_client_msgs", "new_connectees",
            "evicted_answered", "evicted_unanswered", "dwarfs",
            "ch_not_founds", "simple_keepalives", "refresh_address",
            "invalid_auths", "dropped_no_client_address", "err1", "err2",
            "err3", "err4", "simple_address_switches", "proxy_headers",
            "from_connectee_bytes", "from_client_bytes"), 0)
        for name in (("auth_completeds",) if password else (
                "simple_keepalives", "simple_address_switches")):
            want[name] = 1

        def inbound(i, data):
            """Peer i sends data: to the client, tagged."""
            tag = model.tag_of.get(i)
            if tag is None:
                tag, evicted = model.add(i)
                want["new_connectees"] += 1
                if evicted is not None:
                    want["evicted_answered" if evicted[1]
                         else "evicted_unanswered"] += 1
            elif tag in table.answered:
                table.answered.move_to_end(tag)
            else:
                table.unanswered.move_to_end(tag)
            want["from_connectee_msgs"] += 1
            want["from_connectee_bytes"] += len(data)
            want["proxy_headers"] += proxy
            want["invalid_auths"] += password and is_token(data)
            expect[client[0]].append(ux.TAG.pack(tag) + (ux.proxy_header(
                socks[i].getsockname(), here) if proxy else b"") + data)

        def outbound(data):
            """The client sends data: to its tag's connectee, untagged."""
            if password and data == V_INITIAL_REQUEST:
                want["refresh_address"] += 1
                registered.append(V_REGISTERED)
                return
            if len(data) < ux.TAG_SIZE:
                want["dwarfs"] += 1
                return
            if is_token(data):              # does not verify: data
                want["invalid_auths"] += 1
            tag = ux.TAG.unpack_from(data)[0]
            i = table.answered.get(tag)
            if i is not None:
                table.answered.move_to_end(tag)
            else:
                i = table.answer(tag)
            if i is None:
                want["ch_not_founds"] += 1
                return
            want["from_client_msgs"] += 1
            want["from_client_bytes"] += len(data)
            expect[i].append(data[ux.TAG_SIZE:])

        def a_tag():
            """Mostly one a connectee holds, now and then one nobody does."""
            tags = list(model.tag_of.values())
            if tags and rng.random() < 0.85:
                return rng.choice(tags)
            return rng.choice((n + 4, 0, 0xFFFF, ux.TOKEN_LOOKALIKE_TAG))

        def lookalike(size):
            return (ux.TOKEN_PREFIX + noise(rng, size))[:max(size, 22)]

        kinds = ["lone in", "lone in", "train in", "train in", "train new",
                 "lone out", "lone out", "train out", "train out",
                 "keepalive", "dwarf"]
        if password:
            kinds += ["token in", "token out", "token train out", "empty in"]
        else:
            kinds += ["client moves"]
        sizes = (1, 2, 3, 20, 100, 500, 1400, 1400, 9000)
        for round_ in range(self.ROUNDS):
            expect = [[] for _ in socks]
            registered, sends, total = [], [], 0
            items, longest = rng.randint(3, 150), rng.choice((3, 8, 128))
            weights = [rng.random() for _ in kinds]     # this burst's mix
            first = rng.choice(("train new", None))     # as in issue 24
            while total < self.BYTES and len(sends) < items:
                kind = first or rng.choices(kinds, weights)[0]
                first = None
                conns = [i for i in range(len(socks)) if i != client[0]]
                i, size = rng.choice(conns), rng.choice(sizes)
                if kind == "client moves":
                    client[0] = 1 - client[0]
                    sends.append((socks[client[0]], b""))
                    want["simple_keepalives"] += 1
                    want["simple_address_switches"] += 1
                elif kind == "lone in":
                    data = noise(rng, size)
                    sends.append((socks[i], data))
                    inbound(i, data)
                elif kind == "token in":
                    data = lookalike(size)
                    sends.append((socks[i], data))
                    inbound(i, data)
                elif kind == "empty in":
                    sends.append((socks[i], b""))
                    inbound(i, b"")
                elif kind in ("train in", "train new"):
                    count = rng.randint(2, min(longest, 65507 // size))
                    if kind == "train new":     # goes datagram by datagram
                        i = rng.choice([i for i in conns
                                        if i not in model.tag_of])
                        count = rng.randint(2, min(128, 65507 // size))
                    parts = [noise(rng, size) for _ in range(count - 1)]
                    parts.append(noise(rng, rng.randint(1, size)))
                    if password and size >= 22 and rng.random() < 0.3:
                        parts[rng.randrange(count - 1)] = lookalike(size)
                    sends.append((socks[i], parts))
                    for data in parts:
                        inbound(i, data)
                elif kind in ("lone out", "token out", "dwarf", "keepalive"):
                    if kind == "lone out":
                        data = ux.TAG.pack(a_tag()) + noise(rng, size - 1)
                    elif kind == "token out":
                        data = lookalike(size)
                    elif kind == "dwarf":
                        data = b"\x01"
                    else:
                        data = V_INITIAL_REQUEST if password else b""
                        want["simple_keepalives"] += not password
                    sends.append((socks[client[0]], data))
                    if data:
                        outbound(data)
                else:                           # a train from the client
                    size = max(size, 2)
                    count = rng.randint(2, min(longest, 65507 // size))
                    if kind == "token train out":
                        size = len(V_INITIAL_REQUEST)
                        count = rng.randint(2, 20)
                    parts, tag = [], a_tag()
                    for j in range(count):
                        if rng.random() < 0.2:
                            tag = a_tag()   # runs of mixed tags
                        parts.append(ux.TAG.pack(tag)
                                     + noise(rng, size - ux.TAG_SIZE))
                        if kind == "token train out" and rng.random() < 0.3:
                            parts[-1] = V_INITIAL_REQUEST
                    last = rng.choice((size, size, rng.randint(1, size)))
                    parts[-1] = parts[-1][:last]
                    sends.append((socks[client[0]], parts))
                    for data in parts:
                        outbound(data)
                total += sum(map(len, sends[-1][1])) \
                    if isinstance(sends[-1][1], list) else len(sends[-1][1])
            with stopped(proc):
                for sock, data in sends:
                    if isinstance(data, list):
                        send_train(sock, data, saddr)
                    else:
                        sock.sendto(data, saddr)
            got = [take(sock, len(wanted), len(registered) if not i else 0)
                   for i, (sock, wanted) in enumerate(zip(socks, expect))]
            self.assert_alive(proc, "round %d" % round_)
            for i, ((datagrams, _), wanted) in enumerate(zip(got, expect)):
                self.same([data for _, data in datagrams], wanted,
                          "round %d to peer %d (the client: %d)"
                          % (round_, i, client[0]))
            self.assertEqual([tokens for _, tokens in got],
                             [registered] + [[]] * (len(socks) - 1))
            self.assert_quiet(socks)
        self.assert_counters(proc, "server", want)


    # ------------------------------------------------------------ client

    def test_random_bursts_on_the_client(self):
        seed = self.seeds()
        for password in (False, True):
            for portable in (False, True):
                with self.subTest(seed=seed, password=password,
                                  portable=portable):
                    self.client_bursts(random.Random(
                        "client %d %s %s" % (seed, password, portable)),
                        password, portable)

    def client_bursts(self, rng, password, portable):
        """The server's datagrams in bursts (lone, trains of mixed tags,
        tokens, dwarfs, strangers'), then the real server's answers on
        some channels in bursts (lone, trains).  The real server tells
        channels apart by their ports; each datagram names the channel
        (tag, generation) the model says it goes on, where it has room."""
        n = rng.randint(2, 5)
        proxy = rng.random() < 0.25         # each payload after a header
        extra = ("-n", n) + (("-P", V_PASSWORD) if password else ()) \
            + (("--portable-io",) if portable else ()) \
            + (("--proxy-protocol",) if proxy else ())
        head = ux.proxy_header(("192.0.2.1", 4242), ("127.0.0.1", 7)) \
            if proxy else b""
        host = rng.choice(("127.0.0.1", "::1") if has_ipv6()
                          else ("127.0.0.1",))
        server, real, stranger = [roomy(self.udp(host)) for _ in range(3)]
        if not (ux.enable_gro(server) and ux.enable_gro(real)):
            self.skipTest("no UDP_GRO in this kernel")
        proc, caddr = self.start("%s:0" % fmt_host(host), "-a",
                                 ux.format_addr(server.getsockname()), "-c",
                                 ux.format_addr(real.getsockname()), *extra)

        def keepalive(data):
            return not data or is_token(data)
        first = take(server, 0, 1, keepalive)[1]    # the first keepalive
        registered = V_REGISTERED       # a server's answer, and with proxy
        if password and proxy:          # one that says it adds headers
            claims = ux.verify(V_KEY, first[0])
            registered = ux.sign(V_KEY, ux.proxy_claims(claims["proxy"]))
            server.sendto(registered, caddr)
            proc.wait_line("adds PROXY protocol headers")
        tags = rng.sample((0, 1, 2, 3, 4, 5, 7, 100, 0x6501,
                           ux.TOKEN_LOOKALIKE_TAG, 0xFFFF), n + 3)
        # The model: the client's channels, tag -> generation (how many
        # it had), as the client keeps them.
        workers, generations = ux.LRU(n), {}
        opened, closed, clock = {}, {}, [0]
        ports, channels = {}, {}        # port <-> (tag, generation)
        want = dict.fromkeys((
            "from_server_msgs", "from_real_server_msgs", "from_server_bytes",
            "from_real_server_bytes", "dwarfs",
            "strangers", "channels_opened", "channels_closed", "errors",
            "proxy_headers", "proxy_malformed",
            "real_server_refusals", "loops_broken"), 0)
        serial = [0]

        def channel(tag):
            """The channel a datagram from the server for tag goes on."""
            clock[0] += 1
            gen = workers.answered.get(tag)
            if gen is not None:
                workers.answered.move_to_end(tag)
                return tag, gen
            gen = workers.get(tag)
            if gen is None:
                if len(workers) >= n:
                    old, old_gen, _ = workers.evict()
                    closed[old, old_gen] = clock[0]
                    want["channels_closed"] += 1
                gen = generations[tag] = generations.get(tag, 0) + 1
                workers.put(tag, gen)
                opened[tag, gen] = clock[0]
                want["channels_opened"] += 1
            return tag, gen

        def is_open(tag):
            return tag in workers.answered or tag in workers.unanswered

        def body(key, size):
            """size bytes that name channel key (and a serial) if they can."""
            serial[0] += 1
            return (struct.pack(">HHI", key[0], key[1], serial[0])
                    + noise(rng, size))[:size]

        def inbound(tag, size):
            """A datagram from the server for tag, size bytes after it."""
            key = channel(tag)
            data = head + body(key, size)
            expect.setdefault(key, []).append(data)
            want["from_server_msgs"] += 1
            want["proxy_headers"] += proxy
            want["from_server_bytes"] += ux.TAG_SIZE + len(data)
            return ux.TAG.pack(tag) + data

        def arrived(got):
            """The datagrams the real server got, by channel."""
            by_channel = {}
            for src, data in got:
                port = src[1]
                key = ports.get(port)
                if len(data) >= len(head) + 8:
                    named = struct.unpack_from(">HH", data, len(head))
                    if key != named:    # a new channel; on a port reused?
                        self.assertTrue(key is None or closed.get(key, 1e9)
                                        <= opened[named], (port, key, named))
                        self.assertEqual(channels.get(named, port), port,
                                         "two ports for %r" % (named,))
                        key = ports[port] = named
                        channels[named] = port
                self.assertIsNotNone(key, "a datagram from a new port that "
                                     "names no channel")
                by_channel.setdefault(key, []).append(data)
            return by_channel

        kinds = ["lone", "lone", "lone", "train", "train", "train", "dwarf",
                 "stranger"]
        if password:
            kinds += ["token", "token train"]
        if proxy:
            kinds += ["malformed"]
        sizes = (0, 1, 5, 8, 20, 100, 500, 1400, 1400, 9000)
        answered = []           # tags answered last round, in tag order
        for round_ in range(self.ROUNDS):
            expect, sends, total = {}, [], 0
            for tag in answered:        # their order in the LRU known again
                sends.append((server, inbound(tag, 10)))
            items, longest = rng.randint(3, 150), rng.choice((3, 8, 128))
            weights = [rng.random() for _ in kinds]     # this burst's mix
            while total < self.BYTES and len(sends) < items:
                kind = rng.choices(kinds, weights)[0]
                if kind == "lone":
                    tag, size = rng.choice(tags), rng.choice(sizes)
                    if not is_open(tag):
                        size = max(size, 8)
                    sends.append((server, inbound(tag, size)))
                elif kind == "dwarf":
                    sends.append((server, rng.choice((b"", b"\x07"))))
                    want["dwarfs"] += 1
                elif kind == "stranger":
                    parts = [ux.TAG.pack(rng.choice(tags)) + noise(rng, 50)
                             for _ in range(rng.randint(1, 5))]
                    sends.append((stranger, parts if len(parts) > 1
                                  else parts[0]))
                    want["strangers"] += len(parts)
                elif kind == "malformed":     # no header
                    sends.append((server, ux.TAG.pack(rng.choice(tags))
                                  + noise(rng, rng.choice(sizes))))
                    want["proxy_malformed"] += 1
                elif kind == "token":
                    sends.append((server, rng.choice((
                        registered, ux.TOKEN_PREFIX + noise(rng, 60)))))
                else:                       # a train of mixed tags
                    size = len(head) + rng.choice((3, 4, 10, 100, 500, 1400,
                                                   9000))
                    if kind == "token train":
                        size = len(registered)
                    count = rng.randint(2, min(longest, 65507 // size))
                    pool, over = tags, ux.TAG_SIZE + len(head)
                    if size < over + 8:     # too short to name a channel
                        pool = [tag for tag in tags if is_open(tag)]
                        if not pool:
                            continue
                    parts, tag = [], rng.choice(pool)
                    for j in range(count):
                        if rng.random() < 0.2:
                            tag = rng.choice(pool)
                        last = size
                        if j == count - 1:
                            last = rng.choice((size, rng.randint(1, size)))
                            if last < over:     # a dwarf, or a header cut
                                parts.append((ux.TAG.pack(tag) + head)[:last])
                                want["dwarfs" if last < ux.TAG_SIZE
                                     else "proxy_malformed"] += 1
                                break
                            if not is_open(tag):
                                last = max(last, over + 8)
                        if kind == "token train" and rng.random() < 0.3:
                            parts.append(registered)
                        else:
                            parts.append(inbound(tag, last - over))
                    sends.append((server, parts))
                data = sends[-1][1]
                total += sum(map(len, data)) if isinstance(data, list) \
                    else len(data)
            with stopped(proc):
                for sock, data in sends:
                    if isinstance(data, list):
                        send_train(sock, data, caddr)
                    else:
                        sock.sendto(data, caddr)
            got = arrived(take(real, sum(map(len, expect.values())))[0])
            self.assert_alive(proc, "round %d" % round_)
            for key in set(got) | set(expect):
                self.same(got.get(key, []), expect.get(key, []),
                          "round %d on channel %r" % (round_, key))
            # The real server answers on some channels, in one burst.
            expect, sends = {}, []
            live = [(tag, gen) for tag, gen in channels
                    if gen in (workers.answered.get(tag),
                               workers.unanswered.get(tag))]
            for key in rng.sample(live, rng.randint(0, len(live))):
                for _ in range(rng.randint(1, 3)):
                    size = rng.choice(sizes)
                    if rng.random() < 0.5:
                        parts = [body(key, max(size, 1)) for _ in range(
                            rng.randint(2, min(64, 65507 // max(size, 1))))]
                    else:
                        parts = [body(key, size)]
                    sends.append((key, parts))
                    expect.setdefault(key[0], []).extend(
                        ux.TAG.pack(key[0]) + data for data in parts)
                    want["from_real_server_msgs"] += len(parts)
                    want["from_real_server_bytes"] += sum(map(len, parts))
            with stopped(proc):
                for key, parts in sends:
                    dest = (host, channels[key])
                    if len(parts) > 1:
                        send_train(real, parts, dest)
                    else:
                        real.sendto(parts[0], dest)
            got = {}
            self.assert_alive(proc, "round %d, answers" % round_)
            for _, data in take(server, sum(map(len, expect.values())),
                                control=keepalive)[0]:
                got.setdefault(ux.TAG.unpack_from(data)[0], []).append(data)
            for tag in set(got) | set(expect):
                self.same(got.get(tag, []), expect.get(tag, []),
                          "round %d from channel %d" % (round_, tag))
            answered = sorted(expect)
            for tag in answered:
                workers.answer(tag)
            self.assert_quiet([server, real])
        self.assert_counters(proc, "client", want)


# ====================================================================== --metrics

# CI must run the tests against a real Prometheus; elsewhere they skip
# without one.
PROMETHEUS_MISSING = None if shutil.which("prometheus") and shutil.which(
    "promtool") else "needs prometheus and promtool (Debian: prometheus)"
PROMETHEUS_REQUIRED = NETNS_REQUIRED or os.environ.get("CI") == "true"


def scrape(addr, path="/metrics"):
    """GET path from a --metrics address: (status, body as text)."""
    import http.client
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def samples(text):
    """An exposition's samples: {'name{labels}': value}."""
    return dict((line.rpartition(" ")[0], float(line.rpartition(" ")[2]))
                for line in text.splitlines() if not line.startswith("#"))


def metrics_addr(proc):
    """The (host, port) a tool started with --metrics serves on."""
    for line in proc.lines:
        m = re.search(r"Metrics on http://(\S+)/metrics", line)
        if m:
            break
    else:
        m = proc.wait_line(r"Metrics on http://(\S+)/metrics")
    return ux.resolve(m.group(1))[1]


@unittest.skipUnless(sys.platform.startswith("linux"), "needs Linux /proc")
class TestMetrics(RelayCase):
    def pair(self):
        """A relay pair with --metrics each, an echo real server and a
        connectee: (connectee, server's address, server, client)."""
        saddr, server, client = self.relay(extra=("--metrics", "127.0.0.1:0"))
        return self.udp(), saddr, server, client

    def exchange(self, conn, saddr, count, pace=0.0):
        """count datagrams through the pair and back, one at a time, each
        at least `pace` seconds after the last; every one must come back."""
        for i in range(count):
            t = time.monotonic()
            payload = b"%06d" % i
            conn.sendto(payload, saddr)
            self.assertEqual(self.recv(conn)[0], payload)
            time.sleep(max(0.0, pace - (time.monotonic() - t)))

    def settled(self, addr, name, value):
        """The samples at addr once `name` is `value` (a relay counts a
        burst after it sent it on), or fail."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = samples(scrape(addr)[1])
            if got[name] == value or time.monotonic() > deadline:
                self.assertEqual(got[name], value)
                return got
            time.sleep(0.05)

    def promtool_passes(self, text):
        p = subprocess.run(["promtool", "check", "metrics"], input=text,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=TIMEOUT * 2)
        self.assertEqual((p.returncode, p.stdout), (0, ""))

    def test_counters_and_gauges_of_both_roles(self):
        conn, saddr, server, client = self.pair()
        self.exchange(conn, saddr, 25)
        got = self.settled(metrics_addr(server),
                           "udpexposer_from_client_datagrams_total", 25)
        status, text = scrape(metrics_addr(server))
        self.assertEqual(status, 200)
        self.assertEqual(got['udpexposer_info{version="%s",role="server",'
                             'mode="plain"}' % ux.__version__], 1)
        self.assertEqual(got["udpexposer_from_connectee_datagrams_total"], 25)
        self.assertEqual(got["udpexposer_from_connectee_bytes_total"], 150)
        self.assertEqual(got["udpexposer_table_entries"], 1)
        self.assertEqual(got["udpexposer_table_capacity"], 4)
        self.assertEqual(got["udpexposer_peer_heard"], 1)
        self.assertLess(got["udpexposer_peer_silence_seconds"], 3)
        for stat in ux.server_stats():          # every SIGUSR1 counter
            self.assertIn("udpexposer_" + ux.METRIC_OF[stat][0], text)
        got = self.settled(metrics_addr(client),
                           "udpexposer_from_real_server_datagrams_total", 25)
        self.assertEqual(got["udpexposer_from_server_datagrams_total"], 25)
        status, text = scrape(metrics_addr(client))
        self.assertEqual(got["udpexposer_channels_opened_total"], 1)
        self.assertEqual(got["udpexposer_table_entries"], 1)
        self.assertEqual(got["udpexposer_peer_heard"], 1)
        for stat in ux.client_stats():
            self.assertIn("udpexposer_" + ux.METRIC_OF[stat][0], text)
        if not PROMETHEUS_MISSING:
            self.promtool_passes(text)

    def test_a_silent_peer_and_what_is_not_metrics(self):
        proc, _ = self.start("-s", "127.0.0.1:0", "-P", V_PASSWORD, "-n", 9,
                             "--metrics", "127.0.0.1:0")
        addr = metrics_addr(proc)
        got = samples(scrape(addr)[1])
        self.assertEqual(got['udpexposer_info{version="%s",role="server",'
                             'mode="password"}' % ux.__version__], 1)
        self.assertEqual(got["udpexposer_peer_heard"], 0)
        self.assertEqual(got["udpexposer_table_capacity"], 9)
        self.assertEqual(scrape(addr, "/")[0], 404)
        with socket.create_connection(addr, TIMEOUT) as s:
            s.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
            self.assertTrue(s.recv(100).startswith(b"HTTP/1.1 405 "))

    def test_bad_values_are_one_line_and_exit_2(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        for args, says in (
                (["--metrics", "nonsense"], "--metrics: "),
                (["--metrics", "127.0.0.1:65536"], "--metrics: "),
                (["--metrics", "[::1:9"], "--metrics: "),
                (["--metrics", ux.format_addr(taken.getsockname())],
                 "cannot bind --metrics")):
            with self.subTest(args=args):
                p = subprocess.run(
                    [sys.executable, lone_copy(), "-s", "127.0.0.1:0"] + args,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, universal_newlines=True,
                    timeout=TIMEOUT * 2)
                self.assertEqual(p.returncode, 2)
                self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
                self.assertIn("udpexposer: " + says, p.stderr)
        p = subprocess.run([sys.executable, lone_copy(), "127.0.0.1:0", "-S",
                            "-a", "127.0.0.1:9", "-P", "p", "--metrics",
                            "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=TIMEOUT * 2)
        self.assertEqual((p.returncode, p.stderr), (2, "udpexposer: --metrics "
                                                    "is for server and client "
                                                    "mode\n"))

    def test_hostile_scrapers_leave_relaying_alone(self):
        """200 idle connections, one sending garbage, one sending its
        request a byte a second and one reading the answer a byte a second,
        while datagrams go through at a steady pace: every one comes back,
        a real scrape still works, the hostile ones are closed, and the
        server does not spin."""
        conn, saddr, server, client = self.pair()
        addr = metrics_addr(server)
        stop = threading.Event()
        closed = {}                 # who -> seconds from its connect

        def connect():
            s = socket.create_connection(addr, TIMEOUT)
            self.addCleanup(s.close)
            return s

        def ended(s):
            try:
                return s.recv(1 << 16) == b""
            except (BlockingIOError, socket.timeout):
                return False
            except ConnectionResetError:
                return True

        def garbage(s):
            junk = os.urandom(1000)
            while not stop.is_set():
                try:
                    s.sendall(junk)
                except OSError:
                    return True
                stop.wait(0.01)

        def slow_writer(s):
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 10:
                if stop.wait(1.0):
                    return False
                try:
                    s.send(bytes((byte,)))
                except OSError:
                    return True
                if ended(s):
                    return True

        def slow_reader(s):
            """A byte a second until the end of the test, then the rest:
            the whole answer, which the server had finished with."""
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            got = b""
            while not stop.wait(1.0):
                got += s.recv(1)
            while not got.endswith(b"udpexposer_peer_silence_seconds 0\n"):
                more = s.recv(1 << 16)
                if not more:
                    return False
                got += more
            return got.startswith(b"HTTP/1.1 200 ") and s.recv(1) == b""

        t0 = time.monotonic()
        idle = [connect() for _ in range(200)]
        for who, act in (("garbage", garbage), ("slow writer", slow_writer),
                         ("slow reader", slow_reader)):
            s = connect()
            s.settimeout(0.01 if act is slow_writer else TIMEOUT)

            def run(who=who, act=act, s=s, t=time.monotonic()):
                if act(s):
                    closed[who] = time.monotonic() - t
            t = threading.Thread(target=run, daemon=True)
            t.start()
            self.addCleanup(t.join, TIMEOUT)
        self.addCleanup(stop.set)
        cpu0 = cpu_seconds(server.p.pid)
        self.exchange(conn, saddr, 100, pace=0.01)      # 100 a second
        self.assertEqual(scrape(addr)[0], 200)
        self.exchange(conn, saddr, 600, pace=0.01)
        busy = cpu_seconds(server.p.pid) - cpu0
        self.assertLess(busy, 0.5 * (time.monotonic() - t0))
        got = self.settled(addr, "udpexposer_from_client_datagrams_total",
                           700)
        self.assertEqual(got["udpexposer_from_connectee_datagrams_total"], 700)
        for s in idle:
            s.settimeout(TIMEOUT)
            self.assertTrue(ended(s))
        deadline = time.monotonic() + TIMEOUT
        while len(closed) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(sorted(closed), ["garbage", "slow writer"])
        self.assertLess(closed["slow writer"], ux.METRICS_SECONDS + 2.0)
        stop.set()
        while len(closed) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertIn("slow reader", closed)

    @unittest.skipIf(PROMETHEUS_MISSING and not PROMETHEUS_REQUIRED,
                     PROMETHEUS_MISSING)
    def test_a_real_prometheus_scrapes_a_relay_pair(self):
        if PROMETHEUS_MISSING:
            self.fail(PROMETHEUS_MISSING)
        conn, saddr, server, client = self.pair()
        targets = [ux.format_addr(metrics_addr(p)) for p in (server, client)]
        tmp = tempfile.mkdtemp(prefix="uxme%d-" % os.getpid())
        self.addCleanup(shutil.rmtree, tmp, True)
        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write("global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
                    "scrape_configs:\n- job_name: udpexposer\n"
                    "  static_configs: [{targets: %s}]\n" % json.dumps(targets))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            web = s.getsockname()
        log = open(os.path.join(tmp, "prometheus.log"), "w")
        self.addCleanup(log.close)
        prom = subprocess.Popen(
            ["prometheus", "--config.file=" + f.name,
             "--storage.tsdb.path=" + os.path.join(tmp, "data"),
             "--web.listen-address=%s:%d" % web],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.addCleanup(prom.wait, TIMEOUT)
        self.addCleanup(prom.kill)
        self.exchange(conn, saddr, 321)
        self.promtool_passes(scrape(metrics_addr(client))[1])
        self.promtool_passes(scrape(metrics_addr(server))[1])

        def query(expr):
            import urllib.parse
            status, text = scrape(web, "/api/v1/query?query="
                                  + urllib.parse.quote(expr))
            result = json.loads(text)["data"]["result"]
            return [float(r["value"][1]) for r in result]
        deadline = time.monotonic() + 30
        relayed = back = None
        while True:
            try:
                relayed = query("udpexposer_from_connectee_datagrams_total")
                back = query("udpexposer_from_server_datagrams_total")
                if relayed == [321] and back == [321]:
                    break
            except (OSError, ValueError, KeyError):
                pass                # not up yet
            if time.monotonic() > deadline:
                with open(log.name) as f:
                    self.fail("Prometheus saw %s and %s; its log ends: %s"
                              % (relayed, back, f.read()[-2000:]))
            time.sleep(0.2)
        self.assertEqual(query('sum(up{job="udpexposer"})'), [2])
        self.assertEqual(query("udpexposer_peer_heard"), [1, 1])


if __name__ == "__main__":
    unittest.main()
