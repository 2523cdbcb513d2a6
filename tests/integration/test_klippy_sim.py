"""Fidelity tests of the fake klippy API server (tests/sim/klippy_api.py)
alone, with a plain socket client: 0x03 framing in both directions, the
reply and error shapes of klippy's webhooks.py, query/subscribe results,
notifications that carry only what changed with the response template
merged in, klippy's startup state, and klippy exiting and restarting
(socket file removed, stale, or bound again).

Nothing here needs a built daemon or a D-Bus bus; the daemon's client of
this socket is covered by tests/unit/test-klippy.c and the daemon tests.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import harness
import klippy_api
from klippy_api import FakeKlippy

SIM_SCRIPT = os.path.join(harness.SIM_DIR, "klippy_api.py")


class Conn:
    """A minimal klippy API client: whole messages in, whole messages out."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 0

    def close(self):
        self.sock.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, method, params=None, with_id=True):
        self.next_id += 1
        msg = {"method": method}
        if with_id:
            msg["id"] = self.next_id
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg).encode() + b"\x03")
        return self.next_id

    def recv(self, timeout=2.0):
        """Next message (dict), or None on timeout; raises EOFError at EOF."""
        deadline = time.monotonic() + timeout
        while b"\x03" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        raw, self.buf = self.buf.split(b"\x03", 1)
        return json.loads(raw)

    def call(self, method, params=None):
        rid = self.send(method, params)
        msg = self.recv()
        assert msg is not None, "no reply to %s" % method
        assert msg.get("id") == rid, msg
        return msg


@pytest.fixture
def sock_dir():
    # Short: sockaddr_un paths are limited to 107 bytes.
    d = tempfile.mkdtemp(prefix="klippy-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def klippy(sock_dir):
    made = []

    def make(**kw):
        k = FakeKlippy(os.path.join(sock_dir, "klippy.sock"), **kw)
        made.append(k)
        return k
    yield make
    for k in made:
        k.close()


@pytest.fixture
def conn():
    made = []

    def make(path):
        c = Conn(path)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def test_info_framing(klippy, conn):
    k = klippy(software_version="v0.12.0-7-g1234567")
    c = conn(k.socket_path)
    # Two requests in one write, then one split over three writes.
    c.send_raw(b'{"id": 1, "method": "info", "params": {"client_info": {"program": "t"}}}\x03'
               b'{"id": "two", "method": "info"}\x03')
    first, second = c.recv(), c.recv()
    assert first["id"] == 1 and second["id"] == "two"
    result = first["result"]
    assert result["state"] == "ready"
    assert result["state_message"] == "Printer is ready"
    assert result["software_version"] == "v0.12.0-7-g1234567"
    for key in ("hostname", "klipper_path", "python_path", "process_id", "user_id", "group_id",
                "log_file", "config_file", "cpu_info"):
        assert key in result
    assert k.client_infos == [{"program": "t"}]

    for part in (b'{"id": 3, "me', b'thod": "in', b'fo"}\x03'):
        c.send_raw(part)
        time.sleep(0.05)
    assert c.recv()["id"] == 3
    # Replies are compact JSON followed by exactly one 0x03.
    assert klippy_api.encode({"a": 1}) == b'{"a":1}\x03'
    assert [r["method"] for r in k.requests] == ["info", "info", "info"]


def test_errors_and_requests_without_id(klippy, conn):
    k = klippy()
    c = conn(k.socket_path)
    reply = c.call("printer/bogus")
    assert reply["error"] == {"error": "WebRequestError",
                              "message": "webhooks: No registered callback for path 'printer/bogus'"}
    assert "result" not in reply

    assert c.call("objects/query", {"objects": {"webhooks": "state"}})["error"]["message"] == \
        "Invalid argument"
    assert c.call("objects/query", {})["error"]["message"] == "Missing Argument [objects]"
    assert c.call("gcode/script", {})["error"]["message"] == "Missing Argument [script]"

    # No id, no reply (but the request is handled); garbage is skipped.
    c.send("gcode/script", {"script": "M117 hi"}, with_id=False)
    c.send_raw(b"this is not json\x03[1, 2]\x03")
    assert c.call("info")["result"]["state"] == "ready"
    assert k.scripts == ["M117 hi"]
    assert k.bad_messages == [b"this is not json", b"[1, 2]"]
    assert c.recv(timeout=0.2) is None
    assert k.clients == 1


def test_startup_state(klippy, conn):
    k = klippy(state="startup")
    c = conn(k.socket_path)
    info = c.call("info")["result"]
    assert info["state"] == "startup"
    assert info["state_message"].startswith("Printer is not ready")
    # MCUs are listed but not identified yet.
    assert c.call("objects/query", {"objects": {"mcu": None}})["result"]["status"] == {"mcu": {}}

    k.set_state("ready")
    assert c.call("info")["result"]["state"] == "ready"
    status = c.call("objects/query", {"objects": {"mcu": ["mcu_version"]}})["result"]["status"]
    assert status == {"mcu": {"mcu_version": klippy_api.DEFAULT_VERSION}}


def test_objects_list_and_query(klippy, conn):
    mcus = {"mcu": klippy_api.default_mcu("v1", "stm32f429xx"),
            "mcu EBBCan": klippy_api.default_mcu("v2", "stm32g0b1xx", 64000000)}
    config = {"mcu": {"serial": "/dev/serial/by-id/usb-Klipper_stm32f429xx_1234-if00"},
              "mcu EBBCan": {"canbus_uuid": "0e0d81e4210c"}}
    k = klippy(mcus=mcus, config=config, extra_objects={"toolhead": {"homed_axes": ""}})
    c = conn(k.socket_path)
    objects = c.call("objects/list")["result"]["objects"]
    assert objects == ["webhooks", "configfile", "print_stats", "mcu", "mcu EBBCan", "toolhead"]

    result = c.call("objects/query", {"objects": {
        "mcu EBBCan": None, "print_stats": ["state", "nonexistent"], "bogus": ["x"], "bogus2": None,
        "configfile": ["config"]}})["result"]
    assert isinstance(result["eventtime"], float)
    status = result["status"]
    assert status["mcu EBBCan"]["mcu_version"] == "v2"
    assert status["mcu EBBCan"]["mcu_constants"]["MCU"] == "stm32g0b1xx"
    assert status["mcu EBBCan"]["mcu_constants"]["CLOCK_FREQ"] == 64000000
    assert status["mcu EBBCan"]["mcu_build_versions"].startswith("gcc: ")
    assert "last_stats" in status["mcu EBBCan"]
    assert status["print_stats"] == {"state": "standby", "nonexistent": None}
    assert status["bogus"] == {"x": None}
    assert status["bogus2"] == {}
    assert status["configfile"]["config"]["mcu EBBCan"]["canbus_uuid"] == "0e0d81e4210c"
    assert c.call("objects/query", {"objects": {"configfile": ["settings"]}})["result"]["status"][
        "configfile"]["settings"]["mcu ebbcan"] == {"canbus_uuid": "0e0d81e4210c"}
    # A query subscribes to nothing.
    k.set_print_state("printing")
    assert c.recv(timeout=0.2) is None


def test_subscribe_notifications(klippy, conn):
    k = klippy(mcus={"mcu": klippy_api.default_mcu("v1"), "mcu EBBCan": klippy_api.default_mcu("v1")})
    c = conn(k.socket_path)
    objects = {"print_stats": ["state"], "webhooks": ["state", "state_message"],
               "mcu": ["mcu_version", "mcu_build_versions", "mcu_constants"]}
    reply = c.call("objects/subscribe", {"objects": objects, "response_template": {"mcuflashd": "status"}})
    status = reply["result"]["status"]
    assert set(status) == {"print_stats", "webhooks", "mcu"}
    assert status["print_stats"] == {"state": "standby"}
    assert status["webhooks"] == {"state": "ready", "state_message": "Printer is ready"}
    assert status["mcu"]["mcu_version"] == "v1"
    assert status["mcu"]["mcu_constants"]["MCU"] == "stm32f429xx"
    assert k.subscriptions() == [(objects, {"mcuflashd": "status"})]

    k.set_print_state("printing")
    note = c.recv()
    assert set(note) == {"mcuflashd", "params"}
    assert note["mcuflashd"] == "status"
    assert set(note["params"]) == {"eventtime", "status"}
    assert note["params"]["status"] == {"print_stats": {"state": "printing"}}

    # Nothing changed, or only what is not subscribed: no notification.
    k.set_print_state("printing")
    k.set_mcu("mcu EBBCan", version="v9")
    assert c.recv(timeout=0.2) is None

    k.set_state("shutdown", "MCU 'mcu' shutdown: Timer too close")
    note = c.recv()
    assert note["params"]["status"] == {"webhooks": {"state": "shutdown",
                                                     "state_message": "MCU 'mcu' shutdown: Timer too close"}}
    k.set_mcu("mcu", version="v2", mcu_type="stm32h723xx")
    status = c.recv()["params"]["status"]
    assert set(status) == {"mcu"}
    assert status["mcu"]["mcu_version"] == "v2"
    assert status["mcu"]["mcu_constants"]["MCU"] == "stm32h723xx"
    assert "mcu_build_versions" not in status["mcu"]
    assert len(k.notifications) == 3

    # A second subscribe replaces the first.
    c.call("objects/subscribe", {"objects": {"webhooks": ["state"]}})
    k.set_print_state("paused")
    assert c.recv(timeout=0.2) is None
    k.set_state("ready")
    assert c.recv()["params"]["status"] == {"webhooks": {"state": "ready"}}


def test_notifications_per_connection(klippy, conn):
    k = klippy()
    a, b = conn(k.socket_path), conn(k.socket_path)
    a.call("objects/subscribe", {"objects": {"print_stats": ["state"]},
                                 "response_template": {"method": "process_status_update"}})
    b.call("objects/subscribe", {"objects": {"print_stats": None}})
    k.set_print_state("paused")
    assert a.recv() == {"method": "process_status_update",
                        "params": {"eventtime": pytest.approx(time.monotonic(), abs=5),
                                   "status": {"print_stats": {"state": "paused"}}}}
    note = b.recv()
    assert note["params"]["status"] == {"print_stats": {"state": "paused"}}
    assert set(note) == {"params"}


def test_gcode_and_firmware_restart(klippy, conn):
    k = klippy()
    c = conn(k.socket_path)
    generation = k.generation
    assert c.call("gcode/script", {"script": "STATUS"})["result"] == {}
    assert c.call("gcode/script", {"script": "FIRMWARE_RESTART"})["result"] == {}
    with pytest.raises(EOFError):
        c.recv()
    assert k.scripts == ["STATUS", "FIRMWARE_RESTART"]
    assert k.wait_for(lambda s: s.generation == generation + 1)
    # A new socket at the same path (tmpfs may reuse the inode number).
    c2 = conn(k.socket_path)
    assert c2.call("info")["result"]["state"] == "ready"
    assert k.requests[-1]["generation"] == generation + 1

    c2.call("emergency_stop")
    assert c2.call("info")["result"]["state"] == "shutdown"


def test_stop_and_restart(klippy, conn):
    k = klippy()
    c = conn(k.socket_path)
    c.call("info")
    k.stop()
    with pytest.raises(EOFError):
        c.recv()
    assert not os.path.exists(k.socket_path)
    with pytest.raises(FileNotFoundError):
        Conn(k.socket_path)

    k.restart(state="startup")
    c = conn(k.socket_path)
    assert c.call("info")["result"]["state"] == "startup"

    # A killed klippy leaves its socket file: connecting is refused.
    k.stop(unlink=False)
    assert os.path.exists(k.socket_path)
    with pytest.raises(ConnectionRefusedError):
        Conn(k.socket_path)

    k.restart()
    c = conn(k.socket_path)
    assert c.call("info")["result"]["state"] == "ready"
    # restart() while running: connections dropped, socket bound again.
    k.restart(state="error")
    with pytest.raises(EOFError):
        c.recv()
    c = conn(k.socket_path)
    assert c.call("info")["result"]["state"] == "error"

    k.close_clients()
    with pytest.raises(EOFError):
        c.recv()
    assert k.clients == 0
    assert k.wait_for_request("info", count=4) is not None


def test_send_raw(klippy, conn):
    k = klippy()
    c = conn(k.socket_path)
    c.call("info")
    k.send_raw(b"garbage\x03")
    with pytest.raises(json.JSONDecodeError):
        c.recv()


def test_cli(sock_dir):
    path = os.path.join(sock_dir, "cli.sock")
    proc = subprocess.Popen([sys.executable, SIM_SCRIPT, "--socket", path, "--state", "ready",
                             "--mcu", "mcu=v0.12.0-5-gaaaaaaa:stm32f103xe",
                             "--mcu", "mcu host=v0.12.0-5-gaaaaaaa:linux"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        c = Conn(path)
        assert c.call("objects/list")["result"]["objects"][-2:] == ["mcu", "mcu host"]
        status = c.call("objects/query", {"objects": {"mcu host": ["mcu_constants"]}})["result"]["status"]
        assert status["mcu host"]["mcu_constants"]["MCU"] == "linux"
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    assert not os.path.exists(path)
