"""The Linux process MCU: klipper_mcu's pty named in printer.cfg (not a udev
device), found when its symlink appears, identified over the pty, offline
as soon as the klipper_mcu holding the pty's master exits (the real program
leaves its symlink behind), never opened when the pty behind the link
belongs to another program (pty numbers are reused), and left alone while
klippy has it open.  The simulator (tests/sim/linux_mcu.py) runs as its own
process named klipper_mcu, as the real program does."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import termios
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))

from linux_mcu import LinuxMcuProcess, pty_index  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
# What "at once" may take on a loaded test machine; the daemon reacts to the
# exit itself (a pidfd), the bound only keeps a slow machine from failing.
PROMPTLY = 5


@pytest.fixture
def linux_mcu(tmp_path):
    started = []

    def start(version=HOST, name="klipper_mcu", interpreter="/usr/bin/python3", user=None):
        p = LinuxMcuProcess(str(tmp_path / "klipper_host_mcu"), version, name=name, interpreter=interpreter,
                            user=user)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


@pytest.fixture
def stranger_ptys():
    """Ptys the test opens as "another program" (the test process holds
    their masters): (master, slave) pairs, closed at the end."""
    opened = []
    yield opened
    for fds in opened:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def props_of(dbus_client, selector):
    return dbus_client.mcu_props(dbus_client.get_mcu(selector))


def wait_state(dbus_client, wait_for, selector, state, timeout=15):
    return wait_for(lambda: (lambda p: p if p["State"] == state else None)(
        props_of(dbus_client, selector)), timeout=timeout, what="%s %s" % (selector, state))


def start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon, extra_config=""):
    klipper_checkout(HOST)
    link = str(tmp_path / "klipper_host_mcu")
    printer_cfg("[mcu rpi]\nserial: %s\n" % link)
    return link, daemon(extra_config=extra_config)


def take_pty_number(index, stranger_ptys, timeout=10):
    """Open ptys as another program until the kernel hands out /dev/pts/@index
    (it gives the lowest free number; other programs on the machine may
    take some meanwhile).  Returns (master, slave) or None."""
    deadline = time.monotonic() + timeout
    spare = []
    try:
        while time.monotonic() < deadline and len(spare) < 256:
            master, slave = os.openpty()
            if pty_index(os.ttyname(slave)) == index:
                stranger_ptys.append((master, slave))
                return master, slave
            spare.append((master, slave))
            if pty_index(os.ttyname(slave)) > index:
                # Past it: someone else has it now; free ours and try again.
                for fds in spare:
                    for fd in fds:
                        os.close(fd)
                spare = []
                time.sleep(0.05)
        return None
    finally:
        for fds in spare:
            for fd in fds:
                os.close(fd)


def assert_untouched(master, slave, termios_before):
    """Nobody wrote to the stranger's terminal or set it up as a port."""
    os.set_blocking(master, False)
    assert select.select([master], [], [], 0.2)[0] == [] or _read_nothing(master), \
        "bytes arrived on the stranger's terminal"
    assert termios.tcgetattr(slave) == termios_before, "the stranger's terminal settings were changed"


def _read_nothing(master):
    try:
        return os.read(master, 4096) == b""
    except BlockingIOError:
        return True


def test_linux_mcu_found_identified_and_offline(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                dbus_client, wait_for, linux_mcu, ctl):
    link, _ = start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon)
    assert dbus_client.list_mcus() == []

    proc = linux_mcu()
    props = wait_state(dbus_client, wait_for, "rpi", "application")
    assert props["Transport"] == "linux"
    assert props["Name"] == "mcu rpi"
    assert props["McuType"] == "linux"
    assert props["Bootloader"] == "linux"
    assert props["DevicePath"] == link
    assert props["FirmwareVersion"] == HOST
    assert props["VersionMatchesHost"] == "yes"
    assert proc.rx_bytes > 0
    path = dbus_client.get_mcu("rpi")

    out = ctl("status", "--json")
    rpi = [m for m in json.loads(out.stdout)["mcus"] if m["name"] == "mcu rpi"][0]
    assert rpi["transport"] == "linux"

    # klipper_mcu stops; its symlink stays behind, as the real one's does.
    proc.terminate()
    assert os.path.islink(link)
    props = wait_state(dbus_client, wait_for, "rpi", "offline", timeout=PROMPTLY)
    assert "klipper_mcu" in props["StateReason"], props["StateReason"]

    # ... and starts again: same object.
    linux_mcu()
    wait_state(dbus_client, wait_for, "rpi", "application")
    assert dbus_client.get_mcu("rpi") == path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_linux_mcu_offline_at_once_when_klipper_mcu_exits(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                          dbus_client, wait_for, linux_mcu, ctl, sig):
    """The symlink is left behind and nothing in its directory changes: the
    daemon must see the process go, not the link."""
    link, d = start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon)
    proc = linux_mcu(OLD)
    wait_state(dbus_client, wait_for, "rpi", "application")
    target = os.readlink(link)

    if sig == signal.SIGKILL:
        proc.kill()
    else:
        proc.terminate()
    assert os.readlink(link) == target
    props = wait_state(dbus_client, wait_for, "rpi", "offline", timeout=PROMPTLY)
    assert "exited" in d.log() and "pid %d" % proc.pid in d.log()
    assert props["FirmwareVersion"] == OLD      # what was known stays visible
    out = ctl("refresh", "rpi")
    assert out.returncode != 0

    # A new klipper_mcu replaces the stale link: attached and identified again.
    new = linux_mcu(HOST)
    props = wait_state(dbus_client, wait_for, "rpi", "application")
    assert props["FirmwareVersion"] == HOST
    assert new.rx_bytes > 0


def test_linux_mcu_link_left_to_a_strangers_pty_is_never_opened(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                                dbus_client, wait_for, linux_mcu, ctl,
                                                                stranger_ptys):
    """klipper_mcu exits, another program gets its pty number: the leftover
    link now leads to that program's terminal.  The MCU stays offline, the
    daemon says why (once), and the terminal sees no byte and no change."""
    link, d = start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon)
    proc = linux_mcu()
    wait_state(dbus_client, wait_for, "rpi", "application")
    index = proc.index

    proc.kill()
    wait_state(dbus_client, wait_for, "rpi", "offline", timeout=PROMPTLY)
    taken = take_pty_number(index, stranger_ptys)
    if taken is None:
        pytest.skip("another program on this machine kept /dev/pts/%d" % index)
    master, slave = taken
    assert os.path.realpath(link) == os.ttyname(slave)
    before = termios.tcgetattr(slave)

    assert ctl("refresh", "rpi").returncode != 0

    # Anything that makes the daemon look at the link again: an event in
    # its directory naming it (twice), then a Rescan (which forgets offline
    # MCUs; the refusal keeps it from coming back).
    for _ in range(2):
        os.utime(link, follow_symlinks=False)
        props = wait_for(lambda: (lambda p: p if "not of klipper_mcu" in p["StateReason"] else None)(
            props_of(dbus_client, "rpi")), timeout=15, what="rpi refused")
        assert props["State"] == "offline"
        time.sleep(0.3)
    assert "/dev/pts/%d" % index in props["StateReason"], props["StateReason"]
    assert "not opened" in props["StateReason"]
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    time.sleep(0.5)
    assert dbus_client.list_mcus() == []
    refusals = [line for line in d.log().splitlines() if "not of klipper_mcu" in line]
    assert len(refusals) == 1, refusals
    assert "pid %d" % os.getpid() in refusals[0]
    assert_untouched(master, slave, before)

    # klipper_mcu starts again (a new pty, the link replaced): back.
    linux_mcu()
    wait_state(dbus_client, wait_for, "rpi", "application")
    assert_untouched(master, slave, before)


def test_linux_mcu_pty_of_another_program_is_not_identified(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                            dbus_client, wait_for, linux_mcu):
    """A program that is not klipper_mcu (here: the same simulator under
    another name) makes the link: no MCU is shown, its pty is not opened."""
    link, d = start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon)
    other = linux_mcu(name="socat")
    wait_for(lambda: "not of klipper_mcu" in d.log(), timeout=15, what="the refusal in the log")
    assert dbus_client.list_mcus() == []
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    time.sleep(0.5)
    assert dbus_client.list_mcus() == []
    assert other.rx_bytes == 0
    assert "socat (pid %d" % other.pid in d.log()


def test_linux_mcu_name_taken_by_another_user_is_not_enough(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                           dbus_client, wait_for, linux_mcu):
    """Anybody can name a process klipper_mcu and make the link in /tmp: the
    name counts only for root's processes (and the owner of Program='s
    file); a user's is refused, its pty not opened."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the simulator as another user")
    link, d = start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon)
    fake = linux_mcu(user=65534)
    wait_for(lambda: "not of klipper_mcu" in d.log(), timeout=15, what="the refusal in the log")
    assert "klipper_mcu (pid %d, user 65534" % fake.pid in d.log()
    assert dbus_client.list_mcus() == []
    assert fake.rx_bytes == 0


def test_linux_mcu_program_is_recognised_by_the_executable_it_runs(tmp_path, klipper_checkout, printer_cfg,
                                                                    daemon, dbus_client, wait_for, linux_mcu):
    """[Mcu ID] Program= names the program: a process running that file
    holds the pty's master, whatever its name."""
    program = tmp_path / "opt" / "host-mcu"
    program.parent.mkdir()
    shutil.copy2(os.path.realpath("/usr/bin/python3"), program)
    start_daemon(tmp_path, klipper_checkout, printer_cfg, daemon,
                 extra_config="\n[Mcu linux-klipper_host_mcu]\nProgram=%s\n" % program)
    proc = linux_mcu(name="mcu-worker", interpreter=str(program))
    assert os.readlink("/proc/%d/exe" % proc.pid) == str(program)
    props = wait_state(dbus_client, wait_for, "rpi", "application")
    assert props["FirmwareVersion"] == HOST
    assert proc.rx_bytes > 0


def test_linux_mcu_held_by_klippy_is_not_opened(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                dbus_client, wait_for, linux_mcu):
    klipper_checkout(HOST)
    link = str(tmp_path / "klipper_host_mcu")
    printer_cfg("[mcu rpi]\nserial: %s\n" % link)
    proc = linux_mcu()
    # klippy connects to the Linux MCU in pipe mode: a plain open of the slave.
    klippy = subprocess.Popen([sys.executable, "-c",
                               "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY); "
                               "print('open', flush=True); time.sleep(60)", link],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert klippy.stdout.readline().strip() == "open"
        daemon()
        props = wait_for(lambda: (lambda p: p if p["StateReason"] else None)(
            props_of(dbus_client, "rpi")), timeout=15, what="rpi settled")
        assert props["State"] == "unknown"
        assert "held by another process" in props["StateReason"]
        assert proc.rx_bytes == 0
    finally:
        klippy.kill()
        klippy.wait()
