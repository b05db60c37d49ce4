#!/usr/bin/env python3
"""udpexposer.py: reach a UDP service behind a NAT through a helper host.

Roles:
  server     runs on a helper host with a public address (-s);
  client     runs next to the hidden real server (-a SERVER -c REALSERVER) and
             keeps the NAT open with keepalives;
  connectee  any remote peer; it talks to the server as if it were the real
             server.

The server tags each connectee with two bytes and forwards its datagrams to
the client; the client opens one local UDP socket per tag, so the real server
sees every connectee as a distinct peer.  Wire compatible with the Rust
udpexposer 0.3.0, in plain mode, with --password and with --dump-stats.

    helper$  python3 udpexposer.py -s 0.0.0.0:5566 -n 10
    hidden$  python3 udpexposer.py 0.0.0.0:5566 -a 198.51.100.1:5566 \\
                 -c 127.0.0.1:1234 -n 10

One file, standard library only, CPython 3.6 or newer.
"""

import argparse
import array
import base64
import collections
import errno
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

__version__ = "2.0.0"        # this tool's own (semantic versioning)
WIRE_VERSION = "0.3.0"       # the Rust udpexposer whose bytes it speaks
VERSION_TEXT = "%s (wire protocol of udpexposer %s)" % (__version__,
                                                        WIRE_VERSION)

# ---------------------------------------------------------------- constants

MAX_DATAGRAM = 65535      # receive room: no UDP payload is larger
TAG_SIZE = 2
TAG = struct.Struct(">H")         # a tag in front of a relayed datagram
MAX_TAG = 0xFFFF
BURST = 64                # datagrams read from a socket at a time
BURSTS_PER_WAKEUP = 8     # the server reads on while there is more
WAIT_AT_MOST = 1.0        # seconds a wait inside recvmmsg lasts (see MmsgIO)
SOCKET_BUFFER = 1 << 20   # asked of the kernel for SO_RCVBUF / SO_SNDBUF
CACHE_SIZE = 4096         # entries a lookup cache keeps (Bounded): ~1 MB full
ASCII_DIGITS = re.compile("[0-9]+")     # str.isdigit() takes "²" too

DEFAULT_MAX_CLIENTS = 4
DEFAULT_PING_INTERVAL_MS = 25000
DEFAULT_RESOLVE_INTERVAL = 300  # seconds between lookups of -a's host name
MAX_LOOKUP_BACKOFF = 60.0       # seconds between tries of one never resolved
LOOKUP_POLL = 0.05                # while a lookup runs, look for its result
PASSWORD_ENV = "UDPEXPOSER_PASSWORD"
MAX_PASSWORD = 4096     # bytes of --password-file's first line, at most

# Password mode: signed messages are HS256 JSON Web Tokens (PROTOCOL.md).
TOKEN_PREFIX = b"eyJhbGciOiJIUzI1NiJ9."   # base64url of {"alg":"HS256"}, "."
TOKEN_LOOKALIKE_TAG = 0x6579              # b"ey": never handed out as a tag
MAC_TEXT = 43                             # base64url of a 32-byte MAC
# The longest token there is: claims of at most 59 bytes
# ({"nonce":N,"proxy":C}, N and C u64s), which are 79 characters of
# base64url.  Longer ones are data.
MAX_TOKEN = len(TOKEN_PREFIX) + 79 + 1 + MAC_TEXT
STATS_NONCE = (1 << 64) - 1
ARGON2_SALT = b"udpexposer"
ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES = 256, 2, 2
AUTH_WINDOW = (-10, 1)                    # seconds around now a nonce may be
UNANSWERED_PINGS = 3                      # then the client says so
PROXY_WARN_EVERY = 600.0    # s: a client's "does not add headers", again
STATS_TRIES, STATS_WAIT = 3, 1.5
STATS_REPLIES_PER_SECOND = 5              # a replayed -S request reflects
# A replayed keepalive from many forged sources gets Retry replies, each
# larger than the request: at most this many a second, and per address.
RETRIES_PER_SECOND, RETRIES_PER_ADDRESS = 50, 3

# A client whose -c leads back to its server turns one datagram into a new
# connectee, a new channel and the same datagram again, for ever, and no
# channel is ever answered.  The same first datagram on LOOP_LAPS new
# channels, each within LOOP_WINDOW seconds of the last and none answered
# since, is suspect; a probe then tells (see run_client's looped()).
LOOP_LAPS, LOOP_WINDOW = 16, 1.0

# The 23 counters of the stats blob, in wire order (PROTOCOL.md, "Stats").
STAT_NAMES = (
    "err1", "signed_looking", "refresh_address", "invalid_auths",
    "auth_in_progress", "auth_completeds", "err2", "simple_keepalives",
    "simple_address_switches", "dwarfs", "ch_not_founds", "err3",
    "dropped_no_client_address", "new_connectees", "err4",
    "from_connectee_bytes", "from_connectee_msgs", "from_client_bytes",
    "from_client_msgs", "stats_requests", "last_ka_s", "last_client_s",
    "last_connectee_s",
)


# Counters this tool keeps beyond the wire blob (SIGUSR1 shows them).
SERVER_EXTRA_STATS = ("not_allowed", "client_not_allowed",
                      "evicted_unanswered", "evicted_answered",
                      "stats_refused", "retries_refused", "proxy_headers",
                      "sources_refused")
CLIENT_STATS = (
    "keepalives", "from_server_msgs", "from_server_bytes",
    "from_real_server_msgs", "from_real_server_bytes", "strangers", "dwarfs",
    "channels_opened", "channels_closed", "evicted_unanswered",
    "evicted_answered", "loops_broken", "real_server_refusals", "errors",
    "server_address_changes", "proxy_headers", "proxy_malformed",
    "proxy_unconfirmed",
    "last_server_s",
)


def server_stats():
    return dict.fromkeys(STAT_NAMES + SERVER_EXTRA_STATS, 0)


def client_stats():
    return dict.fromkeys(CLIENT_STATS, 0)


class UsageError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


# ---------------------------------------------------------------- logging

WARN, INFO, DEBUG = 0, 1, 2     # -q shows WARN lines only, -v adds DEBUG


def plural(n, noun):
    """'1 channel', '2 channels'."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


class Budget:
    """At most `count` events per `window` seconds, and with per_key at
    most that many of them for one key.

    take(key) says whether one more fits.  held is how many the window that
    ended last held back; the caller reads it and sets it to 0.  The keys
    a window remembers are at most `count`: only those that took.
    """

    def __init__(self, count, window, per_key=None):
        self.count, self.window, self.per_key = count, window, per_key
        self.start = None
        self.used = self.refused = self.held = 0
        self.keys = {}

    def take(self, key=None):
        now = time.monotonic()
        if self.start is None or now - self.start >= self.window:
            self.held += self.refused
            self.start, self.used, self.refused = now, 0, 0
            self.keys.clear()
        if self.used < self.count and (
                self.per_key is None
                or self.keys.get(key, 0) < self.per_key):
            self.used += 1
            if self.per_key is not None:
                self.keys[key] = self.keys.get(key, 0) + 1
            return True
        self.refused += 1
        return False


def write_all(fd, data):
    """os.write until all of data is out (a pipe may take part of it)."""
    while data:
        data = data[os.write(fd, data):]


class Log:
    """The event log, one line per event.

    On a file descriptor (stdout, in main) the lines go into a bounded queue
    that a writer thread empties with blocking writes, so the relay never
    waits for a log reader that stalls (a stuck journald, a paused pager): a
    line that finds the queue full is dropped and counted, and one line says
    how many once the reader is back.  Appending to a deque and waking the
    writer through a pipe take no lock, so a signal handler may log too
    (SIGUSR1).  Under journald each line starts with its syslog priority.
    A stream object instead (a test's) is written at once.

    Lines that strangers can provoke go through limited(): at most BUDGET per
    kind per WINDOW seconds, then one line saying how many were held back.
    """

    BUDGET = 10
    WINDOW = 60.0
    QUEUE = 1000            # lines waiting for the writer, at most
    PRIORITY = {WARN: "<4>", INFO: "<6>", DEBUG: "<7>"}     # syslog's

    def __init__(self, stream=None, verbosity=INFO, fd=None, journal=False):
        self.stream, self.fd, self.verbosity = stream, fd, verbosity
        self.prefix = self.PRIORITY if journal \
            else dict.fromkeys(self.PRIORITY, "")
        self.budgets = {}   # kind -> Budget
        self.queue = collections.deque()
        self.dropped = self.told = 0    # lines dropped; those said so
        self.busy = False
        if fd is not None:
            self.wake_r, self.wake_w = os.pipe()
            os.set_blocking(self.wake_w, False)
            threading.Thread(target=self._writer, daemon=True).start()

    def __call__(self, line, level=INFO):
        if level > self.verbosity:
            return
        line = self.prefix[level] + line + "\n"
        if self.fd is None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
            return
        if len(self.queue) >= self.QUEUE:
            self.dropped += 1
            return
        self.queue.append(line)
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass            # the pipe is full: the writer is awake anyway

    def _writer(self):
        while os.read(self.wake_r, 4096):
            while self.queue:
                self.busy = True
                self._write(self.queue.popleft())
                if not self.queue and self.dropped != self.told:
                    count, self.told = self.dropped - self.told, self.dropped
                    self._write("%s(%d log lines were dropped: the log reader "
                                "was not reading)\n" % (self.prefix[WARN],
                                                        count))
            self.busy = False

    def _write(self, line):
        try:
            write_all(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass            # a closed or broken stdout must not stop us

    def flush(self, timeout=1.0):
        """Wait up to timeout seconds for the queued lines to go out."""
        deadline = time.monotonic() + timeout
        while (self.queue or self.busy) and time.monotonic() < deadline:
            time.sleep(0.01)

    def limited(self, kind, line, level=INFO):
        """Log line unless kind is over budget.  line may be a callable that
        makes the text: it then runs only for a line that is shown."""
        if level > self.verbosity:
            return
        budget = self.budgets.get(kind)
        if budget is None:
            budget = self.budgets[kind] = Budget(self.BUDGET, self.WINDOW)
        shown = budget.take()
        if budget.held:
            self("(%d more lines like %r were held back)" % (budget.held, kind),
                 level)
            budget.held = 0
        if shown:
            self(line() if callable(line) else line, level)


# ---------------------------------------------------------------- systemd

STATUS_EVERY = 10.0     # seconds between STATUS= lines when no watchdog
SHORTEST_TICK = 0.01    # seconds: a shorter watchdog period is clamped


class Notify:
    """systemd's notification socket (Type=notify), or nothing at all.

    NOTIFY_SOCKET names an AF_UNIX datagram socket ('@' starts an abstract
    name).  ready() says READY=1 once; the relay loops call tick() whenever
    `due` has passed, which feeds the watchdog (WATCHDOG=1 at half of
    WATCHDOG_USEC, when that is meant for this process) and says STATUS=.
    Without NOTIFY_SOCKET `due` never comes and nothing is sent.
    Sends never wait: a message that finds the manager's queue full is
    dropped (a late WATCHDOG=1 or STATUS= is worth nothing), so a manager
    that stops reading never stops the relay.  `problem` says what was
    wrong with WATCHDOG_USEC, for the log.
    """

    def __init__(self, environ):
        self.sock, self.watchdog, self.readied = None, False, False
        self.period, self.due = STATUS_EVERY, float("inf")
        self.problem = None
        path = environ.get("NOTIFY_SOCKET", "")
        if not path or not hasattr(socket, "AF_UNIX"):
            return
        if path.startswith("@"):
            path = "\0" + path[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(path)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self.sock = sock
        usec = environ.get("WATCHDOG_USEC", "")
        if environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return
        if not ASCII_DIGITS.fullmatch(usec) or not int(usec):
            if usec:
                self.problem = "WATCHDOG_USEC=%r is not a number of " \
                    "microseconds: no watchdog" % usec
            return
        self.watchdog = True
        self.period = max(int(usec) / 2e6, SHORTEST_TICK)

    def __call__(self, *fields):
        if self.sock is not None:
            try:
                self.sock.send("\n".join(fields).encode("utf-8", "replace"))
            except OSError:
                pass            # full (dropped), or the manager is gone

    def ready(self, status):
        self.readied = True
        if self.sock is not None:
            self("READY=1", "STATUS=" + status)
            self.due = time.monotonic() + self.period

    def tick(self, status):
        self.due = time.monotonic() + self.period
        if self.watchdog:
            self("WATCHDOG=1", "STATUS=" + status)
        else:
            self("STATUS=" + status)


# ---------------------------------------------------------------- addresses

def split_host_port(text):
    """'1.2.3.4:5', '[::1]:5' or 'name:5' -> (host, port).  Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("expected [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [%s]:%s"
                             % (host, port))
    if not ASCII_DIGITS.fullmatch(port) or not 0 <= int(port) <= 65535:
        raise ValueError("bad port %r" % port)
    return host, int(port)


class LookupFailed(ValueError):
    """A well-formed host name that did not resolve (this time)."""


HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def resolve(text, passive=False):
    """Address text -> (family, sockaddr), looked up once.  ValueError for
    text that no lookup can make sense of; LookupFailed for a lookup that
    failed."""
    host, port = split_host_port(text)
    flags = socket.AI_PASSIVE if passive else 0
    if not is_ip_literal(host):
        try:
            labels = host.encode("idna").decode("ascii").rstrip(".")
        except UnicodeError as e:
            raise ValueError("bad host name %r: %s" % (host, e))
        if len(labels) > 253 or not all(
                HOST_LABEL.fullmatch(label) for label in labels.split(".")):
            raise ValueError("bad host name %r" % host)
        if ASCII_DIGITS.fullmatch(labels.rpartition(".")[2]):
            # No top-level domain is all digits (RFC 3696): no name to look up.
            raise ValueError("%r is not an IP address" % host)
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM,
                                   socket.IPPROTO_UDP, flags)
    except socket.gaierror as e:
        raise LookupFailed("cannot resolve %r: %s" % (host, e.strerror))
    infos.sort(key=lambda info: info[0] != socket.AF_INET)   # IPv4 first
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def format_addr(addr):
    """sockaddr -> '1.2.3.4:5' or '[::1]:5', as the Rust tool prints them."""
    if len(addr) > 2:
        host = addr[0]
        if addr[3] and "%" not in host:
            host = "%s%%%d" % (host, addr[3])
        return "[%s]:%d" % (host, addr[1])
    return "%s:%d" % addr


def peer_addr(family, sockaddr):
    """A resolved address in the form recvfrom() on a `family` socket gives.

    An IPv4 peer seen through an IPv6 socket appears as ::ffff:a.b.c.d.
    """
    if family == socket.AF_INET6 and len(sockaddr) == 2:
        return ("::ffff:" + sockaddr[0], sockaddr[1], 0, 0)
    if family == socket.AF_INET and len(sockaddr) == 4:
        raise ValueError("%s is IPv6 but the listening socket is IPv4"
                         % format_addr(sockaddr))
    return sockaddr


def parse_networks(texts, flag):
    """CIDR texts -> ip_network objects; UsageError naming flag on bad input."""
    networks = []
    for text in texts or ():
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise UsageError("%s %s: %s" % (flag, text, e))
    return networks


def ip_of(addr):
    """The ip_address of a sockaddr; an IPv4-mapped one as IPv4."""
    ip = ipaddress.ip_address(addr[0].split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def in_networks(networks, addr):
    """Whether sockaddr addr lies in one of networks (IPv4-mapped counts)."""
    ip = ip_of(addr)
    return any(ip in net for net in networks)


# ---------------------------------------------------------------- PROXY protocol v2

# HAProxy's PROXY protocol, version 2, DGRAM form: with --proxy-protocol
# the server puts a header before every connectee's datagram (after the
# tag), so the real server learns who sent it.
PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2 = 0x21                         # version 2, command PROXY
PROXY_LOCAL = 0x20      # version 2, command LOCAL: no addresses, any family
PROXY_UDP4, PROXY_UDP6 = 0x12, 0x22     # address family and DGRAM
PROXY_ADDRESSES = {PROXY_UDP4: 12, PROXY_UDP6: 36}


def proxy_header(source, dest):
    """The PROXY v2 header of a datagram from sockaddr source to sockaddr
    dest: 28 bytes for IPv4 (an IPv4-mapped source included), 52 for IPv6."""
    src, dst = ip_of(source), ip_of(dest)
    if dst.version != src.version:      # a wildcard bind: no local address
        dst = ipaddress.ip_address("0.0.0.0" if src.version == 4 else "::")
    family = PROXY_UDP4 if src.version == 4 else PROXY_UDP6
    return PROXY_SIGNATURE + struct.pack(
        ">BBH", PROXY_V2, family, PROXY_ADDRESSES[family]) \
        + src.packed + dst.packed + struct.pack(">HH", source[1], dest[1])


def proxy_length(buf, start, end):
    """The length of the PROXY v2 DGRAM header at buf[start:end] (TLVs
    after the addresses included), or 0 where none is well-formed.  A
    LOCAL header is well-formed whatever its family: the spec says a
    receiver must accept it and use the real endpoints."""
    if end - start < 16 or not buf.startswith(PROXY_SIGNATURE, start):
        return 0
    command, family = buf[start + 12], buf[start + 13]
    length = buf[start + 14] << 8 | buf[start + 15]
    if end - start < 16 + length or command != PROXY_LOCAL and (
            command != PROXY_V2 or family not in PROXY_ADDRESSES
            or length < PROXY_ADDRESSES[family]):
        return 0
    return 16 + length


def proxy_source(header):
    """The source sockaddr a well-formed PROXY v2 header names (None for
    LOCAL)."""
    if header[12] == PROXY_LOCAL:
        return None
    if header[13] == PROXY_UDP4:
        return socket.inet_ntop(socket.AF_INET, bytes(header[16:20])), \
            header[24] << 8 | header[25]
    return socket.inet_ntop(socket.AF_INET6, bytes(header[16:32])), \
        header[48] << 8 | header[49], 0, 0


def udp_socket(family, bind_to, connect_to=None, local=False):
    """A non-blocking UDP socket bound to bind_to (and connected to
    connect_to, if given), with roomy buffers.  local: on a wildcard
    bind, report each datagram's local address (LocalReplies) from before
    the bind on, so that no datagram is queued without it."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        if local and bind_to[0] in LocalReplies.WILDCARDS:
            LocalReplies.enable(sock)
        sock.bind(bind_to)
        if connect_to is not None:
            sock.connect(connect_to)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def wildcard(family):
    return ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)


# ---------------------------------------------------------------- tags and the LRU

class LRU:
    """A bounded map that forgets an unanswered entry before an answered one,
    and within each kind the least recently used first.

    An entry is *answered* once traffic has come back for it (answer()).  As
    conntrack keeps its ASSURED entries, a peer that the real server talks
    to keeps its place while strangers that nobody answers come and go.
    Each kind is an OrderedDict in recency order; a key is in one of them.
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.unanswered = collections.OrderedDict()
        self.answered = collections.OrderedDict()

    def __len__(self):
        return len(self.unanswered) + len(self.answered)

    def get(self, key):
        """The value for key (now the most recent of its kind), or None."""
        for kind in (self.answered, self.unanswered):
            value = kind.get(key)
            if value is not None:
                kind.move_to_end(key)
                return value
        return None

    def answer(self, key):
        """Mark key answered and the most recent: its value, or None."""
        value = self.unanswered.pop(key, None)
        if value is not None:
            self.answered[key] = value
            return value
        return self.get(key)

    def put(self, key, value):
        """Store a new key as unanswered; returns what was evicted to make
        room, as (key, value, was_answered), or None."""
        evicted = self.evict() if len(self) >= self.capacity else None
        self.unanswered[key] = value
        return evicted

    def evict(self):
        """Forget the entry the rule picks: (key, value, was_answered)."""
        if self.unanswered:
            return self.unanswered.popitem(last=False) + (False,)
        return self.answered.popitem(last=False) + (True,)


class Bounded(collections.OrderedDict):
    """A cache of `capacity` entries at most: a new key past that forgets
    the oldest one stored, not all (a peer cycling over more keys than it
    holds costs a miss each, never a rebuild).  A hit is a plain dict
    lookup, at C speed; only a store runs Python (OrderedDict's
    popitem(last=False) is O(1); a dict's first item is found by a scan
    past the deleted ones)."""

    def __init__(self, capacity=CACHE_SIZE):
        collections.OrderedDict.__init__(self)
        self.capacity = capacity

    def __setitem__(self, key, value):
        if len(self) >= self.capacity and key not in self:
            self.popitem(last=False)
        collections.OrderedDict.__setitem__(self, key, value)


class Connectees:
    """The server's one table of connectees: tag <-> address.

    Both directions live in one structure and evict together, so a reply for
    an active connectee always finds it.  Tags are handed out from 1 up, then
    the freed ones, oldest first: a tag rests as long as it can before it is
    used again, and taking one is O(1) however full the table is.  Tags in
    `reserved` are never handed out.
    """

    def __init__(self, capacity, reserved=()):
        unused = [tag for tag in range(1, MAX_TAG + 1) if tag not in reserved]
        self.table = LRU(min(capacity, len(unused)))   # tag -> address
        self.tag_of = {}                               # address -> tag
        self.free = collections.deque(unused)

    def __len__(self):
        return len(self.tag_of)

    def add(self, addr):
        """A tag for a new address: (tag, evicted), evicted being
        (address, was_answered) of the connectee that made room, or None."""
        evicted = None
        if len(self.tag_of) >= self.table.capacity:
            tag, old, answered = self.table.evict()
            del self.tag_of[old]
            self.free.append(tag)
            evicted = old, answered
        tag = self.free.popleft()
        self.table.put(tag, addr)
        self.tag_of[addr] = tag
        return tag, evicted


# ---------------------------------------------------------------- Argon2i (RFC 9106)

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
_BLOCK = struct.Struct("<128Q")           # a 1 KiB block as 128 words


def _h_prime(data, size):
    """Argon2's variable-length hash H' built on BLAKE2b (RFC 9106, 3.3)."""
    data = struct.pack("<I", size) + data
    if size <= 64:
        return hashlib.blake2b(data, digest_size=size).digest()
    whole = (size + 31) // 32 - 2         # 64-byte links kept by half
    v = hashlib.blake2b(data).digest()
    out = [v[:32]]
    for _ in range(whole - 1):
        v = hashlib.blake2b(v).digest()
        out.append(v[:32])
    out.append(hashlib.blake2b(v, digest_size=size - 32 * whole).digest())
    return b"".join(out)


def _mixing_schedule():
    """The (a, b, c, d) word quadruples Argon2's compression mixes, in order.

    P, BLAKE2b's round without message words, runs on each row of eight
    16-byte registers, then on each column (RFC 9106, 3.6).
    """
    rows = [[16 * i + j for j in range(16)] for i in range(8)]
    columns = [[2 * i + 16 * k + half for k in range(8) for half in (0, 1)]
               for i in range(8)]
    quads = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
             (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))
    return [tuple(v[i] for i in quad) for v in rows + columns for quad in quads]


_SCHEDULE = _mixing_schedule()


def _half_mix(va, vb, vc, vd, rd, rb):
    """Half of Argon2's GB (RFC 9106, 3.6): multiply-add, xor, rotate right
    d by rd and b by rb.  GB is this with (32, 24), then with (16, 63)."""
    va = (va + vb + 2 * (va & M32) * (vb & M32)) & M64
    vd ^= va
    vd = vd >> rd | (vd << (64 - rd)) & M64
    vc = (vc + vd + 2 * (vc & M32) * (vd & M32)) & M64
    vb ^= vc
    vb = vb >> rb | (vb << (64 - rb)) & M64
    return va, vb, vc, vd


def _compress(x, y, old=None):
    """G(X, Y) of RFC 9106, 3.5 on 128-word blocks; XORed into old if given."""
    r = [a ^ b for a, b in zip(x, y)]
    q = r[:]
    for a, b, c, d in _SCHEDULE:
        va, vb, vc, vd = _half_mix(q[a], q[b], q[c], q[d], 32, 24)
        q[a], q[b], q[c], q[d] = _half_mix(va, vb, vc, vd, 16, 63)
    if old is None:
        return [a ^ b for a, b in zip(q, r)]
    return [a ^ b ^ c for a, b, c in zip(q, r, old)]


def _reference_index(pass_, slice_, index, same_lane, word, segment,
                     lane_length):
    """Column of the reference block for pseudo-random word (RFC 9106, 3.4.2)."""
    if pass_ == 0:
        area, start = slice_ * segment, 0
    else:
        area, start = lane_length - segment, (slice_ + 1) * segment % lane_length
    if same_lane:
        area += index - 1
    elif index == 0:
        area -= 1
    x = (word & M32) ** 2 >> 32
    return (start + area - 1 - (area * x >> 32)) % lane_length


def argon2i(password, salt, memory_kib, passes, lanes, size=32,
            secret=b"", associated=b""):
    """Argon2i version 0x13 (RFC 9106): the tag of `size` bytes."""
    def field(data):
        return struct.pack("<I", len(data)) + data
    h0 = hashlib.blake2b(
        struct.pack("<6I", lanes, size, memory_kib, passes, 0x13, 1)
        + field(password) + field(salt) + field(secret) + field(associated)
    ).digest()
    lane_length = memory_kib // (4 * lanes) * 4
    segment = lane_length // 4
    total = lane_length * lanes
    memory = [None] * total               # lane after lane
    for lane in range(lanes):
        for column in (0, 1):
            memory[lane * lane_length + column] = list(_BLOCK.unpack(
                _h_prime(h0 + struct.pack("<II", column, lane), 1024)))
    zero = [0] * 128

    for pass_ in range(passes):
        for slice_ in range(4):
            for lane in range(lanes):
                # Data-independent addressing: the pseudo-random words are
                # G(0, G(0, input block with a counter)), 128 at a time.
                words = []
                counter_block = [pass_, lane, slice_, total, passes, 1] \
                    + [0] * 122
                while len(words) < segment:
                    counter_block[6] += 1
                    words += _compress(zero, _compress(zero, counter_block))
                first = 2 if pass_ == 0 and slice_ == 0 else 0
                for index in range(first, segment):
                    column = slice_ * segment + index
                    current = lane * lane_length + column
                    previous = current - 1 if column else current + lane_length - 1
                    word = words[index]
                    if pass_ == 0 and slice_ == 0:
                        ref_lane = lane
                    else:
                        ref_lane = (word >> 32) % lanes
                    ref = ref_lane * lane_length + _reference_index(
                        pass_, slice_, index, ref_lane == lane, word,
                        segment, lane_length)
                    memory[current] = _compress(
                        memory[previous], memory[ref],
                        memory[current] if pass_ else None)

    final = memory[lane_length - 1]
    for lane in range(1, lanes):
        last = memory[(lane + 1) * lane_length - 1]
        final = [a ^ b for a, b in zip(final, last)]
    return _h_prime(_BLOCK.pack(*final), size)


def derive_key(password):
    """The 32-byte HMAC key for a password (bytes, or str as UTF-8), as the
    Rust tool derives it."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    return argon2i(password, ARGON2_SALT, ARGON2_MEMORY_KIB, ARGON2_PASSES,
                   ARGON2_LANES)


# ---------------------------------------------------------------- tokens (HS256 JWT)

def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_PADS = {}      # key -> SHA-256 states after its inner and outer pad


def hs256(key, data):
    """HMAC-SHA256 (RFC 2104), the padded key hashed once per key: a
    third of what hmac.new costs per message."""
    pads = _PADS.get(key)
    if pads is None:
        block = key if len(key) <= 64 else hashlib.sha256(key).digest()
        block = block.ljust(64, b"\0")
        pads = _PADS[key] = (hashlib.sha256(bytes(b ^ 0x36 for b in block)),
                             hashlib.sha256(bytes(b ^ 0x5C for b in block)))
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(data)
    outer.update(inner.digest())
    return outer.digest()


def sign(key, claims):
    """The compact JWT for JSON claims (bytes), HS256 under key."""
    signed = TOKEN_PREFIX + _b64url(claims)
    return signed + b"." + _b64url(hs256(key, signed))


def verify(key, token):
    """The decoded claims of a token that verifies under key, else None.

    The shape is checked first (length, prefix, where the MAC starts): a
    datagram that cannot be a token costs no HMAC.
    """
    token = bytes(token)
    if not len(TOKEN_PREFIX) + MAC_TEXT < len(token) <= MAX_TOKEN \
            or token[-MAC_TEXT - 1] != ord(".") \
            or not token.startswith(TOKEN_PREFIX):
        return None
    signed, mac = token[:-MAC_TEXT - 1], token[-MAC_TEXT:]
    if not hmac.compare_digest(_b64url(hs256(key, signed)), mac):
        return None
    body = signed[len(TOKEN_PREFIX):]
    try:
        return json.loads(base64.urlsafe_b64decode(
            body + b"=" * (-len(body) % 4)).decode("utf-8"))
    except ValueError:
        return None


REGISTERED_CLAIMS = b'"Registered"'
# A message of ours whatever the key: the claims a peer signs (PROTOCOL.md),
# base64url, and a MAC.  One that does not verify is not a connectee's data.
OUR_TOKEN = re.compile(re.escape(TOKEN_PREFIX)
                       + rb"([A-Za-z0-9_-]{1,40})\.[A-Za-z0-9_-]{%d}" % MAC_TEXT)
OUR_CLAIMS = re.compile(
    rb'\{"nonce":(null|[0-9]{1,20})\}|"Registered"|\{"Retry":[0-9]{1,20}\}')


def ours(token):
    """Whether token is shaped as a message of ours, its MAC unchecked."""
    match = OUR_TOKEN.fullmatch(token)
    if match is None:
        return False
    body = match.group(1)
    try:
        claims = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
    except ValueError:
        return False
    return OUR_CLAIMS.fullmatch(claims) is not None


def request_claims(nonce=None, proxy=None):
    """A request's claims; proxy: the challenge of a client that asks
    whether the server adds PROXY headers (PROTOCOL.md)."""
    claims = b'{"nonce":null' if nonce is None else b'{"nonce":%d' % nonce
    return claims + (b"}" if proxy is None else b',"proxy":%d}' % proxy)


def retry_claims(nonce):
    return b'{"Retry":%d}' % nonce


def proxy_claims(challenge):
    """Registered, and PROXY v2 headers added: the answer to a request
    whose "proxy" challenge was challenge."""
    return b'{"ProxyV2":%d}' % challenge


def _u64(value):
    return type(value) is int and 0 <= value <= M64


def request_nonce(claims):
    """(True, nonce or None) for request claims, (False, None) otherwise.
    (A request may carry a "proxy" challenge too.)"""
    if isinstance(claims, dict) and "nonce" in claims \
            and claims.keys() <= {"nonce", "proxy"}:
        nonce = claims["nonce"]
        if nonce is None or _u64(nonce):
            return True, nonce
    return False, None


def retry_nonce(claims, name="Retry"):
    """The N of a {"Retry": N} reply (of {name: N}), or None."""
    if isinstance(claims, dict) and list(claims) == [name] \
            and _u64(claims[name]):
        return claims[name]
    return None


# ---------------------------------------------------------------- stats

def pack_stats(stats):
    """The counters as the 184-byte big-endian blob."""
    return struct.pack(">%dQ" % len(STAT_NAMES),
                       *[stats[name] & M64 for name in STAT_NAMES])


# What a stats request signs, whatever the key: its token starts so.
STATS_REQUEST_SIGNED = TOKEN_PREFIX + _b64url(request_claims(STATS_NONCE))


def stats_json(blob):
    """A stats blob as one compact JSON object, keys in wire order."""
    values = struct.unpack(">%dQ" % len(STAT_NAMES), blob)
    return "{%s}" % ",".join('"%s":%d' % kv for kv in zip(STAT_NAMES, values))


# ---------------------------------------------------------------- the event loop

def log_socket_error(log, where, exc):
    """Tier two of the error rules: the caller counts it, this logs it."""
    if exc.errno == errno.EMSGSIZE:
        log.limited(where, "Dropped a datagram too big to %s" % where, WARN)
    elif exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        log.limited(where, "Dropped a datagram to %s: the send buffer is "
                    "full" % where, WARN)
    else:
        log.limited(where, "Socket error (%s): %s" % (where, exc), WARN)


SIGNALLED = set()       # SIGUSR1 was received: the relay loop logs counters


def note_signal(signum, frame):
    """SIGUSR1's handler only takes note.  One that did the work could be
    interrupted by the next signal and run again inside itself: a storm of
    signals would exhaust the stack.  The loops call log_counters()."""
    SIGNALLED.add(signum)


def log_counters(log, mode, stats):
    """If SIGUSR1 came since the last call: the counters as one JSON line."""
    if SIGNALLED:
        SIGNALLED.clear()
        log(json.dumps(dict([("mode", mode)] + list(stats.items())),
                       separators=(",", ":")), WARN)


def run_loop(sel, timers=None, stop=None, signalled=None, after=None):
    """Dispatch readable sockets to the callables in key.data.

    timers() runs whatever is due and returns the seconds to its next
    deadline; it is called again once that deadline has passed, not at every
    wake-up (so a handler never makes a timer due sooner).  Runs until the
    threading.Event stop is set (checked at each wake-up), or forever
    without one.
    In the main thread a signal also ends a wait: Python runs its handler
    only between bytecodes, so one that lands in another thread, or just
    before the wait begins, would wait with it (up to a keepalive interval)
    but for the byte it writes to a wakeup pipe (signal.set_wakeup_fd).
    Then, and once at the start, signalled() does what the handlers noted.
    after() runs once the ready sockets of a round are handled.
    """
    wake = None
    signalled = signalled or (lambda: None)
    if threading.current_thread() is threading.main_thread():
        wake = os.pipe()
        for fd in wake:
            os.set_blocking(fd, False)
        previous = signal.set_wakeup_fd(wake[1])
        sel.register(wake[0], selectors.EVENT_READ,
                     lambda: os.read(wake[0], 512) and signalled())
    signalled()
    timeout, deadline = None, 0.0
    try:
        while stop is None or not stop.is_set():
            if timers is not None:
                now = time.monotonic()
                if now >= deadline:
                    deadline = now + max(0.0, timers())
                timeout = deadline - now
            for key, _ in sel.select(timeout):
                key.data()
            if after is not None:
                after()
    finally:
        if wake is not None:
            signal.set_wakeup_fd(previous)
            sel.unregister(wake[0])
            for fd in wake:
                os.close(fd)


# ---------------------------------------------------------------- datagram I/O in bursts

# UDP segmentation offload (Linux 4.18 and 5.0): a "train" is datagrams of
# one size (the last may be shorter) to or from one peer, handed to or by
# the kernel in one call.  Older Pythons lack the names.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)   # send a train
UDP_GRO = getattr(socket, "UDP_GRO", 104)           # receive trains
TRAIN_IN = 128            # datagrams in a received train, at most (kernel)
TRAIN_OUT = 64            # datagrams in a sent train, at most (any kernel)
MAX_TRAIN_BYTES = 65507   # payload of a sent train, at most
GRO_ROOM = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
# The local address of a datagram (Linux's numbers; older Pythons lack them).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV4_MAPPED_ANY = bytes(10) + b"\xff\xff" + bytes(4)     # ::ffff:0.0.0.0
HEADROOM = TAG_SIZE * TRAIN_IN    # room to put a tag before each datagram
SLOT = HEADROOM + MAX_DATAGRAM    # what one received datagram or train takes
DATA_AT = HEADROOM - TAG_SIZE     # where a lone datagram's tag goes in a slot
PLAIN_ATS = range(DATA_AT, BURST * SLOT, SLOT)
TRIAL_EVERY = 4096        # datagrams read between trials of UDP_GRO
TRIAL_READS = 64          # reads without a train that end a trial
MAX_REST = 6              # a socket skips 2 ** MAX_REST trials at most
GRO_SIZE = struct.Struct("=i")    # the segment size in a UDP_GRO cmsg
# A control message as the kernel writes it: cmsg_len, cmsg_level,
# cmsg_type, and for UDP_GRO the segment size.
GRO_CMSG = struct.Struct("@Niii")
# UDP_SEGMENT's control message: cmsg_len, cmsg_level, cmsg_type, the
# segment size, padded to CMSG_SPACE(2).
SEGMENT_CMSG = struct.Struct("@NiiH6x")
SEGMENT_CMSG_LEN = socket.CMSG_LEN(2) if hasattr(socket, "CMSG_LEN") else 18


def repeated(one, mode="="):
    """Structs for 0..BURST repetitions of the struct format `one`."""
    return [struct.Struct(mode + one * k) for k in range(BURST + 1)]


class BurstIO:
    """Datagram I/O on one socket, a burst at a time, with recvfrom/sendto.

    receive() reads what is waiting, up to BURST datagrams or trains, and
    returns (ats, lengths, sources), one item per datagram or train: item i
    is lengths[i] bytes at buf[ats[i] + TAG_SIZE:], from sources[i], with
    TAG_SIZE free bytes before it for a tag; a train's segment size is in
    train_sizes[ats[i]] (MmsgIO only).  Sources are opaque, hashable
    address keys; address(key) turns one into a sockaddr tuple, key_of()
    back.  send() queues a range of buf for a destination key (send_train()
    a train) and flush() sends what is queued.
    A client's channels go through here too: forward() reads what one has
    and sends it on tagged (errors are raised), send_on() sends buf's bytes
    on one (queued until flush() in a burst with trains), and
    forget(sock) says the client closes one; end_round() ends a selector
    round.  send_now() sends bytes at once, outside any burst.
    Errors go to report(where, exc) and never stop the caller; a reply
    sent from another address than its peer used, report("sources_refused",
    None) (MmsgIO).
    """

    SEND_FLAGS = 0

    def __init__(self, sock, report, notice=None):
        self.sock = sock
        self.report = report
        self.notice = notice or (lambda text: None)
        self.buf = bytearray(BURST * SLOT)
        self.view = memoryview(self.buf)
        # each slot's room for a lone datagram
        self.slots = [self.view[at + TAG_SIZE:at + TAG_SIZE + MAX_DATAGRAM]
                      for at in PLAIN_ATS]
        self.receive, self.send = self._closures(sock, report)
        self.train_sizes = {}           # never a train here: see MmsgIO

    def _closures(self, own, report):
        """receive() and send() over locals: this is the hot path."""
        view, slots = self.view, self.slots
        recv_into, sendto = own.recvfrom_into, own.sendto
        lengths, sources = [0] * BURST, [None] * BURST

        def receive():
            """Read what is waiting, up to BURST datagrams."""
            k = 0
            for _ in range(BURST):
                try:
                    lengths[k], sources[k] = recv_into(slots[k], MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    report("err1", e)
                    continue
                k += 1
            return PLAIN_ATS, lengths[:k], sources[:k]

        def send(start, length, dest, where):
            """Relay buf[start:start + length] to dest."""
            try:
                sendto(view[start:start + length], dest)
            except OSError as e:        # a full send buffer drops it too
                report(where, e)

        return receive, send

    def send_now(self, data, dest, where, chan=None):
        """Send data at once, outside any burst: to the destination key
        dest, or on the connected socket chan."""
        try:
            if chan is None:
                self.sock.sendto(data, self.SEND_FLAGS, dest)
            else:
                chan.send(data, self.SEND_FLAGS)
        except OSError as e:
            self.report(where, e)

    def forward(self, chan, tag, dest, where):
        """Read one datagram from the channel chan and send it on to dest
        at once, with tag before it: (1, its size).  See MmsgIO."""
        n = chan.recv_into(self.slots[0], MAX_DATAGRAM)
        TAG.pack_into(self.buf, DATA_AT, tag)
        self.send_now(self.view[DATA_AT:DATA_AT + n + TAG_SIZE], dest, where)
        return 1, n

    def send_on(self, sock, start, length, where):
        self.send_now(self.view[start:start + length], None, where, sock)

    def forget(self, sock):
        """The client closes this channel."""

    def local_address(self, src):
        """The local address src sent to, where known: see MmsgIO."""
        return None

    def flush(self):
        pass

    def end_round(self):
        """A selector round ends (run_loop): see MmsgIO."""

    def wait_in_receive(self, seconds):
        """Make receive() wait for the first datagram: False, it cannot."""
        return False

    @staticmethod
    def address(key):
        return key

    def key_of(self, addr):
        """The source key recvfrom gives for a sockaddr tuple."""
        return addr


def _load_mmsg():
    """libc's recvmmsg and sendmmsg through ctypes, or None where not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        # PyDLL keeps the GIL across the call: cheaper, and both calls are
        # made so that they never block (PyPy has only CDLL; the one call
        # that waits goes through CDLL, see MmsgIO).  No argtypes:
        # converting by them costs more than the system call.  Callers pass
        # small ints and c_void_p objects made in advance.
        libc = getattr(ctypes, "PyDLL", ctypes.CDLL)(None, use_errno=True)
        for name in ("recvmmsg", "sendmmsg"):
            getattr(libc, name).restype = ctypes.c_int
    except (ImportError, OSError, AttributeError):
        return None
    return ctypes, libc


def split_train(buf, start, n, size):
    """Spread a train of n bytes at buf[start + HEADROOM:] into its
    datagrams of `size` bytes, each with TAG_SIZE free bytes before it:
    (ats, lengths).  Front to back, each moves down by at most HEADROOM.
    A train of more than TRAIN_IN datagrams (no kernel makes one) would not
    fit: OSError.  The relay's way for a train it cannot take whole."""
    if n > size * TRAIN_IN:
        raise OSError(errno.EMSGSIZE, "a train of more than %d datagrams"
                      % TRAIN_IN)
    first = start + HEADROOM
    ats, lengths = [], []
    for j, offset in enumerate(range(0, n, size)):
        length = min(size, n - offset)
        at = start + j * (size + TAG_SIZE)
        buf[at + TAG_SIZE:at + TAG_SIZE + length] = \
            buf[first + offset:first + offset + length]
        ats.append(at)
        lengths.append(length)
    return ats, lengths


def tag_runs(buf, start, n, size):
    """A train of tagged datagrams (each starts with its tag) of `size`
    bytes at buf[start:start + n], the last at least TAG_SIZE long, cut
    where the tag changes: [(start, length, tag)].  At C speed for a train
    of one tag, the usual one."""
    end = start + n
    his, los = buf[start:end:size], buf[start + 1:end:size]
    if his.count(his[0]) == len(his) and los.count(los[0]) == len(los):
        return [(start, n, his[0] << 8 | los[0])]
    cuts, first, tag = [], start, his[0] << 8 | los[0]
    for j in range(1, len(his)):
        if his[j] << 8 | los[j] != tag:
            cuts.append((first, start + j * size - first, tag))
            first, tag = start + j * size, his[j] << 8 | los[j]
    cuts.append((first, end - first, tag))
    return cuts


def cuttable(n, size):
    """Whether a train of n bytes in tagged datagrams of `size` bytes has a
    whole tag and more in each (tag_runs() and send_train() need it)."""
    return size > TAG_SIZE and (n - 1) % size >= TAG_SIZE - 1


def train_length(n, size):
    """How many datagrams a train of n bytes in `size`-byte ones holds."""
    return -(-n // size)


class MmsgIO(BurstIO):
    """BurstIO on Linux: recvmmsg and sendmmsg through ctypes, and UDP
    trains (GRO in, GSO out) where the kernel has them.

    Sources and destinations are raw sockaddr bytes here: cheaper to make,
    hash and send to.  UDP_GRO is on trial (try_trains).  A train read is
    one item, like a lone datagram but with its segment size in
    self.train_sizes (at -> size): the relay sends it on whole with
    send_train(), which puts a tag before each datagram, or leaves each
    one's tag out, by gather iovecs (nothing is copied).
    send() and send_train() queue; flush() (or the BURST-th message) sends
    what is queued: one datagram with sendto, more with one sendmmsg, in
    which a train is one message with a UDP_SEGMENT control message, as
    floor_gso.c does.  Where the kernel refuses a train, its datagrams go
    one by one, and the socket does so from then on (all trains, or
    trains of that size and more to that destination), and loses none.
    Every call is made with MSG_DONTWAIT, except that after wait_in_receive()
    receive() waits in recvmmsg for the first datagram.  Sockets are
    non-blocking, as udp_socket() makes them, or blocking without a timeout.
    """

    MSG_DONTWAIT = 0x40
    MSG_WAITFORONE = 0x10000
    SEND_FLAGS = MSG_DONTWAIT       # the socket may be blocking: see below
    # struct mmsghdr: name, namelen, iov, iovlen, control, controllen,
    # flags, len
    MMSGHDR = struct.Struct("@PIPNPNi4xI4x")

    def __init__(self, sock, report, ctypes, libc, notice=None,
                 reply_from_local=False, trains_in=True):
        BurstIO.__init__(self, sock, report, notice)
        self.c, self.fd = ctypes, sock.fileno()
        # On a wildcard bind, with reply_from_local: sources are keyed by
        # the local address too, and replies leave from it (LocalReplies).
        self.local = LocalReplies.of(sock) if reply_from_local else None
        # trains in: see try_trains(); never without trains_in
        self.gro = trains_in and enable_gro(sock)
        self.gso = self.gro             # trains out, until the kernel refuses
        self.trains = False             # whether this burst brought trains
        self.train_sizes = {}           # the trains of this burst: at -> size
        # Sockets (this one, channels) reading with UDP_GRO on, on trial,
        # each with how many reads it goes on without a train.
        self.trial = {sock: TRIAL_READS} if self.gro else {}
        # datagrams read until the next trial
        self.until_trial = TRIAL_EVERY if trains_in else float("inf")
        self.trials = 0                 # trials due so far
        self.failures, self.rest = {}, {}   # see end_trial()
        self.addresses = Bounded()      # dest key -> sockaddr tuple
        self.too_big = Bounded()        # dest -> a segment size refused
        # The send queue, one entry per message: dests, wheres; its
        # iovecs (pointer, length pairs, all messages' one after the
        # other); and shapes: message index -> (iovecs, segment size or 0,
        # datagrams) for all but a lone datagram to a peer of this socket.
        self.iovecs, self.dests, self.wheres, self.shapes = [], [], [], {}
        # A socket's peers all have one sockaddr size: sockaddr_in for IPv4,
        # sockaddr_in6 (IPv4-mapped included) for IPv6.
        self.name_size = 28 if sock.family == socket.AF_INET6 else 16
        self.room = (GRO_ROOM if self.gro else 0) \
            + (0 if self.local is None else self.local.space)
        self.base = ctypes.addressof(
            (ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        # Every tag's two bytes, for gather iovecs: tag t at 2 * t.
        self.tag_bytes = (ctypes.c_char * (2 * (MAX_TAG + 1))).from_buffer_copy(
            struct.pack(">%dH" % (MAX_TAG + 1), *range(MAX_TAG + 1)))
        self.tags_at = ctypes.addressof(self.tag_bytes)
        # Channels (connected: no names) read bursts into the free slots
        # (forward()); a selector round counts (end_round()).
        self.read, self.filled, self.round, self.seen = libc.recvmmsg, 0, 0, {}
        chan_msgs, _, _, _, (self.msg_size, _, len_at) = self.arrays_chan = \
            mmsg_array(ctypes, self.base + HEADROOM, SLOT, 0, GRO_ROOM)
        self.chan_bytes = memoryview(chan_msgs).cast("B")
        self.chan_pristine = bytes(self.chan_bytes)
        self.chan_msgs = [ctypes.c_void_p(ctypes.addressof(chan_msgs)
                                          + q * self.msg_size)
                          for q in range(BURST)]
        # One struct call per burst reads all lengths (any struct mmsghdr
        # array: see mmsg_array()).
        self.lengths_of = repeated("%dxI%dx" % (
            len_at, self.msg_size - len_at - 4))
        self.send, self.send_on, self.flush, self.send_one, self.queue = \
            self._sender(libc.sendmmsg)
        self.receive = self._receiver(libc.recvmmsg, self.MSG_DONTWAIT)

    def _receiver(self, read, flags):
        """receive() over one call read(fd, msgs, BURST, flags, None)."""
        c, fd, report, sock, trial = self.c, self.fd, self.report, \
            self.sock, self.trial
        msgs, _, names, controls, (msg_size, controllen_at, _) = \
            self.arrays_in = mmsg_array(c, self.base + HEADROOM, SLOT,
                                        self.name_size, self.room)
        at_msgs = c.c_void_p(c.addressof(msgs))
        # One struct call per burst reads all lengths, one all sources.
        lengths_of = self.lengths_of
        sources_of = repeated("%ds" % self.name_size)
        local, room = self.local, self.room
        if local is not None:
            controllens_of = repeated("%dxN%dx" % (
                controllen_at, msg_size - controllen_at - c.sizeof(c.c_size_t)),
                "@")
            locals_of = repeated("%ds%dx" % (local.space, room - local.space))
            add, replies = bytes.__add__, local.__getitem__
        # The kernel sets each msg_controllen to what it wrote there (0 but
        # for a train): a slice assignment puts back all it read.
        msgs_bytes = memoryview(msgs).cast("B")
        pristine = memoryview(bytes(msgs_bytes))
        self.headers_in = msgs_bytes, pristine      # see gro_on()
        headers = [slice(0, k * msg_size) for k in range(BURST + 1)]
        pristines = [pristine[:k * msg_size] for k in range(BURST + 1)]
        no_trains = bytes(len(controls))    # no control message anywhere
        dests, flush, train_sizes = self.dests, self.flush, self.train_sizes

        def receive():
            if dests:               # the channels' of this round: slots
                flush()
            if train_sizes:
                train_sizes.clear()
            k = read(fd, at_msgs, BURST, flags, None)
            if k < 0:
                err = c.get_errno()
                if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    report("err1", OSError(err, os.strerror(err)))
                return (), (), ()
            lengths = lengths_of[k].unpack_from(msgs_bytes)
            sources = sources_of[k].unpack_from(names)
            if local is not None:   # each message's control: pktinfo first,
                trains = sock in trial and max(controllens_of[k].unpack_from(
                    msgs_bytes)) > local.space  # a train's after UDP_GRO's
                msgs_bytes[headers[k]] = pristines[k]
                sources = list(map(add, sources, map(
                    replies, locals_of[k].unpack_from(controls))))
                if trains:
                    self.trained(sock)
                    return self.mark(lengths, sources, controls, room, local)
            elif sock in trial:                 # UDP_GRO is on
                msgs_bytes[headers[k]] = pristines[k]
                if controls != no_trains:
                    self.trained(sock)
                    return self.mark(lengths, sources, controls, room, local)
            if sock in trial:
                self.untrained(sock)
            else:
                self.until_trial -= k
                if self.until_trial <= 0:
                    self.try_trains(sock)
            return PLAIN_ATS, lengths, sources

        return receive

    def mark(self, lengths, sources, controls, room, local=None, first=0,
             sizes=None):
        """What a read with UDP_GRO on brought into slots first...:
        (ats, lengths, sources), a train one item, and its segment size in
        sizes (train_sizes by default): at -> size.  Each message had
        `room` bytes of controls, UDP_GRO's first, and with local a
        train's pktinfo after (LocalReplies)."""
        sizes = self.train_sizes if sizes is None else sizes
        for i in range(len(lengths)):
            _, level, kind, size = GRO_CMSG.unpack_from(controls,
                                                        (first + i) * room)
            if (level, kind) != (SOL_UDP, UDP_GRO):
                continue
            if local is not None:   # its pktinfo follows: the source anew
                at = (first + i) * room
                sources[i] = sources[i][:self.name_size] + local[bytes(
                    controls[at + GRO_ROOM:at + room])]
            if lengths[i] > size:
                sizes[PLAIN_ATS[first + i]] = size
        controls[first * room:(first + len(lengths)) * room] = \
            bytes(len(lengths) * room)
        return PLAIN_ATS[first:first + len(lengths)], lengths, sources

    def split(self, at, n, size):
        """A train the relay cannot send on whole (ats, lengths): spread
        into its datagrams in its slot (split_train)."""
        try:
            return split_train(self.buf, at - DATA_AT, n, size)
        except OSError as e:
            self.report("err1", e)
            return (), ()

    def _sender(self, sendmmsg):
        """send(), send_on(), flush(), send_one(data, dest, where), which
        sends one datagram on this socket at once, and queue(), which
        queues datagrams by their iovecs (see send_train())."""
        c, fd, report, view, base = self.c, self.fd, self.report, \
            self.view, self.base
        name_size, local = self.name_size, self.local
        # A destination key fills its message's name, and with local its
        # control message too: they lie one after the other (mmsg_array).
        key_size = name_size + (0 if local is None else len(local.tail))
        msgs, iovs, names, _, (msg_size, _, _) = self.arrays_out = \
            mmsg_array(c, 0, 0, name_size,
                       0 if local is None else local.space, inline=True)
        at_out_p = c.c_void_p(c.addressof(msgs))
        iovecs_of = repeated("PN", "@")         # void *base, size_t len
        names_view = memoryview(names)
        names_at = msgs[0].hdr.name     # message j's at j * key_size
        # Messages with trains: their own headers, every queued iovec, and
        # per message a control buffer (the key's, then UDP_SEGMENT's).
        batch = (c.c_char * (BURST * msg_size))()
        at_batch = c.addressof(batch)
        at_batch_p = c.c_void_p(at_batch)
        # void *base and size_t len: words of one size on Linux
        word = c.sizeof(c.c_void_p)
        word_code = "Q" if word == 8 else "I"
        all_iovs = (c.c_char * (2 * word * BURST * 2 * TRAIN_OUT))()
        at_iovs = c.addressof(all_iovs)
        iov_words = memoryview(all_iovs).cast("B").cast(word_code)
        seg_at = 0 if local is None else local.space
        ctl_space = seg_at + SEGMENT_CMSG.size
        name_slot = key_size - seg_at   # a key's control message, after
        controls = (c.c_char * (BURST * ctl_space))()
        at_controls = c.addressof(controls)
        header = self.MMSGHDR
        sendto, sendmsg, dontwait = self.sock.sendto, self.sock.sendmsg, \
            self.MSG_DONTWAIT
        addresses, sockaddr, too_big = self.addresses, self.sockaddr, \
            self.too_big
        iovecs, dests, wheres, shapes, trial = self.iovecs, self.dests, \
            self.wheres, self.shapes, self.trial
        lone = (1, 0, 1)                # the shape of a lone datagram

        def push(pairs, dest, where, shape=None):
            """The one way into the send queue: a full queue (sendmmsg's
            most, BURST messages) leaves first, so it never holds more
            than its arrays.  shape: see queue()."""
            if len(dests) == BURST:
                flush()
            if shape is not None:
                shapes[len(dests)] = shape
            iovecs.extend(pairs)
            dests.append(dest)
            wheres.append(where)

        def send(start, length, dest, where):
            push((base + start, length), dest, where)

        def send_on(chan, start, length, where):
            if self.trains:     # in order with the trains for the channel
                push((base + start, length), chan, where, lone)
                return
            try:
                chan.send(view[start:start + length], dontwait)
            except OSError as e:
                report(where, e)

        def queue(flat, pieces, size, count, dest, where):
            """Queue count datagrams of `size` bytes (the last may be
            shorter) to dest, a key or a channel, each made of `pieces`
            iovecs of the flat list of pointer and length pairs: as trains
            of TRAIN_OUT datagrams and MAX_TRAIN_BYTES at most where the
            kernel takes them, else one by one."""
            if isinstance(dest, socket.socket) and dest not in trial:
                self.gro_on(dest)       # its connectee sends trains
            most = max(1, min(TRAIN_OUT, MAX_TRAIN_BYTES // size)) \
                if self.gso and size < too_big.get(dest, MAX_DATAGRAM) else 1
            for j in range(0, count, most):     # flat may hold more
                n = min(most, count - j)
                push(flat[j * 2 * pieces:(j + n) * 2 * pieces], dest, where,
                     (pieces * n, size if n > 1 else 0, n))

        def flush():
            queued = len(dests)
            if not queued:
                return
            if shapes:
                send_batches(queued)
                shapes.clear()
            elif queued == 1:           # half the cost of a sendmmsg of one
                send_one(view[iovecs[0] - base:iovecs[0] - base + iovecs[1]],
                         dests[0], wheres[0])
            else:
                iovecs_of[queued].pack_into(iovs, 0, *iovecs)
                names_view[:queued * key_size] = b"".join(dests)
                sent = sendmmsg(fd, at_out_p, queued, dontwait, None)
                if sent != queued:
                    send_rest(fd, at_out_p.value, [
                        (i, 2 * i, lone) for i in range(queued)], sent)
            iovecs.clear()
            dests.clear()
            wheres.clear()
            self.filled = 0

        def send_one(data, dest, where):
            try:
                if local is None:
                    sendto(data, dontwait,
                           addresses.get(dest) or sockaddr(dest))
                else:
                    sendmsg([data], local.ancillary(dest), dontwait,
                            sockaddr(dest))
            except OSError as e:
                if from_here(dest, e.errno):
                    from_any(data, dest, where)
                else:
                    report(where, e)

        def from_here(dest, err):
            """Whether a send to dest failed for the local address it
            leaves from (LocalReplies): EINVAL with one named."""
            return err == errno.EINVAL and local is not None \
                and local.address(dest) is not None

        def from_any(data, dest, where):
            """The kernel refuses dest's local address as a source: data
            leaves from its choice, counted (sources_refused), said once."""
            if not local.refused:
                local.refused = True
                self.notice("The kernel refuses to send from %s (no longer "
                            "local, or local by a route alone on an old "
                            "kernel): replies leave from its choice of "
                            "address instead, counted in sources_refused"
                            % local.address(dest))
            report("sources_refused", None)
            send_one(data, self.key_of(sockaddr(dest)), where)

        def send_batches(queued):
            """Send a queue that holds trains or channels' messages: one
            sendmmsg for this socket's, one per channel for theirs."""
            iov_words[:len(iovecs)] = array.array(word_code, iovecs)
            mine, channels, at = [], {}, 0
            for i in range(queued):
                shape = shapes.get(i, lone)
                dest = dests[i]
                if isinstance(dest, socket.socket):
                    channels.setdefault(dest, []).append((i, at, shape))
                else:
                    mine.append((i, at, shape))
                at += 2 * shape[0]
            send_batch(fd, mine)
            for chan, messages in channels.items():
                send_batch(chan.fileno(), messages)

        def send_batch(to, messages):
            """One sendmmsg on fd `to` of messages (queue index, index of
            its first iovec value, shape); names only for this socket's."""
            for j, (i, at, (pieces, size, _)) in enumerate(messages):
                name = namelen = control = controllen = 0
                if to == fd:
                    dest = dests[i]
                    names_view[j * key_size:(j + 1) * key_size] = dest
                    name, namelen = names_at + j * key_size, name_size
                    if local is not None:
                        control, controllen = name + key_size - local.space, \
                            local.space
                if size:                # a train: its UDP_SEGMENT after
                    where = first = j * ctl_space
                    if controllen:      # the key's pktinfo before it
                        controls[where:where + seg_at] = dest[name_slot:]
                    else:
                        first += seg_at
                    SEGMENT_CMSG.pack_into(controls, where + seg_at,
                                           SEGMENT_CMSG_LEN, SOL_UDP,
                                           UDP_SEGMENT, size)
                    control, controllen = at_controls + first, \
                        where + ctl_space - first
                header.pack_into(batch, j * msg_size, name, namelen,
                                 at_iovs + word * at, pieces, control,
                                 controllen, 0, 0)
            count = len(messages)
            sent = sendmmsg(to, at_batch_p, count, dontwait, None)
            if sent != count:
                send_rest(to, at_batch, messages, sent)

        def send_rest(to, at_msgs, messages, sent):
            """After a sendmmsg of messages (queue index, index of its
            first iovec value, shape) at at_msgs that sent less than all:
            what the kernel refuses is reported, or for a train sent one by
            one; a full buffer loses the rest, reported."""
            done, count = 0, len(messages)
            while True:
                if sent > 0:
                    done += sent
                else:
                    err = c.get_errno()
                    error = OSError(err, os.strerror(err))
                    i, at, (pieces, size, datagrams) = messages[done]
                    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                        for i, _, shape in messages[done:]:     # all lost
                            for _ in range(shape[2]):
                                report(wheres[i], error)
                        return
                    if from_here(dests[i], err) \
                            or size and refused(dests[i], size, error):
                        one_by_one(i, at, pieces, size)
                    else:
                        for _ in range(datagrams):
                            report(wheres[i], error)
                    done += 1
                if done >= count:
                    return
                sent = sendmmsg(to, c.c_void_p(at_msgs + done * msg_size),
                                count - done, dontwait, None)

        def one_by_one(i, at, pieces, size):
            """The datagrams of a train (size 0: of a lone datagram) the
            kernel refused, one by one."""
            data = b"".join(map(c.string_at, iovecs[at:at + 2 * pieces:2],
                                iovecs[at + 1:at + 2 * pieces:2]))
            dest = dests[i]
            for start in range(0, len(data), size) if size else (0,):
                part = data[start:start + size] if size else data
                if isinstance(dest, socket.socket):
                    try:
                        dest.send(part, dontwait)
                    except OSError as e:
                        report(wheres[i], e)
                else:
                    send_one(part, dest, wheres[i])

        def refused(dest, size, error):
            """A train refused: whether its datagrams should go singly."""
            if error.errno == errno.EMSGSIZE:
                too_big[dest] = size
                return True
            if error.errno in (errno.EIO, errno.EINVAL):
                if self.gso:
                    self.gso = False
                    self.notice("The kernel refuses UDP trains (%s): sending "
                                "datagrams one by one from now on" % error)
                return True
            return False

        return send, send_on, flush, send_one, queue

    def send_now(self, data, dest, where, chan=None):
        if chan is None:
            self.send_one(data, dest, where)
        else:
            BurstIO.send_now(self, data, None, where, chan)

    def ancillary(self, dest):
        """The control messages a datagram to dest carries (sendmsg's)."""
        return [] if self.local is None else self.local.ancillary(dest)

    def local_address(self, src):
        """The local address src sent to: its IP text where the socket
        knows it (a wildcard bind), else None."""
        return None if self.local is None else self.local.address(src)

    def sockaddr(self, dest):
        """The sockaddr tuple of a destination key, remembered."""
        addr = self.addresses.get(dest)
        if addr is None:
            addr = self.addresses[dest] = self.address(dest)
        return addr

    def wait_in_receive(self, seconds):
        sock, c = self.sock, self.c
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("@ll", int(seconds),
                                        int(seconds % 1 * 1000000)))
        except (OSError, AttributeError):
            return False
        # The waiting call lets go of the GIL; sends never block.
        read = c.CDLL(None, use_errno=True).recvmmsg
        read.restype = c.c_int
        self.receive = self._receiver(read, self.MSG_WAITFORONE)
        sock.setblocking(True)
        return True

    def send_train(self, start, n, size, dest, where, tag=None):
        """Queue the train of `size`-byte datagrams at buf[start:start + n]
        (the last may be shorter) for dest, a key or a channel: each with
        tag put before it, or with tag None each without its first
        TAG_SIZE bytes, its tag (a run of one tagged datagram, cut from a
        train, goes as a lone one)."""
        count = train_length(n, size)
        if count == 1 and tag is None:  # a run of one: a lone datagram
            if isinstance(dest, socket.socket):
                self.send_on(dest, start + TAG_SIZE, n - TAG_SIZE, where)
            else:
                self.send(start + TAG_SIZE, n - TAG_SIZE, dest, where)
            return
        last = n - (count - 1) * size           # the last datagram's size
        first = self.base + start
        if tag is not None:
            flat = [self.tags_at + 2 * tag, TAG_SIZE, 0, size] * count
            flat[2::4] = range(first, first + count * size, size)
            flat[-1] = last
            self.queue(flat, 2, size + TAG_SIZE, count, dest, where)
            return
        flat = [0, size - TAG_SIZE] * count
        flat[0::2] = range(first + TAG_SIZE, first + TAG_SIZE + count * size,
                           size)
        flat[-1] = last - TAG_SIZE
        if last == TAG_SIZE:    # an empty datagram is no segment: alone
            self.queue(flat, 1, size - TAG_SIZE, count - 1, dest, where)
            self.queue(flat[-2:], 1, 1, 1, dest, where)
        else:
            self.queue(flat, 1, size - TAG_SIZE, count, dest, where)

    def send_tagged(self, q, lengths, tag, dest, where):
        """Queue the datagrams read into slots q... for dest, each with tag
        put before it: as trains where their sizes allow."""
        k, size, at = len(lengths), lengths[0], PLAIN_ATS[q]
        end = at + k * SLOT
        buf = self.buf          # the tags in place, a byte at a time
        buf[at:end:SLOT] = bytes((tag >> 8,)) * k
        buf[at + 1:end:SLOT] = bytes((tag & 0xFF,)) * k
        if k > 1 and lengths[:-1].count(size) == k - 1 \
                and 0 < lengths[-1] <= size:
            flat = [0, 0] * k
            flat[0::2] = range(self.base + at, self.base + end, SLOT)
            flat[1::2] = map(TAG_SIZE.__add__, lengths)
            self.queue(flat, 1, size + TAG_SIZE, k, dest, where)
            return
        for at, n in zip(PLAIN_ATS[q:q + k], lengths):
            self.send(at, n + TAG_SIZE, dest, where)

    def forward(self, chan, tag, dest, where):
        """Read what a channel has and send it on to dest (a key), each
        datagram with tag before it: (datagrams, bytes) read.

        A lone datagram goes at once.  A channel readable in two selector
        rounds in a row is busy: one recvmmsg reads what waits, up to the
        slots free, and it leaves as trains where it can, at the end of the
        round (end_round()) with what other channels brought.  A channel on
        trial reads with UDP_GRO, and a train leaves as a train."""
        q = self.filled
        if q == BURST:
            self.flush()
            q = 0
        busy = self.seen.get(chan) == self.round - 1
        self.seen[chan] = self.round
        trial = chan in self.trial
        if not trial:
            self.until_trial -= 1
            if self.until_trial <= 0:
                trial = self.try_trains(chan)
        at = PLAIN_ATS[q]
        if not busy and not trial:
            n = chan.recv_into(self.slots[q], MAX_DATAGRAM)
        elif not busy:
            n, ancillary, _, _ = chan.recvmsg_into([self.slots[q]], GRO_ROOM)
            for level, kind, data in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    size = GRO_SIZE.unpack_from(data)[0]
                    if n > size:
                        self.trained(chan)
                        self.send_train(at + TAG_SIZE, n, size, dest, where,
                                        tag)
                        self.filled = q + 1     # after: a flush frees all
                        return train_length(n, size), n
            self.untrained(chan)
        else:
            k = self.read(chan.fileno(), self.chan_msgs[q], BURST - q,
                          self.MSG_DONTWAIT, None)
            if k < 0:
                err = self.c.get_errno()
                raise OSError(err, os.strerror(err))
            lengths = self.lengths_of[k].unpack_from(self.chan_bytes,
                                                     q * self.msg_size)
            # The kernel set each msg_controllen to what it wrote: put back.
            headers = slice(q * self.msg_size, (q + k) * self.msg_size)
            self.chan_bytes[headers] = self.chan_pristine[headers]
            controls = self.arrays_chan[3]
            if trial and any(controls[q * GRO_ROOM:(q + k) * GRO_ROOM]):
                self.trained(chan)
                sizes, count = {}, 0
                for at, n in zip(*self.mark(lengths, (), controls, GRO_ROOM,
                                            first=q, sizes=sizes)[:2]):
                    if at in sizes:
                        self.send_train(at + TAG_SIZE, n, sizes[at], dest,
                                        where, tag)
                        count += train_length(n, sizes[at])
                    else:
                        self.send_tagged(at // SLOT, [n], tag, dest, where)
                        count += 1
                self.filled = q + k     # after the sends: a flush frees all
                return count, sum(lengths)
            if trial:
                self.untrained(chan)
            if k > 1:
                self.send_tagged(q, lengths, tag, dest, where)
                self.filled = q + k     # after: a flush on the way frees all
                return k, sum(lengths)
            self.seen[chan] = -2        # not busy after all: recv next time
            n = lengths[0]
        TAG.pack_into(self.buf, at, tag)    # one datagram: it goes at once
        self.send_one(self.view[at:at + n + TAG_SIZE], dest, where)
        return 1, n

    def end_round(self):
        """A selector round ends: what the channels brought leaves."""
        self.round += 1
        if self.dests:
            self.flush()

    def try_trains(self, sock):
        """At every TRIAL_EVERY-th datagram read: UDP_GRO on trial for the
        socket that read it (the busiest sockets are the likeliest), unless
        it rests from trials that brought no train (end_trial).  Whether
        it is on now.

        Reading with UDP_GRO costs: a channel half a microsecond more per
        read (recvmsg_into against recv_into), this socket a tenth of one
        per burst (the headers put back, the control buffers compared).  So
        it is on at start and then on trial, as here and for a channel when
        trains come for it from the server; each train starts a trial anew.
        """
        self.until_trial = TRIAL_EVERY
        self.trials += 1
        return self.trials >= self.rest.get(sock, 0) and self.gro_on(sock)

    def gro_on(self, sock):
        """UDP_GRO on for sock, on trial: whether the kernel agreed."""
        if sock is self.sock:           # the kernel zeroed what it read:
            msgs_bytes, pristine = self.headers_in      # room for a train
            msgs_bytes[:] = pristine
        if enable_gro(sock):
            self.trial[sock] = TRIAL_READS
            return True
        return False

    def end_trial(self, sock):
        """TRIAL_READS reads without a train: a channel rests for twice as
        many trials as after the last such (up to 2 ** MAX_REST), and
        UDP_GRO goes off, unless something is queued (it may be a train,
        readable only with UDP_GRO on: then the trial goes on)."""
        if sock is not self.sock:       # its trials cost little: no rest
            failures = self.failures[sock] = self.failures.get(sock, 0) + 1
            self.rest[sock] = self.trials + 2 ** min(failures, MAX_REST)
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            sock.recv(1, socket.MSG_PEEK | self.MSG_DONTWAIT)
        except BlockingIOError:         # nothing queued: what comes is cut
            del self.trial[sock]        # into datagrams by the kernel
            return
        except OSError:
            pass
        self.gro_on(sock)

    def trained(self, sock):
        """A read with UDP_GRO on brought a train: a trial starts anew,
        with no rest."""
        if sock is self.sock:
            self.trains = True
        self.trial[sock] = TRIAL_READS
        self.failures.pop(sock, None)

    def untrained(self, sock):
        """A read with UDP_GRO on brought no train: one more towards the
        trial's end."""
        if sock is self.sock:
            self.trains = False
        self.trial[sock] -= 1
        if not self.trial[sock]:
            self.end_trial(sock)

    def forget(self, chan):
        """The client closes chan: what is queued for it leaves first."""
        if chan in self.dests:
            self.flush()
        for table in (self.trial, self.failures, self.rest, self.too_big,
                      self.seen):
            table.pop(chan, None)

    def key_of(self, addr):
        """sockaddr tuple -> the key receive() gives: the sockaddr bytes
        (Linux layout), and with local the control message of a reply
        from whichever address the kernel chooses."""
        host, port = addr[0].split("%")[0], struct.pack(">H", addr[1])
        if len(addr) == 2:
            key = struct.pack("=H", socket.AF_INET) + port \
                + socket.inet_pton(socket.AF_INET, host) + bytes(8)
        else:
            key = struct.pack("=H", socket.AF_INET6) + port \
                + struct.pack(">I", addr[2]) \
                + socket.inet_pton(socket.AF_INET6, host) \
                + struct.pack("=I", addr[3])
        return key if self.local is None else key + self.local.any_for(host)

    @staticmethod
    def address(raw):
        """sockaddr bytes (Linux layout) -> the tuple recvfrom() would give."""
        family = struct.unpack_from("=H", raw)[0]
        port = raw[2] << 8 | raw[3]
        if family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        flowinfo = struct.unpack_from(">I", raw, 4)[0]
        scope = struct.unpack_from("=I", raw, 24)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope


class LocalReplies(Bounded):
    """Replies from the address each datagram came to, on a socket bound to
    a wildcard address: on a host with several addresses a peer hears from
    the one it sent to, not from whichever the route prefers.

    IP_PKTINFO (IPV6_RECVPKTINFO) puts each datagram's local address in a
    control message.  A source key is then the sockaddr followed by the
    control message a reply carries (that address alone, no interface: the
    route still picks the way out), so that the relay's tables key peers by
    both, and sendmmsg takes name and control message from one slot.  This
    cache maps a control message received to that key tail: one lookup per
    datagram, at C speed (map over __getitem__); tail is its shape.

    An IPv6 address made local by a route alone (`ip -6 route add local
    2001:db8:1::/64 dev lo`) is a source the kernel takes in IPV6_PKTINFO
    only from a socket that may use non-local addresses: IP_FREEBIND, which
    Linux applies to IPv6 sockets too (IPV6_FREEBIND, Linux 4.15, sets the
    same flag).  IPv4 needs none.  A source the kernel refuses even so (old
    kernels checked it whatever the flag) leaves from the kernel's choice.
    """

    HEADER = socket.CMSG_LEN(0) if hasattr(socket, "CMSG_LEN") else 16
    WILDCARDS = ("0.0.0.0", "::")       # the hosts a wildcard bind gives

    def __init__(self, family):
        Bounded.__init__(self)
        self.v6 = family == socket.AF_INET6
        if self.v6:
            self.level, self.kind, self.size = \
                socket.IPPROTO_IPV6, IPV6_PKTINFO, 20    # in6_pktinfo
            self.pad = bytes(4)     # after the 28-byte sockaddr_in6
        else:
            self.level, self.kind, self.size = \
                socket.IPPROTO_IP, IP_PKTINFO, 12        # in_pktinfo
            self.pad = b""
        self.space = socket.CMSG_SPACE(self.size)
        self.data_at = (28 if self.v6 else 16) + len(self.pad) + self.HEADER
        self.tail = self.reply(bytes(self.size))
        self.refused = False        # a source refused yet (MmsgIO, said once)

    @staticmethod
    def enable(sock):
        """Ask the kernel for each datagram's local address: whether it
        agreed.  (Datagrams queued before come without: udp_socket(local=
        True) asks before the bind.)"""
        if not hasattr(socket, "CMSG_SPACE"):
            return False
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                try:        # replies from addresses local by a route
                    sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                except OSError:
                    pass    # the kernel's choice then (MmsgIO's from_any)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        except OSError:
            return False
        return True

    @classmethod
    def of(cls, sock):
        """LocalReplies for sock if it is bound to a wildcard address and
        the kernel reports local addresses, else None."""
        if sock.getsockname()[0] not in cls.WILDCARDS \
                or not cls.enable(sock):
            return None
        return cls(sock.family)

    def reply(self, data):
        """The key tail of a reply whose pktinfo struct is data."""
        return self.pad + struct.pack("@Nii", self.HEADER + self.size,
                                      self.level, self.kind) \
            + data + bytes(self.space - self.HEADER - self.size)

    def __missing__(self, raw):
        data = raw[self.HEADER:self.HEADER + self.size]
        if self.v6:                             # the address, no interface
            data = data[:16] + bytes(4)
        else:                                   # ipi_spec_dst alone
            data = bytes(4) + data[4:8] + bytes(4)
        tail = self[raw] = self.reply(data)
        return tail

    def any_for(self, host):
        """The key tail for a peer known by name, not by a datagram: the
        kernel chooses the address (for an IPv4-mapped peer that choice is
        ::ffff:0.0.0.0, the kernel wants an IPv4 address there)."""
        if self.v6 and host.startswith("::ffff:"):
            return self.reply(IPV4_MAPPED_ANY + bytes(4))
        return self.tail

    def address(self, key):
        """The local address a key's tail names, or None (the kernel's
        choice)."""
        data = key[self.data_at:self.data_at + self.size]
        ip = data[:16] if self.v6 else data[4:8]
        if not any(ip) or ip == IPV4_MAPPED_ANY:
            return None
        return socket.inet_ntop(socket.AF_INET6 if self.v6
                                else socket.AF_INET, ip)

    def ancillary(self, key):
        """sendmsg's control messages for a datagram to key."""
        return [(self.level, self.kind,
                 key[self.data_at:self.data_at + self.size])]


def mmsg_array(c, first, stride, name_size, room, inline=False):
    """ctypes arrays of BURST struct mmsghdr for recvmmsg or sendmmsg:
    message i has one iovec (MAX_DATAGRAM bytes at first + i * stride;
    sendmmsg's callers set their own), name_size bytes of sockaddr room and
    `room` bytes of control buffer: in controls, or with inline right after
    its name (at 8-byte alignment) in names.  Returns (msgs, iovs, names,
    controls, (sizeof mmsghdr, offset of controllen, of len))."""

    class IOVec(c.Structure):
        _fields_ = [("base", c.c_void_p), ("len", c.c_size_t)]

    class MsgHdr(c.Structure):
        _fields_ = [("name", c.c_void_p), ("namelen", c.c_uint32),
                    ("iov", c.c_void_p), ("iovlen", c.c_size_t),
                    ("control", c.c_void_p), ("controllen", c.c_size_t),
                    ("flags", c.c_int)]

    class MMsgHdr(c.Structure):
        _fields_ = [("hdr", MsgHdr), ("len", c.c_uint)]

    def address_of(data):
        return c.addressof((c.c_char * len(data)).from_buffer(data))

    name_slot = (name_size + 7) // 8 * 8 if inline and room else name_size
    names = bytearray(BURST * (name_slot + room if inline else name_size))
    controls = bytearray(0 if inline else BURST * room)
    iovs, msgs = (IOVec * BURST)(), (MMsgHdr * BURST)()
    for i in range(BURST):
        iovs[i].base, iovs[i].len = first + i * stride, MAX_DATAGRAM
        hdr = msgs[i].hdr
        if inline:
            hdr.name = address_of(names) + i * (name_slot + room)
            hdr.control = hdr.name + name_slot
        else:
            hdr.name = address_of(names) + i * name_size
            hdr.control = address_of(controls) + i * room
        hdr.namelen = name_size
        hdr.iov, hdr.iovlen = c.addressof(iovs[i]), 1
        if room:
            hdr.controllen = room
        else:
            hdr.control = None
    return msgs, iovs, names, controls, (
        c.sizeof(MMsgHdr), MsgHdr.controllen.offset, MMsgHdr.len.offset)


def enable_gro(sock):
    """Ask for trains on sock (UDP_GRO): whether the kernel agreed."""
    if not GRO_ROOM or not hasattr(sock, "recvmsg_into"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def send_gso(sock, parts, size, addr=None, ancillary=()):
    """Send parts as one train of `size`-byte datagrams (to addr, with the
    control messages ancillary): None, or the OSError (BlockingIOError: a
    full socket buffer lost the train)."""
    segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
    segment.extend(ancillary)
    try:
        if addr is None:
            sock.sendmsg(parts, segment, MmsgIO.MSG_DONTWAIT)
        else:
            sock.sendmsg(parts, segment, MmsgIO.MSG_DONTWAIT, addr)
    except OSError as e:
        return e
    return None


def burst_io(sock, report, portable=False, notice=None,
             reply_from_local=False, trains_in=True):
    """MmsgIO where the platform has it (unless portable), else BurstIO.
    reply_from_local, trains_in: see MmsgIO and LocalReplies."""
    mmsg = None if portable else _load_mmsg()
    if mmsg is None:
        return BurstIO(sock, report, notice)
    return MmsgIO(sock, report, *mmsg, notice=notice,
                  reply_from_local=reply_from_local, trains_in=trains_in)


# ---------------------------------------------------------------- the server

SERVER_ERRORS = {"err1": "receive", "err2": "reply",
                 "err3": "send to a connectee", "err4": "tag and send to the client"}


def run_server(sock, max_clients, log, key=None, stats=None, portable=False,
               allow=(), client_from=(), notify=None, proxy_protocol=False):
    """Relay between connectees and the client on one socket, forever.

    key: the HMAC key in password mode, None in plain mode.
    stats: the counters (server_stats()), updated in place.
    portable: plain recvfrom/sendto even where recvmmsg and trains exist.
    allow, client_from: networks connectees and the client must come from
        (empty: anywhere).
    notify: systemd's Notify, if any.
    proxy_protocol: a PROXY v2 header between tag and payload of each
        connectee's datagram.  Each is read alone (no UDP_GRO), with room
        before it for tag and header.  A client that asks is told so.
    """
    if stats is None:
        stats = server_stats()
    if notify is None:
        notify = Notify({})

    def report(counter, exc):
        stats[counter] += 1
        if exc is not None:         # else a count alone: sources_refused
            log_socket_error(log, SERVER_ERRORS[counter], exc)

    io = burst_io(sock, report, portable, lambda text: log(text, WARN),
                  reply_from_local=True, trains_in=not proxy_protocol)
    # With proxy_protocol: tag -> the tag and header its datagrams carry.
    prefixes = {} if proxy_protocol else None
    here = sock.getsockname()
    connectees = Connectees(max_clients,
                            reserved=(TOKEN_LOOKALIKE_TAG,) if key else ())
    client = None                 # the client's address key, once known
    secret = os.urandom(32)       # keys the address hash of the Retry nonces
    registered = sign(key, REGISTERED_CLAIMS) if key else None
    stats_budget = Budget(STATS_REPLIES_PER_SECOND, 1.0)
    retry_budget = Budget(RETRIES_PER_SECOND, 1.0, RETRIES_PER_ADDRESS)
    buf, view, address = io.buf, io.view, io.address

    def address_hash(src):
        digest = hashlib.blake2b(format_addr(address(src)).encode(),
                                 digest_size=8, key=secret).digest()
        return int.from_bytes(digest, "big")

    def on_signed(token, src):
        """A datagram that looks signed: True if it was handled (not data).

        One that does not verify gets no reply.  A message of ours under
        another key (a client with the wrong password) is dropped; anything
        else is ordinary data.
        """
        nonlocal client
        stats["signed_looking"] += 1
        claims = verify(key, token)
        if claims is None:
            stats["invalid_auths"] += 1
            token = bytes(token)
            if not ours(token):
                return False
            who = "A stats request (-S)" if token.startswith(
                STATS_REQUEST_SIGNED) else "A client"
            log.limited("auth failed", lambda: "%s from %s failed to "
                        "authenticate (another password?)"
                        % (who, format_addr(address(src))), WARN)
            return True
        is_request, nonce = request_nonce(claims)
        if not is_request:
            return True                 # one of ours, but not for a server
        if nonce == STATS_NONCE:
            stats["stats_requests"] += 1
            if stats_budget.take():
                io.send_now(pack_stats(stats), src, "err2")
            else:
                stats["stats_refused"] += 1
                log.limited("stats budget", lambda: "Refused a stats request "
                            "from %s: over %d a second" % (format_addr(
                                address(src)), STATS_REPLIES_PER_SECOND), WARN)
            return True
        now = int(time.time())
        if src == client:
            stats["refresh_address"] += 1
        elif client_from and not in_networks(client_from, address(src)):
            stats["client_not_allowed"] += 1
            log.limited("client-from", lambda: "Ignored a keepalive from %s: "
                        "not in --client-from" % format_addr(address(src)),
                        DEBUG)
            return True
        else:
            stats["auth_in_progress"] += 1
            earliest, latest = now + AUTH_WINDOW[0], now + AUTH_WINDOW[1]
            if nonce is None or not (
                    earliest <= nonce ^ address_hash(src) <= latest):
                if not retry_budget.take(src):
                    stats["retries_refused"] += 1
                    log.limited("retry budget", lambda: "Sent no Retry to "
                                "%s: over %d a second, or %d for one address"
                                % (format_addr(address(src)),
                                   RETRIES_PER_SECOND, RETRIES_PER_ADDRESS),
                                WARN)
                    return True
                log.limited("auth", "Authenticating: %s"
                            % format_addr(address(src)))
                io.send_now(sign(key, retry_claims(now ^ address_hash(src))),
                            src, "err2")
                return True
            stats["auth_completeds"] += 1
            client = src
            log("New client address: %s" % format_addr(address(src)))
        stats["last_ka_s"] = now
        # A client with --proxy-protocol asks whether the headers are
        # added, with a challenge: only it ever hears this answer.
        challenge = proxy_protocol and claims.get("proxy")
        io.send_now(sign(key, proxy_claims(challenge)) if _u64(challenge)
                    else registered, src, "err2")
        return True

    def new_connectee(src):
        """Give src a tag, making room if the table is full: the tag."""
        tag, evicted = connectees.add(src)
        stats["new_connectees"] += 1
        if prefixes is not None:
            prefixes[tag] = TAG.pack(tag) + proxy_header(
                address(src), (io.local_address(src) or here[0],) + here[1:])
        log.limited("connectee", lambda: "Connectee seqn %d from %s"
                    % (tag, format_addr(address(src))))
        if evicted is not None:
            old, answered = evicted
            kind = "answered" if answered else "unanswered"
            stats["evicted_" + kind] += 1
            log.limited("evict", lambda: "Forgot connectee %s, the least "
                        "recently used %s one" % (format_addr(address(old)),
                                                  kind), DEBUG)
        return tag

    send, flush, put_tag = io.send, io.flush, TAG.pack_into
    # Per datagram, the C methods of the table's dicts, bound once: no
    # Python call between.  A connectee is answered once the client sent
    # for its tag.
    table, tag_of = connectees.table, connectees.tag_of.get
    answered = table.answered
    address_of, touch = answered.get, answered.move_to_end
    touch_unanswered = table.unanswered.move_to_end

    def connectee_of(tag, datagrams=1):
        """Where the client's datagrams for tag go: its connectee,
        touched, or on its first reply answered; None for a tag nobody
        has (all of them dropped).  (relay() has the first case inline.)"""
        dest = address_of(tag)
        if dest is not None:
            touch(tag)
            return dest
        dest = table.answer(tag)
        if dest is None:
            stats["ch_not_founds"] += datagrams
            log.limited("channel", "Failed to find channel %d" % tag, WARN)
        return dest

    def relay(ats, lengths, sources, trains):
        """Relay what a burst brought (trains: at -> segment size, see
        BurstIO): (datagrams in, bytes in, datagrams out, bytes out)."""
        nonlocal client
        msgs_in = bytes_in = msgs_out = bytes_out = 0
        for at, n, src in zip(ats, lengths, sources):
            if trains and at in trains:
                counts = relay_train(at, n, src, trains[at])
                msgs_in += counts[0]
                bytes_in += counts[1]
                msgs_out += counts[2]
                bytes_out += counts[3]
                continue
            if key is not None:
                if buf.startswith(TOKEN_PREFIX, at + 2, at + 2 + n) \
                        and on_signed(view[at + 2:at + 2 + n], src):
                    continue
            elif n == 0:                                # a plain keepalive
                if client_from and src != client \
                        and not in_networks(client_from, address(src)):
                    stats["client_not_allowed"] += 1
                    log.limited("client-from", lambda: "Ignored a keepalive "
                                "from %s: not in --client-from"
                                % format_addr(address(src)), DEBUG)
                    continue
                stats["simple_keepalives"] += 1
                stats["last_ka_s"] = int(time.time())
                if src != client:
                    stats["simple_address_switches"] += 1
                    client = src        # anyone can send an empty datagram:
                    log.limited("client address", lambda: "New client "
                                "address: %s" % format_addr(address(src)))
                continue

            if src == client:                           # client -> connectee
                if n < TAG_SIZE:
                    stats["dwarfs"] += 1
                    log.limited("dwarf", "Too short datagram from client",
                                WARN)
                    continue
                tag = buf[at + 2] << 8 | buf[at + 3]
                dest = address_of(tag)
                if dest is not None:
                    touch(tag)
                else:
                    dest = connectee_of(tag)    # its first reply, or none
                    if dest is None:
                        continue
                msgs_out += 1
                bytes_out += n
                send(at + 4, n - 2, dest, "err3")
                continue

            if client is None:                          # connectee, no client
                stats["dropped_no_client_address"] += 1
                log.limited("no client", lambda: "Dropped a datagram from %s: "
                            "no client address yet"
                            % format_addr(address(src)), DEBUG)
                continue
            tag = tag_of(src)                           # connectee -> client
            if tag is None:
                if allow and not in_networks(allow, address(src)):
                    stats["not_allowed"] += 1
                    log.limited("allow", lambda: "Dropped a datagram from %s: "
                                "not in --allow" % format_addr(address(src)),
                                DEBUG)
                    continue
                tag = new_connectee(src)
            elif tag in answered:
                touch(tag)
            else:
                touch_unanswered(tag)
            msgs_in += 1
            bytes_in += n
            if prefixes is None:
                put_tag(buf, at, tag)
                send(at, n + 2, client, "err4")
            else:               # a lone datagram: room enough before it
                prefix = prefixes[tag]
                start = at + TAG_SIZE - len(prefix)
                buf[start:at + TAG_SIZE] = prefix
                send(start, n + len(prefix), client, "err4")
        return msgs_in, bytes_in, msgs_out, bytes_out

    def relay_train(at, n, src, size):
        """Relay a train whole where it is plain data: from the client cut
        where its tags change, each run to its connectee without its tags;
        from a known connectee to the client, its tag before each datagram.
        What else a train may hold (a token, a dwarf, a newcomer's first
        datagrams) goes through relay() datagram by datagram."""
        start = at + TAG_SIZE
        tag = tag_of(src)
        if (src == client and not cuttable(n, size)) \
                or (src != client and (tag is None or client is None)) \
                or (key is not None
                    and TOKEN_PREFIX[0] in buf[start:start + n:size]):
            return relay(*io.split(at, n, size), [src] * train_length(n, size),
                         None)
        if src != client:                               # connectee -> client
            if tag in answered:
                touch(tag)
            else:
                touch_unanswered(tag)
            io.send_train(start, n, size, client, "err4", tag)
            return train_length(n, size), n, 0, 0
        msgs_out = bytes_out = 0                        # client -> connectees
        for first, length, tag in tag_runs(buf, start, n, size):
            dest = connectee_of(tag, train_length(length, size))
            if dest is None:
                continue
            msgs_out += train_length(length, size)
            bytes_out += length
            io.send_train(first, length, size, dest, "err3")
        return 0, 0, msgs_out, bytes_out

    def relay_burst():
        """Receive and relay one burst: how many datagrams came in."""
        ats, lengths, sources = io.receive()
        msgs_in, bytes_in, msgs_out, bytes_out = relay(ats, lengths, sources,
                                                       io.train_sizes)
        flush()

        if msgs_in or msgs_out:
            now = int(time.time())
            if msgs_out:
                stats["from_client_msgs"] += msgs_out
                stats["from_client_bytes"] += bytes_out
                stats["last_client_s"] = now
            if msgs_in:
                if prefixes is not None:
                    stats["proxy_headers"] += msgs_in
                stats["from_connectee_msgs"] += msgs_in
                stats["from_connectee_bytes"] += bytes_in
                stats["last_connectee_s"] = now
        return len(lengths)

    def status():
        return "client %s, %s, %s relayed" % (
            "unknown" if client is None else format_addr(address(client)),
            plural(len(connectees), "connectee"), plural(
                stats["from_connectee_msgs"] + stats["from_client_msgs"],
                "datagram"))

    def counters():
        log_counters(log, "server", stats)

    notify.ready(status())
    counters()
    wait = min(WAIT_AT_MOST, notify.period)
    if io.wait_in_receive(wait):
        # This socket is the server's only one: wait in recvmmsg itself and
        # save a selector round trip per burst.  A signal interrupts the
        # wait; one that lands just before it is handled within `wait`.
        timed = notify.sock is not None     # else `due` never comes
        while True:
            relay_burst()
            if SIGNALLED:
                counters()
            if timed and time.monotonic() >= notify.due:
                notify.tick(status())

    def on_readable():
        # Go on while datagrams keep coming: cheaper than a trip through
        # the selector, and this socket is the server's only one.
        for _ in range(BURSTS_PER_WAKEUP):
            if relay_burst() < BURST:
                break

    def timers():
        now = time.monotonic()
        if now >= notify.due:
            notify.tick(status())
        return min(notify.due - now, wait)

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, on_readable)
    run_loop(sel, timers, signalled=counters)


# ---------------------------------------------------------------- the client

def server_text(server, name):
    """How logs and STATUS= name the client's server."""
    return "%s (not resolved yet)" % name if server is None \
        else format_addr(server)


def run_client(sock, server, real_family, real_server, max_clients,
               interval, log, key=None, portable=False, stats=None,
               server_name=None, resolve_every=DEFAULT_RESOLVE_INTERVAL,
               resolver=None, stop=None, notify=None, proxy_protocol=False):
    """Keep the NAT open towards `server` and relay for `real_server`.

    key: the HMAC key in password mode, None in plain mode.
    portable: plain recvfrom/sendto even where recvmmsg and trains exist.
    stats: the counters (client_stats()), updated in place.
    server_name: the -a text when it is a host name: looked up again every
        resolve_every seconds (and when the server stops answering) by
        resolver(text) -> (family, sockaddr) in a helper thread.
    stop: a threading.Event that ends the loop (runs forever without).
    notify: systemd's Notify, if any.

    proxy_protocol: each datagram from the server must start (after its
        tag) with a PROXY v2 header, relayed with it; others are dropped.
        With a key, nothing is relayed until the server says that it adds
        the headers: a connectee could put its own first.

    Each channel socket is connected to the real server: the kernel drops
    datagrams from anyone else, and a port unreachable comes back as
    ECONNREFUSED.
    """
    if stats is None:
        stats = client_stats()
    if notify is None:
        notify = Notify({})

    def report(where, exc):
        if isinstance(exc, ConnectionRefusedError):
            refusing()      # on a channel: the real server is not there
            return
        stats["errors"] += 1
        log_socket_error(log, "receive" if where == "err1" else where, exc)

    sel = selectors.DefaultSelector()
    io = burst_io(sock, report, portable, lambda text: log(text, WARN))
    # server: None while server_name has not resolved since the start.
    server_key = None if server is None else io.key_of(server)
    buf, view = io.buf, io.view
    workers = LRU(max_clients)      # tag -> channel socket
    firsts = collections.OrderedDict()  # see looped(): hash -> (laps, when)
    probe, probe_sent, loop_seen = None, 0.0, -LOOP_WINDOW
    fd_bound = False                # the open-file limit bounds channels
    bind_to = wildcard(real_family)
    keepalive = sign(key, request_claims()) if key else b""
    period = interval / 1000.0
    next_ping = last_registered = time.monotonic()
    next_lookup = next_ping + resolve_every
    lookups = queue.Queue()         # results from the resolver thread
    backoff = 1.0                   # seconds to the next try, unresolved
    looking_up = heard = authenticated = silent = refused = False
    hinted = False                  # see stranger()
    # Password mode with proxy_protocol: each keepalive asks, with a fresh
    # challenge, whether the server adds the headers; what carries one is
    # relayed only while its signed answer to the last challenge (or the
    # one before) says so.  (Plain mode cannot know: adds stays True.)
    asking = key is not None and proxy_protocol
    challenges, adds = (None, None), not asking
    unconfirmed = Budget(1, PROXY_WARN_EVERY)       # its warning, rarely

    def send_to_server(data, where):
        io.send_now(data, server_key, where)

    def on_token(token):
        """A datagram from the server that looks signed (password mode)."""
        nonlocal heard, authenticated, silent, last_registered
        claims = verify(key, token)
        if claims is None:
            log.limited("token", "Dropped a token from the server that does "
                        "not verify", WARN)
            return
        stats["last_server_s"] = int(time.time())
        if not heard:
            heard = True
            log("Received a reply from server")
        nonce = retry_nonce(claims)
        if nonce is not None:
            send_to_server(sign(key, request_claims(nonce, challenges[0])),
                           "answer a Retry")
            return
        says = retry_nonce(claims, "ProxyV2")
        if claims != "Registered" and (says is None
                                       or says not in challenges):
            return
        last_registered = time.monotonic()
        if not authenticated:
            authenticated = True
            log("Authenticated")
        if silent:
            silent = False
            log("Server %s answers again" % format_addr(server))
        if asking:
            proxied(says is not None)

    def proxied(says):
        """Whether the server's answer says that it adds PROXY headers."""
        nonlocal adds
        if says and not adds:
            log("Server %s adds PROXY protocol headers" % format_addr(server))
        elif not says and (adds or unconfirmed.take()):
            log("Server %s does not say that it adds PROXY protocol headers "
                "(a Rust server, or no --proxy-protocol there): relaying "
                "nothing, since a connectee could put its own header first"
                % format_addr(server), WARN)
        adds = says

    def looped(first):
        """Whether first, the datagram a new channel is opened for, goes
        round a loop (-c leading back to the server): then drop it.

        A suspect first datagram (see LOOP_LAPS) sends a random probe to -c
        from a fresh socket.  Back from the server as a new connectee, the
        loop is certain, and for LOOP_WINDOW whatever comes round again is
        dropped, which ends it.  A flood of one payload is only suspect.
        """
        nonlocal probe, probe_sent, loop_seen
        now = time.monotonic()
        first = bytes(first)
        if first == probe:
            probe, loop_seen = None, now
            stats["loops_broken"] += 1
            log.limited("loop", "Datagrams sent to %s come back from the "
                        "server as new connectees: -c leads back to the "
                        "server (a loop); dropping what comes round"
                        % format_addr(real_server), WARN)
            return True
        digest = hash(first)
        laps, when = firsts.pop(digest, (0, now))
        laps = laps + 1 if now - when < LOOP_WINDOW else 1
        if len(firsts) >= 64:
            firsts.popitem(last=False)
        firsts[digest] = (laps, now)
        if laps > 1 and now - loop_seen < LOOP_WINDOW:
            return True
        if laps % LOOP_LAPS == 0 and now - probe_sent >= LOOP_WINDOW:
            probe, probe_sent = os.urandom(16), now
            try:
                with socket.socket(real_family, socket.SOCK_DGRAM) as fresh:
                    fresh.sendto(probe, real_server)
            except OSError:
                pass
        return False

    def open_worker(tag, first):
        """A new channel for tag, whose first datagram is first, or None.
        (With proxy_protocol first starts with its header.)

        A full table closes a channel first (unanswered ones before
        answered ones), and so does running out of file descriptors.
        """
        nonlocal fd_bound
        header = b""
        if proxy_protocol:              # checked well-formed before
            first = bytes(first)
            cut = proxy_length(first, 0, len(first))
            header, first = first[:cut], first[cut:]
        if looped(first):
            return None
        if len(workers) >= max_clients:
            close_worker(*workers.evict())
        while True:
            try:
                worker = udp_socket(real_family, bind_to, real_server)
                break
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE) \
                        or not len(workers):
                    report("open a channel socket", e)
                    return None
                if not fd_bound:
                    fd_bound = True
                    log("Out of file descriptors with %s open: the "
                        "open-file limit (ulimit -n), not -n %d, bounds the "
                        "channels from now on"
                        % (plural(len(workers), "channel"), max_clients), WARN)
                close_worker(*workers.evict())
        sel.register(worker, selectors.EVENT_READ,
                     lambda: on_worker_readable(worker, tag))
        stats["channels_opened"] += 1
        workers.put(tag, worker)
        if header and header[12] == PROXY_V2 and log.verbosity >= DEBUG:
            log.limited("channel", "New incoming channel %d for %s"
                        % (tag, format_addr(proxy_source(header))))
        else:
            log.limited("channel", "New incoming channel %d" % tag)
        return worker

    def close_worker(tag, worker, answered):
        sel.unregister(worker)
        io.forget(worker)
        worker.close()
        kind = "answered" if answered else "unanswered"
        stats["channels_closed"] += 1
        stats["evicted_" + kind] += 1
        log.limited("evict", lambda: "Closed channel %d, the least recently "
                    "used %s one" % (tag, kind), DEBUG)

    send_on, flush, forward = io.send_on, io.flush, io.forward
    TO_SERVER = "tag and send to the server"
    TO_REAL_SERVER = "send to the real server"
    # Per datagram, the C methods of the table's dicts, bound once: no
    # Python call between.  A channel is answered once the real server sent
    # on it.
    unanswered = workers.unanswered
    worker_of, touch = workers.answered.get, workers.answered.move_to_end

    def stranger(src):
        """A datagram on the main socket from someone not the server.  From
        the server's port at another address, it is most likely the server
        on a host with several addresses, answering from the wrong one:
        said once, at default verbosity."""
        nonlocal hinted
        stats["strangers"] += 1
        addr = io.address(src)
        if not hinted and server is not None and addr[1] == server[1]:
            hinted = True
            log("Dropped datagrams from %s, the server's port at another "
                "address than %s: a server on a host with several addresses "
                "that answers from another one.  Bind the server to the "
                "address this client uses (-s %s), or run udpexposer.py %s "
                "or newer there" % (format_addr(addr), format_addr(server),
                                    format_addr(server), __version__), WARN)
        log.limited("stranger", lambda: "Dropped a datagram from %s: not the "
                    "server" % format_addr(addr), DEBUG)

    def on_server_readable():
        ats, lengths, sources = io.receive()
        msgs, size = relay(ats, lengths, sources, io.train_sizes)
        flush()
        if msgs:
            stats["last_server_s"] = int(time.time())
        stats["from_server_msgs"] += msgs
        stats["from_server_bytes"] += size
        if proxy_protocol:
            stats["proxy_headers"] += msgs

    def relay(ats, lengths, sources, trains):
        """Relay what a burst from the server brought (trains: at ->
        segment size, see BurstIO): (datagrams, bytes)."""
        msgs = size = 0
        for at, n, src in zip(ats, lengths, sources):
            if trains and at in trains:
                counts = relay_train(at, n, src, trains[at])
                msgs += counts[0]
                size += counts[1]
                continue
            at += TAG_SIZE
            if src != server_key:
                stranger(src)
                continue
            if n < TAG_SIZE:
                stats["dwarfs"] += 1
                continue
            if key is not None and buf.startswith(TOKEN_PREFIX, at, at + n):
                on_token(view[at:at + n])
                continue
            tag = buf[at] << 8 | buf[at + 1]
            if proxy_protocol and not (
                    adds and proxy_length(buf, at + 2, at + n)):
                malformed()
                continue
            worker = worker_of(tag)
            if worker is not None:
                touch(tag)
            else:
                worker = workers.get(tag) \
                    or open_worker(tag, view[at + 2:at + n])
                if worker is None:
                    continue
            msgs += 1
            size += n
            send_on(worker, at + 2, n - 2, TO_REAL_SERVER)
        return msgs, size

    def relay_train(at, n, src, size):
        """Relay a train from the server whole where it is plain data: cut
        where its tags change, each run to its channel without its tags.
        What else a train may hold (a token, a dwarf, a stranger's, with
        proxy_protocol a header each) goes through relay() datagram by
        datagram."""
        start = at + TAG_SIZE
        if src != server_key or proxy_protocol or not cuttable(n, size) or (
                key is not None
                and TOKEN_PREFIX[0] in buf[start:start + n:size]):
            return relay(*io.split(at, n, size), [src] * train_length(n, size),
                         None)
        msgs = relayed = 0
        for first, length, tag in tag_runs(buf, start, n, size):
            worker = worker_of(tag)
            if worker is not None:
                touch(tag)
            else:
                worker = workers.get(tag) or open_worker(
                    tag, view[first + 2:first + min(size, length)])
                if worker is None:
                    continue
            msgs += train_length(length, size)
            relayed += length
            io.send_train(first, length, size, worker, TO_REAL_SERVER)
        return msgs, relayed

    def malformed():
        """--proxy-protocol: a datagram from the server without a header, or
        from one that has not said that it adds them (password mode)."""
        if not adds:
            stats["proxy_unconfirmed"] += 1
            return
        stats["proxy_malformed"] += 1
        log.limited("proxy", "Dropped a datagram from the server without a "
                    "PROXY protocol header: is the server run with "
                    "--proxy-protocol too?", WARN)

    def on_worker_readable(worker, tag):
        """What the real server sent on a channel, tagged, to the server.

        A channel carries one connectee: mostly one datagram per wake-up,
        sent at once.  So one read, and none that finds the socket empty;
        while more wait, the selector calls again, and then the read takes
        all that waits (io.forward()).  More than one leave with what other
        channels brought in the same round, at its end (io.end_round()).
        """
        nonlocal refused
        if worker_of(tag) is worker:
            touch(tag)
        elif unanswered.get(tag) is not worker:
            return          # evicted earlier in this same wake-up
        try:
            msgs, size = forward(worker, tag, server_key, TO_SERVER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            report("receive", e)        # says so if the real server refuses
            return
        if refused:
            refused = False
            log("Real server %s answers again" % format_addr(real_server))
        if tag in unanswered:
            workers.answer(tag)
            firsts.clear()      # a real server answers: this is no loop
        stats["from_real_server_msgs"] += msgs
        stats["from_real_server_bytes"] += size

    def refusing():
        """An ICMP port unreachable from the real server came back."""
        nonlocal refused
        stats["real_server_refusals"] += 1
        if not refused:
            refused = True
            log.limited("refused", "Real server %s refuses datagrams (port "
                        "unreachable)" % format_addr(real_server), WARN)

    def look_up_server():
        """Resolve server_name again, in a thread: the loop never waits."""
        nonlocal looking_up
        looking_up = True

        def work():
            try:
                result = peer_addr(sock.family, resolver(server_name)[1])
            except (ValueError, OSError) as e:
                result = e
            lookups.put(result)
        threading.Thread(target=work, daemon=True).start()

    def on_lookup(result):
        nonlocal server, server_key, looking_up, next_ping, next_lookup, \
            backoff, adds
        looking_up = False
        if server is None:              # not resolved since the start
            if isinstance(result, Exception):
                log.limited("resolve", "Cannot resolve %s yet, trying again "
                            "in %d s: %s" % (server_name, backoff, result),
                            WARN)
                next_lookup = time.monotonic() + backoff
                backoff = min(2 * backoff, MAX_LOOKUP_BACKOFF, resolve_every)
                return
            log("Server address: %s is %s" % (server_name,
                                              format_addr(result)))
            server, server_key = result, io.key_of(result)
            next_ping = time.monotonic()
        elif isinstance(result, Exception):
            log.limited("resolve", "Cannot resolve %s again, keeping %s: %s"
                        % (server_name, format_addr(server), result), WARN)
        elif result != server:
            stats["server_address_changes"] += 1
            log("Server address changed: %s -> %s"
                % (format_addr(server), format_addr(result)))
            server, server_key = result, io.key_of(result)
            next_ping = time.monotonic()    # tell the new address at once
            adds = not asking               # until the new one says so

    def timers():
        nonlocal next_ping, next_lookup, silent, challenges, keepalive
        if looking_up:
            try:
                on_lookup(lookups.get_nowait())
            except queue.Empty:
                pass
        now = time.monotonic()
        if now >= next_ping and server is not None:
            if asking:
                challenges = (int.from_bytes(os.urandom(8), "big"),
                              challenges[0])
                keepalive = sign(key, request_claims(None, challenges[0]))
            send_to_server(keepalive, "send a keepalive")
            stats["keepalives"] += 1
            next_ping = now + period
            if not notify.readied:      # after the first keepalive
                notify.ready(status())
            if key is not None and not silent \
                    and now - last_registered >= UNANSWERED_PINGS * period:
                silent = True
                log("Server %s is not answering" % format_addr(server), WARN)
                next_lookup = now           # perhaps it moved
        if server_name is not None and now >= next_lookup and not looking_up:
            look_up_server()
            next_lookup = now + resolve_every
        due = next_ping if server is not None else next_lookup
        if now >= notify.due:
            notify.tick(status())
        if notify.due < due:
            due = notify.due
        if looking_up:
            return min(due - now, LOOKUP_POLL)
        return due - now

    def status():
        return "server %s, %s, %s relayed" % (
            server_text(server, server_name),
            plural(len(workers), "channel"),
            plural(stats["from_server_msgs"] + stats["from_real_server_msgs"],
                   "datagram"))

    if resolver is None:
        resolver = resolve
    if server is None:      # systemd need not wait (and restart) for DNS
        next_lookup = next_ping + backoff
        notify.ready(status())
    sel.register(sock, selectors.EVENT_READ, on_server_readable)
    try:
        run_loop(sel, timers, stop, lambda: log_counters(log, "client", stats),
                 io.end_round)
    finally:
        for kind in (workers.unanswered, workers.answered):
            for worker in kind.values():
                worker.close()
        sel.close()


# ---------------------------------------------------------------- stats client

def dump_stats(sock, server, key):
    """Ask the server for its counters: them as one line of JSON, or None."""
    request = sign(key, request_claims(STATS_NONCE))
    size = 8 * len(STAT_NAMES)
    sock.setblocking(True)
    for _ in range(STATS_TRIES):
        try:
            sock.sendto(request, server)
        except OSError:
            pass
        deadline = time.monotonic() + STATS_WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                break
            except OSError:
                continue                # an ICMP error from an earlier try
            if src == server and len(data) == size:
                return stats_json(data) + "\n"
    return None


# ---------------------------------------------------------------- metrics (Prometheus)

# --metrics ADDR: GET /metrics in Prometheus's text format 0.0.4, served by
# a thread of its own.  Why a thread and not the relay's loop: the server
# waits inside recvmmsg, with no selector to join, and a thread needs no
# hook in either relay loop.  It sleeps in select(), without the GIL, until
# a scraper connects; a scrape costs the relay one rendering of the text
# (well under a millisecond), nothing per datagram.  It only reads `stats`,
# whose keys never change, so no lock is needed.
METRICS_CONNECTIONS = 16    # open at once; a newcomer closes the oldest
METRICS_REQUEST = 4096      # bytes of request line and headers, at most
METRICS_SECONDS = 5.0       # a connection's whole life, at most
METRICS_BACKLOG = 128       # handshakes the kernel completes: a flood costs
                            # no scraper a SYN retry
# stat -> (metric name after "udpexposer_", help); counters get "_total",
# names ending in _seconds are gauges (Unix times).
METRIC_OF = {
    "err1": ("receive_errors", "Socket errors receiving (err1)"),
    "signed_looking": ("signed_looking_datagrams", "Datagrams like a token"),
    "refresh_address": ("signed_keepalives", "Keepalives from the client"),
    "invalid_auths": ("invalid_auths", "Datagrams like a token, bad MAC"),
    "auth_in_progress": ("auth_attempts", "Keepalives from a new address"),
    "auth_completeds": ("auths_completed", "Keepalives that moved the client"),
    "err2": ("reply_errors", "Socket errors replying to a token (err2)"),
    "simple_keepalives": ("plain_keepalives", "Plain-mode keepalives"),
    "simple_address_switches": ("plain_address_switches",
                                "Plain keepalives that moved the client"),
    "dwarfs": ("dwarf_datagrams", "Datagrams shorter than a tag, dropped"),
    "ch_not_founds": ("unknown_tag_datagrams", "Unknown tags, dropped"),
    "err3": ("send_to_connectee_errors", "Socket errors to connectees (err3)"),
    "dropped_no_client_address": ("no_client_datagrams",
                                  "Datagrams before any client, dropped"),
    "new_connectees": ("new_connectees", "Connectees given a tag"),
    "err4": ("send_to_client_errors", "Socket errors to the client (err4)"),
    "from_connectee_bytes": ("from_connectee_bytes", "Bytes to the client"),
    "from_connectee_msgs": ("from_connectee_datagrams",
                            "Datagrams relayed to the client"),
    "from_client_bytes": ("from_client_bytes", "Bytes to connectees"),
    "from_client_msgs": ("from_client_datagrams",
                         "Datagrams relayed to connectees"),
    "stats_requests": ("stats_requests", "Valid -S requests"),
    "last_ka_s": ("last_keepalive_timestamp_seconds",
                  "Unix time of the client's last keepalive"),
    "last_client_s": ("last_from_client_timestamp_seconds",
                      "Unix time of the client's last datagram relayed"),
    "last_connectee_s": ("last_from_connectee_timestamp_seconds",
                         "Unix time of a connectee's last datagram relayed"),
    "not_allowed": ("not_allowed_datagrams", "Not in --allow, dropped"),
    "client_not_allowed": ("client_not_allowed_keepalives",
                           "Keepalives not in --client-from, ignored"),
    "evicted_unanswered": ("evicted_unanswered", "Unanswered entries evicted"),
    "evicted_answered": ("evicted_answered", "Answered entries evicted"),
    "stats_refused": ("stats_refused", "-S requests over budget"),
    "retries_refused": ("retries_refused", "Retry replies over budget"),
    "sources_refused": ("sources_refused_replies", "Replies sent from the "
                        "kernel's choice of address, not the one their "
                        "datagram came to"),
    "proxy_unconfirmed": ("proxy_unconfirmed_datagrams", "Datagrams dropped "
                          "while the server has not said it adds PROXY "
                          "headers"),
    "proxy_headers": ("proxy_header_datagrams", "Datagrams with a PROXY "
                      "header"),
    "keepalives": ("keepalives_sent", "Keepalives sent to the server"),
    "from_server_msgs": ("from_server_datagrams",
                         "Datagrams relayed to the real server"),
    "from_server_bytes": ("from_server_bytes", "Bytes to the real server"),
    "from_real_server_msgs": ("from_real_server_datagrams",
                              "Datagrams relayed to the server"),
    "from_real_server_bytes": ("from_real_server_bytes", "Bytes to the server"),
    "strangers": ("stranger_datagrams", "Not from the server, dropped"),
    "channels_opened": ("channels_opened", "Channel sockets opened"),
    "channels_closed": ("channels_closed", "Channel sockets evicted"),
    "loops_broken": ("loops_broken", "Loops through the server broken"),
    "real_server_refusals": ("real_server_refusals",
                             "Port unreachable from the real server"),
    "errors": ("socket_errors", "Socket errors"),
    "server_address_changes": ("server_address_changes",
                               "Changes of the server's address"),
    "proxy_malformed": ("proxy_malformed_datagrams",
                        "Without a PROXY header, dropped"),
    "last_server_s": ("last_from_server_timestamp_seconds",
                      "Unix time the server was last heard"),
}


def metrics_text(stats, role, mode, capacity, started):
    """The exposition of `stats` and the gauges (text format 0.0.4), bytes.
    mode: "plain" or "password"; capacity: -n; started: Unix time."""
    out = []

    def metric(name, kind, text, value, labels=""):
        out.append("# HELP udpexposer_%s %s\n# TYPE udpexposer_%s %s\n"
                   "udpexposer_%s%s %d\n" % (name, text, name, kind, name,
                                            labels, value))
    metric("info", "gauge", "This relay: version, role and mode", 1,
           '{version="%s",role="%s",mode="%s"}' % (__version__, role, mode))
    for stat, value in list(stats.items()):
        name, text = METRIC_OF[stat]
        if name.endswith("_seconds"):
            metric(name, "gauge", text, value)
        else:
            metric(name + "_total", "counter", text, value)
    if role == "server":
        entries = stats["new_connectees"] - stats["evicted_answered"] \
            - stats["evicted_unanswered"]
        heard = max(stats["last_ka_s"], stats["last_client_s"])
    else:
        entries = stats["channels_opened"] - stats["channels_closed"]
        heard = stats["last_server_s"]
    peer = "client" if role == "server" else "server"
    metric("table_entries", "gauge", "Connectees (server) or channels "
           "(client) in the table", entries)
    metric("table_capacity", "gauge", "The most the table holds (-n)",
           capacity)
    metric("peer_heard", "gauge", "1 once the %s was heard" % peer,
           heard > 0)
    metric("peer_silence_seconds", "gauge", "Seconds since the %s was last "
           "heard (since the start, before it ever was)" % peer,
           max(0, time.time() - max(heard, started)))
    return "".join(out).encode()


def metrics_socket(text):
    """--metrics ADDR: a listening TCP socket; UsageError if it cannot be."""
    try:
        family, addr = resolve(text, passive=True)
    except ValueError as e:
        raise UsageError("--metrics: %s" % e)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(METRICS_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise UsageError("cannot bind --metrics %s: %s"
                         % (text, e.strerror or e))
    return sock


class MetricsServer:
    """HTTP on a listening socket: GET /metrics answers render(), anything
    else an error, and every connection is closed after one answer.

    Nothing a scraper does can hold the thread: sockets never block; a
    connection has METRICS_SECONDS to send at most METRICS_REQUEST bytes of
    request and take the answer, else it is closed; at most
    METRICS_CONNECTIONS are open, and a newcomer closes the oldest (a real
    scraper is done in milliseconds, so the oldest is the one in the way).
    """

    def __init__(self, sock, render):
        self.sock, self.render = sock, render
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ)
        # socket -> [deadline, request bytes, answer left]; oldest first
        self.conns = collections.OrderedDict()
        self.resume = float("inf")      # when to accept again after EMFILE

    def serve(self):
        if hasattr(signal, "pthread_sigmask"):  # the main thread's to handle
            signal.pthread_sigmask(signal.SIG_BLOCK, [
                signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
        conns = self.conns
        while True:
            due = self.resume
            if conns:
                due = min(due, next(iter(conns.values()))[0])
            timeout = None if due == float("inf") \
                else max(0.0, due - time.monotonic())
            for key, _ in self.sel.select(timeout):
                if key.fileobj is self.sock:
                    self.accept()
                elif key.fileobj in conns:
                    self.on_ready(key.fileobj, conns[key.fileobj])
            now = time.monotonic()
            while conns and next(iter(conns.values()))[0] <= now:
                self.close(next(iter(conns)))
            if now >= self.resume:
                self.resume = float("inf")
                self.sel.register(self.sock, selectors.EVENT_READ)

    def accept(self):
        for _ in range(METRICS_CONNECTIONS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:     # EMFILE and the like: a second's pause,
                self.sel.unregister(self.sock)      # not a busy loop
                self.resume = time.monotonic() + 1.0
                return
            if len(self.conns) >= METRICS_CONNECTIONS:
                self.close(next(iter(self.conns)))
            conn.setblocking(False)
            self.sel.register(conn, selectors.EVENT_READ)
            self.conns[conn] = [time.monotonic() + METRICS_SECONDS,
                                b"", None]

    def on_ready(self, conn, state):
        try:
            if state[2] is None:
                data = conn.recv(METRICS_REQUEST + 1 - len(state[1]))
                state[1] += data
                if b"\r\n\r\n" in state[1] or b"\n\n" in state[1]:
                    state[2] = memoryview(self.answer(state[1]))
                    self.sel.modify(conn, selectors.EVENT_WRITE)
                elif not data or len(state[1]) > METRICS_REQUEST:
                    self.close(conn)
                return
            state[2] = state[2][conn.send(state[2]):]
            if not state[2]:
                conn.shutdown(socket.SHUT_WR)
                self.close(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:         # the scraper went away
            self.close(conn)

    def answer(self, request):
        words = request.split(b"\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            status, body = "400 Bad Request", b"bad request\n"
        elif words[0] != b"GET":
            status, body = "405 Method Not Allowed", b"GET only\n"
        elif words[1].split(b"?", 1)[0] != b"/metrics":
            status, body = "404 Not Found", b"try /metrics\n"
        else:
            status, body = "200 OK", self.render()
        return ("HTTP/1.1 %s\r\nContent-Type: text/plain; version=0.0.4; "
                "charset=utf-8\r\nContent-Length: %d\r\nConnection: close"
                "\r\n\r\n" % (status, len(body))).encode() + body

    def close(self, conn):
        del self.conns[conn]
        self.sel.unregister(conn)
        conn.close()


def serve_metrics(sock, log, role, stats, key, capacity):
    """Start the --metrics thread for a relay of this role and stats."""
    mode, started = "password" if key else "plain", time.time()
    server = MetricsServer(sock, lambda: metrics_text(stats, role, mode,
                                                      capacity, started))
    threading.Thread(target=server.serve, name="metrics", daemon=True).start()
    log("Metrics on http://%s/metrics" % format_addr(sock.getsockname()),
        WARN)


# ---------------------------------------------------------------- self-test

SELFTEST_SIZES = (1, 2, 100, 1400, 9000, 65000, 65507 - TAG_SIZE)
EMPTY_PLEASE = b"selftest: answer with an empty datagram"


def selftest(out):
    """Server, client and echo on loopback, plain and password: exit status."""
    out("selftest: Python %s (%s) on %s, %s I/O" % (
        sys.version.split()[0], sys.implementation.name, sys.platform,
        "portable" if _load_mmsg() is None else "recvmmsg/sendmmsg, UDP trains"))
    failures = sum(_selftest_mode(password, out)
                   for password in (None, "selftest password"))
    out("selftest %s" % ("passed" if not failures
                         else "FAILED (%d checks)" % failures))
    return 1 if failures else 0


def _selftest_start(args, env, procs):
    """Start this script with args: (Popen, the address it bound)."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env,
                            universal_newlines=True)
    procs.append(proc)
    lines = queue.Queue()

    def read():
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line)
    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    try:
        first = lines.get(timeout=30)
    except queue.Empty:
        first = ""
    bound = re.search(r" mode on (\S+),", first)
    if bound is None:
        raise RuntimeError("%s did not start: %s" % (args[0], first.strip()))
    return proc, resolve(bound.group(1))[1]


def _echo(sock, stop):
    while not stop.is_set():
        try:
            data, src = sock.recvfrom(MAX_DATAGRAM)
            sock.sendto(b"" if data == EMPTY_PLEASE else data, src)
        except socket.timeout:
            continue
        except OSError:
            return


def _exchange(conn, dest, data, expect, tries=3, wait=2.0):
    """Send data and wait for expect to come back: True or False."""
    for _ in range(tries):
        conn.sendto(data, dest)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                if conn.recvfrom(MAX_DATAGRAM)[0] == expect:
                    return True
            except socket.timeout:
                break
    return False


def _selftest_mode(password, out):
    """One server + client + echo run: the number of failed checks."""
    name = "password mode" if password else "plain mode"
    env = dict(os.environ)
    env.pop(PASSWORD_ENV, None)
    if password:
        env[PASSWORD_ENV] = password
    stop, procs, socks = threading.Event(), [], []
    try:
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks += [echo, conn]
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(0.2)
        conn.bind(("127.0.0.1", 0))
        threading.Thread(target=_echo, args=(echo, stop), daemon=True).start()
        _, server = _selftest_start(["-s", "127.0.0.1:0", "-n", "8"], env, procs)
        _selftest_start(["127.0.0.1:0", "-a", format_addr(server), "-c",
                         format_addr(echo.getsockname()), "-n", "8",
                         "-i", "200"], env, procs)
        if not _exchange(conn, server, b"ready?", b"ready?", tries=20, wait=0.5):
            out("  %s: FAILED, nothing came back through the relay" % name)
            return 1
        failed = [size for size in SELFTEST_SIZES
                  if not _exchange(conn, server, b"s" * size, b"s" * size)]
        checks = ["sizes %d..%d both ways" % (SELFTEST_SIZES[0],
                                              SELFTEST_SIZES[-1])]
        if password:        # in plain mode an empty datagram is a keepalive
            checks.append("empty datagram both ways")
            if not _exchange(conn, server, b"", b""):
                failed.append(0)
        else:
            checks.append("empty reply")
            if not _exchange(conn, server, EMPTY_PLEASE, b""):
                failed.append(0)
        rate = _selftest_rate(conn, server)
        p50, p99 = _selftest_rtt(conn, server)
        out("  %s: %s: %s; %d round trips/s; round trip p50 %d us, p99 %d us"
            % (name, ", ".join(checks),
               "FAILED for sizes %s" % failed if failed else "ok",
               rate, p50, p99))
        return len(failed)
    except (RuntimeError, OSError) as e:
        out("  %s: FAILED, %s" % (name, e))
        return 1
    finally:
        stop.set()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.reader.join(5)         # it closes the pipe
        for sock in socks:
            sock.close()


def _selftest_rate(conn, server, count=3000, window=16, limit=10.0):
    """Round trips of 100 bytes per second with `window` in flight."""
    conn.settimeout(0.5)
    data = b"r" * 100
    t0 = time.monotonic()
    sent = received = 0
    for _ in range(window):
        conn.sendto(data, server)
        sent += 1
    while received < count and time.monotonic() - t0 < limit:
        try:
            conn.recvfrom(MAX_DATAGRAM)
        except socket.timeout:
            sent = received         # lost: refill the window
            for _ in range(window):
                conn.sendto(data, server)
                sent += 1
            continue
        received += 1
        if sent < count:
            conn.sendto(data, server)
            sent += 1
    elapsed = time.monotonic() - t0
    time.sleep(0.2)
    conn.settimeout(0.01)
    try:
        while True:
            conn.recvfrom(MAX_DATAGRAM)     # stragglers
    except socket.timeout:
        pass
    return received / elapsed


def _selftest_rtt(conn, server, count=200):
    """Round trip p50 and p99, in microseconds."""
    times = []
    conn.settimeout(1.0)
    for i in range(count):
        data = b"%d" % i
        t0 = time.perf_counter()
        conn.sendto(data, server)
        try:
            while conn.recvfrom(MAX_DATAGRAM)[0] != data:
                pass
        except socket.timeout:
            continue
        times.append(time.perf_counter() - t0)
    if not times:
        return 0, 0
    times.sort()
    return (times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6)


# ---------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit status 2, instead of usage + error."""
        say("%s (see --help)" % message)
        sys.exit(2)


def build_parser():
    parser = Parser(
        prog="udpexposer.py",
        usage="%(prog)s listen_addr -s [options]              (server)\n"
              "       %(prog)s listen_addr -a ADDR -c ADDR [options]  (client)\n"
              "       %(prog)s listen_addr -S -a ADDR -P PW          "
              "(the server's counters)\n"
              "       %(prog)s --selftest | --version | --help",
        description="Expose UDP port externally using helper hosts.",
        epilog="Modes: -s (server); -a and -c (client); -S with -a and a "
               "password (print the server's counters); --selftest.  "
               "Addresses are IPv4:port, [IPv6]:port or name:port (a name "
               "is looked up at start, and -a's again later).  The password can come from -P, from "
               "--password-file or from the environment variable %s.  "
               "SIGUSR1 logs the counters as one JSON line." % PASSWORD_ENV)
    parser.add_argument("listen_addr", nargs="?",
                        help="UDP socket address to bind to")
    parser.add_argument("-c", "--local-connect-addr", metavar="ADDR",
                        help="client mode: expose specified UDP socket")
    parser.add_argument("-a", "--server-addr", metavar="ADDR",
                        help="client mode: use specified server")
    parser.add_argument("-s", "--server-mode", action="store_true",
                        help="server mode")
    parser.add_argument("-n", "--max-clients", metavar="N", type=int,
                        default=DEFAULT_MAX_CLIENTS,
                        help="connectees remembered (server) or channels "
                             "open (client), least recently used first out, "
                             "1..65535; the same on both sides "
                             "(default: %(default)s)")
    parser.add_argument("-i", "--ping-interval-ms", metavar="MS", type=int,
                        help="for client mode, keepalive interval "
                             "(default: %d)" % DEFAULT_PING_INTERVAL_MS)
    parser.add_argument("-P", "--password", metavar="PW",
                        help="pre-shared key / password to protect server "
                             "against unsolicited clients; visible to other "
                             "users in ps, prefer --password-file "
                             "(default: none)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="read the password from the first line of PATH "
                             "(default: none)")
    parser.add_argument("-S", "--dump-stats", action="store_true",
                        help="ask the server at -a for its counters, print "
                             "them as JSON and exit (needs a password)")
    parser.add_argument("--allow", metavar="CIDR", action="append",
                        help="server mode: relay only connectees from this "
                             "network; repeatable (default: everyone)")
    parser.add_argument("--client-from", metavar="CIDR", action="append",
                        help="server mode: accept the client's keepalives "
                             "only from this network; repeatable (default: "
                             "anywhere)")
    parser.add_argument("--resolve-interval", metavar="SECONDS", type=float,
                        help="client mode: look up the host name of -a again "
                             "this often (default: %d)"
                             % DEFAULT_RESOLVE_INTERVAL)
    parser.add_argument("--selftest", action="store_true",
                        help="run a server, a client and an echo service on "
                             "loopback, report, and exit 0 if all is well")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log evictions and dropped datagrams")
    parser.add_argument("--proxy-protocol", action="store_true",
                        help="server: put a PROXY protocol v2 header (the "
                             "connectee's address) before each datagram "
                             "for the real server; client: relay only "
                             "datagrams that carry one")
    parser.add_argument("--metrics", metavar="ADDR",
                        help="serve the counters to Prometheus at "
                             "http://ADDR/metrics, e.g. 127.0.0.1:9101 "
                             "(default: none)")
    parser.add_argument("--portable-io", action="store_true",
                        help="plain recvfrom/sendto even where recvmmsg "
                             "and UDP trains (GRO/GSO) are available (Linux)")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + VERSION_TEXT)
    return parser


def read_password(args, environ):
    """The password from -P, --password-file or the environment, as bytes,
    or None.  The key is derived from bytes: a password that is not UTF-8
    gives the same key from all three (os.fsencode undoes how Python
    decoded the command line and the environment)."""
    if args.password is not None and args.password_file is not None:
        raise UsageError("give -P or --password-file, not both")
    if args.password_file is not None:
        try:
            with open(args.password_file, "rb") as f:
                line = f.readline(MAX_PASSWORD + 2)
        except OSError as e:
            raise UsageError("cannot read --password-file: %s" % e)
        password = line.rstrip(b"\r\n")
        if len(password) > MAX_PASSWORD:
            raise UsageError("--password-file %s: the first line is longer "
                             "than %d bytes" % (args.password_file,
                                                MAX_PASSWORD))
        if not password:
            raise UsageError("--password-file %s holds an empty first line"
                             % args.password_file)
        return password
    if args.password is not None:                 # -P "$PW", PW unset?
        source, password = "-P", args.password
    elif PASSWORD_ENV in environ:
        source, password = PASSWORD_ENV, environ[PASSWORD_ENV]
    else:
        return None
    if not password:
        raise UsageError("%s gives an empty password: give one, or none for "
                         "plain mode" % source)
    return os.fsencode(password)


def choose_mode(args, password):
    """'server', 'client', 'stats' or 'selftest'; UsageError for nonsense."""
    if args.selftest:
        return "selftest"
    client = args.server_addr is not None or args.local_connect_addr is not None
    if args.listen_addr is None:
        raise UsageError("the listen address is missing, e.g. %s"
                         % ("0.0.0.0:5566" if args.server_mode else
                            "0.0.0.0:0 (any port) for a client"))
    if (args.server_mode or args.dump_stats) and (
            args.ping_interval_ms, args.resolve_interval) != (None, None):
        raise UsageError("-i and --resolve-interval are for client mode "
                         "(-a and -c)")
    if args.ping_interval_ms is None:           # None: not given
        args.ping_interval_ms = DEFAULT_PING_INTERVAL_MS
    if args.resolve_interval is None:
        args.resolve_interval = DEFAULT_RESOLVE_INTERVAL
    if not 1 <= args.max_clients <= MAX_TAG:
        raise UsageError("-n/--max-clients must be 1..65535, not %d"
                         % args.max_clients)
    if not 1 <= args.ping_interval_ms <= 86400000:
        raise UsageError("-i/--ping-interval-ms must be 1..86400000, not %d"
                         % args.ping_interval_ms)
    if not args.resolve_interval > 0:
        raise UsageError("--resolve-interval must be more than 0 seconds")
    if args.quiet and args.verbose:
        raise UsageError("-q and -v contradict each other")
    if (args.allow or args.client_from) and not args.server_mode:
        raise UsageError("--allow and --client-from are for server mode (-s)")
    if args.dump_stats:
        if args.proxy_protocol:
            raise UsageError("--proxy-protocol is for server and client mode")
        if args.server_mode or args.local_connect_addr is not None:
            raise UsageError("-S takes -a and a password, not -s or -c")
        if args.server_addr is None or password is None:
            raise UsageError("-S needs -a SERVER and a password (-P, "
                             "--password-file or %s)" % PASSWORD_ENV)
        return "stats"
    if args.server_mode and client:
        raise UsageError("-s cannot be combined with -a or -c")
    if args.server_mode:
        return "server"
    if args.server_addr is None or args.local_connect_addr is None:
        raise UsageError("choose a mode: -s for server, or -a and -c "
                         "together for client")
    return "client"


def is_ip_literal(host):
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def setup(args, environ):
    """Check flags, resolve addresses, derive the key, bind: a dict or raise."""
    password = read_password(args, environ)
    mode = choose_mode(args, password)
    if args.metrics is not None and mode not in ("server", "client"):
        raise UsageError("--metrics is for server and client mode")
    if mode == "selftest":
        return dict(mode=mode)
    allow = parse_networks(args.allow, "--allow")
    client_from = parse_networks(args.client_from, "--client-from")
    flag, text = "listen_addr", args.listen_addr    # what an error is about
    try:
        family, listen = resolve(text, passive=True)
        server = real = real_family = server_name = None
        if mode != "server":
            flag, text = "-a", args.server_addr
            if not is_ip_literal(split_host_port(text)[0]):
                server_name = text
            try:
                server = peer_addr(family, resolve(text)[1])
            except LookupFailed:
                if mode != "client":    # the client tries again, later
                    raise
        if mode == "client":
            flag, text = "-c", args.local_connect_addr
            real_family, real = resolve(text)
            if server is not None and \
                    (ip_of(real), real[1]) == (ip_of(server), server[1]):
                raise ValueError("the server at -a: the relay would loop")
    except ValueError as e:
        raise UsageError("%s %s: %s" % (flag, text, e))
    key = derive_key(password) if password is not None else None
    metrics = None if args.metrics is None else metrics_socket(args.metrics)
    try:
        sock = udp_socket(family, listen, local=mode == "server")
    except OSError as e:
        if metrics is not None:
            metrics.close()
        raise UsageError("cannot bind %s: %s"
                         % (args.listen_addr, e.strerror or e))
    return dict(mode=mode, sock=sock, key=key, server=server, real=real,
                real_family=real_family, server_name=server_name,
                allow=allow, client_from=client_from, metrics=metrics)


def _stop(signum, frame):
    raise KeyboardInterrupt


def open_closed_std_fds():
    """Point those of fds 0-2 that are closed at /dev/null, so that no
    socket takes their place (a log line must never leave as a datagram);
    returns them."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    return closed


def say(text):
    """One line on stderr, or silence where there is no stderr."""
    try:
        os.write(2, ("udpexposer: %s\n" % text).encode("utf-8", "replace"))
    except OSError:
        pass


def journal_stream(environ):
    """Whether stdout is journald's stream (JOURNAL_STREAM='dev:inode')."""
    dev, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(1)
        return (int(dev), int(inode)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return False


def print_stats(sock, server, key, stdout_closed):
    """-S: ask, print the JSON on stdout; the exit status."""
    if stdout_closed:
        say("stdout is closed: nowhere to print the stats")
        return 1
    text = dump_stats(sock, server, key)
    if text is None:
        say("no stats from %s after %d tries (is it a server, with the same "
            "password?)" % (format_addr(server), STATS_TRIES))
        return 1
    try:
        write_all(1, text.encode())
    except OSError as e:
        say("cannot print the stats: %s" % (e.strerror or e))
        return 1
    return 0


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    closed = open_closed_std_fds()
    log = None
    # Handlers first: a signal while the key is derived ends it cleanly.
    signal.signal(signal.SIGTERM, _stop)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, note_signal)
    run, notify = {}, Notify({})
    try:
        args = build_parser().parse_args(argv)
        log = Log(fd=1, journal=journal_stream(environ), verbosity=WARN
                  if args.quiet else DEBUG if args.verbose else INFO)
        try:
            run = setup(args, environ)
        except UsageError as e:
            say(e)
            return 2
        mode = run["mode"]
        if mode == "selftest":
            try:
                return selftest(log)
            except KeyboardInterrupt:
                return 1
        sock, key = run["sock"], run["key"]
        if mode == "stats":
            return print_stats(sock, run["server"], key, 1 in closed)
        stats = client_stats() if mode == "client" else server_stats()
        notify = Notify(environ)
        bound = format_addr(sock.getsockname())
        flavour = "password mode" if key else "plain mode"
        if args.proxy_protocol:
            flavour += ", PROXY protocol"
        # The start-up line shows even with -q: it says what is bound where.
        if mode == "server":
            log("udpexposer.py %s: server mode on %s, %s, up to %s"
                % (VERSION_TEXT, bound, flavour,
                   plural(args.max_clients, "connectee")), WARN)
        else:
            log("udpexposer.py %s: client mode on %s, %s, server %s, "
                "exposing %s, up to %s"
                % (VERSION_TEXT, bound, flavour,
                   server_text(run["server"], run["server_name"]),
                   format_addr(run["real"]),
                   plural(args.max_clients, "channel")), WARN)
        if notify.problem:
            log(notify.problem, WARN)
        if run["metrics"] is not None:
            serve_metrics(run["metrics"], log, mode, stats, key,
                          args.max_clients)
        if mode == "server":
            run_server(sock, args.max_clients, log, key, stats,
                       portable=args.portable_io, allow=run["allow"],
                       client_from=run["client_from"], notify=notify,
                       proxy_protocol=args.proxy_protocol)
        else:
            run_client(sock, run["server"], run["real_family"], run["real"],
                       args.max_clients, args.ping_interval_ms, log, key,
                       portable=args.portable_io, stats=stats,
                       server_name=run["server_name"],
                       resolve_every=args.resolve_interval, notify=notify,
                       proxy_protocol=args.proxy_protocol)
    except KeyboardInterrupt:
        for signum in (signal.SIGTERM, signal.SIGINT):     # we are going
            signal.signal(signum, signal.SIG_IGN)
        notify("STOPPING=1")
        return 0
    finally:
        if run.get("sock") is not None:
            run["sock"].close()
        if log is not None:
            log.flush()


if __name__ == "__main__":
    sys.exit(main())
