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
# since, is suspect; a probe then tells (see LoopGuard).
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
IO_STATS = ("trains_in", "trains_out", "trains_refused", "sent_one_by_one")
SERVER_EXTRA_STATS = ("not_allowed", "client_not_allowed",
                      "evicted_unanswered", "evicted_answered",
                      "stats_refused", "retries_refused", "proxy_headers",
                      "sources_refused") + IO_STATS
CLIENT_STATS = (
    "keepalives", "from_server_msgs", "from_server_bytes",
    "from_real_server_msgs", "from_real_server_bytes", "strangers", "dwarfs",
    "channels_opened", "channels_closed", "evicted_unanswered",
    "evicted_answered", "loops_broken", "real_server_refusals", "errors",
    "server_address_changes", "proxy_headers", "proxy_malformed",
    "proxy_unconfirmed",
    "last_server_s",
) + IO_STATS


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


def sockaddr_bytes(addr):
    """sockaddr tuple -> struct sockaddr_in or sockaddr_in6 (Linux layout),
    as recvmmsg gives a source's name."""
    host, port = addr[0].split("%")[0], struct.pack(">H", addr[1])
    if len(addr) == 2:
        return struct.pack("=H", socket.AF_INET) + port \
            + socket.inet_pton(socket.AF_INET, host) + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + port \
        + struct.pack(">I", addr[2]) + socket.inet_pton(socket.AF_INET6, host) \
        + struct.pack("=I", addr[3])


def sockaddr_tuple(raw):
    """sockaddr_bytes() backwards: the tuple recvfrom() would give."""
    port = raw[2] << 8 | raw[3]
    if struct.unpack_from("=H", raw)[0] == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port,
            struct.unpack_from(">I", raw, 4)[0],
            struct.unpack_from("=I", raw, 24)[0])


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
#
# The relays see one façade, PortableIO (recvfrom and sendto, anywhere) or
# MmsgIO (Linux: recvmmsg and sendmmsg through ctypes, and UDP trains),
# with one API: see PortableIO.  Inside MmsgIO each mechanism is a room
# that owns its state: Headers (struct mmsghdr arrays), Outbox (a queue
# for sendmmsg and its fallbacks), TrainsOut (the UDP_SEGMENT policy),
# Channels (a client's channels) with ChannelGro (their UDP_GRO policy),
# LocalReplies (replies from the address a datagram came to).
#
# buf holds BURST slots.  A read into slot q lands at q * SLOT + HEADROOM;
# an item is named by `at`, where its tag goes, TAG_SIZE bytes before its
# data:
#
#   q * SLOT              at = q * SLOT + DATA_AT
#   |                     |    q * SLOT + HEADROOM
#   v                     v    v
#   [ headroom ......... |tag| datagram, or train .......... ]
#    <- HEADROOM = TAG_SIZE * TRAIN_IN -><- MAX_DATAGRAM -->
#
# A burst is (ats, lengths, sources, trains): item i is lengths[i] bytes at
# buf[ats[i] + TAG_SIZE:] from the source key sources[i]; a train (the
# kernel's UDP_GRO: datagrams of one size from one peer, the last may be
# shorter) is one item too, with its segment size in trains[at].  split()
# spreads a train into its slot's headroom, a tag's room before each.  The
# main socket reads with UDP_GRO from its start where the kernel has it
# (MmsgIO.gro), and trains go out where it does, until the kernel refuses
# them (TrainsOut): no trial, as in wireguard-go.
#
# A datagram from a connectee (server): relay() puts its tag at buf[at:],
# send(at, TAG_SIZE + n, client) queues one iovec in the main socket's
# Outbox, and flush() sends the burst's datagrams with one sendmmsg.
# A train: send_train(start, n, size, client, where, tag) queues gather
# iovecs (the tag from a table of all tags, then the datagram in place),
# TRAIN_OUT datagrams a message at most, with a UDP_SEGMENT control
# message; from the client the tags are left out instead (each iovec
# starts TAG_SIZE into its datagram).  A message the kernel refuses goes
# datagram by datagram (Outbox.send_rest(), TrainsOut.refused()).
# A channel (client) is sent to at once, a train by one sendmmsg on its
# fd: so its datagrams keep their order.  What a channel reads (forward())
# goes to the server at once, one datagram; a busy channel's several go to
# the main Outbox, which leaves at the selector round's end, when full, or
# before the next receive(): until then their slots stay taken.

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
TRIAL_READS = 64          # a channel's reads without a train: GRO off
# A control message's header (cmsg_len, cmsg_level, cmsg_type), then its
# data: for UDP_GRO the segment size; UDP_SEGMENT's is the whole message.
CMSG_HEAD = struct.Struct("@Nii")
GRO_SIZE = struct.Struct("=i")
SEGMENT_CMSG = struct.Struct("@NiiH6x")
SEGMENT_CMSG_LEN = socket.CMSG_LEN(2) if hasattr(socket, "CMSG_LEN") else 18
# struct mmsghdr, the layout of every array here: msg_name, msg_namelen,
# msg_iov, msg_iovlen, msg_control, msg_controllen, msg_flags, msg_len
# ("0P" pads to a pointer's alignment, on 32-bit and 64-bit alike).
MMSGHDR = struct.Struct("@PIPNPNi0PI0P")
CONTROLLEN_AT = struct.calcsize("@PIPNP")
LEN_AT = struct.calcsize("@PIPNPNi0P")
WORD = struct.calcsize("P")     # void *iov_base and size_t iov_len alike
WORD_CODE = "Q" if WORD == 8 else "I"


def repeated(one, mode="="):
    """Structs for 0..BURST repetitions of the struct format `one`."""
    return [struct.Struct(mode + one * k) for k in range(BURST + 1)]


# One struct call reads the msg_len (msg_controllen) of k headers.
LENGTHS = repeated("%dxI%dx" % (LEN_AT, MMSGHDR.size - LEN_AT - 4))
CONTROLLENS = repeated("%dxN%dx" % (
    CONTROLLEN_AT, MMSGHDR.size - CONTROLLEN_AT - WORD), "@")
IOVECS = repeated("PN", "@")


def gro_size(level, kind, data, at=0):
    """The one parser of UDP_GRO control messages: the segment size that
    a control message of (level, kind) whose data is at data[at:] gives,
    else 0 (it is another's)."""
    if level == SOL_UDP and kind == UDP_GRO:
        return GRO_SIZE.unpack_from(data, at)[0]
    return 0


def gro_segment(controls, at):
    """gro_size() of the control message at controls[at] (as recvmmsg
    writes it, header and data)."""
    _, level, kind = CMSG_HEAD.unpack_from(controls, at)
    return gro_size(level, kind, controls, at + CMSG_HEAD.size)


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


def enable_gro(sock):
    """Ask for trains on sock (UDP_GRO): whether the kernel agreed."""
    if not GRO_ROOM or not hasattr(sock, "recvmsg_into"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class PortableIO:
    """The relays' I/O on one socket, a burst at a time: recvfrom/sendto.

    buf, view: the slots (see the section's top) and a memoryview of them.
    receive() -> (ats, lengths, sources, trains): what is waiting, up to
        BURST items; sources are opaque hashable keys, address(key) gives
        the sockaddr tuple and key_of(addr) the key back; trains maps an
        item's `at` to its segment size (never one here).
    split(at, n, size) -> (ats, lengths): a train as datagrams.
    send(start, length, dest, where): buf[start:start + length] to a key.
    send_train(start, n, size, dest, where, tag=None): a train at
        buf[start:start + n] to a key, each datagram with tag before it,
        or with tag None each without its first TAG_SIZE bytes.
    send_on(chan, start, length, where), send_train_on(chan, start, n,
        size, where): the same on a client's channel (tags left out).
    forward(chan, tag, dest, where) -> (datagrams, bytes): what a channel
        has, read and sent on to a key, tag before each.
    flush(): what is queued leaves; end_round(): a selector round ended;
        forget(chan): a channel closes.  MmsgIO queues what send() and
        send_train() are given by its place in buf: nothing may write
        there until flush() (receive() flushes first).  PortableIO sends
        at once.
    send_now(data, dest, where, chan=None): at once, outside any burst.
    local_address(key): the local IP a source sent to, where known.
    wait_in_receive(seconds): make receive() wait; False where it cannot.
    Errors go to report(where, exc) (where: what the relay was doing)
    and never stop the caller, but for forward(), which raises them;
    counted events go to counts (a dict with IO_STATS, and with local
    replies sources_refused), a lasting change of behaviour to
    notice(text).
    """

    SEND_FLAGS = 0
    NO_TRAINS = {}

    def __init__(self, sock, report, notice=None, counts=None):
        self.sock, self.report = sock, report
        self.notice = notice or (lambda text: None)
        self.counts = collections.Counter() if counts is None else counts
        self.buf = bytearray(BURST * SLOT)
        self.view = memoryview(self.buf)
        # each slot's room for a lone datagram
        self.slots = [self.view[at + TAG_SIZE:at + TAG_SIZE + MAX_DATAGRAM]
                      for at in PLAIN_ATS]
        self.receive = self._recvfrom(sock.recvfrom_into, report)

    def _recvfrom(self, recv_into, report):
        slots, lengths, sources = self.slots, [0] * BURST, [None] * BURST

        def receive():
            k = 0
            for _ in range(BURST):
                try:
                    lengths[k], sources[k] = recv_into(slots[k], MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    report("receive", e)
                    continue
                k += 1
            return PLAIN_ATS, lengths[:k], sources[:k], self.NO_TRAINS
        return receive

    def split(self, at, n, size):
        try:
            return split_train(self.buf, at - DATA_AT, n, size)
        except OSError as e:
            self.report("receive", e)
            return (), ()

    def send(self, start, length, dest, where):
        self.send_now(self.view[start:start + length], dest, where)

    def send_on(self, chan, start, length, where):
        self.send_now(self.view[start:start + length], None, where, chan)

    def send_train(self, start, n, size, dest, where, tag=None):
        """A loop of sends: a train reaches here only from a test."""
        prefix = b"" if tag is None else TAG.pack(tag)
        skip = 0 if tag is None else TAG_SIZE
        for first in range(start, start + n, size):
            end = min(first + size, start + n)
            self.send_now(prefix + self.buf[first + TAG_SIZE - skip:end],
                          dest, where)

    def send_train_on(self, chan, start, n, size, where):
        for first in range(start, start + n, size):
            self.send_on(chan, first + TAG_SIZE,
                         min(size, start + n - first) - TAG_SIZE, where)

    def forward(self, chan, tag, dest, where):
        n = chan.recv_into(self.slots[0], MAX_DATAGRAM)
        TAG.pack_into(self.buf, DATA_AT, tag)
        self.send_now(self.view[DATA_AT:DATA_AT + TAG_SIZE + n], dest, where)
        return 1, n

    def send_now(self, data, dest, where, chan=None):
        try:
            if chan is None:
                self.sock.sendto(data, self.SEND_FLAGS, dest)
            else:
                chan.send(data, self.SEND_FLAGS)
        except OSError as e:        # a full send buffer drops it too
            self.report(where, e)

    def flush(self):
        pass

    def end_round(self):
        pass

    def forget(self, chan):
        pass

    def local_address(self, key):
        return None

    def wait_in_receive(self, seconds):
        return False

    @staticmethod
    def address(key):
        return key

    def key_of(self, addr):
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


class Headers:
    """BURST struct mmsghdr in one ctypes buffer (MMSGHDR's layout), and
    beside them the buffers their pointers lead to: names (name_room bytes
    a message), controls (room bytes a message) and `iovecs` iovecs.
    These fields keep those C buffers alive while the kernel has their
    addresses.  set() writes message i's header; keep() remembers them
    all, and restore(first, k) puts back what recvmmsg changed
    (msg_controllen, msg_len) or a send packed anew."""

    def __init__(self, c, name_room=0, room=0, iovecs=BURST):
        self.raw = (c.c_char * (BURST * MMSGHDR.size))()
        self.bytes = memoryview(self.raw).cast("B")
        self.names = (c.c_char * (BURST * name_room or 1))()
        self.controls = (c.c_char * (BURST * room or 1))()
        self.iovs = (c.c_char * (2 * WORD * iovecs))()
        self.names_at, self.controls_at, self.iovs_at, first = map(
            c.addressof, (self.names, self.controls, self.iovs, self.raw))
        self.name_bytes = memoryview(self.names).cast("B")
        self.iov_words = memoryview(self.iovs).cast("B").cast(WORD_CODE)
        self.pointers = [c.c_void_p(first + i * MMSGHDR.size)
                         for i in range(BURST)]

    def set(self, i, name, namelen, iov, iovlen, control, controllen):
        MMSGHDR.pack_into(self.raw, i * MMSGHDR.size, name, namelen, iov,
                          iovlen, control, controllen, 0, 0)

    def keep(self):
        self.pristine = memoryview(bytes(self.bytes))

    def restore(self, first, k):
        span = slice(first * MMSGHDR.size, (first + k) * MMSGHDR.size)
        self.bytes[span] = self.pristine[span]

    def lengths(self, first, k):
        return LENGTHS[k].unpack_from(self.bytes, first * MMSGHDR.size)

    def controllens(self, first, k):
        return CONTROLLENS[k].unpack_from(self.bytes, first * MMSGHDR.size)


def reads(c, base, name_size=0, room=0):
    """Headers for recvmmsg into buf's slots (buf at base): message q reads
    into slot q, its source's name and its control messages beside."""
    heads = Headers(c, name_size, room)
    IOVECS[BURST].pack_into(heads.iovs, 0, *[
        x for q in range(BURST) for x in (base + q * SLOT + HEADROOM,
                                          MAX_DATAGRAM)])
    for i in range(BURST):
        heads.set(i, heads.names_at + i * name_size if name_size else 0,
                  name_size, heads.iovs_at + i * 2 * WORD, 1,
                  heads.controls_at + i * room if room else 0, room)
    heads.keep()
    return heads


class TrainsOut:
    """The UDP_SEGMENT policy of one I/O: how many datagrams a message may
    carry to a destination, and what a refusal means.  On where the main
    socket reads trains (a kernel that gives them takes them); EIO or EINVAL
    turns trains off for good, said once; EMSGSIZE (the path MTU) makes
    that destination's trains of that size and more go one by one."""

    def __init__(self, on, notice, counts):
        self.on, self.notice, self.counts = on, notice, counts
        self.too_big = Bounded()        # destination -> a refused size

    def most(self, dest, size):
        if not self.on or size >= self.too_big.get(dest, MAX_DATAGRAM):
            return 1
        return max(1, min(TRAIN_OUT, MAX_TRAIN_BYTES // size))

    def refused(self, dest, size, error):
        """A train refused: whether its datagrams should go singly."""
        if error.errno == errno.EMSGSIZE:
            self.counts["trains_refused"] += 1
            self.too_big[dest] = size
            return True
        if error.errno in (errno.EIO, errno.EINVAL):
            self.counts["trains_refused"] += 1
            if self.on:
                self.on = False
                self.notice("The kernel refuses UDP trains (%s): sending "
                            "datagrams one by one from now on" % error)
            return True
        return False


class Outbox:
    """A queue of messages for sendmmsg on one socket, and its flush.

    push(start, length, dest, where, shape=None) is the one way in: it
    sends a full queue first, so the queue never holds more than its BURST
    headers.  A message goes to dest (a key; on a channel's Outbox, whose
    fd is set before each flush, the channel), `where` names it to
    report(), and it is either a lone datagram at buf[start:start +
    length] (buf at `base`) or, with shape, (iovecs, segment size or 0,
    datagrams): iovecs a flat list of pointers and lengths, the segment
    size that of a train.  Lone datagrams alone leave with the headers
    made in advance (names and, with local replies, each key's pktinfo
    from one slot); a queue with shapes packs each message's header.  What
    the kernel refuses: send_rest()."""

    LONE = (None, 0, 1)

    def __init__(self, io, fd, name_size, local, send_one, view=None):
        self.c, self.sendmmsg, self.report = io.c, io.libc.sendmmsg, io.report
        self.fd, self.local, self.trains = fd, local, io.trains_out
        self.send_one = send_one    # (data, dest, where): one datagram now
        self.view, self.base = view, io.base    # io.buf: what is sent
        self.tags_at = io.tags_at               # every tag's two bytes
        self.pairs, self.dests, self.wheres, self.shapes = [], [], [], {}
        # A key: name, then with local replies its control message; the
        # lone datagrams' headers take it from one slot, a train's copies
        # that control message before its UDP_SEGMENT.
        self.name_size, self.pktinfo = name_size, (
            0 if local is None else local.space)
        self.key_size = name_size + (0 if local is None else len(local.tail))
        self.heads = heads = Headers(io.c, self.key_size, self.pktinfo
                                     + SEGMENT_CMSG.size, BURST * 2 * TRAIN_OUT)
        for i in range(BURST):
            name = heads.names_at + i * self.key_size
            heads.set(i, name, name_size, heads.iovs_at + 2 * WORD * i, 1,
                      name + self.key_size - self.pktinfo if self.pktinfo
                      else 0, self.pktinfo)
        heads.keep()
        self.push = self._pusher(io.base)

    def _pusher(self, base):
        """push(), a closure over the queue's lists: it runs per datagram."""
        pairs, dests, wheres, shapes, flush = self.pairs, self.dests, \
            self.wheres, self.shapes, self.flush

        def push(start, length, dest, where, shape=None):
            if len(dests) == BURST:
                flush()
            if shape is not None:
                shapes[len(dests)] = shape
            pairs.extend((base + start, length))
            dests.append(dest)
            wheres.append(where)
        return push

    def push_train(self, start, n, size, dest, where, tag=None):
        """Queue the train of `size`-byte datagrams at buf[start:start + n]
        (the last may be shorter): with tag, each after that tag (two
        iovecs a datagram, the tag from the table at tags_at), with tag
        None each without its first TAG_SIZE bytes (one; a run of one goes
        as a lone datagram, and an empty last one alone: no segment is
        empty).  In messages of as many datagrams as TrainsOut allows."""
        count = -(-n // size)
        last, first = n - (count - 1) * size, self.base + start
        if tag is not None:
            flat = [self.tags_at + TAG_SIZE * tag, TAG_SIZE, 0, size] * count
            flat[2::4] = range(first, first + count * size, size)
            flat[-1], pieces, size = last, 2, size + TAG_SIZE
        elif count == 1:
            self.push(start + TAG_SIZE, n - TAG_SIZE, dest, where)
            return
        else:
            flat = [0, size - TAG_SIZE] * count
            flat[0::2] = range(first + TAG_SIZE,
                               first + TAG_SIZE + count * size, size)
            flat[-1], pieces, size = last - TAG_SIZE, 1, size - TAG_SIZE
        self.push_run(flat, pieces, size, count, dest, where)

    def push_run(self, flat, pieces, size, count, dest, where):
        """Queue count datagrams of `size` bytes (the last may be shorter,
        or empty with pieces 1: it goes alone), each made of `pieces`
        iovecs of flat, in messages that TrainsOut allows."""
        most, step = self.trains.most(dest, size), 2 * pieces
        whole = count - 1 if pieces == 1 and not flat[-1] else count
        for j in range(0, whole, most):
            n = min(most, whole - j)
            self.push(0, 0, dest, where, (flat[j * step:(j + n) * step],
                                          size if n > 1 else 0, n))
            self.trains.counts["trains_out"] += n > 1
        if whole < count:
            self.push(0, 0, dest, where, (flat[-2:], 0, 1))

    def iovecs(self, i):
        """Message i's iovecs: a flat list of pointers and lengths."""
        shape = self.shapes.get(i)
        return self.pairs[2 * i:2 * i + 2] if shape is None else shape[0]

    def flush(self):
        queued = len(self.dests)
        if not queued:
            return
        if self.shapes or not self.key_size:    # or a channel's: no names
            self.send_shaped(queued)
        elif queued == 1 and self.view is not None:   # half the cost of a
            at = self.pairs[0] - self.base          # sendmmsg of one
            self.send_one(self.view[at:at + self.pairs[1]], self.dests[0],
                          self.wheres[0])
        else:
            IOVECS[queued].pack_into(self.heads.iovs, 0, *self.pairs)
            self.heads.name_bytes[:queued * self.key_size] = \
                b"".join(self.dests)
            sent = self.sendmmsg(self.fd, self.heads.pointers[0], queued,
                                 MmsgIO.MSG_DONTWAIT, None)
            if sent != queued:
                self.send_rest(sent)
        del self.pairs[:], self.dests[:], self.wheres[:]

    def send_shaped(self, queued):
        """Pack each message's header: its iovecs in the flat array, its
        name, its controls (the key's pktinfo, a train's UDP_SEGMENT)."""
        heads, key_size, pktinfo = self.heads, self.key_size, self.pktinfo
        space = pktinfo + SEGMENT_CMSG.size     # a train's controls
        pairs, dests, shapes, raw = self.pairs, self.dests, self.shapes, \
            heads.raw
        names, controls = heads.name_bytes, heads.controls
        flat, lone = [], self.LONE
        for i in range(queued):
            iovecs, size, _ = shapes.get(i, lone)
            if iovecs is None:
                iovecs = pairs[2 * i:2 * i + 2]
            name = control = controllen = 0
            if key_size:            # else a channel: connected, no name
                name = heads.names_at + i * key_size
                names[i * key_size:(i + 1) * key_size] = dests[i]
                if pktinfo:
                    control, controllen = name + key_size - pktinfo, pktinfo
            if size:                # the key's pktinfo, then UDP_SEGMENT
                ctl = i * space
                if controllen:
                    controls[ctl:ctl + pktinfo] = dests[i][key_size - pktinfo:]
                else:
                    ctl += pktinfo
                SEGMENT_CMSG.pack_into(controls, i * space + pktinfo,
                                       SEGMENT_CMSG_LEN, SOL_UDP, UDP_SEGMENT,
                                       size)
                control, controllen = heads.controls_at + ctl, \
                    (i + 1) * space - ctl
            MMSGHDR.pack_into(raw, i * MMSGHDR.size, name,
                              self.name_size if name else 0,
                              heads.iovs_at + WORD * len(flat),
                              len(iovecs) // 2, control, controllen, 0, 0)
            flat += iovecs
        heads.iov_words[:len(flat)] = array.array(WORD_CODE, flat)
        sent = self.sendmmsg(self.fd, heads.pointers[0], queued,
                             MmsgIO.MSG_DONTWAIT, None)
        if sent != queued:
            self.send_rest(sent)
        heads.restore(0, queued)
        shapes.clear()

    def send_rest(self, sent):
        """After a sendmmsg that sent less than all, message by message:
        a full buffer loses all that is left; a source address the kernel
        refuses, or a train it refuses (TrainsOut), is sent again datagram
        by datagram by send_one(); anything else is lost.  Losses are
        reported a datagram each."""
        queued, done = len(self.dests), 0
        while True:
            if sent > 0:
                done += sent
            else:
                err = self.c.get_errno()
                error = OSError(err, os.strerror(err))
                size = self.shapes.get(done, self.LONE)[1]
                dest, end = self.dests[done], done + 1
                source = self.local is not None \
                    and self.local.refuses(dest, err)
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    end = queued
                elif source or size and self.trains.refused(dest, size,
                                                            error):
                    self.one_by_one(done, size, source)
                    done = end
                for i in range(done, end):
                    for _ in range(self.shapes.get(i, self.LONE)[2]):
                        self.report(self.wheres[i], error)
                done = end
            if done >= queued:
                return
            sent = self.sendmmsg(self.fd, self.heads.pointers[done],
                                 queued - done, MmsgIO.MSG_DONTWAIT, None)

    def one_by_one(self, i, size, source=False):
        """The datagrams of queued message i singly: a train refused, or
        (source) a message the kernel refused for its source address (size
        0: a lone datagram).  A train refused so, whose datagrams then
        leave from that address, was refused as a train after all."""
        counts = self.trains.counts
        iovecs = self.iovecs(i)
        data = b"".join(map(self.c.string_at, iovecs[0::2], iovecs[1::2]))
        moved = counts.get("sources_refused", 0)
        for start in range(0, len(data), size) if size else (0,):
            self.send_one(data[start:start + size] if size else data,
                          self.dests[i], self.wheres[i])
        if size:
            counts["sent_one_by_one"] += 1
            if source and counts.get("sources_refused", 0) == moved:
                self.trains.refused(self.dests[i], size, OSError(
                    errno.EINVAL, os.strerror(errno.EINVAL)))


class ChannelGro:
    """The UDP_GRO policy of a client's channels.

    Reading with UDP_GRO costs a channel half a microsecond a read
    (recvmmsg against recv_into), so it is on only where trains are
    likely: when the server sends a train for the channel (its connectee
    sends them), or a busy read finds datagrams of one size (the real
    server sends runs, which the kernel hands over as one train with it).
    TRIAL_READS reads without a train turn it off again, unless something
    waits then (it may be a train, readable only with UDP_GRO on)."""

    def __init__(self, on):
        self.on = on
        self.left = {}      # channel with UDP_GRO on -> reads left without

    def start(self, chan):
        if self.on and chan not in self.left and enable_gro(chan):
            self.left[chan] = TRIAL_READS

    def read(self, chan, trains):
        """A read of chan with UDP_GRO on brought trains, or none."""
        left = self.left[chan] = TRIAL_READS if trains else \
            self.left[chan] - 1
        if left:
            return
        try:
            chan.setsockopt(SOL_UDP, UDP_GRO, 0)
            chan.recv(1, socket.MSG_PEEK | MmsgIO.MSG_DONTWAIT)
        except BlockingIOError:         # nothing waits: off
            del self.left[chan]
            return
        except OSError:
            pass
        enable_gro(chan)
        self.left[chan] = TRIAL_READS


class MmsgIO(PortableIO):
    """PortableIO on Linux: recvmmsg and sendmmsg through ctypes, and UDP
    trains (GRO in, GSO out) where the kernel has them.

    Sources and destinations are raw sockaddr bytes here (with local
    replies, followed by a reply's pktinfo: LocalReplies): cheaper to make,
    hash and send to.  Every call is made with MSG_DONTWAIT, except that
    after wait_in_receive() receive() waits in recvmmsg for the first
    datagram.  Sockets are non-blocking, as udp_socket() makes them, or
    blocking without a timeout.
    """

    MSG_DONTWAIT = 0x40
    MSG_WAITFORONE = 0x10000
    SEND_FLAGS = MSG_DONTWAIT       # the socket may be blocking

    def __init__(self, sock, report, ctypes, libc, notice=None,
                 reply_from_local=False, trains_in=True, counts=None):
        PortableIO.__init__(self, sock, report, notice, counts)
        self.c, self.libc, self.fd = ctypes, libc, sock.fileno()
        # On a wildcard bind, with reply_from_local: sources are keyed by
        # the local address too, and replies leave from it (LocalReplies).
        self.local = LocalReplies.of(sock) if reply_from_local else None
        gro = trains_in and enable_gro(sock)
        self.gro = gro          # this socket reads trains (never changes)
        self.trains_out = TrainsOut(gro, self.notice, self.counts)
        self.addresses = Bounded()      # dest key -> sockaddr tuple
        # A socket's peers all have one sockaddr size: sockaddr_in for IPv4,
        # sockaddr_in6 (IPv4-mapped included) for IPv6.
        self.name_size = 28 if sock.family == socket.AF_INET6 else 16
        self.base = ctypes.addressof(
            (ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        # Every tag's two bytes, for gather iovecs: tag t at 2 * t.
        self.tag_table = (ctypes.c_char * (2 * (MAX_TAG + 1))).from_buffer_copy(
            struct.pack(">%dH" % (MAX_TAG + 1), *range(MAX_TAG + 1)))
        self.tags_at = ctypes.addressof(self.tag_table)
        self.outbox = Outbox(self, self.fd, self.name_size, self.local,
                             self.send_now, self.view)
        self.channels = Channels(self, ChannelGro(gro))
        # Per datagram and per burst, no call between.
        self.send, self.send_train = self.outbox.push, self.outbox.push_train
        self.send_on, self.send_train_on, self.forward = (
            self.channels.send_on, self.channels.send_train,
            self.channels.forward)
        self.receive = self._receiver(libc.recvmmsg, self.MSG_DONTWAIT)

    def _receiver(self, read, flags):
        """receive() over read(fd, msgs, BURST, flags, None)."""
        c, fd, report, local = self.c, self.fd, self.report, self.local
        room = (GRO_ROOM if self.gro else 0) \
            + (0 if local is None else local.space)
        # self.reads keeps the C buffers alive that these headers point to
        self.reads = heads = reads(c, self.base, self.name_size, room)
        first, names, controls = heads.pointers[0], heads.names, heads.controls
        # Per burst, one struct call each for lengths, names and control
        # lengths, and one slice assignment puts the headers back.
        head_bytes, sources_of = heads.bytes, repeated("%ds" % self.name_size)
        spans = [slice(0, k * MMSGHDR.size) for k in range(BURST + 1)]
        pristines = [heads.pristine[span] for span in spans]
        plain = 0       # a message's control messages without a train's
        if local is not None:
            plain = local.space
            locals_of = repeated("%ds%dx" % (local.space, room - local.space))
            add, replies = bytes.__add__, local.__getitem__
        plains = [(plain,) * k for k in range(BURST + 1)]   # no train then
        outbox, chan_out, no_trains = self.outbox, self.channels.out, \
            self.NO_TRAINS

        def receive():
            if outbox.dests or chan_out.dests:      # they point into slots
                self.flush()
            k = read(fd, first, BURST, flags, None)
            if k < 0:
                err = c.get_errno()
                if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    report("receive", OSError(err, os.strerror(err)))
                return (), (), (), no_trains
            lengths = LENGTHS[k].unpack_from(head_bytes)
            sources = sources_of[k].unpack_from(names)
            if not room:
                return PLAIN_ATS, lengths, sources, no_trains
            controllens = CONTROLLENS[k].unpack_from(head_bytes)
            head_bytes[spans[k]] = pristines[k]
            if local is not None:
                sources = list(map(add, sources, map(
                    replies, locals_of[k].unpack_from(controls))))
            if controllens == plains[k]:
                return PLAIN_ATS, lengths, sources, no_trains
            return self.mark(lengths, sources, controls, controllens, plain,
                             room)
        return receive

    def mark(self, lengths, sources, controls, controllens, plain, room):
        """What a read with trains brought: (ats, lengths, sources,
        trains).  Each message had `room` bytes of controls: a train's
        UDP_GRO first, and with local replies the pktinfo (`plain` bytes)
        after it.  Only a message whose controls are longer than `plain`
        has one: bytes past a message's length are an earlier read's."""
        trains, local = {}, self.local
        for i in range(len(lengths)):
            size = controllens[i] > plain and gro_segment(controls, i * room)
            if not size:
                continue
            if local is not None:   # its pktinfo follows: the source anew
                at = i * room + GRO_ROOM
                sources[i] = sources[i][:self.name_size] + local[bytes(
                    controls[at:at + local.space])]
            if lengths[i] > size:
                trains[PLAIN_ATS[i]] = size
                self.counts["trains_in"] += 1
        return PLAIN_ATS[:len(lengths)], lengths, sources, trains

    def send_now(self, data, dest, where, chan=None):
        try:
            if chan is not None:
                chan.send(data, self.MSG_DONTWAIT)
            elif self.local is None:
                self.sock.sendto(data, self.MSG_DONTWAIT,
                                 self.addresses.get(dest) or self.sockaddr(
                                     dest))
            else:
                self.sock.sendmsg([data], self.local.ancillary(dest),
                                  self.MSG_DONTWAIT, self.sockaddr(dest))
        except OSError as e:
            if chan is None and self.local is not None \
                    and self.local.refuses(dest, e.errno):
                self.from_any(data, dest, where)
            else:
                self.report(where, e)

    def from_any(self, data, dest, where):
        """The kernel refuses dest's local address as a source: data
        leaves from its choice, counted (sources_refused), said once."""
        if not self.local.refused:
            self.local.refused = True
            self.notice("The kernel refuses to send from %s (no longer "
                        "local, or local by a route alone on an old "
                        "kernel): replies leave from its choice of address "
                        "instead, counted in sources_refused"
                        % self.local.address(dest))
        self.counts["sources_refused"] += 1
        self.send_now(data, self.key_of(self.sockaddr(dest)), where)


    def flush(self):
        self.channels.out.flush()
        self.outbox.flush()

    def end_round(self):
        """A selector round ends: what the channels brought leaves."""
        self.channels.round += 1
        self.outbox.flush()

    def forget(self, chan):
        """The client closes chan: what waits for it leaves first."""
        self.channels.forget(chan)

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

    def local_address(self, key):
        """The local address a source sent to: its IP text where the
        socket knows it (a wildcard bind), else None."""
        return None if self.local is None else self.local.address(key)

    def sockaddr(self, dest):
        """The sockaddr tuple of a destination key, remembered."""
        addr = self.addresses.get(dest)
        if addr is None:
            addr = self.addresses[dest] = self.address(dest)
        return addr

    def key_of(self, addr):
        """sockaddr tuple -> the key receive() gives: the sockaddr bytes,
        and with local replies the pktinfo of a reply from whichever
        address the kernel chooses."""
        key = sockaddr_bytes(addr)
        return key if self.local is None else key + self.local.any_for(
            addr[0].split("%")[0])

    address = staticmethod(sockaddr_tuple)


class Channels:
    """A client's channels in MmsgIO: connected sockets, no names.

    forward() reads what one has into the free slots of io.buf, from
    `filled` on while the main Outbox holds what they brought, and sends
    it on to the server.  A channel readable in two selector rounds in a
    row (`round`, `seen`) is busy and read with one recvmmsg.
    What the server sends a channel: trains wait in `out`, the Outbox of
    one channel at a time (`chan`), and leave by one sendmmsg when the
    burst ends (io.flush()) or another channel's train comes; a lone
    datagram goes at once, unless its channel has trains waiting: then it
    waits behind them, so that a channel's datagrams keep their order.
    UDP_GRO on channels: ChannelGro."""

    def __init__(self, io, gro):
        self.io, self.gro = io, gro
        self.reads = reads(io.c, io.base, 0, GRO_ROOM)
        self.out = Outbox(io, None, 0, None, lambda data, chan, where:
                          io.send_now(data, None, where, chan))
        self.chan = None        # the channel whose datagrams `out` holds
        self.filled, self.round, self.seen = 0, 0, {}

    def send_on(self, chan, start, length, where):
        """A lone datagram for chan, at buf[start:start + length]."""
        if self.chan is chan and self.out.dests:
            self.out.push(start, length, chan, where)
            return
        try:
            chan.send(self.io.view[start:start + length],
                      MmsgIO.MSG_DONTWAIT)
        except OSError as e:
            self.io.report(where, e)

    def send_train(self, chan, start, n, size, where):
        """A train for chan, tags left out: it waits in `out`."""
        if n <= size:
            self.send_on(chan, start + TAG_SIZE, n - TAG_SIZE, where)
            return
        if chan not in self.gro.left:
            self.gro.start(chan)        # its connectee sends trains
        if self.chan is not chan:
            self.out.flush()
            self.chan, self.out.fd = chan, chan.fileno()
        self.out.push_train(start, n, size, chan, where)

    def forward(self, chan, tag, dest, where):
        """Read what a channel has and send it on to dest (a key), each
        datagram with tag before it: (datagrams, bytes) read.

        A lone datagram goes at once.  A channel readable in two selector
        rounds in a row is busy: one recvmmsg reads what waits, up to the
        slots free, and it leaves as trains where it can, in the outbox.
        One with UDP_GRO on (ChannelGro) that is not busy is read by one
        recvmsg: a datagram, or a train."""
        io = self.io
        if self.out.dests:      # trains for channels point into slots too
            self.out.flush()
        q = self.filled if io.outbox.dests else 0
        if q == BURST:
            io.outbox.flush()
            q = 0
        busy = self.seen.get(chan) == self.round - 1
        self.seen[chan] = self.round
        trial = chan in self.gro.left
        if not busy and not trial:
            return self.send_lone(chan.recv_into(io.slots[q], MAX_DATAGRAM),
                                  q, tag, dest, where)
        if not busy:            # one datagram or train, as cheap as can be
            n, ancillary, _, _ = chan.recvmsg_into([io.slots[q]], GRO_ROOM)
            size = gro_size(*ancillary[0]) if ancillary else 0
            self.gro.read(chan, size)
            if not n > size > 0:
                return self.send_lone(n, q, tag, dest, where)
            io.counts["trains_in"] += 1
            self.filled = q + 1
            return self.send_tagged(chan, q, (n,), (size,), tag, dest,
                                    where), n
        heads = self.reads
        k = io.libc.recvmmsg(chan.fileno(), heads.pointers[q], BURST - q,
                             MmsgIO.MSG_DONTWAIT, None)
        if k < 0:
            err = io.c.get_errno()
            raise OSError(err, os.strerror(err))
        lengths = heads.lengths(q, k)
        sizes = [0] * k
        controllens = heads.controllens(q, k)
        if trial and max(controllens):
            sizes = [n and gro_segment(heads.controls, (q + i) * GRO_ROOM)
                     for i, n in enumerate(controllens)]
            io.counts["trains_in"] += sum(
                n > size > 0 for n, size in zip(lengths, sizes))
        heads.restore(q, k)
        if trial:
            self.gro.read(chan, any(sizes))
        if k == 1 and not sizes[0]:     # not busy after all: recv next
            self.seen[chan] = -2
            return self.send_lone(lengths[0], q, tag, dest, where)
        self.filled = q + k     # taken until the outbox leaves
        return self.send_tagged(chan, q, lengths, sizes, tag, dest, where), \
            sum(lengths)

    def send_lone(self, n, q, tag, dest, where):
        """The datagram of n bytes read into slot q goes at once, tagged."""
        at, io = PLAIN_ATS[q], self.io
        TAG.pack_into(io.buf, at, tag)
        io.send_now(io.view[at:at + TAG_SIZE + n], dest, where)
        return 1, n

    def send_tagged(self, chan, q, lengths, sizes, tag, dest, where):
        """Queue what a channel read into slots q... (trains with their
        segment sizes) for dest, tag before each datagram: as one train
        where all are lone and their sizes allow.  How many datagrams."""
        io, k, size = self.io, len(lengths), lengths[0]
        if any(sizes):
            count = 0
            for at, n, seg in zip(PLAIN_ATS[q:q + k], lengths, sizes):
                if seg and n > seg:
                    io.send_train(at + TAG_SIZE, n, seg, dest, where, tag)
                    count += train_length(n, seg)
                else:
                    TAG.pack_into(io.buf, at, tag)
                    io.send(at, TAG_SIZE + n, dest, where)
                    count += 1
            return count
        at, end = PLAIN_ATS[q], PLAIN_ATS[q] + k * SLOT
        buf = io.buf          # the tags in place, a byte at a time
        buf[at:end:SLOT] = bytes((tag >> 8,)) * k
        buf[at + 1:end:SLOT] = bytes((tag & 0xFF,)) * k
        if lengths[:-1].count(size) == k - 1 and 0 < lengths[-1] <= size:
            flat = [0, 0] * k
            flat[0::2] = range(io.base + at, io.base + end, SLOT)
            flat[1::2] = map(TAG_SIZE.__add__, lengths)
            io.outbox.push_run(flat, 1, size + TAG_SIZE, k, dest, where)
            self.gro.start(chan)        # a run of one size: trains likely
        else:
            for at, n in zip(PLAIN_ATS[q:q + k], lengths):
                io.send(at, TAG_SIZE + n, dest, where)
        return k

    def forget(self, chan):
        if self.chan is chan:
            self.out.flush()
            self.chan = None
        self.gro.left.pop(chan, None)
        self.io.trains_out.too_big.pop(chan, None)
        self.seen.pop(chan, None)


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

    def refuses(self, key, err):
        """Whether a send to key failed for the local address it leaves
        from: EINVAL with one named (see the class's docstring)."""
        return err == errno.EINVAL and self.address(key) is not None

    def ancillary(self, key):
        """sendmsg's control messages for a datagram to key."""
        return [(self.level, self.kind,
                 key[self.data_at:self.data_at + self.size])]


def burst_io(sock, report, portable=False, notice=None,
             reply_from_local=False, trains_in=True, counts=None):
    """MmsgIO where the platform has it (unless portable), else PortableIO.
    reply_from_local, trains_in: see MmsgIO and LocalReplies."""
    mmsg = None if portable else _load_mmsg()
    if mmsg is None:
        return PortableIO(sock, report, notice, counts)
    return MmsgIO(sock, report, *mmsg, notice=notice,
                  reply_from_local=reply_from_local, trains_in=trains_in,
                  counts=counts)


# ---------------------------------------------------------------- the server

# What the server was doing (the `where` of an error) -> its counter.
SERVER_ERRORS = {"receive": "err1", "reply": "err2",
                 "send to a connectee": "err3",
                 "tag and send to the client": "err4"}


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

    def report(where, exc):
        stats[SERVER_ERRORS[where]] += 1
        log_socket_error(log, where, exc)

    io = burst_io(sock, report, portable, lambda text: log(text, WARN),
                  reply_from_local=True, trains_in=not proxy_protocol,
                  counts=stats)
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
                io.send_now(pack_stats(stats), src, "reply")
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
                            src, "reply")
                return True
            stats["auth_completeds"] += 1
            client = src
            log("New client address: %s" % format_addr(address(src)))
        stats["last_ka_s"] = now
        # A client with --proxy-protocol asks whether the headers are
        # added, with a challenge: only it ever hears this answer.
        challenge = proxy_protocol and claims.get("proxy")
        io.send_now(sign(key, proxy_claims(challenge)) if _u64(challenge)
                    else registered, src, "reply")
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
    TO_CONNECTEE = "send to a connectee"
    TO_CLIENT = "tag and send to the client"
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
        PortableIO): (datagrams in, bytes in, datagrams out, bytes out)."""
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
                data = at + TAG_SIZE        # where the datagram starts
                if buf.startswith(TOKEN_PREFIX, data, data + n) \
                        and on_signed(view[data:data + n], src):
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
                tag = buf[at + TAG_SIZE] << 8 | buf[at + TAG_SIZE + 1]
                dest = address_of(tag)
                if dest is not None:
                    touch(tag)
                else:
                    dest = connectee_of(tag)    # its first reply, or none
                    if dest is None:
                        continue
                msgs_out += 1
                bytes_out += n
                send(at + 2 * TAG_SIZE, n - TAG_SIZE, dest, TO_CONNECTEE)
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
                send(at, TAG_SIZE + n, client, TO_CLIENT)
            else:               # a lone datagram: room enough before it
                prefix = prefixes[tag]
                start = at + TAG_SIZE - len(prefix)
                buf[start:at + TAG_SIZE] = prefix
                send(start, n + len(prefix), client, TO_CLIENT)
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
            io.send_train(start, n, size, client, TO_CLIENT, tag)
            return train_length(n, size), n, 0, 0
        msgs_out = bytes_out = 0                        # client -> connectees
        for first, length, tag in tag_runs(buf, start, n, size):
            dest = connectee_of(tag, train_length(length, size))
            if dest is None:
                continue
            msgs_out += train_length(length, size)
            bytes_out += length
            io.send_train(first, length, size, dest, TO_CONNECTEE)
        return 0, 0, msgs_out, bytes_out

    def relay_burst():
        """Receive and relay one burst: how many datagrams came in."""
        burst = io.receive()
        msgs_in, bytes_in, msgs_out, bytes_out = relay(*burst)
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
        return len(burst[1])

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


class LoopGuard:
    """Whether the datagram a new channel is opened for goes round a loop
    (-c leading back to the server): then the client drops it.

    The same first datagram on LOOP_LAPS new channels, each within
    LOOP_WINDOW seconds of the last, and none answered since (the client
    clears `firsts` when a real server answers), is suspect: a random
    probe goes to -c from a fresh socket.  Back from the server as a new
    connectee, the loop is certain, and for LOOP_WINDOW whatever comes
    round again is dropped, which ends it.  A flood of one payload is
    only suspect."""

    def __init__(self, family, real_server, stats, log):
        self.family, self.real_server = family, real_server
        self.stats, self.log = stats, log
        self.firsts = collections.OrderedDict()     # hash -> (laps, when)
        self.probe, self.probe_sent, self.seen = None, 0.0, -LOOP_WINDOW

    def looped(self, first):
        now, first = time.monotonic(), bytes(first)
        if first == self.probe:
            self.probe, self.seen = None, now
            self.stats["loops_broken"] += 1
            self.log.limited("loop", "Datagrams sent to %s come back from "
                             "the server as new connectees: -c leads back "
                             "to the server (a loop); dropping what comes "
                             "round" % format_addr(self.real_server), WARN)
            return True
        digest = hash(first)
        laps, when = self.firsts.pop(digest, (0, now))
        laps = laps + 1 if now - when < LOOP_WINDOW else 1
        if len(self.firsts) >= 64:
            self.firsts.popitem(last=False)
        self.firsts[digest] = (laps, now)
        if laps > 1 and now - self.seen < LOOP_WINDOW:
            return True
        if laps % LOOP_LAPS == 0 and now - self.probe_sent >= LOOP_WINDOW:
            self.probe, self.probe_sent = os.urandom(16), now
            try:
                with socket.socket(self.family, socket.SOCK_DGRAM) as fresh:
                    fresh.sendto(self.probe, self.real_server)
            except OSError:
                pass
        return False


class ServerLookup:
    """Where the client's server is, when -a names it by a host name: that
    name looked up again every `every` seconds (sooner when due is set),
    in a helper thread, so that the loop never waits.  Until a first
    answer, tries come after 1, 2, 4 ... seconds.  start(now) begins a
    lookup when one is due; took() whether one found the server, or found
    it moved: then `server` is its address tuple (None before)."""

    def __init__(self, server, name, family, resolver, every, log, stats):
        self.server, self.name, self.family = server, name, family
        self.resolver, self.every, self.log, self.stats = \
            resolver, every, log, stats
        self.results = queue.Queue()
        self.running, self.backoff = False, 1.0
        self.due = time.monotonic() + (every if server else self.backoff)

    def start(self, now):
        if self.name is None or self.running or now < self.due:
            return
        self.running, self.due = True, now + self.every

        def work():
            try:
                result = peer_addr(self.family, self.resolver(self.name)[1])
            except (ValueError, OSError) as e:
                result = e
            self.results.put(result)
        threading.Thread(target=work, daemon=True).start()

    def took(self):
        if not self.running:
            return False
        try:
            result = self.results.get_nowait()
        except queue.Empty:
            return False
        self.running, name, old = False, self.name, self.server
        if isinstance(result, Exception):
            if old is not None:
                self.log.limited("resolve", "Cannot resolve %s again, "
                                 "keeping %s: %s" % (name, format_addr(old),
                                                     result), WARN)
                return False
            self.log.limited("resolve", "Cannot resolve %s yet, trying again "
                             "in %d s: %s" % (name, self.backoff, result),
                             WARN)
            self.due = time.monotonic() + self.backoff
            self.backoff = min(2 * self.backoff, MAX_LOOKUP_BACKOFF,
                               self.every)
            return False
        if result == old:
            return False
        if old is None:
            self.log("Server address: %s is %s" % (name, format_addr(result)))
        else:
            self.stats["server_address_changes"] += 1
            self.log("Server address changed: %s -> %s"
                     % (format_addr(old), format_addr(result)))
        self.server = result
        return True


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
        log_socket_error(log, where, exc)

    sel = selectors.DefaultSelector()
    io = burst_io(sock, report, portable, lambda text: log(text, WARN),
                  counts=stats)
    # server: None while server_name has not resolved since the start.
    server_key = None if server is None else io.key_of(server)
    buf, view = io.buf, io.view
    workers = LRU(max_clients)      # tag -> channel socket
    loops = LoopGuard(real_family, real_server, stats, log)
    fd_bound = False                # the open-file limit bounds channels
    bind_to = wildcard(real_family)
    keepalive = sign(key, request_claims()) if key else b""
    period = interval / 1000.0
    next_ping = last_registered = time.monotonic()
    lookup = ServerLookup(server, server_name, sock.family,
                          resolver or resolve, resolve_every, log, stats)
    heard = authenticated = silent = refused = False
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
        if loops.looped(first):
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

    send_on, forward, flush = io.send_on, io.forward, io.flush
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
        msgs, size = relay(*io.receive())
        flush()         # what waits for channels leaves
        if msgs:
            stats["last_server_s"] = int(time.time())
        stats["from_server_msgs"] += msgs
        stats["from_server_bytes"] += size
        if proxy_protocol:
            stats["proxy_headers"] += msgs

    def relay(ats, lengths, sources, trains):
        """Relay what a burst from the server brought (trains: at ->
        segment size, see PortableIO): (datagrams, bytes)."""
        msgs = size = 0
        for at, n, src in zip(ats, lengths, sources):
            if trains and at in trains:
                counts = relay_train(at, n, src, trains[at])
                msgs += counts[0]
                size += counts[1]
                continue
            data = at + TAG_SIZE        # the datagram: a tag, then payload
            if src != server_key:
                stranger(src)
                continue
            if n < TAG_SIZE:
                stats["dwarfs"] += 1
                continue
            if key is not None and buf.startswith(TOKEN_PREFIX, data,
                                                  data + n):
                on_token(view[data:data + n])
                continue
            tag = buf[data] << 8 | buf[data + 1]
            if proxy_protocol and not (
                    adds and proxy_length(buf, data + TAG_SIZE, data + n)):
                malformed()
                continue
            worker = worker_of(tag)
            if worker is not None:
                touch(tag)
            else:
                worker = workers.get(tag) \
                    or open_worker(tag, view[data + TAG_SIZE:data + n])
                if worker is None:
                    continue
            msgs += 1
            size += n
            send_on(worker, data + TAG_SIZE, n - TAG_SIZE, TO_REAL_SERVER)
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
                    tag, view[first + TAG_SIZE:first + min(size, length)])
                if worker is None:
                    continue
            msgs += train_length(length, size)
            relayed += length
            io.send_train_on(worker, first, length, size, TO_REAL_SERVER)
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
            loops.firsts.clear()    # a real server answers: no loop
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

    def moved():
        """The lookup found the server, or found it moved: tell it at
        once; with asking, relay nothing until it says it adds headers."""
        nonlocal server, server_key, next_ping, adds
        if server is not None:
            adds = not asking
        server, server_key = lookup.server, io.key_of(lookup.server)
        next_ping = time.monotonic()

    def timers():
        nonlocal next_ping, silent, challenges, keepalive
        if lookup.took():
            moved()
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
                lookup.due = now            # perhaps it moved
        lookup.start(now)
        due = next_ping if server is not None else lookup.due
        if now >= notify.due:
            notify.tick(status())
        if notify.due < due:
            due = notify.due
        if lookup.running:
            return min(due - now, LOOKUP_POLL)
        return due - now

    def status():
        return "server %s, %s, %s relayed" % (
            server_text(server, server_name),
            plural(len(workers), "channel"),
            plural(stats["from_server_msgs"] + stats["from_real_server_msgs"],
                   "datagram"))

    if server is None:      # systemd need not wait (and restart) for DNS
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
    "trains_in": ("trains_in", "UDP trains read as one (GRO)"),
    "trains_out": ("trains_out", "UDP trains sent, each in messages of "
                   "TRAIN_OUT datagrams at most (GSO)"),
    "trains_refused": ("trains_refused", "Messages of a train the kernel "
                       "refused"),
    "sent_one_by_one": ("sent_one_by_one", "Refused messages sent again "
                        "datagram by datagram"),
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
