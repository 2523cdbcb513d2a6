#!/usr/bin/python3
"""Katapult on a serial line: USB CDC ACM (1d50:6177) or a UART, simulated
on the master side of a pty.

KatapultSerial serves one pty master fd from a thread with the protocol of
katapult_core.KatapultCore (protocols.md §5; no GET_CANBUS_ID, which only
CAN builds have).  Like the real bootloader it ignores the line speed and
answers on the raw byte stream.  After COMPLETE it acknowledges, waits
complete_delay (0.1 s, Katapult's delay before the application jump),
stops answering (input is read and dropped, the MCU is "resetting") and
calls on_complete(sim, mode, dictionary) from its thread, without its
lock: mode is what now runs ("klipper" with the dictionary JSON of the
flashed image or of the previous application, "foreign" for a flashed
image without a Klipper dictionary, "katapult" when there is no
application).  Who set on_complete (the test harness) re-plugs the
application; the simulator itself never touches devices.

The flash (dict address -> block) can be handed in so it survives
bootloader sessions of one board.  Recorded for assertions (under .lock
or after wait_for): rx_bytes, tx_bytes, commands [(cmd, payload)],
requests, naks_sent, responses_sent, pages_written, completed, left
(mode booted into after COMPLETE, None before).  Faults: "silent" (read
and record, never answer), "garbage" (answer every valid frame with random
bytes), "disconnect[:N]" (hang up the pty after answering the Nth frame).

baud= (off by default) puts the pty behind a rate-limited line
(linkmodel.py, for scripts/bench): every byte in either direction costs
10/baud s, the simulator answers no sooner than the line allows, and
.link.link_seconds adds it up.

KatapultPty is a KatapultSerial on a fresh pty of its own.
host_command()/host_connect() are a small reference host (flashtool's
command exchange: one frame out, first valid response back) for tests.

Command line: serve a fresh pty whose slave is symlinked to PATH, or act as
the host and print CONNECT's answer:
  /usr/bin/python3 tests/sim/katapult_serial.py --pty-link /tmp/ttyKatapult \\
      --mcu stm32f446xx --app-start 0x08008000
  /usr/bin/python3 tests/sim/katapult_serial.py --connect /tmp/ttyKatapult
"""

import argparse
import errno
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
import katapult_core  # noqa: E402
from linkmodel import LinkModel, serial_seconds  # noqa: E402
from ptysim import PtySim  # noqa: E402
from simthread import parse_fault  # noqa: E402

FAULTS = {
    "silent": "read and record everything, never answer",
    "garbage": "answer every valid frame with 8..40 random bytes",
    "disconnect": "disconnect[:N]: hang up the pty after answering the Nth frame (default 1)",
}


class KatapultSerial(PtySim):
    """Katapult serving pty master @fd from a thread; see the module docstring.

    mcu, app_start, block_size, page_size, katapult_version, proto_version
                    what CONNECT reports / how the flash is laid out
    flash           dict address -> block (shared; default a fresh one)
    app_dictionary  JSON of the application Katapult would start when
                    nothing is flashed (None: no application)
    on_complete     callable(sim, mode, dictionary), see the module docstring
    complete_delay  seconds from COMPLETE to the "reset"
    own_fd          close @fd on stop() (the standalone CLI owns its pty)
    baud            line rate of the link model (None: no rate limit); .link
                    is its LinkModel (None without)
    jump_to         where the application really starts (KatapultCore)
    """

    def __init__(self, fd, mcu, app_start=0x08002000, block_size=64, page_size=2048,
                 katapult_version=katapult_core.DEFAULT_KATAPULT_VERSION,
                 proto_version=katapult_core.PROTO_VERSION, flash=None, app_dictionary=None,
                 on_complete=None, complete_delay=katapult_core.COMPLETE_DELAY, fault=None,
                 own_fd=False, seed=None, log=None, baud=None, jump_to=None):
        super().__init__()
        self.fd = fd
        self.mcu = mcu
        self.app_start = app_start
        self.block_size = block_size
        self.app_dictionary = app_dictionary
        self.on_complete = on_complete
        self.complete_delay = complete_delay
        self.own_fd = own_fd
        self.log = log
        self.fault, self.fault_arg = parse_fault(fault, FAULTS)
        self.baud = baud
        self.link = LinkModel() if baud else None

        self.rx_bytes = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.commands = []
        self.requests = 0
        self.naks_sent = 0
        self.responses_sent = 0
        self.pages_written = 0
        self.completed = False
        self.left = None
        self.disconnected = False
        self._complete_at = None
        self.core = katapult_core.KatapultCore(
            mcu, app_start=app_start, block_size=block_size, page_size=page_size,
            katapult_version=katapult_version, proto_version=proto_version,
            flash=flash, commands=self.commands, stats=self, on_complete=self._completing,
            random=random.Random(seed), log=self._debug, jump_to=jump_to)
        self.flash = self.core.flash

        self._adopt_pty(fd)

    # -- control -----------------------------------------------------------

    def start(self):
        self._start_thread("katapult-%s" % self.mcu)
        return self

    def set_fault(self, fault):
        with self.lock:
            self.fault, self.fault_arg = parse_fault(fault, FAULTS)

    def image(self):
        """The flashed bytes from app_start to the end of the highest block."""
        with self.lock:
            return self.core.image()

    def command_names(self):
        """Names of the commands received, in order (e.g. ["CONNECT", ...])."""
        with self.lock:
            return [katapult_core.COMMAND_NAMES.get(c, "0x%02x" % c) for c, _ in self.commands]

    # -- thread ------------------------------------------------------------

    def _debug(self, fmt, *args):
        if self.log:
            self.log("katapult %s: %s" % (self.mcu, fmt % args if args else fmt))

    def _completing(self):
        # Called by the core inside feed() (lock held).
        if self._complete_at is None:
            self._complete_at = time.monotonic() + self.complete_delay

    def _run(self):
        poller = self._poller(self.fd)
        while not self._stopping and not self.disconnected:
            timeout = 1000
            if self._complete_at is not None and not self.completed:
                timeout = max(0, int((self._complete_at - time.monotonic()) * 1000) + 1)
            events = self._poll(poller, timeout)
            if events is None:
                break
            if self._complete_at is not None and not self.completed and \
                    time.monotonic() >= self._complete_at:
                self._leave()
            ev = events.get(self.fd, 0)
            if not ev:
                continue
            data = self._read_pty(ev)
            if data:
                self._handle_input(data)

    def _leave(self):
        with self.lock:
            mode, dictionary = self.core.boot_target(self.app_dictionary)
            self.completed = True
            self.left = mode
            self._debug("application jump: %s", mode)
            self.lock.notify_all()
        if self.on_complete:
            self.on_complete(self, mode, dictionary)

    def _pace(self, nbytes, wait):
        """The line carries @nbytes (lock held); with @wait, return when it
        has.  Input is handled while it still "arrives": the simulator's
        own time hides in the line's."""
        if self.link is not None:
            self.link.occupy(serial_seconds(nbytes, self.baud), wait=wait, lock=self.lock)

    def _handle_input(self, data):
        with self.lock:
            self._pace(len(data), False)
            self.rx_bytes += len(data)
            self._debug("rx %s", data.hex(" "))
            if self.completed or self.fault == "silent":
                self.lock.notify_all()
                return
            self.core.garbage = self.fault == "garbage"
            before = self.requests
            out = self.core.feed(data)
            if out:
                self._pace(len(out), True)
                self._write(out)
            if self.fault == "disconnect" and before < (self.fault_arg or 1) <= self.requests:
                self._disconnect()
            self.lock.notify_all()


class KatapultPty:
    """A started KatapultSerial (.sim) on the master of a fresh pty whose
    slave, .path, a host opens (test_flashers.py, scripts/bench).  Other
    keyword arguments go to KatapultSerial."""

    def __init__(self, mcu="stm32f446xx", **kwargs):
        self.master, slave = os.openpty()
        self.path = os.ttyname(slave)
        os.close(slave)
        self.sim = KatapultSerial(self.master, mcu, **kwargs).start()

    def stop(self):
        self.sim.stop()
        try:
            os.close(self.master)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Reference host


def host_command(fd, cmd, payload=b"", timeout=2.0):
    """Send one Katapult command over @fd; returns (response code, payload)
    of the next response frame with a good CRC.  TimeoutError if none,
    ConnectionError when the port hangs up."""
    os.write(fd, katapult_core.frame(cmd, payload))
    reader = katapult_core.ResponseReader()
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            if time.monotonic() >= deadline:
                raise TimeoutError("no Katapult response to command 0x%02x" % cmd)
            continue
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            continue
        except OSError as e:
            if e.errno == errno.EIO:
                raise ConnectionError("port hung up") from e
            raise
        if not data:
            raise ConnectionError("port hung up")
        for code, body in reader.feed(data):
            if code is not None:
                return code, body


def host_connect(fd, timeout=2.0):
    """CONNECT; returns katapult_core.parse_connect_payload() of the ACK."""
    code, payload = host_command(fd, katapult_core.CONNECT, timeout=timeout)
    if code != katapult_core.ACK or struct.unpack_from("<I", payload)[0] != \
            katapult_core.CONNECT:
        raise ValueError("CONNECT answered with 0x%02x %s" % (code, payload.hex()))
    return katapult_core.parse_connect_payload(payload[4:])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a simulated Katapult on a pty.")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--pty-link", help="serve: symlink to create to the pty slave")
    mode.add_argument("--connect", metavar="DEVICE",
                      help="act as a host instead: send CONNECT to DEVICE, print the answer")
    ap.add_argument("--mcu", default="stm32f446xx")
    ap.add_argument("--app-start", type=lambda v: int(v, 0), default=0x08002000)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--katapult-version", default=katapult_core.DEFAULT_KATAPULT_VERSION)
    ap.add_argument("--fault", default=None, help="one of: " + ", ".join(sorted(FAULTS)))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    if args.connect:
        fd = os.open(args.connect, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            tty.setraw(fd, termios.TCSANOW)
            info = host_connect(fd)
        finally:
            os.close(fd)
        print(" ".join("%s=%s" % (k, hex(v) if k in ("proto_version", "app_start") else v)
                       for k, v in info.items()))
        return 0

    master, slave = os.openpty()
    slave_name = os.ttyname(slave)
    try:
        if os.path.islink(args.pty_link):
            os.unlink(args.pty_link)
        os.symlink(slave_name, args.pty_link)
    finally:
        os.close(slave)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    done = threading.Event()
    sim = KatapultSerial(master, args.mcu, app_start=args.app_start, block_size=args.block_size,
                         katapult_version=args.katapult_version, fault=args.fault, own_fd=True,
                         log=log if args.verbose else None,
                         on_complete=lambda s, mode, d: done.set())
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    sim.start()
    log("katapult_serial: %s on %s (link %s)" % (args.mcu, slave_name, args.pty_link))
    try:
        while not done.is_set() and not sim.disconnected:
            done.wait(0.5)
    finally:
        sim.stop()
        try:
            if os.path.islink(args.pty_link) and os.readlink(args.pty_link) == slave_name:
                os.unlink(args.pty_link)
        except OSError:
            pass
    if sim.left:
        log("katapult_serial: COMPLETE, application jump to %s" % sim.left)
    return 0


if __name__ == "__main__":
    sys.exit(main())
