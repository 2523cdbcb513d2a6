"""Stopping the daemon (SIGTERM) while a flash runs, and systemd's watchdog.

SIGTERM during a flash that stopped Klipper: every job ends at its next
safe point (a reboot step is let to arrive, a write stops between blocks),
Klipper is started again (the systemd mock sees StartUnit after StopUnit),
the log, the Job's ErrorMessage and mcuflashctl say where the MCU was left,
and the simulated MCU is in its bootloader or its application, never lost.
A second SIGTERM exits at once and still starts Klipper again.  With
WATCHDOG_USEC and NOTIFY_SOCKET set, the loop pings WATCHDOG=1 at half the
interval."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
import klippy_api  # noqa: E402
import mkimage  # noqa: E402
import systemd_mock  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
OCTOPUS = "2E0036000851363131363530"
KLIPPER = "klipper.service"
EXIT_BOUND = 60         # generous: the daemon exits within seconds


@pytest.fixture
def systemd(bus):
    mock = systemd_mock.SystemdMock(bus, units={KLIPPER: "active"}, job_delay=0.1).start()
    yield mock
    mock.stop()


def job_props(dbus_client):
    jobs = dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs")
    return dbus_client.get_all(jobs[0], "io.mcuflash1.Job") if jobs else None


def start_flash(kind, testbed, klipper_checkout, printer_cfg, klippy, daemon, dbus_client, wait_for,
                tmp_path, bus):
    """A board Klipper holds, a flash through mcuflashctl in the background
    over a slow link: (board, daemon, ctl process)."""
    klipper_checkout(HOST)
    if kind == "katapult":
        mcu, start, extra = "stm32f446xx", 0x08008000, ""
        board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=mcu, bootloader="katapult",
                                        katapult_kwargs={"app_start": start, "baud": 20000})
    else:
        mcu, start, extra = "stm32f429xx", 0x08008000, "\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS
        board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=mcu, bootloader="stm32-dfu",
                                        boot_kwargs={"link_rate": 4000})
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    klippy(mcus={"mcu": klippy_api.default_mcu(OLD, mcu_type=mcu)})
    d = daemon(extra_config=extra)
    path = dbus_client.get_mcu("mcu")
    wait_for(lambda: "Klipper" in dbus_client.mcu_props(path)["StateReason"], timeout=15)
    image = tmp_path / "klipper.bin"
    image.write_bytes(mkimage.build(mcu, HOST, start, size=24 * 1024))
    ctl = subprocess.Popen([harness.ctl_binary(), "flash", "mcu", str(image)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus))
    return board, d, ctl


def sigterm_and_wait(d):
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail("mcuflashd did not exit within %d s of SIGTERM\n%s" % (EXIT_BOUND, d.log()[-5000:]))
    return time.monotonic() - started


@pytest.mark.parametrize("kind", ["katapult", "stm32-dfu"])
@pytest.mark.parametrize("phase", ["entering-bootloader", "writing"])
def test_sigterm_during_a_flash_stops_safely_and_starts_klipper(
        testbed, klipper_checkout, printer_cfg, klippy, systemd, daemon, dbus_client, wait_for, tmp_path,
        bus, kind, phase):
    board, d, ctl = start_flash(kind, testbed, klipper_checkout, printer_cfg, klippy, daemon, dbus_client,
                                wait_for, tmp_path, bus)
    try:
        wait_for(lambda: (job_props(dbus_client) or {}).get("Phase") == phase, timeout=30,
                 what="the job in phase %s" % phase)
        if phase == "writing":
            wait_for(lambda: job_props(dbus_client)["BytesDone"] > 0, timeout=10)
        sigterm_and_wait(d)
        out, err = ctl.communicate(timeout=30)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.communicate()
    log = d.log()
    assert d.proc.returncode == 0, log[-5000:]

    # Klipper: stopped for the job, started again before the daemon exited.
    order = [(name, args[0]) for name, args in systemd.calls() if name in ("StopUnit", "StartUnit")]
    assert order == [("StopUnit", KLIPPER), ("StartUnit", KLIPPER)], (order, log[-5000:])
    assert systemd.active_state(KLIPPER) == "active"
    assert log.index("Started %s again" % KLIPPER) < log.index("No job is running; exiting.")

    # Where the MCU was left: in the log, the job's message and for the user.
    assert "MCU mcu left in its bootloader (%s): flash again with 'mcuflashctl flash mcu FILE'" % kind in log, \
        log[-5000:]
    assert ctl.returncode != 0
    assert "mcuflashd is stopping" in err and "bootloader" in err, (out, err)
    # The simulated board: in its bootloader, not lost half-way.
    board.wait_mode(kind, timeout=10)
    if phase == "writing":
        written = len(board.flash) if kind == "katapult" else None
        assert written is None or written > 0


def test_second_sigterm_exits_at_once_and_still_starts_klipper(
        testbed, klipper_checkout, printer_cfg, klippy, systemd, daemon, dbus_client, wait_for, tmp_path, bus):
    """A job whose MCU never reaches its bootloader keeps the first SIGTERM
    waiting (BootloaderTimeoutSec=600); the second one exits now."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, bootloader=None, bootloader_request=True)
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    klippy(mcus={"mcu": klippy_api.default_mcu(OLD)})
    d = daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=600\n")
    path = dbus_client.get_mcu("mcu")
    wait_for(lambda: "Klipper" in dbus_client.mcu_props(path)["StateReason"], timeout=15)
    import dbus
    dbus_client.call(path, "io.mcuflash1.Mcu", "RebootToBootloader", dbus.Dictionary({}, signature="sv"))
    wait_for(lambda: (job_props(dbus_client) or {}).get("Phase") == "entering-bootloader", timeout=15)

    d.proc.send_signal(signal.SIGTERM)
    harness.wait_until(lambda: "shutting down" in d.log(), 10, what="the daemon stopping")
    time.sleep(0.5)
    assert d.running(), "exited before the job reached a safe point:\n" + d.log()[-3000:]
    d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail("a second SIGTERM did not end mcuflashd\n" + d.log()[-5000:])
    d.expect_failure = True     # cut short: exit status 1
    log = d.log()
    assert d.proc.returncode == 1, log[-3000:]
    assert "cut short in phase entering-bootloader" in log, log[-3000:]
    harness.wait_until(lambda: systemd.calls("StartUnit"), 10, what="StartUnit after the forced exit")
    assert [args[0] for args in systemd.calls("StartUnit")] == [KLIPPER]
    harness.wait_until(lambda: systemd.active_state(KLIPPER) == "active", 10, what="Klipper active again")


def test_new_jobs_are_refused_while_stopping(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for):
    """Nothing new starts once SIGTERM arrived: the daemon waits for one
    job, and a second MCU's reboot is refused."""
    import dbus
    klipper_checkout(HOST)
    slow = testbed.add_klipper_usb(serial=OCTOPUS, version=HOST, bootloader=None, bootloader_request=True)
    other = testbed.add_klipper_usb(version=HOST, bootloader="katapult")
    printer_cfg("[mcu]\nserial: %s\n\n[mcu other]\nserial: %s\n" % (slow.by_id, other.by_id))
    d = daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=4\n")
    for name in ("mcu", "other"):
        wait_for(lambda: dbus_client.mcu_props(dbus_client.get_mcu(name))["State"] == "application", timeout=15)
    job = dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "RebootToBootloader",
                           dbus.Dictionary({}, signature="sv"))
    wait_for(lambda: dbus_client.get_all(job, "io.mcuflash1.Job")["Phase"] == "entering-bootloader", timeout=10)
    d.proc.send_signal(signal.SIGTERM)
    harness.wait_until(lambda: "shutting down" in d.log(), 10)
    with pytest.raises(dbus.exceptions.DBusException) as e:
        dbus_client.call(dbus_client.get_mcu("other"), "io.mcuflash1.Mcu", "RebootToBootloader",
                         dbus.Dictionary({}, signature="sv"))
    assert e.value.get_dbus_name() == "io.mcuflash1.Error.Busy"
    assert "mcuflashd is stopping" in e.value.get_dbus_message()
    assert other.mode == "klipper"
    d.proc.wait(EXIT_BOUND)
    assert d.proc.returncode == 0, d.log()[-3000:]
    assert "did not appear in a bootloader" in d.log()


def test_watchdog_pings_from_the_loop(testbed, klipper_checkout, daemon, tmp_path):
    klipper_checkout(HOST)
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(1.0)
    try:
        started = time.monotonic()
        d = daemon(env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
        messages = []
        while time.monotonic() - started < 20 and sum("WATCHDOG=1" in m for m in messages) < 5:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        pings = [m for m in messages if "WATCHDOG=1" in m]
        assert any("READY=1" in m for m in messages), messages
        assert len(pings) >= 5, messages
        # Pinged at half the interval: 5 pings take about a second, not ten.
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(EXIT_BOUND)
        assert d.proc.returncode == 0
        rest = []
        while True:
            try:
                rest.append(sock.recv(4096).decode())
            except socket.timeout:
                break
        assert any("STOPPING=1" in m for m in rest), rest
    finally:
        sock.close()


def test_no_watchdog_without_watchdog_usec(testbed, klipper_checkout, daemon, tmp_path):
    klipper_checkout(HOST)
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(2.0)
    try:
        daemon(env={"NOTIFY_SOCKET": sock_path})
        messages = []
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        assert any("READY=1" in m for m in messages)
        assert not any("WATCHDOG=1" in m for m in messages), messages
    finally:
        sock.close()


def test_sigterm_while_klipper_is_being_stopped_starts_it_again(
        testbed, klipper_checkout, printer_cfg, klippy, systemd, daemon, dbus_client, wait_for):
    """systemd carries out a stop it was asked for even when the job is
    cancelled before the answer: Klipper is started again all the same."""
    import dbus
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=HOST, bootloader="katapult")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    klippy(mcus={"mcu": klippy_api.default_mcu(HOST)})
    d = daemon()
    path = dbus_client.get_mcu("mcu")
    wait_for(lambda: "Klipper" in dbus_client.mcu_props(path)["StateReason"], timeout=15)
    systemd.set_job_hang(True)
    job = dbus_client.call(path, "io.mcuflash1.Mcu", "RebootToBootloader", dbus.Dictionary({}, signature="sv"))
    wait_for(lambda: dbus_client.get_all(job, "io.mcuflash1.Job")["Phase"] == "stopping-klipper", timeout=10)
    harness.wait_until(lambda: systemd.calls("StopUnit"), 10, what="StopUnit")
    d.proc.send_signal(signal.SIGTERM)
    harness.wait_until(lambda: systemd.calls("StartUnit"), 10, what="StartUnit")
    systemd.set_job_hang(False)
    systemd.finish_hanging_jobs()
    d.proc.wait(EXIT_BOUND)
    log = d.log()
    assert d.proc.returncode == 0, log[-3000:]
    order = [(name, args[0]) for name, args in systemd.calls() if name in ("StopUnit", "StartUnit")]
    assert order == [("StopUnit", KLIPPER), ("StartUnit", KLIPPER)]
    assert systemd.active_state(KLIPPER) == "active"
    assert "Cancelled before anything was sent to the MCU" in log
    assert board.mode == "klipper" and not board.sim.bootloader_requested
