#!/usr/bin/python3
"""The CAN bus of the integration tests: a hub that LD_PRELOAD-shimmed
programs (tests/shim/canshim.c) and the CAN node simulators (can_node.py)
talk to instead of a kernel CAN interface, which CI machines do not have
(testing.md §5).  It keeps the list of CAN interfaces and their up/down
state, forwards frames between clients, drops frames of interfaces that
are down or missing, tells subscribers about interface changes, and
records every frame for assertions.  It does not model bus timing,
arbitration, error frames or bus-off, and never echoes a frame to its
sender (SocketCAN's default without CAN_RAW_RECV_OWN_MSGS).

Mini-protocol
-------------
The hub is an AF_UNIX SOCK_DGRAM socket bound to a path (CANSHIM_HUB; a
leading "@" means the abstract namespace).  A client autobinds its own
datagram socket (bind() with only sun_family), connect()s it to the hub
and sends datagrams; the hub answers to the client's address.

Frames, both directions: a 16-byte NUL-padded interface name followed by
a struct can_frame (16 bytes, datagram of 32) or struct canfd_frame
(72 bytes, datagram of 88), in host byte order.  Every other length is a
control datagram (ASCII, no newline; never 32 or 88 bytes long):

  client -> hub
    REG<ifname>     host socket (the shim): receive frames of <ifname>;
                    "REG" alone: of every interface.  Sent again, it
                    replaces the registration.  Such a client gets
                    "ERR ENETDOWN" when <ifname> goes down, and
                    "ERR ENODEV" when it disappears (and is unregistered),
                    like a bound SocketCAN socket.
    BUS<ifname>     bus device (a simulated node): receive frames of
                    <ifname>; survives the interface going away and
                    coming back, gets no ERR notices.
    FLT <join> [<id>:<mask> ...]
                    the client's CAN_RAW_FILTER set as 8-digit hex
                    struct can_filter values, <join> 1 for
                    CAN_RAW_JOIN_FILTERS; "FLT 0" = no filter (receive
                    nothing).  Without FLT a client receives everything.
    NAME <label>    a label for the hub's records and logs
    BYE             forget this client
    WATCH           subscribe to interface events (below)
  hub -> REG client
    ERR ENETDOWN, ERR ENODEV   (see REG)
  hub -> WATCH client, one event per datagram:
    IFACE <name> up <bitrate>
    IFACE <name> down
    IFACE <name> gone
    SYNC            after WATCH the hub first sends a snapshot (one "up"
                    or "down" line per existing interface), then "SYNC",
                    then every change as it happens.

The daemon's test seam is this WATCH subscription: with
MCUFLASHD_CAN_TEST_HUB=<path> its CAN interface watcher opens such a socket
instead of rtnetlink.  The shim keeps a private WATCH subscription too, so
a program under the shim sees the same interfaces through if_nametoindex(),
SIOCGIFINDEX, bind() and send().  State changes made through CanHub's
methods are sent before the method returns, so a test that calls
hub.set_up("can0", False) can rely on the daemon and the shim having the
event queued.

Use from Python: CanHub(path, ifaces=("can0",)).start() ... .stop(), or
`with CanHub(path) as hub:`.  CanHubClient and HubWatcher are small
clients for tests.  Command line (serves until SIGTERM/SIGINT):
  /usr/bin/python3 tests/sim/canhub.py /tmp/canhub.sock -i can0 -i can1:500000 -v
  (-i NAME[:BITRATE][:down]; --control reads "add NAME [BITRATE]",
  "up NAME [BITRATE]", "down NAME", "remove NAME" lines from stdin)
"""

import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simthread import ThreadedSim  # noqa: E402

HEADER_SIZE = 16
CAN_MTU = 16
CANFD_MTU = 72
CLASSIC_DATAGRAM = HEADER_SIZE + CAN_MTU
FD_DATAGRAM = HEADER_SIZE + CANFD_MTU

CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_INV_FILTER = 0x20000000
CAN_SFF_MASK = 0x000007FF
CAN_EFF_MASK = 0x1FFFFFFF
CAN_ERR_MASK = 0x1FFFFFFF

DEFAULT_BITRATE = 1000000
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
HUB_SNDBUF = 8 * 1024 * 1024

# One recorded frame.  dropped: None (forwarded), "down" or "absent".
Frame = collections.namedtuple("Frame", "time iface can_id data fd sender receivers dropped")


def _frame_str(self):
    return "%s %s" % (self.iface, format_frame(self.can_id, self.data, self.fd))


Frame.__str__ = _frame_str

# A frame as a client receives it.
RxFrame = collections.namedtuple("RxFrame", "iface can_id data fd")


def format_frame(can_id, data, fd=False):
    """cansend/candump notation: 123#DEADBEEF, 12345678#00, 123##0112 (FD)."""
    if can_id & CAN_EFF_FLAG:
        ident = "%08X" % (can_id & CAN_EFF_MASK)
    else:
        ident = "%03X" % (can_id & CAN_SFF_MASK)
    if fd:
        return "%s##0%s" % (ident, bytes(data).hex().upper())
    if can_id & CAN_RTR_FLAG:
        return "%s#R" % ident
    return "%s#%s" % (ident, bytes(data).hex().upper())


def pack_frame(iface, can_id, data, fd=False, fd_flags=0):
    """The datagram of one frame on @iface."""
    data = bytes(data)
    name = iface.encode()
    if len(name) >= HEADER_SIZE:
        raise ValueError("interface name %r too long" % iface)
    if fd:
        if len(data) > 64:
            raise ValueError("CAN FD frame longer than 64 bytes")
        body = struct.pack("=IBBBB64s", can_id, len(data), fd_flags, 0, 0, data)
    else:
        if len(data) > 8:
            raise ValueError("CAN frame longer than 8 bytes")
        body = struct.pack("=IBBBB8s", can_id, len(data), 0, 0, 0, data)
    return name.ljust(HEADER_SIZE, b"\0") + body


def unpack_frame(datagram):
    """RxFrame of a frame datagram, None for a control datagram."""
    if len(datagram) not in (CLASSIC_DATAGRAM, FD_DATAGRAM):
        return None
    iface = datagram[:HEADER_SIZE].split(b"\0", 1)[0].decode(errors="replace")
    can_id, length = struct.unpack_from("=IB", datagram, HEADER_SIZE)
    fd = len(datagram) == FD_DATAGRAM
    length = min(length, 64 if fd else 8)
    data = bytes(datagram[HEADER_SIZE + 8:HEADER_SIZE + 8 + length])
    return RxFrame(iface, can_id, data, fd)


def filters_match(filters, join, can_id):
    """The kernel's CAN_RAW filter rules (same as canshim.c): @filters is a
    list of (can_id, can_mask) or None for the default "everything".  Error
    frames are left to the shim (it knows the error mask)."""
    if filters is None or can_id & CAN_ERR_FLAG:
        return True
    if not filters:
        return False
    matches = 0
    for filter_id, mask in filters:
        if mask & CAN_ERR_FLAG:
            continue
        invert = bool(filter_id & CAN_INV_FILTER)
        if (mask & CAN_EFF_FLAG) and not (filter_id & CAN_EFF_FLAG):
            mask &= CAN_SFF_MASK | CAN_EFF_FLAG | CAN_RTR_FLAG
        filter_id &= mask
        if ((can_id & mask) != filter_id) if invert else ((can_id & mask) == filter_id):
            matches += 1
    return matches == len(filters) if join else matches > 0


def socket_address(path):
    """The AF_UNIX address for a hub path ("@name" = abstract namespace)."""
    return "\0" + path[1:] if path.startswith("@") else path


class _Client:
    def __init__(self, addr):
        self.addr = addr
        self.label = None
        self.kind = None            # "host" (REG), "bus" (BUS) or None
        self.iface = None           # None = not registered, "" = all interfaces
        self.filters = None         # None = everything
        self.join = False
        self.watcher = False
        self.overruns = 0
        self.received = 0

    def name(self):
        if self.label:
            return self.label
        if isinstance(self.addr, bytes):
            return "@" + self.addr[1:].decode(errors="replace")
        return str(self.addr)

    def snapshot(self):
        return {"name": self.name(), "kind": self.kind, "iface": self.iface,
                "filters": None if self.filters is None else list(self.filters),
                "join": self.join, "watcher": self.watcher, "overruns": self.overruns,
                "received": self.received}


class CanHub(ThreadedSim):
    """The hub, serving @path from a thread.

    ifaces  interfaces present from the start, up: names or (name, bitrate)
    log     callable(str) for a line per frame and event, or None
    """

    def __init__(self, path, ifaces=(), log=None):
        if len(socket_address(path).encode()) >= 108:
            raise ValueError("hub socket path %r is too long for AF_UNIX" % path)
        super().__init__()
        self.path = path
        self.log = log
        self.frames = []                        # every Frame, dropped ones included
        self._ifaces = collections.OrderedDict()  # name -> {"up": bool, "bitrate": int}
        self._clients = {}                      # address -> _Client
        self._names = {}                        # address -> name, kept after a client left
        self._sock = None
        for entry in ifaces:
            name, bitrate = (entry, DEFAULT_BITRATE) if isinstance(entry, str) else entry
            self._ifaces[name] = {"up": True, "bitrate": int(bitrate)}

    # -- control ---------------------------------------------------------

    def start(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if not self.path.startswith("@") and os.path.exists(self.path):
            os.unlink(self.path)
        sock.bind(socket_address(self.path))
        sock.setblocking(False)
        # A client that does not read must not make the hub drop frames for
        # everybody else: all queued datagrams count against our send buffer.
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, HUB_SNDBUF)
                break
            except OSError:
                continue
        self._sock = sock
        self._open_wake_pipe()
        self._start_thread("canhub")
        return self

    def stop(self):
        self._stop_thread()
        self._close_wake_pipe()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if not self.path.startswith("@"):
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    # -- interfaces --------------------------------------------------------

    def add_iface(self, name, bitrate=DEFAULT_BITRATE, up=True):
        """Add interface @name (or change its state if it exists)."""
        if not name or len(name.encode()) >= HEADER_SIZE or any(c.isspace() for c in name):
            raise ValueError("bad interface name %r" % name)
        with self.lock:
            old = self._ifaces.get(name)
            self._ifaces[name] = {"up": bool(up), "bitrate": int(bitrate)}
            if old != self._ifaces[name]:
                self._announce(name)
                if old is not None and old["up"] and not up:
                    self._notify_hosts(name, b"ERR ENETDOWN")
            self.lock.notify_all()

    def set_up(self, name, up=True, bitrate=None):
        """Bring @name up or down (KeyError if it does not exist)."""
        with self.lock:
            state = self._ifaces[name]
        self.add_iface(name, state["bitrate"] if bitrate is None else bitrate, up)

    def remove_iface(self, name):
        """Make @name disappear (a USB-CAN adapter unplugged or rebooting)."""
        with self.lock:
            if self._ifaces.pop(name, None) is None:
                raise KeyError(name)
            self._send_watchers("IFACE %s gone" % name)
            self._notify_hosts(name, b"ERR ENODEV")
            for client in self._clients.values():
                if client.kind == "host" and client.iface == name:
                    client.iface = None
            self.lock.notify_all()

    def ifaces(self):
        """{name: {"up": bool, "bitrate": int}} of the present interfaces."""
        with self.lock:
            return {name: dict(state) for name, state in self._ifaces.items()}

    # -- frames --------------------------------------------------------------

    def inject(self, iface, can_id, data, fd=False):
        """Put a frame on @iface as if a bus device had sent it; returns
        the recorded Frame."""
        with self.lock:
            return self._forward(pack_frame(iface, can_id, data, fd), None, "hub")

    def frames_on(self, iface=None, can_id=None, dropped=False):
        """Recorded frames, optionally of one interface and CAN id.
        dropped: False = forwarded ones only, True = dropped ones only,
        None = all."""
        with self.lock:
            return [f for f in self.frames
                    if (iface is None or f.iface == iface)
                    and (can_id is None or f.can_id == can_id)
                    and (dropped is None or (f.dropped is not None) == dropped)]

    def clear(self):
        with self.lock:
            del self.frames[:]

    def clients(self, kind=None):
        """Snapshots (dicts) of the clients, optionally only "host"/"bus"."""
        with self.lock:
            return [c.snapshot() for c in self._clients.values() if kind is None or c.kind == kind]

    def registered(self, iface, kind="host"):
        """How many clients of @kind are registered for @iface ("" = all)."""
        with self.lock:
            return sum(1 for c in self._clients.values() if c.kind == kind and c.iface == iface)

    def watchers(self, include_shim=False):
        """How many WATCH subscribers there are; the private subscriptions
        of shimmed processes (named "canshim-watch ...") only count with
        @include_shim."""
        with self.lock:
            return sum(1 for c in self._clients.values() if c.watcher and
                       (include_shim or not c.name().startswith("canshim-watch")))

    # -- thread ----------------------------------------------------------

    def _debug(self, fmt, *args):
        if self.log:
            self.log("canhub: " + (fmt % args if args else fmt))

    def _run(self):
        poller = self._poller(self._sock.fileno())
        while not self._stopping:
            events = self._poll(poller, 1000)
            if events is None:
                break
            if not events:
                continue
            while True:
                try:
                    datagram, addr = self._sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    self._debug("receive failed: %s", e)
                    break
                with self.lock:
                    self._handle(datagram, addr)
                    self.lock.notify_all()

    def _client(self, addr):
        client = self._clients.get(addr)
        if client is None:
            client = self._clients[addr] = _Client(addr)
        return client

    def _handle(self, datagram, addr):
        if len(datagram) in (CLASSIC_DATAGRAM, FD_DATAGRAM):
            # A client that closed may still have frames queued here.
            sender = self._clients.get(addr) if addr else None
            name = sender.name() if sender else self._names.get(addr, "unnamed") if addr else \
                "unnamed"
            self._forward(datagram, addr or None, name)
            return
        if not addr:
            self._debug("control datagram from an unbound socket ignored: %r", datagram[:40])
            return
        text = datagram.decode(errors="replace").rstrip(" ")
        if text == "BYE":
            client = self._clients.pop(addr, None)
            if client:
                self._debug("%s left", client.name())
        elif text == "WATCH":
            client = self._client(addr)
            client.watcher = True
            for name in self._ifaces:
                self._send(client, self._iface_line(name).encode())
            self._send(client, b"SYNC")
            self._debug("%s watches interfaces", client.name())
        elif text.startswith("REG") or text.startswith("BUS"):
            client = self._client(addr)
            client.kind = "host" if text.startswith("REG") else "bus"
            client.iface = text[3:]
            self._debug("%s (%s) registered for %s", client.name(), client.kind,
                        client.iface or "all interfaces")
        elif text.startswith("FLT"):
            client = self._client(addr)
            words = text.split()
            try:
                client.join = words[1] == "1"
                client.filters = [tuple(int(v, 16) for v in w.split(":")) for w in words[2:]]
            except (IndexError, ValueError):
                self._debug("bad filter message %r", text)
        elif text.startswith("NAME "):
            self._client(addr).label = text[5:]
            self._names[addr] = text[5:]
        else:
            self._debug("unknown control datagram %r", text[:60])

    def _forward(self, datagram, sender_addr, sender_name):
        frame = unpack_frame(datagram)
        state = self._ifaces.get(frame.iface)
        dropped = "absent" if state is None else (None if state["up"] else "down")
        receivers = []
        if dropped is None:
            for client in list(self._clients.values()):
                if client.addr == sender_addr or client.iface is None:
                    continue
                if client.iface and client.iface != frame.iface:
                    continue
                if not filters_match(client.filters, client.join, frame.can_id):
                    continue
                if self._send(client, datagram):
                    client.received += 1
                    receivers.append(client.name())
        record = Frame(time.monotonic(), frame.iface, frame.can_id, frame.data, frame.fd,
                       sender_name, tuple(receivers), dropped)
        self.frames.append(record)
        self._debug("%s from %s%s", record, sender_name,
                    " dropped (%s)" % dropped if dropped else " to %d" % len(receivers))
        return record

    def _send(self, client, datagram):
        try:
            self._sock.sendto(datagram, client.addr)
            return True
        except BlockingIOError:
            client.overruns += 1
            self._debug("%s does not read: datagram dropped", client.name())
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
                self._debug("%s is gone", client.name())
                self._clients.pop(client.addr, None)
            else:
                self._debug("sending to %s failed: %s", client.name(), e)
        return False

    def _iface_line(self, name):
        state = self._ifaces[name]
        if state["up"]:
            return "IFACE %s up %d" % (name, state["bitrate"])
        return "IFACE %s down" % name

    def _announce(self, name):
        self._send_watchers(self._iface_line(name))

    def _send_watchers(self, line):
        self._debug("event: %s", line)
        for client in list(self._clients.values()):
            if client.watcher:
                self._send(client, line.encode())

    def _notify_hosts(self, name, notice):
        for client in list(self._clients.values()):
            if client.kind == "host" and client.iface == name:
                self._send(client, notice)


class CanHubClient:
    """A Python client of the hub, for tests and simulators.

    iface  interface to receive ("" = all) and to send on by default
    kind   "REG" (behaves like a host socket) or "BUS" (a bus device)
    """

    def __init__(self, hub_path, iface="", kind="REG", name=None):
        self.iface = iface
        self.notices = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("")
        self.sock.connect(socket_address(hub_path))
        if name:
            self._send_text("NAME " + name)
        self._send_text(kind + iface)

    def _send_text(self, text):
        if len(text) in (CLASSIC_DATAGRAM, FD_DATAGRAM):
            text += " "
        self.sock.send(text.encode())

    def fileno(self):
        return self.sock.fileno()

    def set_filters(self, filters, join=False):
        """CAN_RAW_FILTER equivalent: list of (can_id, can_mask); [] = nothing."""
        self._send_text("FLT %d" % (1 if join else 0) + "".join(" %08x:%08x" % f for f in filters))

    def send(self, can_id, data, iface=None, fd=False):
        self.sock.send(pack_frame(iface or self.iface, can_id, data, fd))

    def recv(self, timeout=1.0):
        """Next frame (RxFrame) within @timeout seconds, or None.  Notices
        ("ERR ...") are collected in .notices."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            datagram = self.sock.recv(65536)
            frame = unpack_frame(datagram)
            if frame is not None:
                return frame
            self.notices.append(datagram.decode(errors="replace"))

    def drain(self):
        """Discard frames already queued (returns how many)."""
        count = 0
        while self.recv(0.0001) is not None:
            count += 1
        return count

    def recv_until(self, predicate, timeout=1.0):
        """Frames received until one satisfies @predicate (it is last), or
        all received in @timeout when none does."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            frame = self.recv(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return got
            got.append(frame)
            if predicate(frame):
                return got

    def close(self):
        if self.sock is not None:
            try:
                self.sock.send(b"BYE")
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HubWatcher:
    """A WATCH subscriber, i.e. what the daemon's test seam does.
    .snapshot is the initial {name: "up <bitrate>" or "down"}."""

    def __init__(self, hub_path, timeout=2.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("")
        self.sock.connect(socket_address(hub_path))
        self.sock.send(b"WATCH")
        self.snapshot_lines = []
        self.snapshot = {}
        while True:
            line = self.next_event(timeout)
            if line is None:
                raise TimeoutError("no SYNC from the hub")
            if line == "SYNC":
                break
            self.snapshot_lines.append(line)
            words = line.split()
            self.snapshot[words[1]] = " ".join(words[2:])

    def next_event(self, timeout=1.0):
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Serve a virtual CAN bus for canshim and the simulators.")
    ap.add_argument("socket", help="hub socket path (@name: abstract namespace)")
    ap.add_argument("-i", "--iface", action="append", default=[],
                    help="NAME[:BITRATE][:down], may be repeated")
    ap.add_argument("--control", action="store_true",
                    help="read add/up/down/remove commands from stdin")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every frame and event")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    hub = CanHub(args.socket, log=log if args.verbose else None).start()
    for spec in args.iface:
        parts = spec.split(":")
        bitrate = int(parts[1]) if len(parts) > 1 and parts[1] else DEFAULT_BITRATE
        hub.add_iface(parts[0], bitrate, up="down" not in parts[2:])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    log("canhub: serving %s, interfaces %s" % (args.socket, hub.ifaces()))

    if args.control:
        def control():
            for line in sys.stdin:
                words = line.split()
                try:
                    bitrate = int(words[2]) if len(words) > 2 else None
                    if words[0] == "add":
                        hub.add_iface(words[1], bitrate or DEFAULT_BITRATE)
                    elif words[0] == "up":
                        hub.set_up(words[1], True, bitrate)
                    elif words[0] == "down":
                        hub.set_up(words[1], False)
                    elif words[0] == "remove":
                        hub.remove_iface(words[1])
                    else:
                        raise ValueError("unknown command")
                    log("canhub: %s" % hub.ifaces())
                except (IndexError, KeyError, ValueError) as e:
                    log("canhub: %r: %s" % (line.strip(), e))
        threading.Thread(target=control, daemon=True).start()
    try:
        while not done.is_set():
            done.wait(0.5)
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
