"""pytest fixtures for mcuflashd's integration tests (thin wrappers around
harness.py; see testing.md "Recommended test layout").

Fixtures (all function-scoped, each test gets fresh ones in its tmp_path):
  bus               address of a private system-like dbus-daemon with the real
                    dbus/io.mcuflash1.conf policy (the test fails if it is missing)
  testbed           harness.Testbed: .add_klipper_usb(...), .add_usb_serial_bridge(...),
                    .add_uart(...), .remove(board), .uevent(board, action), .tb, .root
  klipper_host      harness.KlipperHost (checkout + printer.cfg paths)
  klipper_checkout  klipper_checkout(version) -> checkout path (klippy/.version)
  printer_cfg       printer_cfg(text) -> printer.cfg path
  daemon            daemon(config_text=None, identify_timeout=2, offline_timeout=600,
                    serial_devices=None, extra_config="", args=("-v",), env=None,
                    wait=True) -> harness.Daemon; waits for io.mcuflash1; stopped
                    with SIGTERM at teardown, exit status must be 0
  ctl               ctl(*args, timeout=60, env=None) -> CompletedProcess of mcuflashctl
  can_hub           canhub.CanHub (no interfaces yet) at a socket in tmp_path; pass it
                    to daemon(can_hub=...) to run the daemon under the CAN shim;
                    .nodes(KlipperCanNode/KatapultCanNode kwargs) helpers below
  can_node          can_node(kind="klipper"|"katapult", iface="can0", uuid=..., **kw)
                    -> a started simulator on can_hub, stopped at teardown
  klippy            klippy(**FakeKlippy kwargs) -> a fake klippy API server at the
                    ApiSocket= path the daemon is configured with
  rig               rig(kind) -> flashrig.Rig: one MCU of that kind ("katapult-usb",
                    "katapult-uart", "katapult-can", "stm32-dfu", "picoboot") running
                    an old Klipper behind its bootloader, the daemon started, a good
                    image at the host version ready (see flashrig.py)
  dbus_client       harness.BusClient on the private bus
  mcu_props, manager_props, wait_for   shortcuts to dbus_client's methods

The daemon's output and a summary of every simulator are attached to the
report of a failing test; MCUFLASHD_SIM_LOG=1 also logs all simulator
traffic (shown with the captured output).  A test that expects the daemon
to fail sets `d.expect_failure = True` on the Daemon it started.  Nothing
here starts anything a test did not ask for: a test that only uses
`testbed` needs neither a bus nor a built daemon.
"""

import os
import sys

import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))

import can_node as can_node_sim  # noqa: E402
import canhub  # noqa: E402
import klippy_api  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for daemon in getattr(item, "_mcuflashd_daemons", []):
            report.sections.append(("mcuflashd output (%s)" % daemon.log_path, daemon.log()))
        for board in getattr(item, "_mcuflashd_boards", lambda: [])():
            if board.sim is not None:
                s = board.sim
                report.sections.append((
                    "simulator %s %s" % (board.devnode, getattr(board, "serial", "")),
                    "rx_bytes=%d tx_bytes=%d requests=%d acks=%d naks=%d responses=%d "
                    "fault=%s messages=%r" % (s.rx_bytes, s.tx_bytes, s.requests, s.acks_sent,
                                              s.naks_sent, s.responses_sent, s.fault,
                                              [m[0] for m in s.messages][:50])))


@pytest.fixture
def bus(tmp_path):
    private_bus = harness.PrivateBus(str(tmp_path))
    yield private_bus.address
    private_bus.stop()


@pytest.fixture
def testbed(request):
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail("integration tests must run under umockdev's preload: use tests/run-integration")
    log = print if os.environ.get("MCUFLASHD_SIM_LOG") else None
    tb = harness.Testbed(sim_log=log)
    request.node._mcuflashd_boards = lambda: list(tb.boards)
    yield tb
    tb.close()


@pytest.fixture
def klipper_host(tmp_path):
    return harness.KlipperHost(str(tmp_path))


@pytest.fixture
def klipper_checkout(klipper_host):
    return klipper_host.set_version


@pytest.fixture
def printer_cfg(klipper_host):
    return klipper_host.write_printer_cfg


@pytest.fixture
def dbus_client(bus):
    client = harness.BusClient(bus)
    yield client
    client.close()


@pytest.fixture
def mcu_props(dbus_client):
    return dbus_client.mcu_props


@pytest.fixture
def manager_props(dbus_client):
    return dbus_client.manager_props


@pytest.fixture
def wait_for(dbus_client):
    return dbus_client.wait_for


@pytest.fixture
def daemon(request, tmp_path, bus, testbed, klipper_host):
    started = []
    request.node._mcuflashd_daemons = started

    def start(config_text=None, identify_timeout=2, offline_timeout=600, serial_devices=None,
              extra_config="", args=("-v",), env=None, wait=True, can_hub=None):
        if config_text is None:
            config_text = harness.daemon_config(klipper_host, identify_timeout=identify_timeout,
                                                offline_timeout=offline_timeout,
                                                serial_devices=serial_devices, extra=extra_config)
        if can_hub is not None:
            env = dict(env or {})
            env.update({
                # The shim first, then umockdev's preload (testing.md §5).
                "LD_PRELOAD": "%s:%s" % (canshim_path(), harness.umockdev_preload()),
                "CANSHIM_HUB": can_hub.path,
                "MCUFLASHD_CAN_TEST_HUB": can_hub.path,
            })
        d = harness.Daemon(str(tmp_path), bus, testbed, config_text, args=args, env=env,
                           wait=wait, name="mcuflashd-%d" % len(started))
        started.append(d)
        return d

    yield start

    problems = []
    for d in started:
        status = d.stop()
        if status != 0 and not getattr(d, "expect_failure", False):
            problems.append("mcuflashd (pid %d) exit status %s\n--- output ---\n%s"
                            % (d.pid, status, d.log()[-20000:]))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def ctl(bus):
    def run(*args, timeout=60, env=None, input=None):
        return harness.run_ctl(bus, *args, timeout=timeout, env=env, input=input)
    return run


def canshim_path():
    path = os.path.join(harness.build_dir(), "tests", "shim", "libcanshim.so")
    if not os.path.exists(path):
        pytest.fail("%s is not built (meson compile)" % path)
    return path


@pytest.fixture
def can_hub(tmp_path):
    hub = canhub.CanHub(str(tmp_path / "canhub.sock"))
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture
def can_node(can_hub):
    nodes = []

    def start(kind="klipper", iface="can0", **kwargs):
        cls = can_node_sim.KlipperCanNode if kind == "klipper" else can_node_sim.KatapultCanNode
        node = cls(can_hub.path, iface, **kwargs)
        node.start()
        nodes.append(node)
        return node
    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def klippy(klipper_host):
    servers = []

    def start(**kwargs):
        os.makedirs(os.path.dirname(klipper_host.api_socket), exist_ok=True)
        # A real klippy reports the version of the checkout it runs from.
        if klipper_host.version:
            kwargs.setdefault("software_version", klipper_host.version)
        server = klippy_api.FakeKlippy(klipper_host.api_socket, **kwargs)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def rig(request, testbed, klipper_checkout, printer_cfg, daemon, tmp_path):
    import flashrig

    def make(kind):
        klipper_checkout(flashrig.HOST)
        kw = dict(testbed=testbed, printer_cfg=printer_cfg, daemon=daemon)
        if kind == "katapult-can":
            kw.update(can_hub=request.getfixturevalue("can_hub"), can_node=request.getfixturevalue("can_node"))
        return flashrig.make_rig(kind, tmp_path, **kw)
    return make
