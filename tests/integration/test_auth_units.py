"""End-to-end tests of the authorization gate (daemon/core/auth.c) and of
systemd unit control (daemon/core/units.c), without the daemon's job
machinery.

The modules run inside test-auth-units-driver (tests/tools/auth-units-driver.c),
a small service on the same sd-bus + libevent loop as the daemon, on a
private system-like bus next to python3-dbusmock's polkitd template and
tests/sim/systemd_mock.py.  Callers are root (the test process) or uid 65534
(a subprocess that drops privileges before it connects), so the bus here
lives in a directory everybody may enter, not in pytest's 0700 tmp_path.

What is checked: root is authorized without polkit (even with no polkit at
all); everybody else gets exactly what polkit says, asked with the caller's
bus name, the action, and AllowUserInteraction only when the caller allowed
it; polkit absent, hanging or cancelled; stopping and starting units with
the JobRemoved handshake, failed jobs, unknown units, systemd absent or
slow, and cancellation.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import dbus
import pytest

import harness
import systemd_mock

DRIVER_NAME = "io.mcuflash1.test.Driver"
DRIVER_PATH = "/io/mcuflash1/test"
DRIVER_IFACE = "io.mcuflash1.test.Driver"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
MOCK_IFACE = "org.freedesktop.DBus.Mock"
NOBODY = 65534
KLIPPER = "klipper.service"

REBOOT = "io.mcuflash1.reboot"
FLASH = "io.mcuflash1.flash"
UPDATE_ALL = "io.mcuflash1.update-all"

# Only for this test's bus: root may own the driver's name, anybody may call
# it, and every user may connect (as Debian's system.conf says with
# <allow user="*"/>; tests/data/bus.conf.in lacks it, which keeps every
# non-root client off the bus).
DRIVER_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="%s"/>
  </policy>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="%s"/>
  </policy>
</busconfig>
""" % (DRIVER_NAME, DRIVER_NAME)

# Run as the caller (root or nobody): one method call on its own connection,
# printed as JSON with the caller's unique name.  Gio because it can set the
# ALLOW_INTERACTIVE_AUTHORIZATION header flag.
CALLER = r"""
import json, os, sys
from gi.repository import Gio, GLib
address, method, sig, args, interactive, timeout = sys.argv[1:7]
conn = Gio.DBusConnection.new_for_address_sync(
    address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
    None, None)
out = {"name": conn.get_unique_name(), "euid": os.geteuid()}
flags = Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION if interactive == "1" else Gio.DBusCallFlags.NONE
try:
    reply = conn.call_sync(%r, %r, %r, method, GLib.Variant("(" + sig + ")", tuple(json.loads(args))),
                           None, flags, int(float(timeout) * 1000), None)
    out["reply"] = list(reply.unpack())
except GLib.Error as e:
    out["error"] = Gio.DBusError.get_remote_error(e)
    out["message"] = e.message
print(json.dumps(out))
""" % (DRIVER_NAME, DRIVER_PATH, DRIVER_IFACE)


class Caller:
    """One call to the driver from a separate process (so that each call has
    its own connection and unique name), as root or as another uid."""

    def __init__(self, address, method, sig, args, uid=0, interactive=False, timeout=60):
        kwargs = {}
        if uid != 0:
            kwargs = {"user": uid, "group": uid, "extra_groups": []}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", CALLER, address, method, sig, json.dumps(list(args)),
             "1" if interactive else "0", str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
            env=harness.clean_env(HOME="/"), **kwargs)

    def result(self, timeout=90):
        out, err = self.proc.communicate(timeout=timeout)
        self.elapsed = time.monotonic() - self.started
        assert self.proc.returncode == 0, "caller failed: %s" % err
        return json.loads(out)


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def world_bus():
    """A private bus (harness.PrivateBus: .address, .workdir) whose socket uid
    65534 can reach, with the driver's policy."""
    workdir = tempfile.mkdtemp(prefix="mcuflashd-auth-")
    os.chmod(workdir, 0o755)
    policy = os.path.join(workdir, "test-driver.conf")
    with open(policy, "w") as f:
        f.write(DRIVER_POLICY)
    bus = harness.PrivateBus(workdir, policy_files=[policy])
    os.chmod(bus.socket, 0o777)
    yield bus
    bus.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class Driver:
    def __init__(self, address, workdir):
        binary = os.path.join(harness.build_dir(), "tests", "test-auth-units-driver")
        if not os.path.exists(binary):
            pytest.fail("%s is not built (meson compile)" % binary)
        self.address = address
        self.log_path = os.path.join(workdir, "driver.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, "-v"], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=address))
        self.conn = dbus.bus.BusConnection(address)
        harness.wait_until(lambda: self.conn.name_has_owner(DRIVER_NAME) or self.proc.poll() is not None,
                           10, what="the driver on the bus")
        assert self.proc.poll() is None, "driver exited: " + self.log()
        self.pid = self.proc.pid

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def call(self, method, sig, *args, uid=0, interactive=False, timeout=60):
        """Call and wait; returns the reply as a list."""
        out = Caller(self.address, method, sig, args, uid=uid, interactive=interactive,
                     timeout=timeout).result()
        assert "error" not in out, out
        return out["reply"]

    def start_call(self, method, sig, *args, uid=0, interactive=False, timeout=60):
        return Caller(self.address, method, sig, args, uid=uid, interactive=interactive, timeout=timeout)

    def callbacks(self):
        return int(self.conn.call_blocking(DRIVER_NAME, DRIVER_PATH, DRIVER_IFACE, "Callbacks", "", ()))

    def unit(self, method, unit, timeout_ms=0):
        r, s = self.call(method, "su", unit, timeout_ms)
        return r, s

    def stop(self):
        status = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            status = self.proc.returncode
        self.conn.close()
        self._log.close()
        return status


@pytest.fixture
def driver(request, world_bus):
    d = Driver(world_bus.address, world_bus.workdir)
    request.node._mcuflashd_daemons = [d]     # conftest attaches its log to failures
    yield d
    status = d.stop()
    assert status == 0, "driver exit status %s\n%s" % (status, d.log()[-5000:])


class PolkitMock:
    """python3-dbusmock's polkitd template in its own process (testing.md §3)."""

    def __init__(self, address):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-m", "dbusmock", "--system", "--template", "polkitd"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=address))
        self.conn = dbus.bus.BusConnection(address)
        harness.wait_until(lambda: self.conn.name_has_owner(POLKIT_NAME) or self.proc.poll() is not None,
                           10, what="the polkit mock on the bus")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def _mock(self, method, sig="", *args):
        return self.conn.call_blocking(POLKIT_NAME, POLKIT_PATH, MOCK_IFACE, method, sig, args)

    def set_allowed(self, *actions):
        self._mock("SetAllowed", "as", dbus.Array(actions, signature="s"))

    def simulate_hang(self, hang):
        self._mock("SimulateHang", "b", hang)

    def release_hanging_calls(self):
        self._mock("ReleaseHangingCalls")

    def have_hanging_calls(self):
        return bool(self._mock("HaveHangingCalls"))

    def checks(self):
        """[(subject kind, subject details, action, details, flags, cancellation id)]"""
        rows = self._mock("GetMethodCalls", "s", "CheckAuthorization")
        return [tuple(harness.to_python(a) for a in (args[0][0], args[0][1], args[1], args[2], args[3],
                                                       args[4]))
                for _, args in rows]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        self.conn.close()


@pytest.fixture
def polkit(world_bus):
    mock = PolkitMock(world_bus.address)
    yield mock
    mock.stop()


@pytest.fixture
def systemd(world_bus):
    mocks = []

    def start(units=None, **kwargs):
        m = systemd_mock.SystemdMock(world_bus.address, units=units, **kwargs).start()
        mocks.append(m)
        return m
    yield start
    for m in mocks:
        m.stop()


# ---------------------------------------------------------------------------
# authorization


def test_action_table_through_the_gate(driver, polkit):
    """Reads are open to everybody and never reach polkit; each mutating
    method is checked against its own action."""
    assert driver.call("Gate", "ss", "io.mcuflash1.Manager", "ListMcus", uid=NOBODY) == ["", 1, "open"]
    assert driver.call("Gate", "ss", "io.mcuflash1.Mcu", "Refresh", uid=NOBODY) == ["", 1, "open"]
    assert polkit.checks() == []

    polkit.set_allowed(FLASH)
    action, result, _ = driver.call("Gate", "ss", "io.mcuflash1.Mcu", "Flash", uid=NOBODY)
    assert (action, result) == (FLASH, 1)
    action, result, message = driver.call("Gate", "ss", "io.mcuflash1.Mcu", "RebootToBootloader", uid=NOBODY)
    assert (action, result) == (REBOOT, 0)
    assert "denied" in message
    action, result, _ = driver.call("Gate", "ss", "io.mcuflash1.Manager", "UpdateAll", uid=NOBODY)
    assert (action, result) == (UPDATE_ALL, 0)
    assert [c[2] for c in polkit.checks()] == [FLASH, REBOOT, UPDATE_ALL]


def test_root_is_authorized_without_polkit(driver):
    """No polkit on the bus at all: root still may, from the loop."""
    assert driver.call("Check", "s", REBOOT) == [1, "Authorized."]
    assert driver.call("Gate", "ss", "io.mcuflash1.Mcu", "RebootToApplication")[:2] == [REBOOT, 1]
    assert driver.callbacks() == 2


def test_root_never_asks_polkit(driver, polkit):
    """Polkit denies everything by default; root is not even asked about."""
    assert driver.call("Check", "s", FLASH) == [1, "Authorized."]
    assert polkit.checks() == []


def test_polkit_allows(driver, polkit):
    polkit.set_allowed(REBOOT)
    out = Caller(driver.address, "Check", "s", [REBOOT], uid=NOBODY).result()
    assert out["euid"] == NOBODY
    assert out["reply"] == [1, "Authorized."]
    [(kind, subject, action, details, flags, cancellation)] = polkit.checks()
    # The subject is the caller's bus name (polkit resolves it itself), not
    # the driver's and not a pid.
    assert (kind, subject) == ("system-bus-name", {"name": out["name"]})
    assert (action, details, flags, cancellation) == (REBOOT, {}, 0, "")


def test_polkit_denies(driver, polkit):
    polkit.set_allowed(FLASH)
    result, message = driver.call("Check", "s", REBOOT, uid=NOBODY)
    assert result == 0
    assert message == "Not authorized: polkit denied the request."
    assert "polkit denied io.mcuflash1.reboot" in driver.log()


def test_interaction_only_when_the_caller_allows_it(driver, polkit):
    polkit.set_allowed(REBOOT)
    assert driver.call("Check", "s", REBOOT, uid=NOBODY, interactive=True) == [1, "Authorized."]
    assert driver.call("Check", "s", REBOOT, uid=NOBODY, interactive=False) == [1, "Authorized."]
    assert [c[4] for c in polkit.checks()] == [1, 0]


def test_polkit_absent(driver):
    """Without polkit only root may act, and the caller is told so."""
    result, message = driver.call("Check", "s", REBOOT, uid=NOBODY)
    assert result == -errno.EACCES
    assert message == "polkit is not available; only root may do this."
    assert "polkit is not on the system bus" in driver.log()


def test_polkit_hangs(driver, polkit):
    """A polkit that never answers costs the caller 10 s (non-interactive),
    not the loop: other calls are served meanwhile."""
    polkit.set_allowed(REBOOT)
    polkit.simulate_hang(True)
    hanging = driver.start_call("Check", "s", REBOOT, uid=NOBODY)
    harness.wait_until(polkit.have_hanging_calls, 5, what="polkit to hold the check")
    assert driver.call("Check", "s", REBOOT) == [1, "Authorized."]          # root, meanwhile
    out = hanging.result()
    assert out["reply"] == [-errno.ETIMEDOUT, "polkit did not answer in time; try again."]
    assert 9 <= hanging.elapsed < 20
    # The answer arriving late is dropped; the driver carries on.
    polkit.release_hanging_calls()
    polkit.simulate_hang(False)
    assert driver.call("Check", "s", REBOOT, uid=NOBODY) == [1, "Authorized."]
    assert driver.callbacks() == 3


def test_cancelled_check_never_calls_back(driver, polkit):
    polkit.set_allowed(REBOOT)
    polkit.simulate_hang(True)
    assert driver.call("CheckCancel", "su", REBOOT, 300, uid=NOBODY) == ["cancelled"]
    harness.wait_until(polkit.have_hanging_calls, 5, what="polkit to hold the cancelled check")
    polkit.release_hanging_calls()
    polkit.simulate_hang(False)
    # A round trip through polkit after the release: the late answer to
    # the cancelled check has been processed by now.
    assert driver.call("Check", "s", REBOOT, uid=NOBODY) == [1, "Authorized."]
    assert driver.callbacks() == 1


# ---------------------------------------------------------------------------
# systemd units


def test_stop_and_start(driver, systemd):
    mock = systemd(units={KLIPPER: "active", "moonraker.service": "active"})
    assert driver.unit("State", KLIPPER) == (0, "active")

    assert driver.unit("Stop", KLIPPER) == (0, "done")
    assert mock.active_state(KLIPPER) == "inactive"
    assert driver.unit("State", KLIPPER) == (0, "inactive")
    assert driver.unit("Start", KLIPPER) == (0, "done")
    assert mock.active_state(KLIPPER) == "active"
    assert mock.active_state("moonraker.service") == "active"

    # Subscribe before each job; the second one finds the connection
    # subscribed already, which is fine.
    jobs = [(name, args) for name, args in mock.calls() if name in ("Subscribe", "StopUnit", "StartUnit")]
    assert jobs == [("Subscribe", []), ("StopUnit", [KLIPPER, "replace"]),
                    ("Subscribe", []), ("StartUnit", [KLIPPER, "replace"])]
    assert len(mock.subscribers()) == 1
    assert "Stopped klipper.service." in driver.log()


def test_failed_job(driver, systemd):
    mock = systemd(units={KLIPPER: "inactive"})
    mock.set_job_result(KLIPPER, "failed")
    assert driver.unit("Start", KLIPPER) == (-errno.EIO, "failed")
    assert driver.unit("State", KLIPPER) == (0, "failed")
    assert "systemd's job ended with result 'failed'" in driver.log()


def test_unknown_unit(driver, systemd):
    mock = systemd(units={KLIPPER: "active"})
    assert driver.unit("Stop", "klipper-nope.service") == (-errno.ENOENT, "")
    assert driver.unit("Start", "klipper-nope.service") == (-errno.ENOENT, "")
    assert driver.unit("State", "klipper-nope.service") == (-errno.ENOENT, "inactive")
    assert mock.active_state(KLIPPER) == "active"


def test_state_of_an_unloaded_unit(driver, systemd):
    """systemd unloads inactive units nobody needs: GetUnit fails, LoadUnit
    finds the unit installed."""
    mock = systemd(unloaded_units=[KLIPPER])
    assert driver.unit("State", KLIPPER) == (0, "inactive")
    assert [name for name, _ in mock.calls() if name in ("GetUnit", "LoadUnit")] == ["GetUnit", "LoadUnit"]
    assert driver.unit("Start", KLIPPER) == (0, "done")


def test_job_removed_before_the_reply(driver, systemd):
    """JobRemoved may overtake the StopUnit reply; the result is not lost."""
    mock = systemd(units={KLIPPER: "active"})
    mock.set_job_delay(0)
    assert driver.unit("Stop", KLIPPER) == (0, "done")
    assert driver.unit("Start", KLIPPER) == (0, "done")
    assert "before naming our job" in driver.log()


def test_job_timeout(driver, systemd):
    mock = systemd(units={KLIPPER: "active"})
    mock.set_job_hang(True)
    started = time.monotonic()
    assert driver.unit("Stop", KLIPPER, timeout_ms=1000) == (-errno.ETIMEDOUT, "")
    assert 0.9 <= time.monotonic() - started < 10
    assert "systemd did not finish within 1.0 s" in driver.log()
    # The job finishing later is ignored.
    mock.finish_hanging_jobs()
    mock.set_job_hang(False)
    assert driver.unit("Start", KLIPPER) == (0, "done")
    assert driver.callbacks() == 2


def test_systemd_absent(driver):
    assert driver.unit("Stop", KLIPPER) == (-errno.EHOSTDOWN, "")
    assert driver.unit("State", KLIPPER) == (-errno.EHOSTDOWN, "")
    assert "Cannot stop klipper.service: systemd is not on the system bus" in driver.log()


def test_cancelled_stop_never_calls_back(driver, systemd):
    mock = systemd(units={KLIPPER: "active"}, job_delay=1.0)
    assert driver.call("StopCancel", "su", KLIPPER, 200) == ["cancelled"]
    harness.wait_until(lambda: mock.active_state(KLIPPER) == "inactive", 5, what="the stop job to finish")
    time.sleep(0.2)
    assert driver.callbacks() == 0
    assert driver.unit("State", KLIPPER) == (0, "inactive")


def test_parallel_jobs(driver, systemd):
    """Two units at once: each waits for its own job."""
    mock = systemd(units={KLIPPER: "active", "klipper-2.service": "inactive"}, job_delay=0.5)
    mock.set_job_result("klipper-2.service", "failed")
    stop = driver.start_call("Stop", "su", KLIPPER, 0)
    start = driver.start_call("Start", "su", "klipper-2.service", 0)
    assert stop.result()["reply"] == [0, "done"]
    assert start.result()["reply"] == [-errno.EIO, "failed"]
    assert mock.active_state(KLIPPER) == "inactive"
    assert mock.active_state("klipper-2.service") == "failed"
