"""Plain building blocks of the integration test environment.

Used by conftest.py (which wraps them in pytest fixtures) and by
tests/tools/demo_env.py (the demo of design.md §5):

  PrivateBus     a private, system-like dbus-daemon with the project's real
                 policy file dbus/io.mcuflash1.conf and tests/data/test-policy.conf
  Testbed        a umockdev testbed with helpers that plug simulated boards:
                 Klipper USB CDC ttys (tests/data/*.umockdev templates filled in,
                 /dev/serial/by-id links, uevents) with a KlipperMcu simulator,
                 UARTs and USB-UART bridges; boards with a bootloader
                 re-enumerate into it on a bootloader request (Katapult's CDC
                 tty with katapult_serial.py, the ROM bootloaders of
                 usb_boot.py) and back into Klipper when it starts the
                 application
  Board          one simulated board: its identity and the device it shows now
  KlipperHost    a fake Klipper checkout (klippy/.version) and printer.cfg
  Daemon         the built mcuflashd under umockdev's preload, stderr in a file
  BusClient      python3-dbus client: properties, calls, signal-driven waiting
  run_ctl()      the built mcuflashctl against the private bus

It does not decide what a test checks, and it never touches the real system
bus, real devices or the real Klipper installation.  The whole test process
must run under umockdev's preload (tests/run-integration does that).
"""

import gc
import heapq
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

import dbus  # noqa: E402
import dbus.mainloop.glib  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(TESTS_DIR)
DATA_DIR = os.path.join(TESTS_DIR, "data")
SIM_DIR = os.path.join(TESTS_DIR, "sim")
if SIM_DIR not in sys.path:
    sys.path.insert(0, SIM_DIR)

import katapult_serial  # noqa: E402
import klipper_mcu  # noqa: E402

BUS_NAME = "io.mcuflash1"
MANAGER_PATH = "/io/mcuflash1"
MANAGER_IFACE = "io.mcuflash1.Manager"
MCU_IFACE = "io.mcuflash1.Mcu"
PROJECT_POLICY = os.path.join(REPO_DIR, "dbus", "io.mcuflash1.conf")
TEST_POLICY = os.path.join(DATA_DIR, "test-policy.conf")

HOST_VERSION = "v0.13.0-46-g8c72b4a5"
OLD_VERSION = "v0.12.0-396-g2d5a2aa8"


class HarnessError(RuntimeError):
    pass


def build_dir():
    """The meson build dir: $MCUFLASHD_BUILDDIR, else <repo>/build."""
    return os.environ.get("MCUFLASHD_BUILDDIR") or os.path.join(REPO_DIR, "build")


def daemon_binary():
    return os.path.join(build_dir(), "daemon", "mcuflashd")


def ctl_binary():
    return os.path.join(build_dir(), "client", "mcuflashctl")


def umockdev_preload():
    """Absolute path of libumockdev-preload.so.0 (soname as fallback)."""
    try:
        out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True,
                             check=False).stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("libumockdev-preload.so.0 ") and "=>" in line:
                path = line.split("=>", 1)[1].strip()
                if os.path.exists(path):
                    return path
    except OSError:
        pass
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        p = os.path.join(d, "libumockdev-preload.so.0")
        if os.path.exists(p):
            return p
    return "libumockdev-preload.so.0"


def clean_env(**extra):
    """os.environ without umockdev's preload/testbed, plus @extra."""
    env = dict(os.environ)
    for k in ("LD_PRELOAD", "UMOCKDEV_DIR", "DBUS_SESSION_BUS_ADDRESS"):
        env.pop(k, None)
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    """Poll @predicate (plain Python state, not D-Bus) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------------------
# D-Bus


class PrivateBus:
    """A dbus-daemon configured like the system bus, in @workdir."""

    def __init__(self, workdir, policy_files=None, require_project_policy=True):
        self.workdir = os.path.join(workdir, "bus")
        self.policy_dir = os.path.join(self.workdir, "system.d")
        self.socket = os.path.join(self.workdir, "system_bus_socket")
        os.makedirs(self.policy_dir, exist_ok=True)
        if require_project_policy and not os.path.exists(PROJECT_POLICY):
            raise HarnessError("the project's D-Bus policy %s does not exist" % PROJECT_POLICY)
        files = [PROJECT_POLICY, TEST_POLICY] if require_project_policy else [TEST_POLICY]
        for f in files + list(policy_files or []):
            shutil.copy(f, self.policy_dir)
        with open(os.path.join(DATA_DIR, "bus.conf.in")) as f:
            conf = f.read()
        conf = conf.replace("@SOCKET@", self.socket).replace("@POLICY_DIR@", self.policy_dir)
        self.config = os.path.join(self.workdir, "bus.conf")
        with open(self.config, "w") as f:
            f.write(conf)
        self.log_path = os.path.join(self.workdir, "dbus-daemon.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--config-file=" + self.config, "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=self.log, env=clean_env(), text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("unix:"):
            self.stop()
            raise HarnessError("dbus-daemon did not start: %r, log: %s" % (line, self._log_text()))
        self.address = line

    def _log_text(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc.stdout.close()
            self.proc = None
        if self.log:
            self.log.close()
            self.log = None


def to_python(value):
    """dbus-python values to plain Python (str, int, bool, float, list, dict)."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(value)
    if isinstance(value, (dbus.Byte, dbus.Int16, dbus.UInt16, dbus.Int32, dbus.UInt32,
                          dbus.Int64, dbus.UInt64)):
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, (dbus.Array, list, tuple, dbus.Struct)):
        return [to_python(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {to_python(k): to_python(v) for k, v in value.items()}
    return value


class BusClient:
    """A python3-dbus connection to the private bus with a GLib main loop, so
    that waits can be driven by signals.  Every signal io.mcuflash1 emits is
    recorded in .signals as (path, interface, member, args)."""

    def __init__(self, address):
        self.address = address
        self.conn = dbus.bus.BusConnection(address, mainloop=dbus.mainloop.glib.DBusGMainLoop())
        self.signals = []
        self._signal_seen = False
        self.conn.add_signal_receiver(self._on_signal, bus_name=BUS_NAME,
                                      interface_keyword="interface", member_keyword="member",
                                      path_keyword="path")

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass

    def _on_signal(self, *args, interface=None, member=None, path=None):
        self.signals.append((str(path), str(interface), str(member), to_python(list(args))))
        self._signal_seen = True

    def clear_signals(self):
        self.signals = []

    def signals_named(self, member):
        self.iterate()
        return [s for s in self.signals if s[2] == member]

    def iterate(self):
        """Dispatch whatever is pending (signals) without blocking."""
        ctx = GLib.MainContext.default()
        while ctx.pending():
            ctx.iteration(False)

    def name_has_owner(self, name=BUS_NAME):
        return bool(self.conn.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus")
                    .NameHasOwner(name, dbus_interface="org.freedesktop.DBus"))

    def call(self, path, interface, method, *args, timeout=30):
        obj = self.conn.get_object(BUS_NAME, path, introspect=False)
        return to_python(obj.get_dbus_method(method, interface)(*args, timeout=timeout))

    def get_all(self, path, interface):
        return self.call(path, "org.freedesktop.DBus.Properties", "GetAll", interface)

    def get(self, path, interface, prop):
        return self.call(path, "org.freedesktop.DBus.Properties", "Get", interface, prop)

    def manager_props(self):
        return self.get_all(MANAGER_PATH, MANAGER_IFACE)

    def mcu_props(self, path):
        return self.get_all(path, MCU_IFACE)

    def list_mcus(self):
        return self.call(MANAGER_PATH, MANAGER_IFACE, "ListMcus")

    def get_mcu(self, selector):
        return self.call(MANAGER_PATH, MANAGER_IFACE, "GetMcu", selector)

    def all_mcu_props(self):
        """{path: props} of every MCU the manager lists."""
        return {p: self.mcu_props(p) for p in self.list_mcus()}

    def find_mcu(self, **match):
        """Props of the single MCU whose properties equal @match
        (e.g. UsbSerial=...), or None."""
        found = [p for p in self.all_mcu_props().values()
                 if all(p.get(k) == v for k, v in match.items())]
        if len(found) > 1:
            raise HarnessError("%d MCUs match %r" % (len(found), match))
        return found[0] if found else None

    def wait_for(self, predicate, timeout=10.0, what=None):
        """Wait until predicate() returns something true and return it.

        predicate is re-evaluated after every signal from io.mcuflash1
        (PropertiesChanged, McuAdded, InterfacesAdded, ...) and at least every
        200 ms; a D-Bus error inside it (object not there yet) counts as false."""
        ctx = GLib.MainContext.default()
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            self.iterate()
            try:
                value = predicate()
                if value:
                    return value
            except dbus.exceptions.DBusException as e:
                last_error = e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out after %.1f s waiting for %s%s" % (
                    timeout, what or getattr(predicate, "__name__", "condition"),
                    " (last D-Bus error: %s)" % last_error if last_error else ""))
            fired = []
            source = GLib.timeout_add(max(1, int(min(left, 0.2) * 1000)),
                                      lambda: fired.append(1) and False)
            self._signal_seen = False
            while not self._signal_seen and not fired:
                ctx.iteration(True)
            if not fired:
                GLib.source_remove(source)

    def wait_for_name(self, timeout=10.0, process=None):
        """Wait until io.mcuflash1 is owned; fail early if @process exits."""
        deadline = time.monotonic() + timeout
        while not self.name_has_owner():
            if process is not None and process.poll() is not None:
                raise HarnessError("mcuflashd exited with status %d before taking %s"
                                   % (process.returncode, BUS_NAME))
            if time.monotonic() >= deadline:
                raise TimeoutError("%s did not appear on the bus within %.0f s"
                                   % (BUS_NAME, timeout))
            time.sleep(0.02)


# ---------------------------------------------------------------------------
# umockdev


def _read_template(name):
    with open(os.path.join(DATA_DIR, name)) as f:
        lines = [line for line in f.read().splitlines(True) if not line.startswith("#")]
    return "".join(lines)


def _fill(template, values):
    for key, value in values.items():
        template = template.replace("@%s@" % key, str(value))
    left = re.findall(r"@[A-Z0-9_]+@", template)
    if left:
        raise HarnessError("unfilled placeholders %s" % sorted(set(left)))
    return template


def st_dfu_serial(klipper_serial):
    """The USB serial an STM32's ROM DFU bootloader reports for the chip
    whose Klipper serial (the 96-bit unique id as hex, memory order) is
    @klipper_serial: ST's USB library form, UID0+UID2 as 8 hex digits and
    the top half of UID1 as 4 (e.g. 2E0036000851363131363530 ->
    306B365F3136).  Any other string is returned reversed, so it differs
    from Klipper's as the real ones do."""
    try:
        raw = bytes.fromhex(klipper_serial)
    except ValueError:
        raw = b""
    if len(raw) != 12:
        return klipper_serial[::-1]
    uid0, uid1, uid2 = struct.unpack("<III", raw)
    return "%08X%04X" % ((uid0 + uid2) & 0xFFFFFFFF, uid1 >> 16)


# USB ROM bootloaders simulated by tests/sim/usb_boot.py: mode -> (class
# name, the callback attribute it calls when the host starts the
# application, USB serial the device reports given Klipper's serial).
# Adding a bootloader is one entry here (and its simulator there).  The
# harness uses of a simulator: cls(serial=, log=, **boot_kwargs),
# record(port, busnum, devnum, interfaces=True), attach(UMockdev.Testbed,
# devnode), detach(), .flash (bytearray, 0xFF = erased) under .lock.
USB_BOOTLOADERS = {
    "stm32-dfu": ("Stm32DfuSim", "on_leave", st_dfu_serial),
    "picoboot": ("Rp2040BootSim", "on_reboot", lambda serial: serial),
}
BOOTLOADERS = ("katapult",) + tuple(USB_BOOTLOADERS)

# Timing of a simulated reboot (seconds): from the request the firmware got
# to its USB disconnect, and from the disconnect to the next device's
# enumeration.  Katapult adds its own ~0.1 s between COMPLETE and the jump.
RESET_DELAY = 0.005
ENUMERATE_DELAY = 0.1


class Device:
    """One device on the testbed's bus: what a Board currently shows."""

    def __init__(self, tty, devnode, syspaths, links, master_fd, devnos, vendor_id=None,
                 product_id=None, usb_serial=None, busnum=None, devnum=None):
        self.tty = tty                          # "ttyACM0", None for a bare USB device
        self.devnode = devnode                  # "/dev/ttyACM0", "/dev/bus/usb/001/007"
        self.syspaths = syspaths                # child first ("/sys/devices/...")
        self.links = links                      # /dev/serial/... DEVLINKS
        self.master_fd = master_fd              # pty master (testbed owns it) or None
        self.devnos = devnos                    # "major:minor" of every node
        self.vendor_id = vendor_id
        self.product_id = product_id
        self.usb_serial = usb_serial
        self.busnum = busnum
        self.devnum = devnum


class Board:
    """A simulated board plugged into the testbed.

    A board keeps its identity (serial = the chip id Klipper reports, mcu,
    port, version of the application) while the device it shows changes:
    a bootloader request makes a USB board re-enumerate on the same port
    as its bootloader, a UART board switches personality on the same tty.
      mode            "klipper", "katapult", "stm32-dfu", "picoboot",
                      "foreign" (a flashed non-Klipper application) or None
                      (rebooting: no device on the bus)
      history         every mode it entered, in order (starts ["klipper"])
      sim             the KlipperMcu while in Klipper, else None
      bootloader_sim  the bootloader simulator while in a bootloader, else None
      flash           Katapult's flash (address -> block), kept across sessions
      device          the current Device (None while rebooting); tty,
                      devnode, syspaths, links, master_fd, devnos,
                      vendor_id, product_id, usb_serial, busnum, devnum
                      read through to it (to the last one while rebooting)
      present         a device is on the bus; plugged: not removed by the test
    wait_mode(mode, timeout) waits for a mode (signalled, no polling)."""

    _DEVICE_FIELDS = ("tty", "devnode", "syspaths", "links", "master_fd", "devnos",
                      "vendor_id", "product_id", "usb_serial", "busnum", "devnum")

    def __init__(self, kind, **info):
        self.kind = kind                        # "klipper-usb", "ch340", "uart"
        self.plugged = True
        self.device = None
        self.last_device = None
        self.mode = None
        self.history = []
        self.sim = None
        self.bootloader_sim = None
        self.bootloader = None
        self.flash = {}
        self.rom_flash = None                   # a ROM bootloader's flash, kept likewise
        self.app_dictionary = None              # JSON of the Klipper application
        self.generation = 0                     # bumped by every transition
        self.cond = threading.Condition()
        self.__dict__.update(info)              # serial, mcu, port, version, ...

    def __getattr__(self, name):
        # Only called for attributes not set on the board itself.
        if name in Board._DEVICE_FIELDS:
            dev = self.__dict__.get("device") or self.__dict__.get("last_device")
            return getattr(dev, name) if dev is not None else None
        raise AttributeError(name)

    @property
    def present(self):
        return self.device is not None

    @property
    def syspath(self):
        """sysfs path of the tty (or of the USB device of a bootloader)."""
        return self.syspaths[0]

    @property
    def usb_syspath(self):
        """sysfs path of the usb_device (None for a UART)."""
        for p in self.syspaths or []:
            if re.search(r"/\d+-[\d.]+$", p):
                return p
        return None

    @property
    def by_id(self):
        for link in self.links or []:
            if link.startswith("/dev/serial/by-id/"):
                return link
        return None

    @property
    def by_path(self):
        for link in self.links or []:
            if link.startswith("/dev/serial/by-path/"):
                return link
        return None

    def wait_mode(self, mode, timeout=5.0, present=True):
        """Wait until the board is in @mode (and, with present, its device
        is plugged); returns the board.  TimeoutError otherwise."""
        def done():
            return self.mode == mode and (self.present or not present)
        with self.cond:
            if not self.cond.wait_for(done, timeout):
                raise TimeoutError("%r: still %s after %.1f s waiting for %s (history %s)"
                                   % (self, self.mode, timeout, mode, self.history))
        return self

    def wait_for(self, predicate, timeout=5.0):
        """Wait until predicate(board) is true (re-checked on every transition)."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def __repr__(self):
        return "<Board %s %s %s %s>" % (self.kind, self.devnode, getattr(self, "serial", ""),
                                        self.mode)


class _Scheduler:
    """One thread that runs the harness's delayed actions (plugging and
    unplugging after a simulator asked for it), in time order."""

    def __init__(self, run):
        self._run_action = run
        self._cond = threading.Condition()
        self._queue = []
        self._seq = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="testbed-actions", daemon=True)
        self._thread.start()

    def later(self, delay, action):
        with self._cond:
            self._seq += 1
            heapq.heappush(self._queue, (time.monotonic() + delay, self._seq, action))
            self._cond.notify_all()

    def stop(self):
        with self._cond:
            self._stopping = True
            self._queue = []
            self._cond.notify_all()
        self._thread.join(10)

    def _loop(self):
        while True:
            with self._cond:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._cond.wait(self._queue[0][0] - now if self._queue else None)
                if self._stopping:
                    return
                _, _, action = heapq.heappop(self._queue)
            self._run_action(action)


class Testbed:
    """umockdev testbed plus helpers to plug and unplug simulated boards.

    Create it inside a process that runs under umockdev's preload; children
    that should see it need env() (UMOCKDEV_DIR and the preload).
    sim_log: a function that gets every simulator's traffic as text lines.

    Boards with a bootloader re-enumerate by themselves: a simulator that
    got a bootloader request (or a bootloader told to start the
    application) asks the testbed, and a harness thread ("testbed-actions")
    unplugs and plugs devices a few ms later.  All umockdev calls, from
    that thread and from the test's, are serialised by one lock, and never
    run in a simulator's thread.  action_errors collects exceptions of that
    thread; close() raises them.

    Limits of umockdev 0.17 this class works around: a tty name is never
    reused after an unplug (ttyACM0 gone -> the next device is ttyACM1, also
    when a board comes back from its bootloader), devices are added parents
    first (umockdev sends each "add" as soon as a device is complete), and
    removal leaves stale entries it cleans up itself."""

    def __init__(self, sim_log=None):
        self.tb = UMockdev.Testbed.new()
        self.root = self.tb.get_root_dir()
        self.boards = []
        self._usec = 1700000000000000
        self._next_devnum = {}
        self._used_ttys = set()
        self._hubs = set()
        self._log = sim_log
        self._lock = threading.RLock()
        self.action_errors = []
        self._actions = _Scheduler(self._run_action)
        # The usual hubs exist before anything watches (like at boot).
        self._add_hubs(1, ["1-1"])

    # -- helpers ---------------------------------------------------------

    def env(self):
        """Environment entries a child needs to run inside this testbed."""
        return {"UMOCKDEV_DIR": self.root, "LD_PRELOAD": umockdev_preload()}

    def _free_tty(self, prefix):
        # umockdev 0.17 keeps a removed tty's name in its pty table, and adding
        # that name again aborts the process: unlike the kernel (lowest free
        # minor) a name is never reused within one testbed.
        n = 0
        while "%s%d" % (prefix, n) in self._used_ttys:
            n += 1
        self._used_ttys.add("%s%d" % (prefix, n))
        return "%s%d" % (prefix, n), n

    def _usb_values(self, port):
        m = re.fullmatch(r"(\d+)-(\d+(?:\.\d+)*)", port)
        if not m:
            raise HarnessError("bad USB port %r (expected e.g. 1-1.3)" % port)
        busnum = int(m.group(1))
        hops = m.group(2).split(".")
        chain = ["%d-%s" % (busnum, ".".join(hops[:i + 1])) for i in range(len(hops))]
        self._add_hubs(busnum, chain[:-1])
        devnum = self._next_devnum.get(busnum, 4) + 1
        self._next_devnum[busnum] = devnum
        self._usec += 1234567
        return {
            "PORT": port,
            "USBDEV": "pci0000:00/0000:00:14.0/usb%d/%s" % (busnum, "/".join(chain)),
            "USBPATH": m.group(2),
            "USBPATHTAG": m.group(2).replace(".", "_"),
            "BUSNUM": busnum, "BUSNUM3": "%03d" % busnum,
            "DEVNUM": devnum, "DEVNUM3": "%03d" % devnum,
            "USBMINOR": (busnum - 1) * 128 + devnum - 1,
            "USEC": self._usec,
        }

    def _add_hubs(self, busnum, hubs):
        """Add the root hub of bus @busnum and the hubs @hubs ("1-1", ...)
        if they are not there yet.  libusb numbers ports through the parent
        devices it finds (without them, dfu-util would call port 1-1.5
        "1-5"); udev sees them as on a real machine."""
        root = "usb%d" % busnum
        path = "pci0000:00/0000:00:14.0/" + root
        for name in [root] + hubs:
            if name != root:
                path += "/" + name
            if name in self._hubs:
                continue
            if name == root:
                devnum, vid, pid, maker, product, bcd = 1, 0x1d6b, 0x0002, \
                    "Linux 6.1.0-13-amd64 xhci-hcd", "xHCI Host Controller", 0x0601
            else:
                # The first hubs take devnums 2..4 (boards start at 5).
                devnum = len([h for h in self._hubs if h.startswith("%d-" % busnum)]) + 2
                if devnum > 4:
                    devnum = self._next_devnum.get(busnum, 4) + 1
                    self._next_devnum[busnum] = devnum
                vid, pid, maker, product, bcd = 0x05e3, 0x0610, "GenesysLogic", "USB2.1 Hub", \
                    0x6063
            descriptors = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 9, 0, 1, 64, vid, pid,
                                      bcd, 1, 2, 0 if name != root else 3, 1)
            descriptors += struct.pack("<BBHBBBBB", 9, 2, 25, 1, 1, 0, 0xE0, 0)
            descriptors += struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 1, 9, 0, 0, 0)
            descriptors += struct.pack("<BBBBHB", 7, 5, 0x81, 3, 4 if name == root else 1, 12)
            minor = (busnum - 1) * 128 + devnum - 1
            lines = ["P: /devices/" + path, "N: bus/usb/%03d/%03d" % (busnum, devnum),
                     "E: DEVPATH=/devices/" + path,
                     "E: DEVNAME=/dev/bus/usb/%03d/%03d" % (busnum, devnum),
                     "E: DEVTYPE=usb_device", "E: DRIVER=usb",
                     "E: PRODUCT=%x/%x/%x" % (vid, pid, bcd), "E: TYPE=9/0/1",
                     "E: BUSNUM=%03d" % busnum, "E: DEVNUM=%03d" % devnum, "E: MAJOR=189",
                     "E: MINOR=%d" % minor, "E: SUBSYSTEM=usb",
                     "E: ID_VENDOR_ID=%04x" % vid, "E: ID_MODEL_ID=%04x" % pid,
                     "A: bConfigurationValue=1\\n", "A: bDeviceClass=09\\n",
                     "A: bNumInterfaces= 1\\n", "A: busnum=%d\\n" % busnum,
                     "A: dev=189:%d\\n" % minor, "A: devnum=%d\\n" % devnum,
                     "A: devpath=%s\\n" % ("0" if name == root else name.split("-", 1)[1]),
                     "A: idProduct=%04x\\n" % pid, "A: idVendor=%04x\\n" % vid,
                     "A: manufacturer=%s\\n" % maker,
                     "A: maxchild=%d\\n" % (12 if name == root else 4),
                     "A: product=%s\\n" % product, "A: speed=480\\n",
                     "H: descriptors=" + descriptors.hex().upper()]
            self.tb.add_from_string("\n".join(lines) + "\n")
            self._hubs.add(name)

    def _used_ports(self):
        return {getattr(b, "port", None) for b in self.boards if b.plugged}

    def _plug_device(self, record, tty, links, **info):
        """Add the devices of @record (umockdev-record text, paragraphs in
        any order) and return a Device; with @tty, the testbed's pty
        master for it."""
        # umockdev 0.17's add_from_string() emits an "add" uevent for every
        # device as soon as that device is complete (its /dev node included),
        # and remove_device() emits nothing.  So add the devices one at a time,
        # parents first (the templates list the tty first, like
        # umockdev-record), so that every event finds its parents complete,
        # in the order the kernel sends them (syspaths: the reverse, for
        # "remove").  The /dev/serial links exist before the tty's event, as
        # udev creates them before it broadcasts.
        paragraphs = [p.strip("\n") + "\n" for p in record.split("\n\n") if p.strip()]

        def parents_first(paragraph):
            path = paragraph.split("\n", 1)[0][3:].strip()
            return path.count("/"), path
        paragraphs.sort(key=parents_first)
        syspaths = ["/sys" + p.split("\n", 1)[0][3:].strip() for p in reversed(paragraphs)]
        for link in links:
            # Like udev, the newest device takes over a link two share (two
            # CH340 bridges have the same by-id name).
            path = self.root + link
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._unlink(path)
            os.symlink(os.path.relpath(self.root + "/dev/" + tty, os.path.dirname(path)), path)
        for paragraph in paragraphs:
            self.tb.add_from_string(paragraph)
        master = None
        devnode = None
        if tty is not None:
            devnode = "/dev/" + tty
            master = self.tb.get_dev_fd(devnode)
            if master < 0:
                raise HarnessError("umockdev created no pty for %s" % devnode)
        else:
            m = re.search(r"^N: (\S+)", record, re.M)
            devnode = "/dev/" + m.group(1) if m else None
        devnos = re.findall(r"^A: dev=(\d+:\d+)", record, re.M)
        return Device(tty, devnode, syspaths, list(links), master, devnos, **info)

    def _unplug_device(self, dev, uevent=True):
        """Hang up the pty, send "remove" uevents (children first), delete
        the devices, the stale umockdev entries and /dev/serial links."""
        if dev.master_fd is not None:
            self._hangup(dev.master_fd)
        if uevent:
            for p in dev.syspaths:
                self.tb.uevent(p, "remove")
        pts = None
        if dev.tty is not None:
            try:
                pts = os.readlink(self.root + dev.devnode)
            except OSError:
                pts = None
        for p in dev.syspaths:
            self.tb.remove_device(p)
        # remove_device() (umockdev 0.17) leaves the /sys/dev/char links and
        # the pty map entry behind; a later device with the same numbers or
        # the same /dev/pts/N would then abort the testbed.
        for devno in dev.devnos:
            self._unlink(self.root + "/sys/dev/char/" + devno)
        if pts:
            self._unlink(self.root + "/dev/.ptymap/" + pts.replace("/", "_"))
        for link in dev.links:
            path = self.root + link
            try:
                if os.path.basename(os.readlink(path)) == dev.tty:
                    os.unlink(path)
            except OSError:
                pass

    def _klipper_sim(self, board, fd, sim_args):
        """A started KlipperMcu on @fd whose bootloader requests come to us."""
        args = dict(sim_args)
        args.setdefault("bootloader_request", board.bootloader is not None)
        sim = klipper_mcu.KlipperMcu(
            fd, log=self._log,
            on_bootloader_request=lambda s, how: self._request(board, s, how), **args)
        # A host that reacted to the uevent may already have written to
        # the pty; that input waits in the pty until the simulator reads it.
        return sim.start()

    def _set_mode(self, board, mode, device=None, sim=None, bootloader_sim=None):
        """Record a transition (testbed lock held)."""
        with board.cond:
            if board.device is not None:
                board.last_device = board.device
            board.device = device
            board.sim = sim
            board.bootloader_sim = bootloader_sim
            board.mode = mode
            board.generation += 1
            if mode is not None:
                board.history.append(mode)
            board.cond.notify_all()

    def uevent(self, board, action):
        """Send @action ("change", "remove", or a repeated "add") for the
        board's current devices: parents first for "add", children first
        otherwise.  Plugging a board sends its "add" events by itself."""
        with self._lock:
            if board.device is None:
                raise HarnessError("%r has no device on the bus now" % board)
            paths = board.syspaths if action != "add" else list(reversed(board.syspaths))
            for p in paths:
                self.tb.uevent(p, action)

    # -- boards ----------------------------------------------------------

    def add_klipper_usb(self, serial=None, mcu="stm32f429xx", version=HOST_VERSION,
                        port=None, fault=None, simulate=True, bootloader=None,
                        katapult_kwargs=None, boot_kwargs=None, reset_delay=RESET_DELAY,
                        enumerate_delay=ENUMERATE_DELAY, **sim_kwargs):
        """Plug a Klipper MCU on USB CDC ACM (1d50:614e) with a simulator;
        monitors get the kernel's "add" events (usb_device, interfaces, tty).

        serial: USB serial (chip id hex); default 2E003600...0851363131363530,
                one per board
        port: USB port path like "1-1.3"; default the next free 1-1.N
        fault, **sim_kwargs: passed to KlipperMcu (build_versions, start_seq, ...)
        simulate=False leaves the pty without a simulator (board.sim None).
        bootloader: what a bootloader request (1200 baud touch) leads to:
          None        the firmware ignores requests (no HAVE_BOOTLOADER_REQUEST;
                      pass bootloader_request=True for one whose bootloader
                      never enumerates: the tty goes and nothing comes back)
          "katapult"  Katapult's CDC ACM tty 1d50:6177 (katapult-usb-acm.umockdev)
                      with a KatapultSerial (katapult_kwargs: app_start,
                      block_size, katapult_version, fault, ...)
          "stm32-dfu", "picoboot"  the ROM bootloaders of usb_boot.py
                      (boot_kwargs go to their simulator)
        reset_delay, enumerate_delay: seconds from the request to the USB
          disconnect, and from there to the next device's "add" events.
        Returns a Board (devnode, by_id, by_path, sim, syspaths, mode, ...)."""
        if bootloader is not None and bootloader not in BOOTLOADERS:
            raise HarnessError("unknown bootloader %r (known: %s)"
                               % (bootloader, ", ".join(BOOTLOADERS)))
        with self._lock:
            if port is None:
                used = self._used_ports()
                port = next("1-1.%d" % n for n in range(2, 100) if "1-1.%d" % n not in used)
            if serial is None:
                serial = ("%08X" % (0x2E003600 + len(self.boards))) + "0851363131363530"
            board = Board("klipper-usb", serial=serial, mcu=mcu, port=port, version=version,
                          reset_delay=reset_delay, enumerate_delay=enumerate_delay,
                          katapult_kwargs=dict(katapult_kwargs or {}),
                          boot_kwargs=dict(boot_kwargs or {}), in_place=False)
            board.bootloader = bootloader
            sim_args = None
            if simulate:
                sim_args = dict(version=version, mcu=mcu, fault=fault, **sim_kwargs)
            board.sim_args = sim_args
            self.boards.append(board)
            self._plug_klipper_usb(board, sim_args)
            return board

    def _plug_klipper_usb(self, board, sim_args):
        tty, minor = self._free_tty("ttyACM")
        values = self._usb_values(board.port)
        values.update({"TTY": tty, "TTYMINOR": minor, "MCU": board.mcu, "SERIAL": board.serial})
        record = _fill(_read_template("klipper-usb-acm.umockdev"), values)
        links = ["/dev/serial/by-path/pci-0000:00:14.0-usb-0:%s:1.0" % values["USBPATH"],
                 "/dev/serial/by-id/usb-Klipper_%s_%s-if00" % (board.mcu, board.serial)]
        dev = self._plug_device(record, tty, links, vendor_id=0x1d50, product_id=0x614e,
                                usb_serial=board.serial, busnum=values["BUSNUM"],
                                devnum=values["DEVNUM"])
        sim = None
        if sim_args is not None:
            sim = self._klipper_sim(board, dev.master_fd, sim_args)
            board.app_dictionary = sim.dict_json
        self._set_mode(board, "klipper", device=dev, sim=sim)

    def add_usb_serial_bridge(self, port=None, klipper=None, bootloader=None,
                              katapult_kwargs=None, reset_delay=RESET_DELAY):
        """Plug a CH340 USB-UART bridge (1a86:7523, ttyUSBn, no serial).
        klipper: None (nothing answers) or a dict of KlipperMcu arguments
        (version, mcu, fault, ...) for a Klipper board behind the bridge.
        bootloader: None or "katapult": the UART magic string switches the
        same tty to Katapult and its COMPLETE back (see add_uart)."""
        with self._lock:
            if port is None:
                used = self._used_ports()
                port = next("1-1.%d" % n for n in range(4, 100) if "1-1.%d" % n not in used)
            tty, minor = self._free_tty("ttyUSB")
            values = self._usb_values(port)
            values.update({"TTY": tty, "TTYMINOR": minor})
            record = _fill(_read_template("ch340-usb-serial.umockdev"), values)
            links = ["/dev/serial/by-path/pci-0000:00:14.0-usb-0:%s:1.0-port0" % values["USBPATH"],
                     "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0"]
            board = Board("ch340", port=port, serial="", mcu=(klipper or {}).get("mcu"),
                          version=(klipper or {}).get("version"), reset_delay=reset_delay,
                          katapult_kwargs=dict(katapult_kwargs or {}), in_place=True)
            dev = self._plug_device(record, tty, links, vendor_id=0x1a86, product_id=0x7523,
                                    usb_serial="", busnum=values["BUSNUM"],
                                    devnum=values["DEVNUM"])
            return self._start_uart_board(board, dev, klipper, bootloader)

    def add_uart(self, tty="ttyAMA0", klipper=None, bootloader=None, katapult_kwargs=None,
                 reset_delay=RESET_DELAY):
        """Add an on-board UART (Raspberry Pi PL011 style), optionally with a
        Klipper simulator (dict of KlipperMcu arguments) on it.
        bootloader: None, or "katapult": the UART magic string (protocols.md
        §4.2) switches the same tty, without any uevent, to a KatapultSerial
        (katapult_kwargs) reset_delay later, and Katapult's COMPLETE switches
        it back to Klipper (the flashed version if the image has a Klipper
        dictionary)."""
        with self._lock:
            m = re.fullmatch(r"([A-Za-z]+)(\d+)", tty)
            line = int(m.group(2)) if m else 0
            addr = "7e201%03x" % (line * 0x200)
            values = {"TTY": tty, "TTYMINOR": 64 + line, "UARTDEV": "%s.serial" % addr[1:],
                      "UARTDEVTAG": "%s_serial" % addr[1:], "OFADDR": addr,
                      "IOMEMBASE": "FE201000", "LINE": line, "UARTTYPE": 91, "USEC": self._usec}
            if tty in self._used_ttys:
                raise HarnessError("%s was already used in this testbed (umockdev 0.17 "
                                   "cannot add a tty name twice)" % tty)
            self._used_ttys.add(tty)
            record = _fill(_read_template("platform-uart.umockdev"), values)
            board = Board("uart", port="", serial="", mcu=(klipper or {}).get("mcu"),
                          version=(klipper or {}).get("version"), reset_delay=reset_delay,
                          katapult_kwargs=dict(katapult_kwargs or {}), in_place=True)
            dev = self._plug_device(record, tty, [])
            return self._start_uart_board(board, dev, klipper, bootloader)

    def _start_uart_board(self, board, dev, klipper, bootloader):
        if bootloader not in (None, "katapult"):
            raise HarnessError("a UART board's bootloader can only be katapult, not %r"
                               % bootloader)
        if bootloader is not None and klipper is None:
            raise HarnessError("a bootloader needs a Klipper simulator (klipper=...)")
        board.bootloader = bootloader
        board.sim_args = dict(link="serial", **klipper) if klipper is not None else None
        self.boards.append(board)
        sim = None
        if board.sim_args is not None:
            sim = self._klipper_sim(board, dev.master_fd, board.sim_args)
            board.app_dictionary = sim.dict_json
        self._set_mode(board, "klipper", device=dev, sim=sim)
        return board

    def remove(self, board, uevent=True):
        """Unplug: stop the simulators, hang up the pty (the host sees
        EOF/EIO), send "remove" uevents (tty first), delete the devices and
        /dev/serial links.  uevent=False removes silently (a monitor misses
        the unplug).  A reboot in progress is abandoned."""
        with self._lock:
            if not board.plugged:
                return
            self._stop_sims(board)
            if board.device is not None:
                self._unplug_device(board.device, uevent=uevent)
            with board.cond:
                # The stopped simulators stay readable for assertions.
                board.plugged = False
                board.last_device = board.device or board.last_device
                board.device = None
                board.generation += 1
                board.cond.notify_all()

    @staticmethod
    def _unlink(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _hangup(master_fd):
        # Close the pty master while keeping its fd number valid: the
        # testbed still owns the number and closes it when it goes away.
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(null, master_fd)
        os.close(null)

    @staticmethod
    def _stop_sims(board):
        if board.sim is not None:
            board.sim.stop()
        sim = board.bootloader_sim
        if isinstance(sim, katapult_serial.KatapultSerial):
            sim.stop()
        elif sim is not None:
            sim.detach()

    def close(self):
        """Stop the action thread and every simulator, drop the testbed.
        Raises HarnessError afterwards if a re-enumeration failed."""
        self._actions.stop()
        with self._lock:
            for board in list(self.boards):
                self._stop_sims(board)
            self.boards = []
        del self.tb
        gc.collect()
        if self.action_errors:
            raise HarnessError("testbed actions failed:\n" + "\n".join(self.action_errors))

    # -- reboots (run by the action thread) ------------------------------

    def _later(self, board, delay, action):
        """Run action() in the action thread after @delay seconds, unless the
        board changed in between (removed, or another transition)."""
        generation = board.generation

        def run():
            if board.plugged and board.generation == generation:
                action()
        self._actions.later(delay, run)

    def _run_action(self, action):
        with self._lock:
            try:
                action()
            except Exception as e:          # raised again by close()
                self.action_errors.append("".join(traceback.format_exception(e)))
                if self._log:
                    self._log("testbed action failed: %s" % self.action_errors[-1])

    def _request(self, board, sim, how):
        """KlipperMcu callback (its thread): the firmware resets now."""
        if self._log:
            self._log("%s: bootloader request (%s)" % (board.serial or board.tty, how))
        self._later(board, board.reset_delay, lambda: self._enter_bootloader(board, sim))

    def _enter_bootloader(self, board, sim):
        if board.sim is not sim:
            return
        sim.stop()
        if board.in_place:
            # A UART: the same tty, now served by Katapult (or by nobody).
            if board.bootloader is None:
                self._set_mode(board, None, device=board.device)
            else:
                self._start_katapult(board, board.device)
            return
        self._unplug_device(board.device)
        self._set_mode(board, None)
        if board.bootloader is not None:
            self._later(board, board.enumerate_delay, lambda: self._plug_bootloader(board))

    def _plug_bootloader(self, board):
        if board.bootloader == "katapult":
            tty, minor = self._free_tty("ttyACM")
            values = self._usb_values(board.port)
            values.update({"TTY": tty, "TTYMINOR": minor, "MCU": board.mcu,
                           "SERIAL": board.serial})
            record = _fill(_read_template("katapult-usb-acm.umockdev"), values)
            links = ["/dev/serial/by-path/pci-0000:00:14.0-usb-0:%s:1.0" % values["USBPATH"],
                     "/dev/serial/by-id/usb-katapult_%s_%s-if00" % (board.mcu, board.serial)]
            dev = self._plug_device(record, tty, links, vendor_id=0x1d50, product_id=0x6177,
                                    usb_serial=board.serial, busnum=values["BUSNUM"],
                                    devnum=values["DEVNUM"])
            self._start_katapult(board, dev)
            return
        class_name, callback, serial_of = USB_BOOTLOADERS[board.bootloader]
        usb_boot = _usb_boot_module()
        kwargs = dict(board.boot_kwargs)
        kwargs.setdefault("serial", serial_of(board.serial))
        kwargs.setdefault("log", self._log)
        sim = getattr(usb_boot, class_name)(**kwargs)
        with sim.lock:
            if board.rom_flash is not None and len(board.rom_flash) == len(sim.flash):
                sim.flash[:] = board.rom_flash          # what earlier sessions wrote
        setattr(sim, callback, lambda *args: self._bootloader_done(board, sim, None, None))
        values = self._usb_values(board.port)
        record = sim.record(board.port, values["BUSNUM"], values["DEVNUM"], interfaces=True)
        m = re.search(r"^A: idVendor=([0-9a-fA-F]+)", record, re.M)
        vid = int(m.group(1), 16) if m else None
        m = re.search(r"^A: idProduct=([0-9a-fA-F]+)", record, re.M)
        pid = int(m.group(1), 16) if m else None
        # The handler first: a real device answers once udev announces it.
        sim.attach(self.tb)
        dev = self._plug_device(record, None, [], vendor_id=vid, product_id=pid,
                                usb_serial=kwargs["serial"], busnum=values["BUSNUM"],
                                devnum=values["DEVNUM"])
        self._set_mode(board, board.bootloader, device=dev, bootloader_sim=sim)

    def _start_katapult(self, board, dev):
        kwargs = dict(board.katapult_kwargs)
        kwargs.setdefault("flash", board.flash)
        kwargs.setdefault("app_dictionary", board.app_dictionary)
        sim = katapult_serial.KatapultSerial(
            dev.master_fd, board.mcu, log=self._log,
            on_complete=lambda s, mode, dictionary: self._bootloader_done(board, s, mode,
                                                                          dictionary),
            **kwargs)
        self._set_mode(board, "katapult", device=dev, bootloader_sim=sim)
        sim.start()

    def _bootloader_done(self, board, sim, mode, dictionary):
        """Bootloader simulator callback (its thread or umockdev's): the
        host told it to start the application.  mode/dictionary as
        KatapultSerial reports them; None for the ROM bootloaders (then
        the image they hold decides)."""
        delay = 0 if board.in_place else board.reset_delay
        self._later(board, delay, lambda: self._leave_bootloader(board, sim, mode, dictionary))

    def _leave_bootloader(self, board, sim, mode, dictionary):
        if board.bootloader_sim is not sim:
            return
        if mode is None:
            with sim.lock:
                board.rom_flash = bytes(sim.flash)
                mode, dictionary = sim.boot_target(board.app_dictionary)
        self._stop_sims(board)
        if board.in_place:
            self._start_application(board, mode, dictionary)
            return
        self._unplug_device(board.device)
        self._set_mode(board, None)
        self._later(board, board.enumerate_delay,
                    lambda: self._start_application(board, mode, dictionary))

    def _start_application(self, board, mode, dictionary):
        # "bootloader": a ROM bootloader whose flash holds nothing it can
        # start comes back as itself.
        if mode in ("katapult", "bootloader"):
            if board.in_place:
                self._start_katapult(board, board.device)
            else:
                self._plug_bootloader(board)
            return
        if mode == "foreign":
            # Not Klipper: nothing of ours answers (on USB nothing enumerates).
            self._set_mode(board, "foreign", device=board.device if board.in_place else None)
            return
        sim_args = dict(board.sim_args or {})
        for key in ("version", "build_versions", "fault", "start_seq", "dictionary", "app", "kconfig",
                    "compression"):
            sim_args.pop(key, None)
        sim_args["dictionary"] = dictionary
        parsed = json.loads(dictionary)
        board.version = parsed.get("version", board.version)
        board.mcu = parsed.get("config", {}).get("MCU", board.mcu)
        if board.in_place:
            sim = self._klipper_sim(board, board.device.master_fd, sim_args)
            board.app_dictionary = dictionary
            self._set_mode(board, "klipper", device=board.device, sim=sim)
        else:
            self._plug_klipper_usb(board, sim_args)


def _usb_boot_module():
    """tests/sim/usb_boot.py (the ROM bootloader simulators)."""
    try:
        import usb_boot
    except ImportError as e:
        raise HarnessError("tests/sim/usb_boot.py is needed for the ROM bootloaders: %s" % e)
    return usb_boot


# ---------------------------------------------------------------------------
# Klipper host side


class KlipperHost:
    """A fake Klipper installation: checkout with klippy/.version and a
    printer_data/config/printer.cfg, under @workdir."""

    def __init__(self, workdir):
        self.checkout = os.path.join(workdir, "klipper")
        self.printer_cfg_path = os.path.join(workdir, "printer_data", "config", "printer.cfg")
        self.api_socket = os.path.join(workdir, "printer_data", "comms", "klippy.sock")
        os.makedirs(os.path.join(self.checkout, "klippy"), exist_ok=True)
        self.version = None

    def set_version(self, version):
        """Write klippy/.version the way Klipper's release tarballs carry it."""
        self.version = version
        with open(os.path.join(self.checkout, "klippy", ".version"), "w") as f:
            f.write(version + "\n")
        stub = os.path.join(self.checkout, "klippy", "klippy.py")
        if not os.path.exists(stub):
            with open(stub, "w") as f:
                f.write("# Klipper host stub for mcuflashd tests\n")
        return self.checkout

    def write_printer_cfg(self, text):
        os.makedirs(os.path.dirname(self.printer_cfg_path), exist_ok=True)
        with open(self.printer_cfg_path, "w") as f:
            f.write(text)
        return self.printer_cfg_path


def daemon_config(host, identify_timeout=2, offline_timeout=600, serial_devices=None,
                  extra=""):
    """Text of an mcuflashd.conf pointing at @host (a KlipperHost)."""
    lines = [
        "[Klipper]",
        "Path=%s" % host.checkout,
        "PrinterConfig=%s" % host.printer_cfg_path,
        "ApiSocket=%s" % host.api_socket,
        "",
        "[Discovery]",
        "IdentifyTimeoutSec=%s" % identify_timeout,
        "OfflineTimeoutSec=%s" % offline_timeout,
    ]
    if serial_devices:
        lines.append("SerialDevices=%s" % " ".join(serial_devices))
    return "\n".join(lines) + "\n" + extra


class Daemon:
    """The built mcuflashd on the private bus inside the testbed.

    Environment: DBUS_SYSTEM_BUS_ADDRESS, UMOCKDEV_DIR, LD_PRELOAD of
    umockdev's preload, ASAN_OPTIONS=verify_asan_link_order=0 (needed by
    ASan builds under a preload), GIT_CEILING_DIRECTORIES=@workdir so
    git describe in the fake checkout never finds another repository.
    @env entries override all of these.
    $DAEMON_WRAPPER (e.g. "valgrind --error-exitcode=99") prefixes the command."""

    def __init__(self, workdir, bus_address, testbed, config_text, args=("-v",), env=None,
                 wait=True, name="mcuflashd"):
        binary = daemon_binary()
        if not os.access(binary, os.X_OK):
            raise HarnessError("%s is not built (set MCUFLASHD_BUILDDIR or run meson compile)"
                               % binary)
        self.config_path = os.path.join(workdir, "%s.conf" % name)
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(workdir, "%s.log" % name)
        self._log = open(self.log_path, "w")
        # git describe in the fake checkout must not find a repository above it.
        full_env = clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus_address,
                             GIT_CEILING_DIRECTORIES=os.path.abspath(workdir))
        full_env.update(testbed.env())
        full_env.setdefault("ASAN_OPTIONS", "verify_asan_link_order=0")
        if "verify_asan_link_order" not in full_env["ASAN_OPTIONS"]:
            full_env["ASAN_OPTIONS"] += ":verify_asan_link_order=0"
        full_env.update(env or {})
        wrapper = shlex.split(os.environ.get("DAEMON_WRAPPER", ""))
        self.argv = wrapper + [binary, "--config", self.config_path] + list(args)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=full_env)
        self.returncode = None
        if wait:
            client = BusClient(bus_address)
            try:
                client.wait_for_name(10.0, self.proc)
            except Exception as e:
                self.kill()
                raise HarnessError("%s\n--- mcuflashd output ---\n%s" % (e, self.log()))
            finally:
                client.close()

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def running(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM and wait; returns the exit status (negative = signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "hung (killed after %.0f s)" % timeout
        if self.returncode is None:
            self.returncode = self.proc.returncode
        if self._log:
            self._log.close()
            self._log = None
        return self.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.returncode is None:
            self.returncode = self.proc.returncode
        if self._log:
            self._log.close()
            self._log = None


def run_ctl(bus_address, *args, timeout=60, env=None, input=None):
    """Run the built mcuflashctl; returns subprocess.CompletedProcess (text)."""
    binary = ctl_binary()
    if not os.access(binary, os.X_OK):
        raise HarnessError("%s is not built" % binary)
    full_env = clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus_address)
    full_env.update(env or {})
    return subprocess.run([binary] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input)


# ---------------------------------------------------------------------------
# Everything together (demo_env.py; tests use the fixtures instead)


class Environment:
    """Private bus + testbed + fake Klipper host + daemon, in a temp dir.
    close() stops everything in reverse order; safe to call more than once."""

    def __init__(self, workdir=None, keep=False):
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="mcuflashd-env.")
        self.keep = keep
        self.bus = None
        self.testbed = None
        self.daemon = None
        self.client = None
        self.host = KlipperHost(self.workdir)

    def start_bus(self):
        self.bus = PrivateBus(self.workdir)
        return self.bus

    def start_testbed(self):
        self.testbed = Testbed()
        return self.testbed

    def start_daemon(self, config_text=None, env=None, **config_args):
        """config_args go to daemon_config() (extra= appends text)."""
        if config_text is None:
            config_text = daemon_config(self.host, **config_args)
        self.daemon = Daemon(self.workdir, self.bus.address, self.testbed, config_text, env=env)
        self.client = BusClient(self.bus.address)
        return self.daemon

    def close(self):
        status = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.daemon is not None:
            status = self.daemon.stop()
            self.daemon = None
        if self.testbed is not None:
            self.testbed.close()
            self.testbed = None
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        if self._own_dir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return status
