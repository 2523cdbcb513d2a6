#!/usr/bin/python3
"""Simulated CAN nodes on the test hub (canhub.py): a Klipper MCU that can
reboot into Katapult, and a Katapult bootloader that can boot into Klipper.

A node connects to the hub directly (no shim) as a bus device ("BUS"
registration), sees every frame on its interface and records all of them.
Both personalities implement the admin channel of protocols.md §2.1 the way
the firmware does (src/generic/canserial.c of Klipper, src/generic/canbus.c
of Katapult):
  * CMD_QUERY_UNASSIGNED (0x3F0 [00]) is answered with RESP_NEED_NODEID
    (0x3F1 [20 uuid×6 app]) only while the node has no node id; app byte
    0x01 for Klipper, 0x11 for Katapult.
  * Klipper takes a node id from CMD_SET_KLIPPER_NODEID [01 uuid nodeid];
    when that command gives a DIFFERENT uuid the node id this node uses,
    or another node transmits on this node's reply id, the node drops its
    id and shuts down with "Another CAN node assigned this ID" (recorded in
    shutdown_reason; it answers queries again, like the firmware).
  * CMD_REQUEST_BOOTLOADER [02 uuid] makes the Klipper node reboot into
    its Katapult personality (same uuid, unassigned) after reboot_delay
    seconds; bootloader_requested records it.
  * Katapult takes an id from [11 uuid nodeid], drops it on [12] or on a
    conflict (without shutting down).
With a node id the node streams its protocol over CAN ids 0x100+2*id
(from the host) and 0x101+2*id (to the host) in ≤8-byte frames:
  * Klipper (§1): the firmware's block resynchronisation, sequence
    numbers, acks and naks (like klipper_mcu.py), identify with a
    realistic CAN-build dictionary (klipper_dict.py, CANBUS_FREQUENCY and
    get_canbus_id included), get_uptime, get_clock, get_config,
    get_canbus_id, clear_shutdown; in shutdown other commands get
    "is_shutdown".
  * Katapult (§5), with katapult_core.KatapultCore doing the protocol:
    frames 01 88 cmd nwords payload crc 99 03, NACK once on malformed
    input, CONNECT (protocol version, application start, block size, MCU,
    Katapult version), GET_CANBUS_ID, SEND_BLOCK, SEND_EOF, REQUEST_BLOCK
    against an in-memory flash (erased = 0xFF), COMPLETE (boots the
    application 0.1 s later: the flashed image if it contains a Klipper
    dictionary, else the previous Klipper application if there was one;
    without an application it stays in Katapult), COMMAND_ERROR for
    anything else.
Faults (set_fault() changes them later): "silent" (records everything,
answers nothing, not even queries), "garbage" (answers every input of its
data stream with random bytes; the admin channel stays correct),
"disconnect[:N]" (after answering the Nth frame addressed to it, default
1, it answers nothing any more).  Nodes do not model CAN-FD, bus timing,
receive-buffer overruns or the USB side of a USB-CAN bridge (use
on_mode_change to remove/add the hub interface for that).  bitrate= (off
by default) gives a node a rate-limited bus (linkmodel.py, for
scripts/bench): every frame it receives or sends costs a classic CAN
frame's bits at that rate, the node handles and sends frames no sooner
than the bus allows, and .link.link_seconds adds it up.

Reference host helpers for tests (query_unassigned, set_klipper_nodeid,
request_bootloader, host_identify, katapult_command, katapult_connect, ...)
drive a node through a canhub.CanHubClient.

Command line (serves until SIGTERM/SIGINT):
  /usr/bin/python3 tests/sim/can_node.py HUB can0 --uuid 0e0d81e4210c \\
      --version v0.13.0-46-g8c72b4a5 --mcu stm32g0b1xx [--katapult] [-v]
"""

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import canhub  # noqa: E402
import katapult_core  # noqa: E402
import klipper_dict  # noqa: E402
import klipper_proto  # noqa: E402
from klipper_proto import build_block  # noqa: E402
from linkmodel import LinkModel, can_frame_seconds  # noqa: E402
from simthread import ThreadedSim, parse_fault  # noqa: E402

DEFAULT_VERSION = "v0.13.0-46-g8c72b4a5"
DEFAULT_KATAPULT_VERSION = katapult_core.DEFAULT_KATAPULT_VERSION
DEFAULT_MCU = "stm32g0b1xx"

ADMIN_ID = 0x3F0
ADMIN_RESP_ID = 0x3F1
NODEID_BASE = 0x100
CMD_QUERY_UNASSIGNED = 0x00
CMD_SET_KLIPPER_NODEID = 0x01
CMD_REQUEST_BOOTLOADER = 0x02
CMD_SET_KATAPULT_NODEID = 0x11
CMD_CLEAR_KATAPULT_NODEID = 0x12
RESP_NEED_NODEID = 0x20
APP_KLIPPER = 0x01
APP_KATAPULT = 0x11
ADMIN_NAMES = {
    CMD_QUERY_UNASSIGNED: "query_unassigned",
    CMD_SET_KLIPPER_NODEID: "set_klipper_nodeid",
    CMD_REQUEST_BOOTLOADER: "request_bootloader",
    CMD_SET_KATAPULT_NODEID: "set_katapult_nodeid",
    CMD_CLEAR_KATAPULT_NODEID: "clear_katapult_nodeid",
    RESP_NEED_NODEID: "resp_need_nodeid",
}
CONFLICT_REASON = "Another CAN node assigned this ID"

# Katapult (protocols.md §5): the protocol lives in katapult_core.py; these
# names stay for the tests and tools that use them.
KATAPULT_CONNECT = katapult_core.CONNECT
KATAPULT_SEND_BLOCK = katapult_core.SEND_BLOCK
KATAPULT_SEND_EOF = katapult_core.SEND_EOF
KATAPULT_REQUEST_BLOCK = katapult_core.REQUEST_BLOCK
KATAPULT_COMPLETE = katapult_core.COMPLETE
KATAPULT_GET_CANBUS_ID = katapult_core.GET_CANBUS_ID
KATAPULT_ACK = katapult_core.ACK
KATAPULT_NACK = katapult_core.NACK
KATAPULT_COMMAND_ERROR = katapult_core.COMMAND_ERROR
KATAPULT_BUSY = katapult_core.BUSY
KATAPULT_PROTO_VERSION = katapult_core.PROTO_VERSION
KATAPULT_MESSAGE_MIN = katapult_core.MESSAGE_MIN
KATAPULT_MESSAGE_MAX = katapult_core.MESSAGE_MAX
KATAPULT_COMPLETE_DELAY = katapult_core.COMPLETE_DELAY
katapult_frame = katapult_core.frame
_pad_words = katapult_core.pad_words
parse_connect_payload = katapult_core.parse_connect_payload
find_klipper_dictionary = katapult_core.find_klipper_dictionary

# Commands the firmware accepts while shut down (HF_IN_SHUTDOWN).
KLIPPER_IN_SHUTDOWN = {"identify", "get_uptime", "get_clock", "get_config", "get_canbus_id",
                       "clear_shutdown", "emergency_stop", "reset"}

FAULTS = {
    "silent": "record everything, answer nothing (not even admin queries)",
    "garbage": "answer every data-stream input with random bytes (admin channel stays correct)",
    "disconnect": "disconnect[:N]: after answering the Nth frame addressed to the node "
                  "(default 1) answer nothing any more",
}


def parse_uuid(uuid):
    """6 bytes from bytes or a 12-digit hex string (wire order, §2.2)."""
    if isinstance(uuid, str):
        uuid = bytes.fromhex(uuid)
    uuid = bytes(uuid)
    if len(uuid) != 6:
        raise ValueError("a CAN uuid has 6 bytes, not %d" % len(uuid))
    return uuid


def node_rx_id(nodeid):
    """CAN id the host sends to @nodeid on."""
    return NODEID_BASE + 2 * nodeid


def node_tx_id(nodeid):
    """CAN id @nodeid answers on."""
    return NODEID_BASE + 2 * nodeid + 1


def can_dictionary(version, mcu, build_versions=None, canbus_frequency=1000000, bridge=False,
                   app="Klipper", kconfig=None, compression="zlib"):
    """(json, compressed) of a CAN build: klipper_dict's dictionary plus the
    canserial static string a CAN build has; app, kconfig and compression as
    klipper_dict.build() takes them."""
    text, _ = klipper_dict.build(version, mcu, build_versions=build_versions,
                                 link="canbridge" if bridge else "can",
                                 extra_config={"CANBUS_FREQUENCY": canbus_frequency},
                                 app=app, kconfig=kconfig, compression=compression)
    parsed = json.loads(text)
    strings = parsed["enumerations"].setdefault("static_string_id", {})
    if CONFLICT_REASON not in strings:
        strings[CONFLICT_REASON] = max(strings.values(), default=-1) + 1
    text = klipper_dict.DictionaryText(json.dumps(parsed, separators=(",", ":"), sort_keys=True),
                                       compression)
    return text, klipper_dict.compress(text)


class CanNode(ThreadedSim):
    """One simulated node; use KlipperCanNode or KatapultCanNode.

    Recorded for assertions (read under .lock or after wait_for):
      frames        every frame received: canhub.RxFrame (iface, can_id, data, fd)
      sent          every frame sent: (can_id, data)
      admin         admin commands seen on 0x3F0: (name, data bytes)
      messages      Klipper messages of accepted blocks: (name, params)
      katapult_commands  valid Katapult frames: (cmd, payload)
      mode          "klipper", "katapult" or "foreign" (flashed non-Klipper image)
      nodeid        current node id or None
      bootloader_requested, shutdown_reason, is_shutdown, disconnected,
      rebooting, boots (list of modes booted into), flash (address -> block)
    """

    def __init__(self, hub_path, iface, uuid, mode, mcu=DEFAULT_MCU, version=DEFAULT_VERSION,
                 build_versions=None, canbus_frequency=1000000, bridge=False, has_app=True,
                 katapult_version=DEFAULT_KATAPULT_VERSION, proto_version=KATAPULT_PROTO_VERSION,
                 app_start=0x08002000, block_size=64, page_size=2048, reboot_delay=0.1,
                 assigned_by_klipper=None, fault=None, dictionary=None, seed=None, log=None,
                 on_mode_change=None, name=None, bitrate=None, app="Klipper", kconfig=None,
                 compression=None):
        super().__init__()
        self.hub_path = hub_path
        self.iface = iface
        self.uuid = parse_uuid(uuid)
        self.mcu = mcu
        self.canbus_frequency = canbus_frequency
        self.bridge = bridge
        self.build_versions = build_versions
        self.katapult_version = katapult_version
        self.proto_version = proto_version
        self.app_start = app_start
        self.block_size = block_size
        self.page_size = page_size
        self.reboot_delay = reboot_delay
        self.log = log
        self.on_mode_change = on_mode_change
        self.name = name or "%s-%s" % (mode, self.uuid.hex())
        self.random = random.Random(seed)
        self.fault, self.fault_arg = parse_fault(fault, FAULTS)
        self.bitrate = bitrate
        self.link = LinkModel() if bitrate else None

        # The Klipper application this node runs (None: no application).
        self.app_dictionary = None
        self.app_version = None
        if has_app:
            if dictionary is None:
                dictionary, _ = can_dictionary(version, mcu, build_versions, canbus_frequency,
                                               bridge, app=app, kconfig=kconfig,
                                               compression=compression or "zlib")
            elif compression is not None:
                dictionary = klipper_dict.DictionaryText(dictionary, compression)
            self._load_app(dictionary)

        self.frames = []
        self.sent = []
        self.admin = []
        self.messages = []
        self.blocks = []
        self.katapult_commands = []
        self.boots = [mode]
        self.flash = {}
        self.bootloader_requested = False
        self.shutdown_reason = None
        self.is_shutdown = False
        self.disconnected = False
        self.rebooting = False
        self.handled = 0                # frames addressed to the node
        self.rx_bytes = 0
        self.acks_sent = 0
        self.naks_sent = 0
        self.responses_sent = 0
        self.requests = 0
        self.pages_written = 0
        self._timers = []               # (deadline, callable) run in the thread
        # Katapult's command processor; it counts into this node's
        # naks_sent/responses_sent/requests/pages_written and writes flash.
        self.katapult = katapult_core.KatapultCore(
            mcu, app_start=app_start, block_size=block_size, page_size=page_size,
            katapult_version=katapult_version, proto_version=proto_version,
            canbus_uuid=self.uuid, flash=self.flash, commands=self.katapult_commands,
            stats=self, random=self.random,
            on_complete=lambda: self._schedule(KATAPULT_COMPLETE_DELAY, self._boot_application),
            log=self._debug)
        self._reset_state(mode)
        if assigned_by_klipper is not None:
            self.nodeid = int(assigned_by_klipper)

        self._sock = None

    # -- control ---------------------------------------------------------

    def start(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("")
        sock.connect(canhub.socket_address(self.hub_path))
        for text in ("NAME " + self.name, "BUS" + self.iface):
            if len(text) in (canhub.CLASSIC_DATAGRAM, canhub.FD_DATAGRAM):
                text += " "
            sock.send(text.encode())
        self._sock = sock
        self._open_wake_pipe()
        self._start_thread("can-node-" + self.name)
        return self

    def stop(self):
        self._stop_thread()
        self._close_wake_pipe()
        if self._sock is not None:
            try:
                self._sock.send(b"BYE")
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    def set_fault(self, fault):
        with self.lock:
            self.fault, self.fault_arg = parse_fault(fault, FAULTS)
            self.disconnected = False
            self.handled = 0

    def received(self, name):
        """Accepted Klipper messages called @name (list of param dicts)."""
        with self.lock:
            return [p for n, p in self.messages if n == name]

    def frames_to(self, can_id):
        """Received frames with CAN id @can_id."""
        with self.lock:
            return [f for f in self.frames if f.can_id == can_id]

    def image(self):
        """The flashed bytes from app_start to the end of the highest block."""
        with self.lock:
            return self.katapult.image()

    @property
    def uuid_hex(self):
        return self.uuid.hex()

    @property
    def app_id(self):
        return APP_KLIPPER if self.mode == "klipper" else APP_KATAPULT

    @property
    def version(self):
        """Firmware version of the Klipper application, or None."""
        return self.app_version

    # -- state -------------------------------------------------------------

    def _load_app(self, dictionary):
        parsed = json.loads(dictionary)
        self.app_dictionary = dictionary
        self.app_version = parsed.get("version")
        # What the build embeds: zlib, or bzip2 for a Kalico build (a
        # dictionary found in a flashed image remembers which).
        self.dict_compressed = klipper_dict.compress(dictionary)
        self.clock_freq = parsed.get("config", {}).get("CLOCK_FREQ", 1000000)
        self.commands = klipper_proto.MessageParser(parsed.get("commands", {}).items())
        self.responses = klipper_proto.MessageParser(parsed.get("responses", {}).items())
        self.static_strings = parsed.get("enumerations", {}).get("static_string_id", {})

    def _reset_state(self, mode):
        """A fresh boot into @mode: no node id, empty receive state."""
        self.mode = mode
        self.nodeid = None
        self.next_seq = 0
        self.decoder = klipper_proto.StreamDecoder()
        self.katapult.reset()
        self.is_shutdown = False
        self.started_at = time.monotonic()

    def _debug(self, fmt, *args):
        if self.log:
            self.log("%s: %s" % (self.name, fmt % args if args else fmt))

    # -- thread ------------------------------------------------------------

    def _run(self):
        poller = self._poller(self._sock.fileno())
        while not self._stopping:
            with self.lock:
                now = time.monotonic()
                due = [t for t in self._timers if t[0] <= now]
                self._timers = [t for t in self._timers if t[0] > now]
                for _, action in due:
                    action()
                if due:
                    self.lock.notify_all()
                timeout = min((t[0] for t in self._timers), default=now + 1.0) - now
            events = self._poll(poller, max(0, int(timeout * 1000) + 1))
            if events is None:
                break
            if not events:
                continue
            try:
                datagram = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                self._debug("hub connection failed: %s", e)
                break
            frame = canhub.unpack_frame(datagram)
            if frame is None:
                continue                # hub notices are for host sockets
            self._pace(frame.data)
            with self.lock:
                out = self._on_frame(frame)
                self.lock.notify_all()
            ends = [self._pace(data) for _, data in out]
            for n, ((can_id, data), end) in enumerate(zip(out, ends)):
                if end is not None:
                    self.link.wait_until(end, spin=n == len(out) - 1)
                self._send(can_id, data)

    def _pace(self, data):
        """The bus carries a frame with @data: returns when it has (None
        without a link model).  Nobody waits here: the node works on a
        frame while it arrives, and sends each frame of an answer once the
        bus has carried it (_run), so that the answer trickles out as on
        a real bus and the hub forwards one frame while the next is on
        the bus."""
        if self.link is not None:
            return self.link.occupy(can_frame_seconds(len(data), self.bitrate), wait=False)
        return None

    def _send(self, can_id, data):
        try:
            self._sock.send(canhub.pack_frame(self.iface, can_id, data))
        except OSError as e:
            self._debug("send failed: %s", e)
            return
        with self.lock:
            self.sent.append((can_id, bytes(data)))
            self.lock.notify_all()

    def _schedule(self, delay, action):
        """Run @action in the node's thread after @delay seconds (called
        from that thread, which recomputes its poll timeout next)."""
        self._timers.append((time.monotonic() + delay, action))

    def _on_frame(self, frame):
        """Handle one received frame (lock held); returns frames to send."""
        self.frames.append(frame)
        out = []
        if frame.fd or frame.can_id & (canhub.CAN_EFF_FLAG | canhub.CAN_RTR_FLAG |
                                       canhub.CAN_ERR_FLAG):
            return out
        can_id = frame.can_id
        mine = can_id == ADMIN_ID or (self.nodeid is not None and
                                      can_id in (node_rx_id(self.nodeid),
                                                 node_tx_id(self.nodeid)))
        if not mine or self.rebooting or self.mode == "foreign":
            return out
        if self.fault == "silent" or self.disconnected:
            return out
        self.handled += 1
        if can_id == ADMIN_ID:
            self._admin(frame.data, out)
        elif can_id == node_tx_id(self.nodeid):
            self._debug("another node transmits on 0x%03x", can_id)
            self._conflict()
        elif self.mode == "klipper":
            self._klipper_input(frame.data, out)
        else:
            self._katapult_input(frame.data, out)
        if self.fault == "disconnect" and self.handled >= (self.fault_arg or 1):
            self._debug("disconnecting after %d frames", self.handled)
            self.disconnected = True
        return out

    def _stream(self, out, data):
        """Queue @data on the node's reply id in ≤8-byte frames."""
        if self.nodeid is None:
            return
        for pos in range(0, len(data), 8):
            out.append((node_tx_id(self.nodeid), bytes(data[pos:pos + 8])))

    # -- admin channel -------------------------------------------------------

    def _admin(self, data, out):
        if not data:
            return
        cmd = data[0]
        self.admin.append((ADMIN_NAMES.get(cmd, "0x%02x" % cmd), bytes(data)))
        uuid_matches = len(data) >= 7 and bytes(data[1:7]) == self.uuid
        if cmd == CMD_QUERY_UNASSIGNED:
            if self.nodeid is None:
                out.append((ADMIN_RESP_ID, bytes([RESP_NEED_NODEID]) + self.uuid +
                            bytes([self.app_id])))
        elif (cmd == CMD_SET_KLIPPER_NODEID and self.mode == "klipper") or \
                (cmd == CMD_SET_KATAPULT_NODEID and self.mode == "katapult"):
            if len(data) < 8:
                return
            if uuid_matches:
                if self.nodeid != data[7]:
                    self._debug("node id %d", data[7])
                self.nodeid = data[7]
            elif data[7] == self.nodeid:
                self._conflict()
        elif cmd == CMD_REQUEST_BOOTLOADER and self.mode == "klipper":
            if uuid_matches:
                self._debug("bootloader requested")
                self.bootloader_requested = True
                self._reboot("katapult")
        elif cmd == CMD_CLEAR_KATAPULT_NODEID and self.mode == "katapult":
            self.nodeid = None

    def _conflict(self):
        self.nodeid = None
        if self.mode == "klipper":
            self._debug("shutdown: %s", CONFLICT_REASON)
            self.is_shutdown = True
            self.shutdown_reason = CONFLICT_REASON

    def _reboot(self, mode, delay=None):
        """Go silent, then boot into @mode after the reboot delay."""
        self.rebooting = True
        self.nodeid = None

        def boot():
            self.rebooting = False
            self._reset_state(mode)
            self.boots.append(mode)
            self._debug("booted into %s", mode)
            if self.on_mode_change:
                self.on_mode_change(self, mode)
        self._schedule(self.reboot_delay if delay is None else delay, boot)

    # -- Klipper personality ---------------------------------------------

    def _klipper_input(self, data, out):
        self.rx_bytes += len(data)
        if self.fault == "garbage":
            junk = bytes(self.random.choice([b for b in range(256) if b != 0x7E])
                         for _ in range(self.random.randint(8, 40)))
            self._stream(out, junk)
            return
        stream = bytearray()
        for event in self.decoder.feed(data):
            if event[0] == "nak":
                self.naks_sent += 1
                stream += build_block(self.next_seq)
                continue
            _, seq, content = event
            if seq != self.next_seq:
                self.blocks.append((seq, content, False))
                self.naks_sent += 1
                stream += build_block(self.next_seq)
                continue
            self.blocks.append((seq, content, True))
            self.next_seq = (seq + 1) & klipper_proto.MESSAGE_SEQ_MASK
            self.requests += 1
            for reply in self._klipper_dispatch(content):
                stream += build_block(self.next_seq, reply)
                self.responses_sent += 1
            stream += build_block(self.next_seq)
            self.acks_sent += 1
        self._stream(out, stream)

    def _klipper_dispatch(self, content):
        replies = []
        try:
            msgs = self.commands.parse(content)
        except klipper_proto.ProtocolError as e:
            msgs = [("#malformed", {"error": str(e), "content": bytes(content)})]
        for name, params in msgs:
            self.messages.append((name, params))
            self._debug("got %s %s", name, params)
            if name.startswith("#"):
                continue
            if self.is_shutdown and name not in KLIPPER_IN_SHUTDOWN:
                replies.append(self.responses.encode(
                    "is_shutdown", static_string_id=self.static_strings.get(
                        self.shutdown_reason or "", 0)))
                continue
            if name == "identify":
                offset, count = params["offset"], params["count"]
                chunk = self.dict_compressed[offset:offset + count]
                reply = self.responses.encode("identify_response", offset=offset, data=chunk)
                if len(reply) <= klipper_proto.MESSAGE_PAYLOAD_MAX:
                    replies.append(reply)
            elif name == "get_uptime":
                ticks = self._clock64()
                replies.append(self.responses.encode("uptime", high=ticks >> 32,
                                                     clock=ticks & 0xFFFFFFFF))
            elif name == "get_clock":
                replies.append(self.responses.encode("clock", clock=self._clock64() & 0xFFFFFFFF))
            elif name == "get_config":
                replies.append(self.responses.encode("config", is_config=0, crc=0,
                                                     is_shutdown=int(self.is_shutdown),
                                                     move_count=0))
            elif name == "get_canbus_id":
                replies.append(self.responses.encode("canbus_id", canbus_uuid=self.uuid,
                                                     canbus_nodeid=self.nodeid or 0))
            elif name == "clear_shutdown":
                self.is_shutdown = False
        return replies

    def _clock64(self):
        return int((time.monotonic() - self.started_at) * self.clock_freq)

    # -- Katapult personality --------------------------------------------

    def _katapult_input(self, data, out):
        self.rx_bytes += len(data)
        self.katapult.garbage = self.fault == "garbage"
        self._stream(out, self.katapult.feed(data))

    def _boot_application(self):
        """What Katapult's application_jump leads to."""
        mode, dictionary = self.katapult.boot_target(self.app_dictionary)
        if mode == "foreign":
            self._debug("flashed image has no Klipper dictionary: foreign firmware")
        elif mode == "katapult":
            self._debug("no application: staying in Katapult")
        elif dictionary is not self.app_dictionary:
            self._load_app(dictionary)
        self._reboot(mode, delay=0)


class KlipperCanNode(CanNode):
    """A Klipper MCU on CAN (protocols.md §2).

    uuid                 6 bytes or 12 hex digits
    version, mcu, build_versions, canbus_frequency, bridge (USB-CAN bridge
                         build: get_canbus_status in the dictionary)
    app, kconfig, compression
                         a newer or Kalico build: "app", the embedded build
                         config, "zlib" or "bzip2" identify data
    assigned_by_klipper  start with this node id, as when a running Klipper
                         host holds the node (it then ignores queries)
    katapult_version, app_start, block_size, proto_version
                         the Katapult it reboots into on REQUEST_BOOTLOADER
    reboot_delay         seconds of silence while rebooting
    fault                see FAULTS
    bitrate              bus rate of the link model (None: no rate limit);
                         .link is its LinkModel (None without)
    on_mode_change       callable(node, mode) after each boot (runs in the
                         node's thread with its lock held: keep it short)
    """

    def __init__(self, hub_path, iface, uuid, version=DEFAULT_VERSION, mcu=DEFAULT_MCU,
                 canbus_frequency=1000000, **kwargs):
        super().__init__(hub_path, iface, uuid, "klipper", mcu=mcu, version=version,
                         canbus_frequency=canbus_frequency, has_app=True, **kwargs)


class KatapultCanNode(CanNode):
    """Katapult on CAN (protocols.md §5).

    app_version  the Klipper version of the application it boots after
                 COMPLETE when nothing was flashed (None: no valid
                 application, so it stays in Katapult)
    katapult_version, proto_version, app_start, block_size, page_size, mcu,
    reboot_delay, fault, on_mode_change, bitrate as for KlipperCanNode.
    """

    def __init__(self, hub_path, iface, uuid, mcu=DEFAULT_MCU, app_version=None, **kwargs):
        if kwargs.get("assigned_by_klipper") is not None:
            raise ValueError("a Katapult node is never held by Klipper")
        super().__init__(hub_path, iface, uuid, "katapult", mcu=mcu,
                         version=app_version or DEFAULT_VERSION, has_app=app_version is not None,
                         **kwargs)


# ---------------------------------------------------------------------------
# Reference host: what Klipper's canbus_query.py / klippy and Katapult's
# flashtool do, through a canhub.CanHubClient.


def query_unassigned(client, timeout=0.3):
    """Send CMD_QUERY_UNASSIGNED and collect RESP_NEED_NODEID answers for
    @timeout seconds: list of (uuid hex, app id)."""
    client.drain()
    client.send(ADMIN_ID, bytes([CMD_QUERY_UNASSIGNED]))
    found = []
    deadline = time.monotonic() + timeout
    while True:
        frame = client.recv(max(0.0, deadline - time.monotonic()))
        if frame is None:
            return found
        if frame.can_id == ADMIN_RESP_ID and len(frame.data) >= 8 and \
                frame.data[0] == RESP_NEED_NODEID:
            found.append((frame.data[1:7].hex(), frame.data[7]))


def set_klipper_nodeid(client, uuid, nodeid):
    client.send(ADMIN_ID, bytes([CMD_SET_KLIPPER_NODEID]) + parse_uuid(uuid) + bytes([nodeid]))


def set_katapult_nodeid(client, uuid, nodeid):
    client.send(ADMIN_ID, bytes([CMD_SET_KATAPULT_NODEID]) + parse_uuid(uuid) + bytes([nodeid]))


def clear_katapult_nodeids(client):
    client.send(ADMIN_ID, bytes([CMD_CLEAR_KATAPULT_NODEID]))


def request_bootloader(client, uuid):
    client.send(ADMIN_ID, bytes([CMD_REQUEST_BOOTLOADER]) + parse_uuid(uuid))


def send_stream(client, nodeid, data):
    """Send @data to @nodeid as ≤8-byte frames."""
    for pos in range(0, len(data), 8):
        client.send(node_rx_id(nodeid), data[pos:pos + 8])


def host_identify(client, nodeid, timeout=5.0, first_seq=1, rto=0.2):
    """Download the compressed dictionary of Klipper node @nodeid, like
    klipper_mcu.host_identify does over a tty (adopts the seq of acks and
    naks, retransmits after @rto).  Returns (compressed bytes, stats)."""
    decoder = klipper_proto.StreamDecoder()
    seq = first_seq & klipper_proto.MESSAGE_SEQ_MASK
    data = bytearray()
    stats = {"sent": 0, "naks": 0, "retransmits": 0}
    deadline = time.monotonic() + timeout
    state = {"sent_seq": None, "sent_at": 0.0, "have_chunk": False}
    client.drain()

    def send():
        block = klipper_proto.identify_block(seq, len(data))
        send_stream(client, nodeid, b"\x7e" + block)
        state.update(sent_seq=seq, sent_at=time.monotonic(), have_chunk=False)
        stats["sent"] += 1

    send()
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError("no complete dictionary after %.1f s (%d bytes)"
                               % (timeout, len(data)))
        frame = client.recv(max(0.001, min(deadline - now, state["sent_at"] + rto - now)))
        if frame is None:
            if time.monotonic() >= state["sent_at"] + rto:
                stats["retransmits"] += 1
                send()
            continue
        if frame.can_id != node_tx_id(nodeid):
            continue
        for event in decoder.feed(frame.data):
            if event[0] != "block":
                continue
            _, block_seq, content = event
            if content:
                for name, params in klipper_proto.BOOT_PARSER.parse(content):
                    if name == "identify_response" and params["offset"] == len(data):
                        if not params["data"]:
                            return bytes(data), stats
                        data += params["data"]
                        state["have_chunk"] = True
                continue
            acked = block_seq == ((state["sent_seq"] + 1) & klipper_proto.MESSAGE_SEQ_MASK)
            seq = block_seq
            if not acked:
                stats["naks"] += 1
                send()
            elif state["have_chunk"]:
                send()


def katapult_command(client, nodeid, cmd, payload=b"", timeout=2.0):
    """Send one Katapult command to @nodeid; returns (response code,
    payload) of the next valid response frame.  TimeoutError if none."""
    client.drain()
    send_stream(client, nodeid, katapult_frame(cmd, payload))
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        frame = client.recv(max(0.0, deadline - time.monotonic()))
        if frame is None:
            raise TimeoutError("no Katapult response to command 0x%02x" % cmd)
        if frame.can_id != node_tx_id(nodeid):
            continue
        buf += frame.data
        start = buf.find(b"\x01\x88")
        if start < 0 or len(buf) - start < KATAPULT_MESSAGE_MIN:
            continue
        length = buf[start + 3] * 4 + 8
        if len(buf) - start < length:
            continue
        body = bytes(buf[start:start + length])
        crc = body[-4] | body[-3] << 8
        if body[-2:] != b"\x99\x03" or klipper_proto.crc16(body[2:-4]) != crc:
            raise ValueError("malformed Katapult response %s" % body.hex())
        return body[2], body[4:-4]


def katapult_connect(client, nodeid, timeout=2.0):
    """CONNECT; returns parse_connect_payload() of the ACK."""
    code, payload = katapult_command(client, nodeid, KATAPULT_CONNECT, timeout=timeout)
    if code != KATAPULT_ACK or struct.unpack_from("<I", payload)[0] != KATAPULT_CONNECT:
        raise ValueError("CONNECT answered with 0x%02x %s" % (code, payload.hex()))
    return parse_connect_payload(payload[4:])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a simulated Klipper/Katapult CAN node.")
    ap.add_argument("hub", help="hub socket path")
    ap.add_argument("iface")
    ap.add_argument("--uuid", required=True, help="12 hex digits")
    ap.add_argument("--katapult", action="store_true", help="start in Katapult")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="Klipper version")
    ap.add_argument("--mcu", default=DEFAULT_MCU)
    ap.add_argument("--katapult-version", default=DEFAULT_KATAPULT_VERSION)
    ap.add_argument("--canbus-frequency", type=int, default=1000000)
    ap.add_argument("--bridge", action="store_true", help="USB-CAN bridge build")
    ap.add_argument("--assigned-by-klipper", type=int, default=None, metavar="NODEID")
    ap.add_argument("--fault", default=None, help="one of: " + ", ".join(sorted(FAULTS)))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    common = dict(mcu=args.mcu, katapult_version=args.katapult_version,
                  canbus_frequency=args.canbus_frequency, fault=args.fault,
                  log=log if args.verbose else None)
    if args.katapult:
        node = KatapultCanNode(args.hub, args.iface, args.uuid, app_version=args.version,
                               **common)
    else:
        node = KlipperCanNode(args.hub, args.iface, args.uuid, version=args.version,
                              bridge=args.bridge, assigned_by_klipper=args.assigned_by_klipper,
                              **common)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    node.start()
    log("can_node: %s %s on %s (%s)" % (node.mode, node.uuid_hex, args.iface, args.hub))
    try:
        while not done.is_set():
            done.wait(0.5)
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
