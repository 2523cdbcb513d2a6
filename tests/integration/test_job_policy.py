"""Who may start a job, and Klipper around a job: the real daemon with
python3-dbusmock's polkitd and the systemd mock (tests/sim/systemd_mock.py)
on a private bus that an unprivileged caller (uid 65534) can reach."""

import os
import shutil
import subprocess
import sys
import tempfile

import dbus
import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
import systemd_mock  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
NOBODY = 65534
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
MOCK_IFACE = "org.freedesktop.DBus.Mock"


@pytest.fixture
def bus():
    """Overrides conftest's bus: one that uid 65534 can reach too."""
    workdir = tempfile.mkdtemp(prefix="mcuflashd-policy-")
    os.chmod(workdir, 0o755)
    # As on Debian's system bus, every user may connect.
    users = os.path.join(workdir, "users.conf")
    with open(users, "w") as f:
        f.write('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
                ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
                '<busconfig><policy context="default"><allow user="*"/></policy></busconfig>\n')
    private = harness.PrivateBus(workdir, policy_files=[users])
    os.chmod(private.socket, 0o777)
    yield private.address
    private.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def polkit(bus):
    proc = subprocess.Popen(["/usr/bin/python3", "-m", "dbusmock", "--system", "--template", "polkitd"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus))
    conn = dbus.bus.BusConnection(bus)
    harness.wait_until(lambda: conn.name_has_owner(POLKIT_NAME) or proc.poll() is not None, 10,
                       what="polkit mock")

    class Polkit:
        def allow(self, *actions):
            conn.call_blocking(POLKIT_NAME, POLKIT_PATH, MOCK_IFACE, "SetAllowed", "as",
                               (dbus.Array(actions, signature="s"),))

        def checked_actions(self):
            rows = conn.call_blocking(POLKIT_NAME, POLKIT_PATH, MOCK_IFACE, "GetMethodCalls", "s",
                                      ("CheckAuthorization",))
            return [str(args[1]) for _, args in rows]
    yield Polkit()
    proc.terminate()
    proc.wait(5)
    conn.close()


@pytest.fixture
def systemd(bus):
    mock = systemd_mock.SystemdMock(bus, units={"klipper.service": "active"}, job_delay=0.1).start()
    yield mock
    mock.stop()


def ctl_as_nobody(bus, *args):
    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return subprocess.run([harness.ctl_binary()] + list(args), capture_output=True, text=True,
                          timeout=60, preexec_fn=drop, cwd="/",
                          env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus, HOME="/"))


def wait_app(dbus_client, wait_for, selector="mcu"):
    wait_for(lambda: dbus_client.mcu_props(dbus_client.get_mcu(selector))["State"] == "application",
             timeout=15)


@pytest.fixture
def board(testbed, klipper_checkout, printer_cfg):
    klipper_checkout(HOST)
    b = testbed.add_klipper_usb(serial="2E0036000851363131363530", version=HOST, bootloader="katapult")
    printer_cfg("[mcu]\nserial: %s\n" % b.by_id)
    return b


def test_polkit_denies_nothing_is_sent(board, polkit, daemon, bus, dbus_client, wait_for):
    daemon()
    wait_app(dbus_client, wait_for)
    out = ctl_as_nobody(bus, "bootloader", "mcu")
    assert out.returncode == 1
    assert "not authorized" in out.stderr.lower() or "NotAuthorized" in out.stderr, out.stderr
    assert polkit.checked_actions() == ["io.mcuflash1.reboot"]
    assert not board.sim.bootloader_requested
    assert board.mode == "klipper"
    assert dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs") == []
    # Reading stays open to everybody.
    assert ctl_as_nobody(bus, "status").returncode == 0


def test_polkit_allows(board, polkit, daemon, bus, dbus_client, wait_for):
    polkit.allow("io.mcuflash1.reboot")
    daemon()
    wait_app(dbus_client, wait_for)
    out = ctl_as_nobody(bus, "bootloader", "mcu")
    assert out.returncode == 0, out.stderr
    assert "bootloader" in out.stdout
    board.wait_mode("katapult")


def test_no_polkit_unprivileged_caller_is_refused(board, daemon, bus, dbus_client, wait_for):
    daemon()
    wait_app(dbus_client, wait_for)
    out = ctl_as_nobody(bus, "bootloader", "mcu")
    assert out.returncode == 1 and "polkit" in out.stderr.lower(), out.stderr
    assert not board.sim.bootloader_requested


def start_waiting_job(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for):
    """A reboot job by root that waits (the board never answers the
    bootloader request) until BootloaderTimeoutSec."""
    klipper_checkout(HOST)
    b = testbed.add_klipper_usb(serial="2E0036000851363131363530", version=HOST, bootloader=None,
                                bootloader_request=True)
    printer_cfg("[mcu]\nserial: %s\n" % b.by_id)
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=30\n")
    wait_app(dbus_client, wait_for)
    job = dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "RebootToBootloader",
                           dbus.Dictionary({}, signature="sv"))
    wait_for(lambda: dbus_client.get_all(job, "io.mcuflash1.Job")["Phase"] == "entering-bootloader", timeout=10)
    return job


def cancel_as_nobody(bus, job):
    """Job.Cancel from uid 65534: the CompletedProcess.  While the reboot
    request is on its way to the MCU the daemon answers Busy "… it stops at
    the next safe point": the cancel is taken all the same (the job stops
    there), so that answer counts as accepted, never as a reason to ask
    again (a second call would find the job finished already)."""
    return ctl_as_nobody(bus, "cancel", job)


def cancel_accepted(out):
    return out.returncode == 0 or "next safe point" in out.stderr


def test_cancel_takes_the_action_of_the_job(testbed, klipper_checkout, printer_cfg, polkit, daemon, bus,
                                            dbus_client, wait_for):
    """Cancelling somebody else's job is as privileged as starting it: a
    user polkit does not allow to reboot MCUs cannot cancel a reboot."""
    job = start_waiting_job(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for)
    out = cancel_as_nobody(bus, job)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "not authorized" in out.stderr.lower() or "NotAuthorized" in out.stderr, out.stderr
    assert polkit.checked_actions() == ["io.mcuflash1.reboot"]
    assert dbus_client.get_all(job, "io.mcuflash1.Job")["State"] == "running"

    polkit.allow("io.mcuflash1.reboot")
    out = cancel_as_nobody(bus, job)
    assert cancel_accepted(out), out.stdout + out.stderr
    done = wait_for(lambda: (lambda p: p if p["State"] != "running" else None)(
        dbus_client.get_all(job, "io.mcuflash1.Job")), timeout=10)
    assert done["State"] == "cancelled", done


@pytest.mark.parametrize("succeeds", [True, False])
def test_klipper_stopped_and_started_around_a_job(testbed, klipper_checkout, printer_cfg, klippy,
                                                  systemd, daemon, dbus_client, wait_for, succeeds):
    import klippy_api
    klipper_checkout(HOST)
    b = testbed.add_klipper_usb(serial="2E0036000851363131363530", version=HOST,
                                bootloader="katapult" if succeeds else None,
                                **({} if succeeds else {"bootloader_request": True}))
    printer_cfg("[mcu]\nserial: %s\n" % b.by_id)
    klippy(mcus={"mcu": klippy_api.default_mcu(HOST)})
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=2\n")
    path = dbus_client.get_mcu("mcu")
    wait_for(lambda: "Klipper" in dbus_client.mcu_props(path)["StateReason"], timeout=10)

    # Not allowed to stop Klipper: refused, nothing happens.
    with pytest.raises(Exception) as e:
        dbus_client.call(path, "io.mcuflash1.Mcu", "RebootToBootloader",
                         dbus.Dictionary({"stop-klipper": dbus.Boolean(False)}, signature="sv"))
    assert "io.mcuflash1.Error.Busy" in str(e.value)
    assert systemd.calls("StopUnit") == []

    job = dbus_client.call(path, "io.mcuflash1.Mcu", "RebootToBootloader",
                           dbus.Dictionary({}, signature="sv"))

    def finished():
        p = dbus_client.get_all(job, "io.mcuflash1.Job")
        return p if p["State"] in ("succeeded", "failed") and p["Phase"] == "done" else None
    done = wait_for(finished, timeout=30)
    assert done["State"] == ("succeeded" if succeeds else "failed"), done["ErrorMessage"]
    # Stopped first, started again after the job - also after a failed one.
    order = [(name, args[0]) for name, args in systemd.calls() if name in ("StopUnit", "StartUnit")]
    assert order == [("StopUnit", "klipper.service"), ("StartUnit", "klipper.service")]
    assert systemd.active_state("klipper.service") == "active"
    if succeeds:
        b.wait_mode("katapult")
