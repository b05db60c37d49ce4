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
import collections
import errno
import os
import selectors
import signal
import socket
import sys
import time

__version__ = "0.3.0"

# ---------------------------------------------------------------- constants

MAX_DATAGRAM = 65535      # receive room: no UDP payload is larger
TAG_SIZE = 2
MAX_TAG = 0xFFFF
BURST = 64                # datagrams drained from one socket per wake-up
SOCKET_BUFFER = 1 << 20   # asked of the kernel for SO_RCVBUF / SO_SNDBUF

DEFAULT_MAX_CLIENTS = 4
DEFAULT_PING_INTERVAL_MS = 25000

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


class UsageError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


# ---------------------------------------------------------------- logging

class Log:
    """Event log on stdout, one line per event, flushed at once.

    Lines that strangers can provoke go through limited(): at most BUDGET per
    kind per WINDOW seconds, then one line saying how many were held back.
    """

    BUDGET = 10
    WINDOW = 60.0

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.windows = {}   # kind -> [window start, lines shown, lines held]

    def __call__(self, line):
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass    # a closed or broken stdout must not stop the relay

    def limited(self, kind, line):
        now = time.monotonic()
        w = self.windows.get(kind)
        if w is None or now - w[0] >= self.WINDOW:
            if w is not None and w[2]:
                self("(%d more lines like %r were held back)" % (w[2], kind))
            w = self.windows[kind] = [now, 0, 0]
        if w[1] < self.BUDGET:
            w[1] += 1
            self(line)
        else:
            w[2] += 1


# ---------------------------------------------------------------- addresses

def split_host_port(text):
    """'1.2.3.4:5', '[::1]:5' or 'name:5' -> (host, port).  Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("expected [IPv6]:port in %r" % text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port in %r" % text)
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: [%s]:%s"
                             % (host, port))
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("bad port %r in %r" % (port, text))
    return host, int(port)


def resolve(text, passive=False):
    """Address text -> (family, sockaddr), looked up once."""
    host, port = split_host_port(text)
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM,
                                   socket.IPPROTO_UDP, flags)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError("cannot resolve %r: %s" % (host, e))
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


def udp_socket(family, bind_to):
    """A non-blocking UDP socket bound to bind_to, with roomy buffers."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
        sock.bind(bind_to)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def wildcard(family):
    return ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)


# ---------------------------------------------------------------- tags and the LRU

def tag_bytes(tag):
    return bytes((tag >> 8, tag & 0xFF))


class LRU:
    """A bounded map that forgets its least recently used entry first."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.entries = collections.OrderedDict()

    def __len__(self):
        return len(self.entries)

    def __contains__(self, key):
        return key in self.entries

    def get(self, key):
        """The value for key (now the most recent), or None."""
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key, value):
        """Store key; returns the (key, value) evicted to make room, or None."""
        evicted = None
        if key not in self.entries and len(self.entries) >= self.capacity:
            evicted = self.entries.popitem(last=False)
        self.entries[key] = value
        self.entries.move_to_end(key)
        return evicted


class Connectees:
    """The server's one table of connectees: tag <-> address.

    Both directions live in one structure and evict together, so a reply for
    an active connectee always finds it.  Tags are handed out in sequence
    from 1, wrapping after 65535, and skip the tags still in use.
    """

    def __init__(self, capacity):
        self.addr_of = LRU(capacity)    # tag -> address, in recency order
        self.tag_of = {}                # address -> tag
        self.next_tag = 1

    def __len__(self):
        return len(self.tag_of)

    def lookup(self, tag):
        """The address of tag (now most recent), or None."""
        return self.addr_of.get(tag)

    def tag_for(self, addr):
        """(tag, is_new, evicted_address_or_None) for a connectee address."""
        tag = self.tag_of.get(addr)
        if tag is not None:
            self.addr_of.entries.move_to_end(tag)
            return tag, False, None
        tag = self.next_tag
        while tag in self.addr_of:
            tag = tag % MAX_TAG + 1
        self.next_tag = tag % MAX_TAG + 1
        evicted = self.addr_of.put(tag, addr)
        if evicted is not None:
            del self.tag_of[evicted[1]]
            evicted = evicted[1]
        self.tag_of[addr] = tag
        return tag, True, evicted


# ---------------------------------------------------------------- the event loop

def socket_error(stats, counter, log, where, exc):
    """Tier two of the error rules: count a socket error, log it, go on."""
    if stats is not None:
        stats[counter] += 1
    if exc.errno == errno.EMSGSIZE:
        log.limited(where, "Dropped a datagram too big to %s" % where)
    else:
        log.limited(where, "Socket error (%s): %s" % (where, exc))


def run_loop(sel, timers=None):
    """Dispatch readable sockets to the callables in key.data, forever.

    timers() runs whatever is due and returns the seconds to its next deadline.
    """
    timeout = None
    while True:
        if timers is not None:
            timeout = max(0.0, timers())
        for key, _ in sel.select(timeout):
            key.data()


# ---------------------------------------------------------------- the server

def run_server(sock, max_clients, log, stats=None):
    """Relay between connectees and the client on one socket, forever."""
    if stats is None:
        stats = dict.fromkeys(STAT_NAMES, 0)
    connectees = Connectees(max_clients)
    client = None

    buf = bytearray(TAG_SIZE + MAX_DATAGRAM)
    view = memoryview(buf)
    payload = view[TAG_SIZE:]     # received data lands after the tag's room
    recv_into = sock.recvfrom_into
    sendto = sock.sendto

    def on_readable():
        nonlocal client
        from_client = from_connectee = 0
        for _ in range(BURST):
            try:
                n, src = recv_into(payload, MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                socket_error(stats, "err1", log, "receive", e)
                continue

            if n == 0:                                  # a keepalive
                stats["simple_keepalives"] += 1
                stats["last_ka_s"] = int(time.time())
                if src != client:
                    stats["simple_address_switches"] += 1
                    client = src
                    log("New client address: %s" % format_addr(src))
                continue

            if src == client:                           # client -> connectee
                if n < TAG_SIZE:
                    stats["dwarfs"] += 1
                    log.limited("dwarf", "Too short datagram from client")
                    continue
                tag = buf[2] << 8 | buf[3]
                dest = connectees.lookup(tag)
                if dest is None:
                    stats["ch_not_founds"] += 1
                    log.limited("channel", "Failed to find channel %d" % tag)
                    continue
                from_client += 1
                stats["from_client_bytes"] += n
                try:
                    sendto(view[4:n + 2], dest)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    socket_error(stats, "err3", log, "send to a connectee", e)
                continue

            if client is None:                          # connectee, no client
                stats["dropped_no_client_address"] += 1
                continue
            tag, new, evicted = connectees.tag_for(src)  # connectee -> client
            if new:
                stats["new_connectees"] += 1
                log.limited("connectee", "Connectee seqn %d from %s"
                            % (tag, format_addr(src)))
            buf[0] = tag >> 8
            buf[1] = tag & 0xFF
            from_connectee += 1
            stats["from_connectee_bytes"] += n
            try:
                sendto(view[:n + 2], client)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                socket_error(stats, "err4", log, "tag and send to the client", e)

        if from_client or from_connectee:
            now = int(time.time())
            if from_client:
                stats["from_client_msgs"] += from_client
                stats["last_client_s"] = now
            if from_connectee:
                stats["from_connectee_msgs"] += from_connectee
                stats["last_connectee_s"] = now

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, on_readable)
    run_loop(sel)


# ---------------------------------------------------------------- the client

def run_client(sock, server, real_family, real_server, max_clients,
               interval, log):
    """Keep the NAT open towards `server` and relay for `real_server`, forever."""
    sel = selectors.DefaultSelector()
    workers = LRU(max_clients)      # tag -> worker socket
    buf = bytearray(TAG_SIZE + MAX_DATAGRAM)
    view = memoryview(buf)
    payload = view[TAG_SIZE:]
    sendto = sock.sendto
    bind_to = wildcard(real_family)
    keepalive = b""

    def send_to_server(data, where):
        try:
            sendto(data, server)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            socket_error(None, None, log, where, e)

    def open_worker(tag):
        try:
            worker = udp_socket(real_family, bind_to)
        except OSError as e:
            socket_error(None, None, log, "open a channel socket", e)
            return None
        sel.register(worker, selectors.EVENT_READ,
                     lambda: on_worker_readable(worker, tag))
        evicted = workers.put(tag, worker)
        if evicted is not None:
            sel.unregister(evicted[1])
            evicted[1].close()
        log.limited("channel", "New incoming channel %d" % tag)
        return worker

    def on_server_readable():
        for _ in range(BURST):
            try:
                n, src = sock.recvfrom_into(buf, MAX_DATAGRAM + TAG_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                socket_error(None, None, log, "receive from the server", e)
                continue
            if src != server or n < TAG_SIZE:
                continue                    # strangers and dwarfs
            tag = buf[0] << 8 | buf[1]
            worker = workers.get(tag) or open_worker(tag)
            if worker is None:
                continue
            try:
                worker.sendto(view[2:n], real_server)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                socket_error(None, None, log, "send to the real server", e)

    def on_worker_readable(worker, tag):
        if workers.entries.get(tag) is not worker:
            return          # evicted earlier in this same wake-up
        for _ in range(BURST):
            try:
                n, src = worker.recvfrom_into(payload, MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                socket_error(None, None, log, "receive from the real server", e)
                continue
            if src != real_server:
                continue
            buf[0] = tag >> 8
            buf[1] = tag & 0xFF
            send_to_server(view[:n + 2], "tag and send to the server")

    period = interval / 1000.0
    next_ping = time.monotonic()

    def timers():
        nonlocal next_ping
        now = time.monotonic()
        if now >= next_ping:
            send_to_server(keepalive, "send a keepalive")
            next_ping = now + period
        return next_ping - now

    sel.register(sock, selectors.EVENT_READ, on_server_readable)
    run_loop(sel, timers)


# ---------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit status 2, instead of usage + error."""
        self.exit(2, "udpexposer: %s (see --help)\n" % message)


def build_parser():
    parser = Parser(
        prog="udpexposer.py",
        description="Expose UDP port externally using helper hosts.",
        epilog="Modes: -s (server); -a and -c (client); -S with -a and -P "
               "(print the server's counters).  Addresses are IPv4:port, "
               "[IPv6]:port or, for -a and -c, name:port.")
    parser.add_argument("listen_addr", help="UDP socket address to bind to")
    parser.add_argument("-c", "--local-connect-addr", metavar="ADDR",
                        help="client mode: expose specified UDP socket")
    parser.add_argument("-a", "--server-addr", metavar="ADDR",
                        help="client mode: use specified server")
    parser.add_argument("-s", "--server-mode", action="store_true",
                        help="server mode")
    parser.add_argument("-n", "--max-clients", metavar="N", type=int,
                        default=DEFAULT_MAX_CLIENTS,
                        help="maximum number of clients, LRU-style, 1..65535 "
                             "(default: %(default)s)")
    parser.add_argument("-i", "--ping-interval-ms", metavar="MS", type=int,
                        default=DEFAULT_PING_INTERVAL_MS,
                        help="for client mode, keepalive interval "
                             "(default: %(default)s)")
    parser.add_argument("-P", "--password", metavar="PW",
                        help="pre-shared key / password to protect server "
                             "against unsolicited clients (default: none)")
    parser.add_argument("-S", "--dump-stats", action="store_true",
                        help="ask the server at -a for its counters, print "
                             "them as JSON and exit (needs -P)")
    parser.add_argument("--version", action="version",
                        version="%(prog)s " + __version__)
    return parser


def check_args(args):
    """Raise UsageError for a combination of flags that makes no sense."""
    if not 1 <= args.max_clients <= MAX_TAG:
        raise UsageError("-n/--max-clients must be 1..65535, not %d"
                         % args.max_clients)
    if not 1 <= args.ping_interval_ms <= 86400000:
        raise UsageError("-i/--ping-interval-ms must be 1..86400000, not %d"
                         % args.ping_interval_ms)
    if args.password is not None or args.dump_stats:
        raise UsageError("-P/--password and -S/--dump-stats are not "
                         "implemented yet")
    client = args.server_addr is not None or args.local_connect_addr is not None
    if args.server_mode and client:
        raise UsageError("-s cannot be combined with -a or -c")
    if args.server_mode:
        return "server"
    if args.server_addr is None or args.local_connect_addr is None:
        raise UsageError("choose a mode: -s for server, or -a and -c "
                         "together for client")
    return "client"


def setup(args):
    """Parse addresses and bind the main socket: (mode, sock, extra) or raise."""
    mode = check_args(args)
    try:
        family, listen = resolve(args.listen_addr, passive=True)
        if mode == "client":
            server_family, server = resolve(args.server_addr)
            real_family, real = resolve(args.local_connect_addr)
            server = peer_addr(family, server)
    except ValueError as e:
        raise UsageError(str(e))
    try:
        sock = udp_socket(family, listen)
    except OSError as e:
        raise UsageError("cannot bind %s: %s"
                         % (args.listen_addr, e.strerror or e))
    if mode == "server":
        return mode, sock, None
    return mode, sock, (server, real_family, real)


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        mode, sock, extra = setup(args)
    except UsageError as e:
        print("udpexposer: %s" % e, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    log = Log()
    bound = format_addr(sock.getsockname())
    try:
        if mode == "server":
            log("udpexposer.py %s: server mode on %s, up to %d connectees"
                % (__version__, bound, args.max_clients))
            run_server(sock, args.max_clients, log)
        else:
            server, real_family, real = extra
            log("udpexposer.py %s: client mode on %s, server %s, "
                "exposing %s, up to %d channels"
                % (__version__, bound, format_addr(server),
                   format_addr(real), args.max_clients))
            run_client(sock, server, real_family, real, args.max_clients,
                       args.ping_interval_ms, log)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
