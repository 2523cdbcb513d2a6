"""Plain building blocks of the integration test environment.

Used by conftest.py (which wraps them in pytest fixtures) and by
tests/tools/demo_env.py (the demo of design.md §5):

  PrivateBus     a private, system-like dbus-daemon with the project's real
                 policy file dbus/io.mcuflash1.conf and tests/data/test-policy.conf
  Testbed        a umockdev testbed with helpers that plug simulated boards:
                 Klipper USB CDC ttys (tests/data/*.umockdev templates filled in,
                 /dev/serial/by-id links, uevents) with a KlipperMcu simulator
  KlipperHost    a fake Klipper checkout (klippy/.version) and printer.cfg
  Daemon         the built mcuflashd under umockdev's preload, stderr in a file
  BusClient      python3-dbus client: properties, calls, signal-driven waiting
  run_ctl()      the built mcuflashctl against the private bus

It does not decide what a test checks, and it never touches the real system
bus, real devices or the real Klipper installation.  The whole test process
must run under umockdev's preload (tests/run-integration does that).
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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


class Board:
    """A simulated device plugged into the testbed."""

    def __init__(self, kind, tty, syspaths, links, master_fd, sim=None, **info):
        self.kind = kind
        self.tty = tty                          # "ttyACM0"
        self.devnode = "/dev/" + tty            # the path udev reports
        self.syspaths = syspaths                # child first ("/sys/devices/...")
        self.links = links                      # /dev/serial/... DEVLINKS
        self.master_fd = master_fd              # pty master (testbed owns it)
        self.sim = sim                          # KlipperMcu or None
        self.plugged = True
        self.__dict__.update(info)              # serial, mcu, port, version, ...

    @property
    def syspath(self):
        """sysfs path of the tty."""
        return self.syspaths[0]

    @property
    def by_id(self):
        for link in self.links:
            if link.startswith("/dev/serial/by-id/"):
                return link
        return None

    @property
    def by_path(self):
        for link in self.links:
            if link.startswith("/dev/serial/by-path/"):
                return link
        return None

    def __repr__(self):
        return "<Board %s %s %s>" % (self.kind, self.devnode, getattr(self, "serial", ""))


class Testbed:
    """umockdev testbed plus helpers to plug and unplug simulated boards.

    Create it inside a process that runs under umockdev's preload; children
    that should see it need env() (UMOCKDEV_DIR and the preload).
    sim_log: a function that gets every simulator's traffic as text lines.

    Limits of umockdev 0.17 this class works around: a tty name is never
    reused after an unplug (ttyACM0 gone -> the next board is ttyACM1), and
    removal leaves stale entries it cleans up itself."""

    def __init__(self, sim_log=None):
        self.tb = UMockdev.Testbed.new()
        self.root = self.tb.get_root_dir()
        self.boards = []
        self._usec = 1700000000000000
        self._next_devnum = {}
        self._log = sim_log

    # -- helpers ---------------------------------------------------------

    def env(self):
        """Environment entries a child needs to run inside this testbed."""
        return {"UMOCKDEV_DIR": self.root, "LD_PRELOAD": umockdev_preload()}

    def _free_tty(self, prefix):
        # umockdev 0.17 keeps a removed tty's name in its pty table, and adding
        # that name again aborts the process: unlike the kernel (lowest free
        # minor) a name is never reused within one testbed.
        used = {b.tty for b in self.boards}
        n = 0
        while "%s%d" % (prefix, n) in used:
            n += 1
        return "%s%d" % (prefix, n), n

    def _usb_values(self, port):
        m = re.fullmatch(r"(\d+)-(\d+(?:\.\d+)*)", port)
        if not m:
            raise HarnessError("bad USB port %r (expected e.g. 1-1.3)" % port)
        busnum = int(m.group(1))
        hops = m.group(2).split(".")
        chain = ["%d-%s" % (busnum, ".".join(hops[:i + 1])) for i in range(len(hops))]
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

    def _used_ports(self):
        return {getattr(b, "port", None) for b in self.boards if b.plugged}

    def _plug(self, kind, record, tty, links, sim_args, **info):
        # umockdev 0.17's add_from_string() emits an "add" uevent for every
        # device as soon as that device is complete (its /dev node included),
        # and remove_device() emits nothing.  So add the devices one at a time,
        # parents first (the templates list the tty first, like
        # umockdev-record), so that every event finds its parents complete,
        # in the order the kernel sends them.  The /dev/serial links exist
        # before the tty's event, as udev creates them before it broadcasts.
        paragraphs = [p.strip("\n") + "\n" for p in record.split("\n\n") if p.strip()]
        syspaths = ["/sys" + p.split("\n", 1)[0][3:].strip() for p in paragraphs]
        for link in links:
            # Like udev, the newest device takes over a link two share (two
            # CH340 bridges have the same by-id name).
            path = self.root + link
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._unlink(path)
            os.symlink(os.path.relpath(self.root + "/dev/" + tty, os.path.dirname(path)), path)
        for paragraph in reversed(paragraphs):
            self.tb.add_from_string(paragraph)
        master = self.tb.get_dev_fd("/dev/" + tty)
        if master < 0:
            raise HarnessError("umockdev created no pty for /dev/%s" % tty)
        sim = None
        if sim_args is not None:
            # A host that reacted to the uevent may already have written to
            # the pty; that input waits in the pty until the simulator reads it.
            sim = klipper_mcu.KlipperMcu(master, log=self._log, **sim_args).start()
        board = Board(kind, tty, syspaths, links, master, sim=sim, **info)
        board.devnos = re.findall(r"^A: dev=(\d+:\d+)", record, re.M)
        self.boards.append(board)
        return board

    def uevent(self, board, action):
        """Send @action ("change", "remove", or a repeated "add") for the
        board's devices: parents first for "add", children first otherwise.
        Plugging a board sends its "add" events by itself."""
        paths = board.syspaths if action != "add" else list(reversed(board.syspaths))
        for p in paths:
            self.tb.uevent(p, action)

    # -- boards ----------------------------------------------------------

    def add_klipper_usb(self, serial=None, mcu="stm32f429xx", version=HOST_VERSION,
                        port=None, fault=None, simulate=True, **sim_kwargs):
        """Plug a Klipper MCU on USB CDC ACM (1d50:614e) with a simulator;
        monitors get the kernel's "add" events (usb_device, interfaces, tty).

        serial: USB serial (chip id hex); default 2E003600...0851363131363530,
                one per board
        port: USB port path like "1-1.3"; default the next free 1-1.N
        fault, **sim_kwargs: passed to KlipperMcu (build_versions, start_seq, ...)
        simulate=False leaves the pty without a simulator (board.sim None).
        Returns a Board (devnode, by_id, by_path, sim, syspaths, ...)."""
        if port is None:
            used = self._used_ports()
            port = next("1-1.%d" % n for n in range(2, 100) if "1-1.%d" % n not in used)
        if serial is None:
            serial = ("%08X" % (0x2E003600 + len(self.boards))) + "0851363131363530"
        tty, minor = self._free_tty("ttyACM")
        values = self._usb_values(port)
        values.update({"TTY": tty, "TTYMINOR": minor, "MCU": mcu, "SERIAL": serial})
        record = _fill(_read_template("klipper-usb-acm.umockdev"), values)
        links = ["/dev/serial/by-path/pci-0000:00:14.0-usb-0:%s:1.0" % values["USBPATH"],
                 "/dev/serial/by-id/usb-Klipper_%s_%s-if00" % (mcu, serial)]
        sim_args = dict(version=version, mcu=mcu, fault=fault, **sim_kwargs) if simulate else None
        return self._plug("klipper-usb", record, tty, links, sim_args,
                          serial=serial, mcu=mcu, port=port, version=version,
                          vendor_id=0x1d50, product_id=0x614e)

    def add_usb_serial_bridge(self, port=None, klipper=None):
        """Plug a CH340 USB-UART bridge (1a86:7523, ttyUSBn, no serial).
        klipper: None (nothing answers) or a dict of KlipperMcu arguments
        (version, mcu, fault, ...) for a Klipper board behind the bridge."""
        if port is None:
            used = self._used_ports()
            port = next("1-1.%d" % n for n in range(4, 100) if "1-1.%d" % n not in used)
        tty, minor = self._free_tty("ttyUSB")
        values = self._usb_values(port)
        values.update({"TTY": tty, "TTYMINOR": minor})
        record = _fill(_read_template("ch340-usb-serial.umockdev"), values)
        links = ["/dev/serial/by-path/pci-0000:00:14.0-usb-0:%s:1.0-port0" % values["USBPATH"],
                 "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0"]
        sim_args = dict(link="serial", **klipper) if klipper is not None else None
        return self._plug("ch340", record, tty, links, sim_args, port=port,
                          serial="", vendor_id=0x1a86, product_id=0x7523,
                          mcu=(klipper or {}).get("mcu"), version=(klipper or {}).get("version"))

    def add_uart(self, tty="ttyAMA0", klipper=None):
        """Add an on-board UART (Raspberry Pi PL011 style), optionally with a
        Klipper simulator (dict of KlipperMcu arguments) on it."""
        m = re.fullmatch(r"([A-Za-z]+)(\d+)", tty)
        line = int(m.group(2)) if m else 0
        addr = "7e201%03x" % (line * 0x200)
        values = {"TTY": tty, "TTYMINOR": 64 + line, "UARTDEV": "%s.serial" % addr[1:],
                  "UARTDEVTAG": "%s_serial" % addr[1:], "OFADDR": addr, "IOMEMBASE": "FE201000",
                  "LINE": line, "UARTTYPE": 91, "USEC": self._usec}
        record = _fill(_read_template("platform-uart.umockdev"), values)
        sim_args = dict(link="serial", **klipper) if klipper is not None else None
        return self._plug("uart", record, tty, [], sim_args, port="", serial="",
                          mcu=(klipper or {}).get("mcu"), version=(klipper or {}).get("version"))

    def remove(self, board, uevent=True):
        """Unplug: stop the simulator, hang up the pty (the host sees EOF/EIO),
        send "remove" uevents (tty first), delete the devices and /dev/serial
        links.  uevent=False removes silently (a monitor misses the unplug)."""
        if not board.plugged:
            return
        if board.sim is not None:
            board.sim.stop()
        self._hangup(board)
        if uevent:
            self.uevent(board, "remove")
        try:
            pts = os.readlink(self.root + board.devnode)
        except OSError:
            pts = None
        for p in board.syspaths:
            self.tb.remove_device(p)
        # remove_device() (umockdev 0.17) leaves the /sys/dev/char links and
        # the pty map entry behind; a later device with the same numbers or
        # the same /dev/pts/N would then abort the testbed.
        for devno in board.devnos:
            self._unlink(self.root + "/sys/dev/char/" + devno)
        if pts:
            self._unlink(self.root + "/dev/.ptymap/" + pts.replace("/", "_"))
        for link in board.links:
            path = self.root + link
            try:
                if os.path.basename(os.readlink(path)) == board.tty:
                    os.unlink(path)
            except OSError:
                pass
        board.plugged = False

    @staticmethod
    def _unlink(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _hangup(board):
        # Close the pty master while keeping its fd number valid: the
        # testbed still owns the number and closes it when it goes away.
        if board.sim is not None and board.sim.disconnected:
            return
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(null, board.master_fd)
        os.close(null)

    def close(self):
        for board in list(self.boards):
            if board.sim is not None:
                board.sim.stop()
        self.boards = []
        del self.tb
        import gc
        gc.collect()


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

    def set_version(self, version):
        """Write klippy/.version the way Klipper's release tarballs carry it."""
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
