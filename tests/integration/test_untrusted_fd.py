"""Hostile callers of the real daemon (issue 10, point 2): file descriptors
that cannot be read, or not soon, handed to Mcu.Flash by an unprivileged
caller (uid 65534, polkit denying: NotAuthorized before the fd is looked at)
and by root (InvalidImage naming the problem); the daemon keeps answering
everybody meanwhile and keeps no fd or job of it.  Finished flashes let go
of their image at once, and a flood of Rescan/Refresh from uid 65534 does not
disturb root's flashes."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import dbus
import pytest

import harness
# The bus uid 65534 can reach, and python3-dbusmock's polkitd.
from test_job_policy import NOBODY, bus, polkit  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import mkimage  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
OCTOPUS = "2E0036000851363131363530"
CALLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "untrusted_caller.py")

KINDS = {
    # kind: words root's InvalidImage message must hold
    "silent-pipe": "pipe",
    "slow-pipe": "pipe",
    "eventfd": "not a regular file",
    "dev-zero": "character device",
    "directory": "directory",
    "socket": "socket",
    "write-only": "not open for reading",
    "sparse": "at most 16777216 bytes",
    "truncated": "truncated",
}


def open_fds(daemon_proc):
    return len(os.listdir("/proc/%d/fd" % daemon_proc.pid))


def settled_fds(daemon_proc, expected, timeout=10):
    """The daemon's fd count once it stops changing towards @expected."""
    deadline = time.monotonic() + timeout
    n = open_fds(daemon_proc)
    while n != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        n = open_fds(daemon_proc)
    return n


def start_caller(bus_address, mcu_path, kind, as_nobody, image_path=None):
    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    args = ["/usr/bin/python3", CALLER, bus_address, mcu_path, kind] + ([image_path] if image_path else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                            preexec_fn=drop if as_nobody else None,
                            env=harness.clean_env(HOME="/", TMPDIR="/tmp"))


def answered_meanwhile(dbus_client, proc, timeout=30):
    """Ask the daemon for its Version and its MCUs until @proc exits; the
    slowest answer in seconds, and how many were asked."""
    slowest, asked = 0.0, 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        start = time.monotonic()
        dbus_client.get("/io/mcuflash1", "io.mcuflash1.Manager", "Version")
        dbus_client.list_mcus()
        slowest = max(slowest, time.monotonic() - start)
        asked += 1
        time.sleep(0.01)
    return slowest, asked


@pytest.fixture
def board(testbed, klipper_checkout, printer_cfg):
    klipper_checkout(HOST)
    b = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                katapult_kwargs={"app_start": 0x08008000})
    printer_cfg("[mcu]\nserial: %s\n" % b.by_id)
    return b


@pytest.fixture
def shared_dir():
    """A directory uid 65534 can read too."""
    path = tempfile.mkdtemp(prefix="mcuflashd-untrusted-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_app(dbus_client, wait_for, version=None):
    return wait_for(lambda: (lambda p: p if p["State"] == "application" and (
        version is None or p["FirmwareVersion"] == version) else None)(
            dbus_client.mcu_props(dbus_client.get_mcu("mcu"))),
        timeout=20, what="mcu running %s" % version)


@pytest.mark.parametrize("as_nobody", [True, False], ids=["uid65534", "root"])
def test_hostile_fds_are_refused_and_the_daemon_keeps_answering(board, polkit, daemon, bus, dbus_client,
                                                                 wait_for, shared_dir, as_nobody):
    d = daemon()
    wait_app(dbus_client, wait_for)
    mcu = dbus_client.get_mcu("mcu")
    truncated = os.path.join(shared_dir, "klipper.hex")
    with open(truncated, "wb") as f:
        f.write(mkimage.build("stm32f446xx", HOST, 0x08008000, fmt="hex")[:-200])
    os.chmod(truncated, 0o644)
    before = open_fds(d.proc)

    for kind, words in KINDS.items():
        proc = start_caller(bus, mcu, kind, as_nobody, truncated)
        slowest, asked = answered_meanwhile(dbus_client, proc)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        result = json.loads(out)
        assert "job" not in result, result
        if as_nobody:
            assert result["error"] == "io.mcuflash1.Error.NotAuthorized", result
        else:
            assert result["error"] == "io.mcuflash1.Error.InvalidImage", result
            assert words in result["message"], result
        # Refused at once, not after a read timed out.
        assert result["seconds"] < 5, result
        assert slowest < 1.0, "%s: an answer took %.3f s" % (kind, slowest)
        # Nothing left behind: no fd, no job, the board untouched.
        assert settled_fds(d.proc, before) == before, kind
        assert dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs") == []
    assert board.history == ["klipper"] and not board.sim.bootloader_requested
    if as_nobody:
        # polkit was asked (and said no) once per call; the fd never mattered.
        assert polkit.checked_actions() == ["io.mcuflash1.flash"] * len(KINDS)
    else:
        assert polkit.checked_actions() == []


def test_methods_not_on_the_list_are_denied(board, daemon, bus, dbus_client, wait_for):
    daemon()
    wait_app(dbus_client, wait_for)
    mcu = dbus_client.get_mcu("mcu")
    with pytest.raises(dbus.exceptions.DBusException) as e:
        dbus_client.call(mcu, "io.mcuflash1.Mcu", "Erase")
    assert e.value.get_dbus_name() == "org.freedesktop.DBus.Error.AccessDenied"
    with pytest.raises(dbus.exceptions.DBusException) as e:
        dbus_client.call(mcu, "org.freedesktop.DBus.Properties", "Set", "io.mcuflash1.Mcu", "Name",
                         dbus.String("x", variant_level=1))
    assert e.value.get_dbus_name() == "org.freedesktop.DBus.Error.AccessDenied"
    assert dbus_client.mcu_props(mcu)["State"] == "application"


def test_finished_flashes_let_go_of_their_fds(board, daemon, dbus_client, wait_for, ctl, tmp_path):
    """Five flashes, then the daemon holds as many fds as before them (it
    kept one memfd and more per finished job for 10 minutes)."""
    d = daemon()
    wait_app(dbus_client, wait_for)
    path = tmp_path / "klipper.bin"
    path.write_bytes(mkimage.build("stm32f446xx", HOST, 0x08008000))
    before = open_fds(d.proc)
    jobs = []
    for _ in range(5):
        out = ctl("flash", "mcu", str(path), "--force", "--json", timeout=120)
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        assert job["state"] == "succeeded", job
        jobs.append(job)
        wait_app(dbus_client, wait_for, HOST)
    # The finished jobs are still there to be read...
    assert len(dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs")) == 5
    # ...but hold nothing any more.
    assert settled_fds(d.proc, before) == before


def test_unprivileged_rescan_flood_does_not_disturb_a_flash(board, daemon, bus, dbus_client, wait_for, ctl,
                                                            tmp_path):
    d = daemon()
    wait_app(dbus_client, wait_for)
    mcu = dbus_client.get_mcu("mcu")
    path = tmp_path / "klipper.bin"
    path.write_bytes(mkimage.build("stm32f446xx", HOST, 0x08008000))
    rescans_before = d.log().count("Rescanning.")
    started = time.monotonic()
    spammer = start_caller(bus, mcu, "spam", as_nobody=True)
    try:
        time.sleep(1)
        assert spammer.poll() is None, spammer.communicate()
        for _ in range(3):
            out = ctl("flash", "mcu", str(path), "--force", "--json", timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            job = json.loads(out.stdout)
            assert job["state"] == "succeeded", job
            wait_app(dbus_client, wait_for, HOST)
    finally:
        spammer.kill()
        spammer.communicate()
    elapsed = time.monotonic() - started
    assert "port is held by another process" not in d.log()
    # Thousands of Rescan calls came; rescans ran, at most about once a second.
    rescans = d.log().count("Rescanning.") - rescans_before
    assert 1 <= rescans <= elapsed + 3, (rescans, elapsed)


def tiny_record_hex(size):
    """Intel HEX of one-byte records at consecutive addresses, about @size bytes."""
    lines, address, upper = [], 0x08000000, None
    total = 0
    while total < size - 64:
        if address >> 16 != upper:
            upper = address >> 16
            rec = bytes([2, 0, 0, 4, upper >> 8 & 0xff, upper & 0xff])
            lines.append(":%s%02X\n" % (rec.hex().upper(), -sum(rec) & 0xff))
            total += len(lines[-1])
        rec = bytes([1, address >> 8 & 0xff, address & 0xff, 0, address & 0xff])
        lines.append(":%s%02X\n" % (rec.hex().upper(), -sum(rec) & 0xff))
        total += len(lines[-1])
        address += 1
    lines.append(":00000001FF\n")
    return "".join(lines).encode()


def peak_rss_kib(proc):
    with open("/proc/%d/status" % proc.pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hex_of_tiny_records_costs_little_memory(board, daemon, dbus_client, wait_for, tmp_path):
    """A 16 MiB Intel HEX of one-byte records once took the daemon to 120 MB:
    now it is read as one segment (and refused: it is no Klipper image)."""
    d = daemon()
    wait_app(dbus_client, wait_for)
    path = tmp_path / "tiny.hex"
    path.write_bytes(tiny_record_hex(16 * 1024 * 1024 - 4096))
    before = peak_rss_kib(d.proc)
    with open(path, "rb") as f:
        with pytest.raises(dbus.exceptions.DBusException) as e:
            dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "Flash",
                             dbus.types.UnixFd(f.fileno()), dbus.Dictionary({}, signature="sv"))
    assert e.value.get_dbus_name() == "io.mcuflash1.Error.InvalidImage", e.value.get_dbus_message()
    assert "data dictionary" in e.value.get_dbus_message()
    grown = peak_rss_kib(d.proc) - before
    # The decoded bytes and little else (measured: about 18 MiB; 58 MiB before).
    assert grown < 40 * 1024, "peak RSS grew by %d KiB" % grown


def test_a_job_s_mcu_is_left_alone(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for):
    """While a job has the MCU, Refresh answers Busy and Rescan neither
    forgets nor probes it; the job goes on."""
    from test_job_policy import start_waiting_job
    job = start_waiting_job(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for)
    mcu = dbus_client.get_mcu("mcu")
    with pytest.raises(dbus.exceptions.DBusException) as e:
        dbus_client.call(mcu, "io.mcuflash1.Mcu", "Refresh")
    assert e.value.get_dbus_name() == "io.mcuflash1.Error.Busy"
    assert "has a job running" in e.value.get_dbus_message()
    for _ in range(3):
        dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    assert mcu in dbus_client.list_mcus()
    assert dbus_client.mcu_props(mcu)["Job"] == job
    assert dbus_client.get_all(job, "io.mcuflash1.Job")["State"] == "running"


def test_refresh_is_rate_limited(board, daemon, dbus_client, wait_for):
    """Many Refresh calls, one after the other from each of ten callers,
    share identifies: at most about one a second."""
    d = daemon()
    wait_app(dbus_client, wait_for)
    mcu = dbus_client.get_mcu("mcu")
    before = d.log().count("identifying on")
    started = time.monotonic()
    callers = [subprocess.Popen(["/usr/bin/python3", "-c",
                                 "import dbus, sys\nc = dbus.bus.BusConnection(sys.argv[1])\nfor _ in range(5):\n"
                                 "    c.call_blocking('io.mcuflash1', sys.argv[2], 'io.mcuflash1.Mcu', 'Refresh', '', ())",
                                 dbus_client.address, mcu]) for _ in range(10)]
    assert [c.wait(60) for c in callers] == [0] * 10
    elapsed = time.monotonic() - started
    identifies = d.log().count("identifying on") - before
    assert 1 <= identifies <= elapsed + 2, (identifies, elapsed)


def test_mcuflashctl_passes_a_pipe_as_a_memfd(board, daemon, dbus_client, wait_for, ctl):
    """The daemon takes regular files only; mcuflashctl reads a pipe itself
    (as the caller) into a memfd, so `... | mcuflashctl flash mcu /dev/stdin`
    still works."""
    daemon()
    wait_app(dbus_client, wait_for)
    hex_text = mkimage.build("stm32f446xx", HOST, 0x08008000, fmt="hex").decode("ascii")
    out = ctl("flash", "mcu", "/dev/stdin", "--json", input=hex_text, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "succeeded"
    wait_app(dbus_client, wait_for, HOST)
