#!/usr/bin/python3
"""A Klipper MCU simulator on the master side of a pty.

KlipperMcu serves one pty master fd from a thread: it decodes the host's
blocks with the firmware's resynchronisation rules, keeps the firmware's
sequence state (next expected seq starts at 0 after reset and survives the
host closing and reopening the port, as on a real board), acks good
blocks, naks bad ones (protocols.md §1.5) and answers identify with chunks
of a realistic compressed data dictionary (klipper_dict.py).  get_uptime,
get_clock and get_config are answered too; any other command is acked and
recorded but gets no reply, and an unknown id is recorded as "#unknown".

Everything received is recorded for assertions: rx_bytes, the decoded
messages of accepted blocks, naks/acks sent.  Faults make it misbehave
(see FAULTS).  The pty slave is made raw through the master (on Linux,
termios calls on a pty master act on the slave), so no byte is mangled
even for hosts that set no termios.

Bootloader requests (protocols.md §4) arrive the way the firmware gets them:
  * link "usb": the USB CDC "1200 baud touch".  A pty has no
    SET_LINE_CODING, but termios.tcgetattr() on the master shows the speed
    the host set on the slave, so the thread looks at it every
    touch_interval seconds (20 ms) and takes a change to B1200 as the
    request.  DTR cannot be seen on a pty (TIOCMBIC fails there), so the
    speed alone decides.
  * link "serial": the UART magic string " \x1c Request Serial
    Bootloader!! ~", when it is exactly what the firmware's block finder
    discards as one malformed block (serial_irq.c console_task: pop_count
    32 and the bytes match), i.e. it arrives between two 0x7e.
On a request (and bootloader_request=True, the firmware's
HAVE_BOOTLOADER_REQUEST) the MCU "resets": bootloader_requested becomes
True, bootloader_request_how says which way it came, nothing is answered
any more (rebooting; input is read and dropped, reset() ends that) and
on_bootloader_request(sim, how) runs in the simulator's thread, without
its lock; whoever set it (the test harness) plugs the bootloader.  With
bootloader_request=False the request is only recorded in
ignored_bootloader_requests and the firmware carries on.  It does not
model shutdown state or Klipper's move queue.

host_identify() is a small reference host (the identify exchange as
protocols.md §1.5 describes a minimal client) for tests of the simulator
and of the harness; touch_1200() and send_serial_bootloader_request() are
the host side of the two bootloader requests.

Command line: serve a fresh pty whose slave is symlinked to PATH until
killed, or act as the host against a device:
  /usr/bin/python3 tests/sim/klipper_mcu.py --pty-link /tmp/ttyKlipper \\
      --version v0.13.0-46-g8c72b4a5 --mcu stm32f429xx
  /usr/bin/python3 tests/sim/klipper_mcu.py --identify /tmp/ttyKlipper
"""

import argparse
import errno
import fcntl
import json
import os
import random
import select
import signal
import struct
import sys
import termios
import threading
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import klipper_dict  # noqa: E402
import klipper_proto  # noqa: E402
from klipper_proto import build_block  # noqa: E402
import simthread  # noqa: E402
from ptysim import PtySim  # noqa: E402

DEFAULT_VERSION = "v0.13.0-46-g8c72b4a5"

# protocols.md §4.2: what the firmware compares a discarded block with, and
# what hosts send (a leading 0x7e ends whatever came before).
SERIAL_BOOTLOADER_MAGIC = b" \x1c Request Serial Bootloader!! ~"
SERIAL_BOOTLOADER_REQUEST = b"~" + SERIAL_BOOTLOADER_MAGIC
TOUCH_INTERVAL = 0.02

# fault string -> meaning (":N" sets the argument where one is listed)
FAULTS = {
    "silent": "read and record everything, never write a byte",
    "garbage": "answer every read with 8..40 random bytes that contain no 0x7e",
    "crc": "crc[:N]: corrupt the CRC of every Nth response block (default every one); acks stay intact",
    "crc_first": "corrupt the CRC of the first response block only",
    "hang_mid_dict": "hang_mid_dict[:N]: go silent once identify asks for offset >= N "
                     "(default: half the dictionary, chunk aligned)",
    "disconnect": "disconnect[:N]: after answering the Nth accepted block (default 1) close the "
                  "pty master so the host sees a hangup",
}


class FirmwareDecoder(klipper_proto.StreamDecoder):
    """StreamDecoder that also keeps what the firmware's block finder pops
    as one malformed block (everything up to and including the next 0x7e),
    so the UART magic string can be recognised the way serial_irq.c does."""

    def __init__(self):
        super().__init__()
        self.dropped = []

    def _skip_to_sync(self):
        idx = self.buf.find(bytes([klipper_proto.MESSAGE_SYNC]))
        if idx >= 0:
            self.dropped.append(bytes(self.buf[:idx + 1]))
        return super()._skip_to_sync()


def parse_fault(fault):
    """'crc:3' -> ('crc', 3); None -> (None, None)."""
    return simthread.parse_fault(fault, FAULTS)


class KlipperMcu(PtySim):
    """Simulated Klipper MCU serving pty master @fd from a thread.

    fd          pty master (umockdev: testbed.get_dev_fd(); standalone: os.openpty()[0])
    version     firmware version in the dictionary
    mcu         CONFIG_MCU (stm32f429xx, rp2040, linux, ...)
    link        "usb", "serial", "can" or "canbridge" (dictionary constants)
    fault       see FAULTS; can be changed later with set_fault()
    start_seq   next expected host seq (0 = freshly reset MCU)
    own_fd      close @fd on stop() (the standalone CLI owns its pty)
    dictionary  JSON text to serve instead of a generated one (version and
                mcu then come from it)
    app, kconfig, compression  a newer or Kalico build: its "app", embedded
                build config and "zlib" or "bzip2" identify data
    bootloader_request     act on bootloader requests (see the module
                docstring); False: record them in ignored_bootloader_requests
    on_bootloader_request  callable(sim, how) after a request it acted on;
                how is "usb-1200-baud" or "serial-magic"
    touch_interval  seconds between looks at the line speed (link "usb")
    """

    def __init__(self, fd, version=DEFAULT_VERSION, mcu="stm32f429xx", build_versions=None,
                 link="usb", fault=None, start_seq=0, own_fd=False, dictionary=None,
                 seed=None, log=None, on_disconnect=None, bootloader_request=True,
                 on_bootloader_request=None, touch_interval=TOUCH_INTERVAL, app="Klipper",
                 kconfig=None, compression=None):
        super().__init__()
        self.fd = fd
        self.version = version
        self.mcu = mcu
        self.link = link
        self.own_fd = own_fd
        self.log = log
        self.on_disconnect = on_disconnect
        if dictionary is None:
            self.dict_json, self.dict_compressed = klipper_dict.build(
                version, mcu, build_versions=build_versions, link=link, app=app, kconfig=kconfig,
                compression=compression or "zlib")
        else:
            # A dictionary found in a flashed image remembers how the image
            # compressed it; @compression overrides.
            self.dict_json = dictionary
            self.dict_compressed = klipper_dict.compress(dictionary, compression)
        parsed = json.loads(self.dict_json)
        if dictionary is not None:
            self.version = parsed.get("version", version)
            self.mcu = parsed.get("config", {}).get("MCU", mcu)
        self.clock_freq = parsed["config"].get("CLOCK_FREQ", 1000000)
        self.commands = klipper_proto.MessageParser(parsed["commands"].items())
        self.responses = klipper_proto.MessageParser(parsed["responses"].items())
        self.random = random.Random(seed)

        self.fault, self.fault_arg = parse_fault(fault)
        self.next_seq = start_seq & klipper_proto.MESSAGE_SEQ_MASK
        self.decoder = FirmwareDecoder()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.messages = []              # (name, params) of accepted blocks
        self.blocks = []                # (seq, content, accepted) of every valid block
        self.acks_sent = 0
        self.naks_sent = 0
        self.responses_sent = 0
        self.requests = 0               # accepted blocks
        self.hung = False
        self.disconnected = False
        self.started_at = time.monotonic()

        self.bootloader_request = bootloader_request
        self.on_bootloader_request = on_bootloader_request
        self.touch_interval = touch_interval
        self.bootloader_requested = False
        self.bootloader_request_how = None
        self.rebooting = False          # acted on a request: silent from then on
        self.ignored_bootloader_requests = []
        self.line_speeds = []           # termios speeds the host set (link "usb")
        self.dropped_after_request = 0  # bytes read while "resetting"

        self._adopt_pty(fd)
        self._line_speed = self._read_line_speed()

    # -- control ---------------------------------------------------------

    def start(self):
        self._start_thread("klipper-mcu-%s" % self.mcu)
        return self

    def set_fault(self, fault):
        with self.lock:
            self.fault, self.fault_arg = parse_fault(fault)
            self.hung = False

    def reset(self):
        """Model an MCU reset: seq back to 0, receive state cleared, answering
        again after a bootloader request."""
        with self.lock:
            self.next_seq = 0
            self.decoder.reset()
            self.hung = False
            self.rebooting = False
            self._line_speed = self._read_line_speed()

    def received(self, name):
        """Accepted messages called @name (list of param dicts)."""
        with self.lock:
            return [p for n, p in self.messages if n == name]

    # -- thread ----------------------------------------------------------

    def _debug(self, fmt, *args):
        if self.log:
            self.log("%s: %s" % (self.mcu, fmt % args))

    def _run(self):
        poller = self._poller(self.fd)
        while not self._stopping and not self.disconnected:
            watch_line = self.link == "usb" and not self.rebooting
            events = self._poll(poller, int(self.touch_interval * 1000) if watch_line else 1000)
            if events is None:
                break
            if watch_line and self._line_coding_changed():
                continue
            ev = events.get(self.fd, 0)
            if not ev:
                continue
            data = self._read_pty(ev)
            if data:
                self._handle_input(data)

    def _handle_input(self, data):
        with self.lock:
            self.rx_bytes += len(data)
            self._debug("rx %s", data.hex(" "))
            if self.rebooting:
                # Resetting into the bootloader: nobody reads the port.
                self.dropped_after_request += len(data)
                self.lock.notify_all()
                return
            if self.fault == "silent" or self.hung:
                self.lock.notify_all()
                return
            if self.fault == "garbage":
                junk = bytes(self.random.choice([b for b in range(256) if b != 0x7E])
                             for _ in range(self.random.randint(8, 40)))
                self._write(junk)
                self.lock.notify_all()
                return
            out = bytearray()
            disconnect = False
            events = self.decoder.feed(data)
            # After the magic the firmware resets before its transmit
            # buffer drains: nothing of this input is answered.
            requested = self._serial_magic_seen()
            for event in [] if requested else events:
                if event[0] == "nak":
                    out += self._nak("malformed input")
                    continue
                _, seq, content = event
                if seq != self.next_seq:
                    self.blocks.append((seq, content, False))
                    out += self._nak("seq %d, expected %d" % (seq, self.next_seq))
                    continue
                self.blocks.append((seq, content, True))
                self.next_seq = (seq + 1) & klipper_proto.MESSAGE_SEQ_MASK
                self.requests += 1
                replies = self._dispatch(content)
                if self.hung:
                    break
                for reply in replies:
                    out += self._response_block(reply)
                out += build_block(self.next_seq)
                self.acks_sent += 1
                if self.fault == "disconnect" and self.requests >= (self.fault_arg or 1):
                    disconnect = True
                    break
            if out:
                self._write(bytes(out))
            if disconnect:
                self._disconnect()
            self.lock.notify_all()
        if disconnect and self.on_disconnect:
            self.on_disconnect(self)
        if requested and self.on_bootloader_request:
            self.on_bootloader_request(self, self.bootloader_request_how)

    # -- bootloader requests (protocols.md §4.1, §4.2) ---------------------

    def _read_line_speed(self):
        try:
            return termios.tcgetattr(self.fd)[5]
        except (termios.error, OSError):
            return None

    def _line_coding_changed(self):
        """Look at the line speed the host set; True when that was a 1200
        baud touch the MCU acted on (the thread then stops answering)."""
        speed = self._read_line_speed()
        if speed is None or speed == self._line_speed:
            return False
        self._line_speed = speed
        with self.lock:
            self.line_speeds.append(speed)
            self._debug("host set line speed %s", _speed_name(speed))
            acted = speed == termios.B1200 and self._bootloader_request("usb-1200-baud")
            self.lock.notify_all()
        if acted and self.on_bootloader_request:
            self.on_bootloader_request(self, "usb-1200-baud")
        return acted

    def _serial_magic_seen(self):
        """After a feed (lock held): did the block finder drop the magic?"""
        dropped, self.decoder.dropped = self.decoder.dropped, []
        if self.link != "serial" or SERIAL_BOOTLOADER_MAGIC not in dropped:
            return False
        return self._bootloader_request("serial-magic")

    def _bootloader_request(self, how):
        """bootloader_request() of the firmware (lock held)."""
        if not self.bootloader_request:
            self._debug("bootloader request (%s) ignored", how)
            self.ignored_bootloader_requests.append(how)
            return False
        self._debug("bootloader request (%s): resetting", how)
        self.bootloader_requested = True
        self.bootloader_request_how = how
        self.rebooting = True
        return True

    def _nak(self, why):
        self.naks_sent += 1
        self._debug("nak (%s)", why)
        return build_block(self.next_seq)

    def _response_block(self, content):
        block = bytearray(build_block(self.next_seq, content))
        self.responses_sent += 1
        n = self.responses_sent
        if (self.fault == "crc" and n % (self.fault_arg or 1) == 0) or \
                (self.fault == "crc_first" and n == 1):
            block[-3] ^= 0x5A
            self._debug("corrupting CRC of response %d", n)
        return bytes(block)

    def _dispatch(self, content):
        replies = []
        try:
            msgs = self.commands.parse(content)
        except klipper_proto.ProtocolError as e:
            msgs = [("#malformed", {"error": str(e), "content": bytes(content)})]
        for name, params in msgs:
            self.messages.append((name, params))
            self._debug("got %s %s", name, params)
            if name == "identify":
                offset, count = params["offset"], params["count"]
                if self.fault == "hang_mid_dict":
                    limit = self.fault_arg
                    if limit is None:
                        half = len(self.dict_compressed) // 2
                        limit = half - half % klipper_proto.IDENTIFY_CHUNK
                    if offset >= limit:
                        self.hung = True
                        self._debug("hanging at dictionary offset %d", offset)
                        return []
                chunk = self.dict_compressed[offset:offset + count]
                reply = self.responses.encode("identify_response", offset=offset, data=chunk)
                if len(reply) > klipper_proto.MESSAGE_PAYLOAD_MAX:
                    # The firmware cannot encode this (it would shut down).
                    self._debug("identify count %d does not fit a block", count)
                    continue
                replies.append(reply)
            elif name == "get_uptime":
                ticks = self._clock64()
                replies.append(self.responses.encode("uptime", high=ticks >> 32,
                                                     clock=ticks & 0xFFFFFFFF))
            elif name == "get_clock":
                replies.append(self.responses.encode("clock", clock=self._clock64() & 0xFFFFFFFF))
            elif name == "get_config":
                replies.append(self.responses.encode("config", is_config=0, crc=0,
                                                     is_shutdown=0, move_count=0))
        return replies

    def _clock64(self):
        return int((time.monotonic() - self.started_at) * self.clock_freq)


def _speed_name(speed):
    for name in dir(termios):
        if name.startswith("B") and name[1:].isdigit() and getattr(termios, name) == speed:
            return name[1:]
    return str(speed)


def touch_1200(path):
    """Host side of the USB CDC "1200 baud touch" (protocols.md §4.1, as
    flash_usb.py and flashtool do it): open, DTR on, B1200, DTR off, close;
    DTR ioctls fail on ptys and every error after the open is ignored,
    since the device may vanish mid-call."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for request in (termios.TIOCMBIS, None, termios.TIOCMBIC):
            try:
                if request is None:
                    attrs = termios.tcgetattr(fd)
                    attrs[4] = attrs[5] = termios.B1200
                    termios.tcsetattr(fd, termios.TCSANOW, attrs)
                else:
                    fcntl.ioctl(fd, request, struct.pack("I", termios.TIOCM_DTR))
            except (OSError, termios.error):
                pass
    finally:
        os.close(fd)


def send_serial_bootloader_request(fd):
    """Host side of the UART request (§4.2): 0x7e + the 32-byte magic."""
    os.write(fd, SERIAL_BOOTLOADER_REQUEST)


def host_identify(fd, timeout=5.0, first_seq=1, count=klipper_proto.IDENTIFY_CHUNK, rto=0.1):
    """Reference host: download the compressed dictionary over @fd.

    Behaves like protocols.md §1.5's minimal client (Klipper's host starts
    with seq 1, so a fresh MCU naks first): writes 0x7e + identify, adopts
    the seq of every ack/nak, retransmits after @rto without an answer.
    Returns (compressed bytes, stats dict).  Raises TimeoutError, or
    ConnectionError when the port hangs up."""
    decoder = klipper_proto.StreamDecoder()
    seq = first_seq & klipper_proto.MESSAGE_SEQ_MASK
    data = bytearray()
    stats = {"sent": 0, "naks": 0, "retransmits": 0, "bad_bytes": 0}
    deadline = time.monotonic() + timeout
    sent_seq = None
    sent_at = 0.0
    have_chunk = False

    def send(resync):
        nonlocal sent_seq, sent_at, have_chunk
        block = klipper_proto.identify_block(seq, len(data), count)
        os.write(fd, (b"\x7e" if resync else b"") + block)
        sent_seq, sent_at, have_chunk = seq, time.monotonic(), False
        stats["sent"] += 1

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    send(True)
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError("no complete dictionary after %.1f s (%d bytes)"
                               % (timeout, len(data)))
        events = poller.poll(max(1, int(min(deadline - now, sent_at + rto - now) * 1000)))
        if not events:
            if time.monotonic() >= sent_at + rto:
                stats["retransmits"] += 1
                send(True)
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as e:
            if e.errno == errno.EIO:
                raise ConnectionError("port hung up") from e
            raise
        if not chunk:
            raise ConnectionError("port hung up")
        for event in decoder.feed(chunk):
            if event[0] != "block":
                continue
            _, block_seq, content = event
            if content:
                for name, params in klipper_proto.BOOT_PARSER.parse(content):
                    if name == "identify_response" and params["offset"] == len(data):
                        if not params["data"]:
                            stats["bad_bytes"] = decoder.discarded
                            return bytes(data), stats
                        data += params["data"]
                        have_chunk = True
                continue
            acked = block_seq == ((sent_seq + 1) & klipper_proto.MESSAGE_SEQ_MASK)
            seq = block_seq
            if not acked:
                stats["naks"] += 1
                send(True)
            elif have_chunk:
                send(False)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a simulated Klipper MCU on a pty.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pty-link", help="serve: symlink to create to the pty slave")
    mode.add_argument("--identify", metavar="DEVICE",
                      help="act as a host instead: download DEVICE's dictionary, print the JSON")
    ap.add_argument("--version", default=DEFAULT_VERSION)
    ap.add_argument("--mcu", default="stm32f429xx")
    ap.add_argument("--link", default="usb", choices=["usb", "serial", "can", "canbridge"])
    ap.add_argument("--build-versions", default=None)
    ap.add_argument("--fault", default=None, help="one of: " + ", ".join(sorted(FAULTS)))
    ap.add_argument("--start-seq", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--timeout", type=float, default=5.0, help="--identify: overall timeout")
    args = ap.parse_args(argv)

    if args.identify:
        fd = os.open(args.identify, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            tty.setraw(fd, termios.TCSANOW)
            compressed, stats = host_identify(fd, timeout=args.timeout)
        finally:
            os.close(fd)
        print(klipper_proto.inflate_dictionary(compressed))
        print("identify: %d bytes compressed, %r" % (len(compressed), stats), file=sys.stderr)
        return 0

    master, slave = os.openpty()
    slave_name = os.ttyname(slave)
    tty.setraw(master, termios.TCSANOW)
    try:
        if os.path.islink(args.pty_link):
            os.unlink(args.pty_link)
        os.symlink(slave_name, args.pty_link)
    finally:
        os.close(slave)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    mcu = KlipperMcu(master, version=args.version, mcu=args.mcu, link=args.link,
                     build_versions=args.build_versions, fault=args.fault,
                     start_seq=args.start_seq, own_fd=True, log=log if args.verbose else None)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    mcu.start()
    log("klipper_mcu: %s %s on %s (link %s), dictionary %d bytes compressed"
        % (args.mcu, args.version, slave_name, args.pty_link, len(mcu.dict_compressed)))
    try:
        while not done.is_set() and not mcu.disconnected:
            done.wait(0.5)
    finally:
        mcu.stop()
        try:
            if os.path.islink(args.pty_link) and os.readlink(args.pty_link) == slave_name:
                os.unlink(args.pty_link)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
