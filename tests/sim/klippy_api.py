#!/usr/bin/python3
"""A fake klippy API server (protocols.md §17.1) on a Unix stream socket.

FakeKlippy serves the socket from a thread with klippy's real framing (one
JSON object followed by 0x03 per message, both ways) and the shapes of
Klipper's klippy/webhooks.py:

  info                 state (startup/ready/shutdown/error), state_message,
                       software_version, hostname, paths, pid, ...
  objects/list         {"objects": [...]}
  objects/query        {"eventtime": t, "status": {obj: {field: value}}};
                       fields null = all; unknown objects give {}, unknown
                       fields null (as klippy does)
  objects/subscribe    same result; afterwards every change of a subscribed
                       field is sent as {<response_template...>, "params":
                       {"eventtime": t, "status": {only what changed}}}
  gcode/script         recorded in .scripts; RESTART / FIRMWARE_RESTART
                       restart the fake like klippy (connections and socket
                       closed, a new socket bound at the same path)
  gcode/restart, gcode/firmware_restart, emergency_stop, list_endpoints
  anything else        {"id": n, "error": {"error": "WebRequestError",
                       "message": "webhooks: No registered callback for path '...'"}}

Requests without an id get no reply; undecodable messages are recorded in
.bad_messages and skipped, as klippy does.  Objects served: webhooks,
configfile (config/settings from the config dict), print_stats, one status
object per MCU ("mcu", "mcu EBBCan": mcu_version, mcu_build_versions,
mcu_constants, last_stats, and mcu_kconfig where set_mcu() gives one; {}
while klippy is starting up, as before it identified the MCUs) and any extra_objects.

What it does not model: klippy's 250 ms notification batching (changes are
sent at once), the shared-last-query quirk of its subscriptions, G-code
execution, remote methods and gcode/subscribe_output.

Test controls: set_state(), set_print_state(), set_mcu(), remove_mcu(),
set_object(), stop(unlink=True) (klippy exiting; unlink=False leaves the
stale socket file a killed klippy leaves), restart(), close_clients(),
send_raw(); records: requests, scripts, bad_messages, connections,
client_infos, notifications; wait_for(predicate), wait_for_request(method).

Command line (for demos), serves until SIGTERM/SIGINT:
  /usr/bin/python3 tests/sim/klippy_api.py --socket /tmp/klippy_uds \\
      --state ready --mcu mcu=v0.12.0-100-gabcdef12:stm32f429xx \\
      --mcu "mcu EBBCan=v0.12.0-100-gabcdef12:stm32g0b1xx"
"""

import argparse
import copy
import errno
import json
import os
import select
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simthread import ThreadedSim  # noqa: E402

DEFAULT_VERSION = "v0.12.0-100-gabcdef12"
DEFAULT_BUILD_VERSIONS = "gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40"

# klippy/klippy.py's messages
STATE_MESSAGES = {
    "startup": "Printer is not ready\nThe klippy host software is attempting to connect.  "
               "Please\nretry in a few moments.",
    "ready": "Printer is ready",
    "shutdown": "Shutdown due to webhooks request\nOnce the underlying issue is corrected, use the\n"
                "\"FIRMWARE_RESTART\" command to reset the firmware, reload the\nconfig, and restart "
                "the host software.\nPrinter is shutdown",
    "error": "Error in config\nOnce the underlying issue is corrected, use the \"RESTART\"\n"
             "command to reload the config and restart the host software.\nPrinter is halted",
}
STATES = tuple(STATE_MESSAGES)
PRINT_STATES = ("standby", "printing", "paused", "complete", "cancelled", "error")
MESSAGE_MAX = 4 * 1024 * 1024


def default_mcu(version=DEFAULT_VERSION, mcu_type="stm32f429xx", clock_freq=180000000):
    """Status fields of an MCU object as klippy/mcu.py reports them."""
    return {
        "mcu_version": version,
        "mcu_build_versions": DEFAULT_BUILD_VERSIONS,
        "mcu_constants": {
            "MCU": mcu_type, "CLOCK_FREQ": clock_freq, "ADC_MAX": 4095, "STATS_SUMSQ_BASE": 256,
            "STEPPER_BOTH_EDGE": 1, "RESERVE_PINS_USB": "PA11,PA12",
        },
    }


def encode(message):
    """One message on the wire."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\x03"


class _Client:
    def __init__(self, sock, number, generation):
        self.sock = sock
        self.number = number
        self.generation = generation
        self.rbuf = b""
        self.dead = False
        self.subscription = None        # {obj: [fields] or None}
        self.template = {}
        self.last = {}                  # {obj: {field: value}} as last sent


class FakeKlippy(ThreadedSim):
    """Fake klippy API server at @socket_path; see the module docstring.

    state            "ready" (default), "startup", "shutdown" or "error"
    print_state      print_stats.state
    mcus             {"mcu": {mcu_version, mcu_build_versions, mcu_constants}, "mcu EBBCan": {...}};
                     default one "mcu" (stm32f429xx, DEFAULT_VERSION)
    config           printer.cfg as {section: {key: value}} for configfile.config
    software_version host version reported by info
    extra_objects    {name: status dict} served as is
    restart_state    state after a RESTART/FIRMWARE_RESTART or restart()
    """

    def __init__(self, socket_path, state="ready", print_state="standby", mcus=None, config=None,
                 state_message=None, software_version=DEFAULT_VERSION, extra_objects=None,
                 restart_state="ready", log=None, start=True,
                 config_file="/home/pi/printer_data/config/printer.cfg"):
        if state not in STATES:
            raise ValueError("unknown klippy state %r" % state)
        super().__init__()
        self.socket_path = socket_path
        self.config_file = config_file
        self.software_version = software_version
        self.restart_state = restart_state
        self.log = log
        self.state = state
        self.state_message = state_message if state_message is not None else STATE_MESSAGES[state]
        self.print_state = print_state
        self.mcus = copy.deepcopy(mcus) if mcus is not None else {"mcu": default_mcu()}
        self.config = copy.deepcopy(config) if config is not None else {}
        self.extra_objects = copy.deepcopy(extra_objects) if extra_objects is not None else {}

        # records
        self.requests = []              # {"method", "id", "params", "client", "generation"}
        self.scripts = []
        self.bad_messages = []
        self.client_infos = []
        self.notifications = []         # (client number, message) sent
        self.connections = 0            # accepted in total
        self.generation = 0             # bumped by every (re)start, like a new klippy process

        self._clients = []
        self._listener = None
        self._stop_unlink = True
        self._restart_request = None
        self._close_request = False
        self._open_wake_pipe()
        if start:
            self.start()

    # -- control ---------------------------------------------------------

    def start(self):
        """Bind the socket (removing a stale file first, like klippy) and serve."""
        with self.lock:
            self._bind()
        self._start_thread("fake-klippy")
        return self

    def stop(self, unlink=True):
        """klippy exits: connections and socket closed; the file is removed
        unless unlink=False (a killed klippy leaves a stale file behind:
        connecting then gives ECONNREFUSED)."""
        if self._thread is None:
            return
        with self.lock:
            self._stop_unlink = unlink
        self._stop_thread()

    def close(self):
        self.stop()
        self._close_wake_pipe()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def restart(self, state=None, timeout=5.0):
        """klippy restarts: connections and socket closed, socket file removed
        and bound again (inotify sees IN_CREATE); state becomes @state or
        restart_state and print_stats "standby", as in a new klippy process.
        Starts the server if it was stopped."""
        state = state or self.restart_state
        if self._thread is None:
            with self.lock:
                self._set_state_locked(state, None, notify=False)
                self.print_state = "standby"
            return self.start()
        with self.lock:
            generation = self.generation
            self._restart_request = state
        self.wake()
        if not self.wait_for(lambda k: k.generation > generation, timeout):
            raise TimeoutError("fake klippy did not restart")
        return self

    def close_clients(self, timeout=5.0):
        """Drop every connection, keep listening."""
        with self.lock:
            self._close_request = True
        self.wake()
        if not self.wait_for(lambda k: not k._close_request, timeout):
            raise TimeoutError("fake klippy did not close its clients")

    def set_state(self, state, message=None):
        """klippy's own state (webhooks.state); info answers it too."""
        if state not in STATES:
            raise ValueError("unknown klippy state %r" % state)
        with self.lock:
            self._set_state_locked(state, message)

    def set_print_state(self, print_state):
        with self.lock:
            self.print_state = print_state
            self._notify_locked()

    def set_mcu(self, name, version=None, build_versions=None, mcu_type=None, constants=None, **fields):
        """Add or change MCU object @name ("mcu", "mcu EBBCan"); only given fields change."""
        with self.lock:
            mcu = self.mcus.setdefault(name, default_mcu())
            if version is not None:
                mcu["mcu_version"] = version
            if build_versions is not None:
                mcu["mcu_build_versions"] = build_versions
            if constants is not None or mcu_type is not None:
                mcu["mcu_constants"] = dict(constants if constants is not None
                                            else mcu.get("mcu_constants", {}))
                if mcu_type is not None:
                    mcu["mcu_constants"]["MCU"] = mcu_type
            mcu.update(fields)
            self._notify_locked()

    def remove_mcu(self, name):
        with self.lock:
            self.mcus.pop(name, None)
            self._notify_locked()

    def set_object(self, name, status):
        """Replace an extra status object (e.g. "idle_timeout")."""
        with self.lock:
            self.extra_objects[name] = copy.deepcopy(status)
            self._notify_locked()

    def send_raw(self, data):
        """Write raw bytes to every connection (garbage tests)."""
        with self.lock:
            for c in self._clients:
                self._send_bytes_locked(c, data)

    @property
    def clients(self):
        """Number of open connections."""
        with self.lock:
            return sum(1 for c in self._clients if not c.dead)

    def subscriptions(self):
        """[(objects, response_template)] of the open connections that subscribed."""
        with self.lock:
            return [(copy.deepcopy(c.subscription), dict(c.template))
                    for c in self._clients if not c.dead and c.subscription is not None]

    def requests_for(self, method):
        with self.lock:
            return [r for r in self.requests if r["method"] == method]

    def wait_for_request(self, method, count=1, timeout=5.0):
        """Wait until @count requests of @method arrived; returns the last one or None."""
        if not self.wait_for(lambda k: len([r for r in k.requests if r["method"] == method]) >= count,
                             timeout):
            return None
        return self.requests_for(method)[count - 1]

    # -- status objects --------------------------------------------------

    def _objects_locked(self):
        names = ["webhooks", "configfile", "print_stats"]
        names += list(self.mcus)
        names += [n for n in self.extra_objects if n not in names]
        return names

    def _status_locked(self, name):
        if name == "webhooks":
            return {"state": self.state, "state_message": self.state_message}
        if name == "print_stats":
            return {"filename": "", "total_duration": 0.0, "print_duration": 0.0,
                    "filament_used": 0.0, "state": self.print_state, "message": "",
                    "info": {"total_layer": None, "current_layer": None}}
        if name == "configfile":
            settings = {s.lower(): {k.lower(): v for k, v in opts.items()}
                        for s, opts in self.config.items()}
            return {"config": copy.deepcopy(self.config), "settings": settings,
                    "save_config_pending": False, "save_config_pending_items": {}, "warnings": []}
        if name in self.mcus:
            if self.state == "startup":
                return {}               # not identified yet
            status = copy.deepcopy(self.mcus[name])
            status.setdefault("last_stats", {})
            return status
        if name in self.extra_objects:
            return copy.deepcopy(self.extra_objects[name])
        return None

    def _query_locked(self, objects):
        """klippy's QueryStatusHelper for a query: every requested object,
        every requested field (null if missing)."""
        status = {}
        for name, fields in objects.items():
            res = self._status_locked(name) or {}
            if fields is None:
                fields = list(res)
            status[name] = {f: res.get(f) for f in fields}
        return status

    # -- thread ----------------------------------------------------------

    def _debug(self, fmt, *args):
        if self.log:
            self.log("fake klippy: " + fmt % args)

    def _bind(self):
        # klippy's ServerSocket: remove the file, bind, listen.
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        sock.bind(self.socket_path)
        sock.listen(4)
        self._listener = sock
        self.generation += 1
        self._debug("listening on %s (generation %d)", self.socket_path, self.generation)

    def _close_all_locked(self, unlink):
        for c in self._clients:
            c.dead = True
            try:
                c.sock.close()
            except OSError:
                pass
        self._clients = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if unlink:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self.lock.notify_all()

    def _restart_locked(self, state):
        self._debug("restarting into %s", state)
        self._close_all_locked(unlink=False)
        self._set_state_locked(state, None, notify=False)
        self.print_state = "standby"
        self._bind()
        self.lock.notify_all()

    def _run(self):
        while True:
            with self.lock:
                if self._stopping:
                    self._close_all_locked(self._stop_unlink)
                    return
                if self._restart_request is not None:
                    state, self._restart_request = self._restart_request, None
                    self._restart_locked(state)
                if self._close_request:
                    for c in self._clients:
                        c.dead = True
                for c in [c for c in self._clients if c.dead]:
                    c.sock.close()
                    self._clients.remove(c)
                    self._debug("client %d closed", c.number)
                if self._close_request:
                    self._close_request = False
                    self.lock.notify_all()
                socks = {c.sock: c for c in self._clients}
                listener = self._listener
            try:
                readable, _, _ = select.select([listener, self._wake_r] + list(socks), [], [], 1.0)
            except (OSError, ValueError):
                continue
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            for s in readable:
                if s is listener:
                    self._accept(listener)
                elif s in socks:
                    self._receive(socks[s])

    def _accept(self, listener):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        sock.settimeout(5.0)
        with self.lock:
            self.connections += 1
            client = _Client(sock, self.connections, self.generation)
            self._clients.append(client)
            self._debug("client %d connected", client.number)
            self.lock.notify_all()

    def _receive(self, client):
        try:
            data = client.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self.lock:
            if not data:
                client.dead = True
                self.lock.notify_all()
                return
            client.rbuf += data
            *messages, client.rbuf = client.rbuf.split(b"\x03")
            if len(client.rbuf) > MESSAGE_MAX:
                self.bad_messages.append(client.rbuf[:64])
                client.dead = True
            for raw in messages:
                if client.dead or self._listener is None:
                    break
                self._handle_locked(client, raw)
            self.lock.notify_all()

    # -- requests --------------------------------------------------------

    def _handle_locked(self, client, raw):
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ValueError("Not a top-level dictionary")
            method = request.get("method")
            params = request.get("params", {})
            if not isinstance(method, str) or not isinstance(params, dict):
                raise ValueError("Invalid request type")
        except ValueError:
            self._debug("bad message %r", raw[:80])
            self.bad_messages.append(raw)
            return
        rid = request.get("id")
        self.requests.append({"method": method, "id": rid, "params": params,
                              "client": client.number, "generation": client.generation})
        self._debug("client %d: %s", client.number, raw.decode(errors="replace"))
        after = None
        try:
            handler = self._handlers().get(method)
            if handler is None:
                raise WebRequestError("webhooks: No registered callback for path '%s'" % method)
            result, after = handler(client, params)
            response = {"id": rid, "result": result if result is not None else {}}
        except WebRequestError as e:
            response = {"id": rid, "error": {"error": "WebRequestError", "message": str(e)}}
        if rid is not None:
            self._send_locked(client, response)
        if after is not None:
            after()

    def _handlers(self):
        return {
            "info": self._h_info,
            "list_endpoints": self._h_list_endpoints,
            "objects/list": self._h_list,
            "objects/query": self._h_query,
            "objects/subscribe": self._h_subscribe,
            "gcode/script": self._h_script,
            "gcode/restart": lambda c, p: self._h_script(c, {"script": "RESTART"}),
            "gcode/firmware_restart": lambda c, p: self._h_script(c, {"script": "FIRMWARE_RESTART"}),
            "emergency_stop": self._h_estop,
        }

    def _h_info(self, client, params):
        client_info = params.get("client_info")
        if client_info is not None:
            if not isinstance(client_info, dict):
                raise WebRequestError("Invalid Argument Type [client_info]")
            self.client_infos.append(client_info)
        return {
            "state": self.state, "state_message": self.state_message,
            "hostname": socket.gethostname(), "klipper_path": "/home/pi/klipper",
            "python_path": "/home/pi/klippy-env/bin/python", "process_id": os.getpid(),
            "user_id": os.getuid(), "group_id": os.getgid(),
            "log_file": "/home/pi/printer_data/logs/klippy.log",
            "config_file": self.config_file,
            "software_version": self.software_version, "cpu_info": "4 core ARMv7 Processor rev 3 (v7l)",
        }, None

    def _h_list_endpoints(self, client, params):
        return {"endpoints": list(self._handlers())}, None

    def _h_list(self, client, params):
        return {"objects": self._objects_locked()}, None

    def _objects_param(self, params):
        objects = params.get("objects")
        if objects is None:
            raise WebRequestError("Missing Argument [objects]")
        if not isinstance(objects, dict):
            raise WebRequestError("Invalid Argument Type [objects]")
        for fields in objects.values():
            if fields is not None and (not isinstance(fields, list)
                                       or not all(isinstance(f, str) for f in fields)):
                raise WebRequestError("Invalid argument")
        return objects

    def _h_query(self, client, params):
        objects = self._objects_param(params)
        return {"eventtime": time.monotonic(), "status": self._query_locked(objects)}, None

    def _h_subscribe(self, client, params):
        objects = self._objects_param(params)
        template = params.get("response_template", {})
        if not isinstance(template, dict):
            raise WebRequestError("Invalid Argument Type [response_template]")
        status = self._query_locked(objects)
        client.subscription = copy.deepcopy(objects)
        client.template = dict(template)
        client.last = copy.deepcopy(status)
        return {"eventtime": time.monotonic(), "status": status}, None

    def _h_script(self, client, params):
        script = params.get("script")
        if script is None:
            raise WebRequestError("Missing Argument [script]")
        if not isinstance(script, str):
            raise WebRequestError("Invalid Argument Type [script]")
        self.scripts.append(script)
        command = script.strip().split(None, 1)[0].upper() if script.strip() else ""
        if command in ("RESTART", "FIRMWARE_RESTART"):
            # The reply goes out first, then klippy restarts.
            return {}, lambda: self._restart_locked(self.restart_state)
        return {}, None

    def _h_estop(self, client, params):
        self._set_state_locked("shutdown", None)
        return {}, None

    # -- sending ---------------------------------------------------------

    def _set_state_locked(self, state, message, notify=True):
        self.state = state
        self.state_message = message if message is not None else STATE_MESSAGES[state]
        if notify:
            self._notify_locked()

    def _send_bytes_locked(self, client, data):
        if client.dead:
            return
        try:
            client.sock.sendall(data)
        except OSError as e:
            self._debug("client %d: send failed: %s", client.number, errno.errorcode.get(e.errno, e))
            client.dead = True
            self.wake()

    def _send_locked(self, client, message):
        self._send_bytes_locked(client, encode(message))

    def _notify_locked(self):
        """Send each subscriber what changed in its subscription."""
        for client in self._clients:
            if client.dead or client.subscription is None:
                continue
            changed = {}
            for name, fields in client.subscription.items():
                res = self._status_locked(name) or {}
                last = client.last.setdefault(name, {})
                for field in (fields if fields is not None else list(res)):
                    value = res.get(field)
                    if field not in last or last[field] != value:
                        changed.setdefault(name, {})[field] = copy.deepcopy(value)
                        last[field] = copy.deepcopy(value)
            if changed:
                message = dict(client.template)
                message["params"] = {"eventtime": time.monotonic(), "status": changed}
                self.notifications.append((client.number, message))
                self._send_locked(client, message)
        self.lock.notify_all()


class WebRequestError(Exception):
    pass


def parse_mcu_arg(text):
    """'mcu EBBCan=v0.12.0-1-gabc:stm32g0b1xx' -> ('mcu EBBCan', fields)."""
    name, sep, rest = text.partition("=")
    if not sep or not (name == "mcu" or name.startswith("mcu ")):
        raise argparse.ArgumentTypeError("expected 'mcu[ NAME]=VERSION:MCU_TYPE', got %r" % text)
    version, _, mcu_type = rest.partition(":")
    return name, default_mcu(version or DEFAULT_VERSION, mcu_type or "stm32f429xx")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a fake klippy API socket.")
    ap.add_argument("--socket", required=True, help="socket path (klippy's -a)")
    ap.add_argument("--state", default="ready", choices=STATES)
    ap.add_argument("--print-state", default="standby")
    ap.add_argument("--software-version", default=DEFAULT_VERSION)
    ap.add_argument("--mcu", action="append", type=parse_mcu_arg, default=[],
                    help="'mcu[ NAME]=VERSION:MCU_TYPE' (repeatable; default one stm32f429xx 'mcu')")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    klippy = FakeKlippy(args.socket, state=args.state, print_state=args.print_state,
                        mcus=dict(args.mcu) if args.mcu else None,
                        software_version=args.software_version, log=log if args.verbose else None)
    log("klippy_api: serving %s (state %s, MCUs %s)"
        % (args.socket, args.state, ", ".join(klippy.mcus)))
    try:
        while not done.is_set():
            done.wait(0.5)
    finally:
        klippy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
