#!/usr/bin/python3
"""A mock of systemd's manager (org.freedesktop.systemd1) for the private test
bus: a python3-dbusmock template plus SystemdMock, the wrapper tests use to
run it as a separate process and to steer it.

python3-dbusmock 0.28 ships a "systemd" template, but it cannot stand in for
systemd towards a client that waits for jobs: JobRemoved always says "done"
and is sent before anybody could have seen the job path, GetUnit/StartUnit of
an unknown unit raise a Python KeyError instead of NoSuchUnit, there is no
Subscribe, LoadUnit or failing job.  This template models what mcuflashd's
daemon/core/units.c relies on, the way systemd 252 behaves:

  Manager (/org/freedesktop/systemd1, org.freedesktop.systemd1.Manager)
    Subscribe()          second call from the same connection fails with
                         org.freedesktop.systemd1.AlreadySubscribed
    Unsubscribe()        org.freedesktop.systemd1.NotSubscribed if not subscribed
    GetUnit(s) -> o      NoSuchUnit "Unit X not loaded." unless loaded
    LoadUnit(s) -> o     loads it; an unknown unit gets LoadState "not-found"
    StartUnit(ss) -> o, StopUnit(ss) -> o, RestartUnit(ss) -> o
                         queue a job (/org/freedesktop/systemd1/job/N), emit
                         JobNew, set ActiveState activating/deactivating and,
                         after the job delay, the final ActiveState and
                         JobRemoved(u id, o job, s unit, s result).  Unknown
                         unit: NoSuchUnit.  Invalid name: InvalidArgs.
    StartTransientUnit(ssa(sv)a(sa(sv))) -> o
                         a Type=oneshot service: runs ExecStart's first
                         command (no sandbox: the properties are recorded,
                         not applied) with StandardInput/OutputFileDescriptor
                         as its stdin/stdout; the start job ends when it
                         exits: "done" for status 0, else "failed".  A unit
                         of that name that runs already: UnitExists.  The
                         unit is inactive (or failed) afterwards.
                         GetTransientUnits() -> s: JSON [[name, {property:
                         value}], ...] of every one started (fds as "fd").
    Job signals are broadcast only while somebody is subscribed or the
    client that queued the job is still connected, as systemd does.
  Units (/org/freedesktop/systemd1/unit/<escaped name>, ...systemd1.Unit)
    Id, Names, Description, LoadState, ActiveState, SubState; every change
    emits PropertiesChanged.

Test controls on org.freedesktop.DBus.Mock at /org/freedesktop/systemd1:
  AddUnit(s name, s active_state)     a loaded unit
  SetUnitState(s name, s active_state)
  SetUnitLoaded(s name, b loaded)     unloaded = installed but not loaded
                                      (GetUnit fails, LoadUnit works)
  SetJobResult(s name, s result)      result of later jobs of that unit:
                                      done (default), failed, canceled,
                                      timeout, dependency, skipped
  SetJobDelay(d seconds)              0 = the job finishes before the method
                                      returns, so JobRemoved comes before the
                                      reply (real clients must survive that)
  SetJobHang(b)                       jobs never finish ...
  FinishHangingJobs()                 ... until this
  GetSubscribers() -> as
plus dbusmock's own GetCalls/GetMethodCalls/ClearCalls for assertions.
Template parameters (-p JSON): {"units": {"klipper.service": "active"},
"unloaded_units": ["name", ...], "job_delay": 0.1}.

Not modelled: job types beyond start/stop/restart, job merging, dependencies,
unit files, the Job objects themselves, and anything of systemd's other
interfaces.
"""

import json
import os
import re
import subprocess
import sys
import time

import dbus
import dbus.service
from gi.repository import GLib

from dbusmock import MOCK_IFACE, mockobject

BUS_NAME = "org.freedesktop.systemd1"
MAIN_OBJ = "/org/freedesktop/systemd1"
MAIN_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SYSTEM_BUS = True

ERROR_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
ERROR_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
ERROR_NOT_SUBSCRIBED = "org.freedesktop.systemd1.NotSubscribed"
ERROR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ERROR_UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"

JOB_RESULTS = ("done", "failed", "canceled", "timeout", "dependency", "skipped")
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|socket|target|device|mount|automount|"
                       r"swap|timer|path|slice|scope)$")
SUB_STATES = {"active": "running", "inactive": "dead", "failed": "failed",
              "activating": "start", "deactivating": "stop"}


def escape_unit_name(name):
    """systemd's bus_label_escape(): keep [A-Za-z0-9], everything else _xx."""
    if not name:
        return "_"
    return "".join(c if c.isascii() and c.isalnum() else "_%02x" % b
                   for c, b in ((chr(b), b) for b in name.encode()))


def unit_object_path(name):
    return "%s/unit/%s" % (MAIN_OBJ, escape_unit_name(name))


# ---------------------------------------------------------------------------
# template


def load(mock, parameters):
    mock.units = {}                 # name -> {"path", "loaded"}
    mock.job_results = {}           # name -> result of its next jobs
    mock.job_delay = float(parameters.get("job_delay", 0.1))
    mock.job_hang = False
    mock.hanging_jobs = []
    mock.next_job_id = 1
    mock.subscribers = set()
    mock.transient = []             # [(name, {property: value})]
    mock.AddProperties(MAIN_IFACE, {"Version": "252", "Virtualization": ""})
    for name, state in dict(parameters.get("units", {})).items():
        _add_unit(mock, str(name), str(state))
    for name in parameters.get("unloaded_units", []):
        if str(name) not in mock.units:
            _add_unit(mock, str(name), "inactive")
        mock.units[str(name)]["loaded"] = False


def _check_name(name):
    if not UNIT_NAME.match(name):
        raise dbus.exceptions.DBusException("Unit name %s is not valid." % name, name=ERROR_INVALID_ARGS)


def _add_unit(mock, name, state, load_state="loaded"):
    _check_name(name)
    path = unit_object_path(name)
    if name in mock.units:
        _set_state(mock, name, state)
        return path
    mock.AddObject(path, UNIT_IFACE, {
        "Id": dbus.String(name),
        "Names": dbus.Array([name], signature="s"),
        "Description": dbus.String("Mock of " + name),
        "LoadState": dbus.String(load_state),
        "ActiveState": dbus.String(state),
        "SubState": dbus.String(SUB_STATES.get(state, state)),
    }, [])
    mock.units[name] = {"path": path, "loaded": True}
    return path


def _unit_object(mock, name):
    return mockobject.objects[mock.units[name]["path"]]


def _active_state(mock, name):
    return str(_unit_object(mock, name).props[UNIT_IFACE]["ActiveState"])


def _set_state(mock, name, state):
    _unit_object(mock, name).UpdateProperties(UNIT_IFACE, {
        "ActiveState": dbus.String(state),
        "SubState": dbus.String(SUB_STATES.get(state, state)),
    })


def _still_connected(mock, name):
    try:
        return bool(mock.connection.name_has_owner(name))
    except dbus.exceptions.DBusException:
        return False


def _job_signal_wanted(mock, requester):
    mock.subscribers = {s for s in mock.subscribers if _still_connected(mock, s)}
    return bool(mock.subscribers) or (requester is not None and _still_connected(mock, requester))


def _finish_job(mock, job):
    result = job["result"]
    if result == "done":
        final = "active" if job["kind"] == "start" else "inactive"
    elif result in ("failed", "timeout"):
        final = "failed"
    else:
        final = job["previous"]
    _set_state(mock, job["unit"], final)
    if _job_signal_wanted(mock, job["requester"]):
        mock.EmitSignal(MAIN_IFACE, "JobRemoved", "uoss",
                        [dbus.UInt32(job["id"]), dbus.ObjectPath(job["path"]), job["unit"], result])


def _queue_job(mock, name, kind, requester):
    name = str(name)
    _check_name(name)
    # Like systemd, load the unit first; only a unit without a unit file fails.
    if name not in mock.units or _unit_object(mock, name).props[UNIT_IFACE]["LoadState"] == "not-found":
        raise dbus.exceptions.DBusException(
            "Unit %s %s." % (name, "not loaded" if kind == "stop" else "not found"), name=ERROR_NO_SUCH_UNIT)
    mock.units[name]["loaded"] = True
    job = {
        "id": mock.next_job_id,
        "path": "%s/job/%d" % (MAIN_OBJ, mock.next_job_id),
        "unit": name,
        "kind": kind,
        "result": mock.job_results.get(name, "done"),
        "previous": _active_state(mock, name),
        "requester": requester,
    }
    mock.next_job_id += 1
    _set_state(mock, name, "activating" if kind == "start" else "deactivating")
    if _job_signal_wanted(mock, requester):
        mock.EmitSignal(MAIN_IFACE, "JobNew", "uos", [dbus.UInt32(job["id"]), dbus.ObjectPath(job["path"]), name])
    if mock.job_hang:
        mock.hanging_jobs.append(job)
    elif mock.job_delay <= 0:
        _finish_job(mock, job)
    else:
        def finish():
            _finish_job(mock, job)
            return False
        GLib.timeout_add(int(mock.job_delay * 1000), finish)
    return dbus.ObjectPath(job["path"])


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="", sender_keyword="sender")
def Subscribe(self, sender=None):
    if sender in self.subscribers:
        raise dbus.exceptions.DBusException("Client is already subscribed.", name=ERROR_ALREADY_SUBSCRIBED)
    self.subscribers.add(sender)


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="", sender_keyword="sender")
def Unsubscribe(self, sender=None):
    if sender not in self.subscribers:
        raise dbus.exceptions.DBusException("Client is not subscribed.", name=ERROR_NOT_SUBSCRIBED)
    self.subscribers.discard(sender)


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="o")
def GetUnit(self, name):
    name = str(name)
    if name not in self.units or not self.units[name]["loaded"]:
        raise dbus.exceptions.DBusException("Unit %s not loaded." % name, name=ERROR_NO_SUCH_UNIT)
    return dbus.ObjectPath(self.units[name]["path"])


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="o")
def LoadUnit(self, name):
    name = str(name)
    if name not in self.units:
        return dbus.ObjectPath(_add_unit(self, name, "inactive", load_state="not-found"))
    self.units[name]["loaded"] = True
    return dbus.ObjectPath(self.units[name]["path"])


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o", sender_keyword="sender")
def StartUnit(self, name, mode, sender=None):
    return _queue_job(self, name, "start", sender)


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o", sender_keyword="sender")
def StopUnit(self, name, mode, sender=None):
    return _queue_job(self, name, "stop", sender)


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o", sender_keyword="sender")
def RestartUnit(self, name, mode, sender=None):
    return _queue_job(self, name, "start", sender)


def _plain_property(value):
    if isinstance(value, dbus.types.UnixFd):
        return "fd"
    return _plain(value)


@dbus.service.method(MAIN_IFACE, in_signature="ssa(sv)a(sa(sv))", out_signature="o", sender_keyword="sender")
def StartTransientUnit(self, name, mode, properties, aux, sender=None):
    name = str(name)
    props = {str(k): v for k, v in properties}
    plain = {k: _plain_property(v) for k, v in props.items()}
    # dbusmock's call log cannot hand out fds: record them as "fd".
    for i in range(len(self.call_log) - 1, -1, -1):
        if self.call_log[i][1] == "StartTransientUnit":
            self.call_log[i] = (self.call_log[i][0], "StartTransientUnit", [name, str(mode), json.dumps(plain)])
            break
    _check_name(name)
    if name in self.units and self.units[name].get("running"):
        raise dbus.exceptions.DBusException("Unit %s was already loaded or has a fragment file." % name,
                                            name=ERROR_UNIT_EXISTS)
    if props.get("Type", "simple") != "oneshot" or "ExecStart" not in props:
        raise dbus.exceptions.DBusException("mock: only Type=oneshot with ExecStart= is modelled",
                                            name=ERROR_INVALID_ARGS)
    path, argv, _ignore = props["ExecStart"][0]
    fds = {}
    for key in ("StandardInputFileDescriptor", "StandardOutputFileDescriptor"):
        if key in props:
            fds[key] = props[key].take()
    self.transient.append((name, plain))
    _add_unit(self, name, "inactive")
    self.units[name]["running"] = True
    job = {
        "id": self.next_job_id,
        "path": "%s/job/%d" % (MAIN_OBJ, self.next_job_id),
        "unit": name,
        "kind": "start",
        "result": "done",
        "previous": "inactive",
        "requester": sender,
    }
    self.next_job_id += 1
    _set_state(self, name, "activating")
    if _job_signal_wanted(self, sender):
        self.EmitSignal(MAIN_IFACE, "JobNew", "uos", [dbus.UInt32(job["id"]), dbus.ObjectPath(job["path"]), name])
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    try:
        proc = subprocess.Popen([str(a) for a in argv], executable=str(path), env=env, cwd="/",
                                stdin=fds.get("StandardInputFileDescriptor", subprocess.DEVNULL),
                                stdout=fds.get("StandardOutputFileDescriptor", subprocess.DEVNULL))
    except OSError:
        proc = None
    for fd in fds.values():
        os.close(fd)

    def exited(code):
        job["result"] = "done" if code == 0 else "failed"
        self.units[name]["running"] = False
        _finish_job(self, job)
        # A oneshot service is inactive (or failed) once its command ended.
        _set_state(self, name, "inactive" if code == 0 else "failed")
        return False
    if proc is None:
        GLib.idle_add(exited, 203)      # systemd's EXIT_EXEC
    else:
        # Reaped by Popen only (a GLib child watch would race with Popen's
        # own waitpid and could see a failed command as status 0).
        def poll():
            return True if proc.poll() is None else exited(proc.returncode)
        GLib.timeout_add(20, poll)
    return dbus.ObjectPath(job["path"])


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="s")
def GetTransientUnits(self):
    return json.dumps(self.transient)


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def AddUnit(self, name, active_state):
    _add_unit(self, str(name), str(active_state))


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def SetUnitState(self, name, active_state):
    _set_state(self, str(name), str(active_state))


@dbus.service.method(MOCK_IFACE, in_signature="sb", out_signature="")
def SetUnitLoaded(self, name, loaded):
    self.units[str(name)]["loaded"] = bool(loaded)


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def SetJobResult(self, name, result):
    if str(result) not in JOB_RESULTS:
        raise dbus.exceptions.DBusException("result must be one of " + ", ".join(JOB_RESULTS),
                                            name=ERROR_INVALID_ARGS)
    self.job_results[str(name)] = str(result)


@dbus.service.method(MOCK_IFACE, in_signature="d", out_signature="")
def SetJobDelay(self, seconds):
    self.job_delay = float(seconds)


@dbus.service.method(MOCK_IFACE, in_signature="b", out_signature="")
def SetJobHang(self, hang):
    self.job_hang = bool(hang)


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="")
def FinishHangingJobs(self):
    jobs, self.hanging_jobs = self.hanging_jobs, []
    for job in jobs:
        _finish_job(self, job)


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="as")
def GetSubscribers(self):
    return dbus.Array(sorted(self.subscribers), signature="s")


# ---------------------------------------------------------------------------
# wrapper for tests


class SystemdMock:
    """This template in a `python3 -m dbusmock --system` process on the bus at
    @address.  start() waits until org.freedesktop.systemd1 is owned; the
    other methods steer the mock and read what it recorded."""

    def __init__(self, address, units=None, unloaded_units=(), job_delay=0.1, log_path=None):
        self.address = address
        self.parameters = {"units": dict(units or {}), "unloaded_units": list(unloaded_units),
                           "job_delay": job_delay}
        self.log_path = log_path
        self.proc = None
        self._conn = None

    def start(self, timeout=10.0):
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        for k in ("LD_PRELOAD", "UMOCKDEV_DIR", "DBUS_SESSION_BUS_ADDRESS"):
            env.pop(k, None)
        args = ["/usr/bin/python3", "-m", "dbusmock", "--system", "--template", os.path.abspath(__file__),
                "-p", json.dumps(self.parameters)]
        if self.log_path:
            args += ["-l", self.log_path]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._conn = dbus.bus.BusConnection(self.address)
        deadline = time.monotonic() + timeout
        while not self._conn.name_has_owner(BUS_NAME):
            if self.proc.poll() is not None:
                raise RuntimeError("systemd mock exited: %s" % self.proc.stderr.read().decode(errors="replace"))
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("systemd mock did not own %s within %.0f s" % (BUS_NAME, timeout))
            time.sleep(0.02)
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
            self.proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _mock(self, method, *args, signature=None):
        return self._conn.call_blocking(BUS_NAME, MAIN_OBJ, MOCK_IFACE, method, signature, args)

    def add_unit(self, name, active_state="inactive"):
        self._mock("AddUnit", name, active_state, signature="ss")

    def set_unit_state(self, name, active_state):
        self._mock("SetUnitState", name, active_state, signature="ss")

    def set_unit_loaded(self, name, loaded):
        self._mock("SetUnitLoaded", name, loaded, signature="sb")

    def set_job_result(self, name, result):
        self._mock("SetJobResult", name, result, signature="ss")

    def set_job_delay(self, seconds):
        self._mock("SetJobDelay", float(seconds), signature="d")

    def set_job_hang(self, hang):
        self._mock("SetJobHang", hang, signature="b")

    def finish_hanging_jobs(self):
        self._mock("FinishHangingJobs", signature="")

    def transient_units(self):
        """[(name, {property: value})] of every StartTransientUnit, in order."""
        return [(n, p) for n, p in json.loads(str(self._mock("GetTransientUnits", signature="")))]

    def subscribers(self):
        return [str(s) for s in self._mock("GetSubscribers", signature="")]

    def calls(self, method=None):
        """[(method, [args...])] in call order, or [args...] of one method."""
        rows = self._mock("GetCalls", signature="")
        calls = [(str(name), [_plain(a) for a in args]) for _, name, args in rows]
        if method is None:
            return calls
        return [args for name, args in calls if name == method]

    def clear_calls(self):
        self._mock("ClearCalls", signature="")

    def active_state(self, name):
        return str(self._conn.call_blocking(BUS_NAME, unit_object_path(name), "org.freedesktop.DBus.Properties",
                                            "Get", "ss", (UNIT_IFACE, "ActiveState")))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _plain(value):
    if isinstance(value, (dbus.String, dbus.ObjectPath)):
        return str(value)
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.UInt32, dbus.Int32, dbus.UInt64, dbus.Int64, dbus.Byte)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    # Run the mock in the foreground on $DBUS_SYSTEM_BUS_ADDRESS:
    #   systemd_mock.py [UNIT=STATE ...]    e.g. klipper.service=active
    units = dict(a.split("=", 1) for a in sys.argv[1:])
    os.execv("/usr/bin/python3", ["/usr/bin/python3", "-m", "dbusmock", "--system", "--template",
                                  os.path.abspath(__file__), "-p", json.dumps({"units": units})])
