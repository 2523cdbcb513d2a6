"""Flashing the Linux process MCU: the image (a host program, Klipper's
out/klipper.elf of a "linux" build) is installed over klipper_mcu, the old
program kept as klipper_mcu.old, klipper-mcu.service restarted through the
systemd mock, and the MCU must answer with the image's version — else the
old program goes back.  The service is tests/sim/linux_mcu.LinuxMcuService:
it runs whatever program is installed when systemd restarts it."""

import json
import os
import stat
import sys
from types import SimpleNamespace

import dbus
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
import mkimage  # noqa: E402
import systemd_mock  # noqa: E402
from linux_mcu import LinuxMcuService  # noqa: E402
from flashrig import start_flash, wait_done  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
UNIT = "klipper-mcu.service"
MCU_ID = "linux-klipper_host_mcu"


@pytest.fixture
def systemd(bus):
    mock = systemd_mock.SystemdMock(bus, units={UNIT: "active"}, job_delay=0.1).start()
    yield mock
    mock.stop()


class Host:
    """A Linux host with klipper_mcu installed at @program, run by the
    simulated klipper-mcu.service, and a daemon told where both are."""

    def __init__(self, tmp_path, systemd, version=OLD, broken=()):
        bindir = tmp_path / "usr-local-bin"
        bindir.mkdir()
        self.program = str(bindir / "klipper_mcu")
        self.old_bytes = mkimage.host_program(version)
        with open(self.program, "wb") as f:
            f.write(self.old_bytes)
        os.chmod(self.program, 0o755)
        self.link = str(tmp_path / "klipper_host_mcu")
        self.systemd = systemd
        self.service = LinuxMcuService(systemd, UNIT, self.program, self.link, broken=broken).start()
        self.config = "\n[Mcu %s]\nProgram=%s\nService=%s\n" % (MCU_ID, self.program, UNIT)

    def installed(self):
        with open(self.program, "rb") as f:
            return f.read()

    def restarts(self):
        return [args[0] for args in self.systemd.calls("RestartUnit")]

    def stop(self):
        self.service.stop()


@pytest.fixture
def host(tmp_path, systemd):
    hosts = []

    def make(**kw):
        h = Host(tmp_path, systemd, **kw)
        hosts.append(h)
        return h
    yield make
    for h in hosts:
        h.stop()


def props(dbus_client):
    return dbus_client.mcu_props(dbus_client.get_mcu("rpi"))


def wait_version(dbus_client, wait_for, version):
    return wait_for(lambda: (lambda p: p if p["State"] == "application" and p["FirmwareVersion"] == version
                             else None)(props(dbus_client)), timeout=20, what="rpi running %s" % version)


def linux_image(tmp_path, version=HOST):
    image = tmp_path / "klipper.elf"
    image.write_bytes(mkimage.build("linux", version, 0, fmt="elf"))
    return image


def failed_flash(ctl, image):
    """mcuflashctl flash rpi IMAGE, which must fail: what it said."""
    out = ctl("flash", "rpi", str(image), timeout=120)
    assert out.returncode != 0
    return out.stdout + out.stderr


def start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h, extra=""):
    klipper_checkout(HOST)
    printer_cfg("[mcu rpi]\nserial: %s\n" % h.link)
    h.daemon = daemon(extra_config=h.config + extra)
    return wait_version(dbus_client, wait_for, OLD)


def test_linux_flash_installs_restarts_and_answers(klipper_checkout, printer_cfg, daemon, dbus_client,
                                                   wait_for, ctl, tmp_path, host):
    h = host()
    p = start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h)
    assert p["Bootloader"] == "linux" and p["VersionMatchesHost"] == "no"
    image = linux_image(tmp_path)
    new = image.read_bytes()

    out = ctl("flash", "rpi", str(image), "--json", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded" and job["bytes_total"] == len(new)
    # Installed whole, the old program kept next to it, mode kept.
    assert h.installed() == new
    with open(h.program + ".old", "rb") as f:
        assert f.read() == h.old_bytes
    assert stat.S_IMODE(os.stat(h.program).st_mode) == 0o755
    assert not [n for n in os.listdir(os.path.dirname(h.program)) if n.startswith(".")]
    assert h.restarts() == [UNIT]
    assert h.service.started() == [OLD, HOST]
    # Written by a transient service that may write the program's directory
    # only (the daemon's own unit keeps /usr/local/bin read-only).
    [(name, unit)] = h.systemd.transient_units()
    assert name.startswith("mcuflashd-install-program-") and name.endswith(".service")
    assert unit["Type"] == "oneshot" and unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"] == [os.path.dirname(h.program)]
    assert unit["StandardInputFileDescriptor"] == "fd" and unit["StandardOutputFileDescriptor"] == "fd"
    [[exe, argv, _]] = unit["ExecStart"]
    assert os.path.basename(exe) == "mcuflashd" and argv[1:] == ["--install-program=" + h.program]
    p = wait_version(dbus_client, wait_for, HOST)
    assert p["VersionMatchesHost"] == "yes"
    # The old klipper_mcu's exit was seen (its link stayed), the new one
    # taken by the process that holds its pty.
    old_pid, new_pid = h.service.pids
    log = h.daemon.log()
    assert "klipper_mcu (pid %d) behind %s exited" % (old_pid, h.link) in log
    assert "of klipper_mcu (pid %d)" % new_pid in log

    # Already current: nothing happens unless forced.
    out = ctl("flash", "rpi", str(image))
    assert out.returncode == 0, out.stderr
    assert h.restarts() == [UNIT]
    out = ctl("flash", "rpi", str(image), "--force", timeout=120)
    assert out.returncode == 0, out.stderr
    assert h.restarts() == [UNIT, UNIT]
    assert h.installed() == new


def test_linux_flash_rolls_back_when_the_new_program_does_not_answer(klipper_checkout, printer_cfg, daemon,
                                                                     dbus_client, wait_for, ctl, tmp_path,
                                                                     host):
    h = host(broken={HOST})
    start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h,
          extra="\n[Jobs]\nBootloaderTimeoutSec=3\n")
    image = linux_image(tmp_path)
    message = failed_flash(ctl, image)
    assert "did not answer" in message or "does not answer" in message, message
    assert "put back" in message and "answers again (version %s)" % OLD in message, message
    # The old program is back, runs and answers; the service went round twice.
    assert h.installed() == h.old_bytes
    assert h.restarts() == [UNIT, UNIT]
    # Put back by the same kind of transient service.
    assert [unit["ExecStart"][0][1][1] for _, unit in h.systemd.transient_units()] == [
        "--install-program=" + h.program, "--restore-program=" + h.program]
    assert h.service.started() == [OLD, None, OLD]
    wait_version(dbus_client, wait_for, OLD)

    # A program that works is taken afterwards.
    h.service.broken.clear()
    out = ctl("flash", "rpi", str(image), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    wait_version(dbus_client, wait_for, HOST)


def test_linux_flash_is_not_cancelled_once_the_new_program_is_in_place(klipper_checkout, printer_cfg, daemon,
                                                                      dbus_client, wait_for, tmp_path, host):
    """Past the rename there is no half-way: Cancel says so, and the job
    ends as it would have (here: rolled back, the old program answers)."""
    h = host(broken={HOST})
    start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h,
          extra="\n[Jobs]\nBootloaderTimeoutSec=4\n")
    job = start_flash(dbus_client, SimpleNamespace(selector="rpi", image=str(linux_image(tmp_path))))
    wait_for(lambda: h.restarts() == [UNIT], timeout=20, what="the new program installed")
    with pytest.raises(dbus.exceptions.DBusException) as e:
        dbus_client.call(job, "io.mcuflash1.Job", "Cancel")
    assert e.value.get_dbus_name() == "io.mcuflash1.Error.Busy"
    assert "cannot be cancelled now" in e.value.get_dbus_message(), e.value.get_dbus_message()
    done = wait_done(dbus_client, wait_for, job, timeout=30)
    assert (done["State"], done["Error"]) == ("failed", "io.mcuflash1.Error.Timeout"), done
    assert "put back" in done["ErrorMessage"], done
    assert h.installed() == h.old_bytes
    wait_version(dbus_client, wait_for, OLD)


@pytest.mark.parametrize("case,error,expected", [
    ("other-machine", "ImageMismatch", "this host runs"),
    ("mcu-image", "ImageMismatch", "image is for stm32f446xx, this MCU is linux"),
    ("truncated", "InvalidImage", "truncated ELF file"),
    ("garbage", "InvalidImage", "no data dictionary"),
])
def test_linux_bad_images_are_refused_before_anything_is_installed(klipper_checkout, printer_cfg, daemon,
                                                                    dbus_client, wait_for, ctl, tmp_path, host,
                                                                    case, error, expected):
    h = host()
    start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h)
    if case == "other-machine":
        other = "aarch64" if mkimage.host_machine() != "aarch64" else "x86-64"
        data = mkimage.host_program(HOST, machine=other)
    elif case == "mcu-image":
        data = mkimage.build("stm32f446xx", HOST, 0x08008000, fmt="elf")
    elif case == "truncated":
        data = mkimage.build("linux", HOST, 0, fmt="elf")[:-4096]
    else:
        data = bytes(range(256)) * 64
    image = tmp_path / "klipper.elf"
    image.write_bytes(data)

    with open(image, "rb") as f:
        with pytest.raises(dbus.exceptions.DBusException) as e:
            dbus_client.call(dbus_client.get_mcu("rpi"), "io.mcuflash1.Mcu", "Flash",
                             dbus.types.UnixFd(f.fileno()), dbus.Dictionary({}, signature="sv"))
    assert e.value.get_dbus_name() == "io.mcuflash1.Error." + error, e.value.get_dbus_message()
    assert expected in e.value.get_dbus_message()
    out = ctl("flash", "rpi", str(image))
    assert out.returncode == 1 and expected in out.stderr, out.stderr
    assert h.installed() == h.old_bytes
    assert not os.path.exists(h.program + ".old")
    assert h.restarts() == []
    assert props(dbus_client)["FirmwareVersion"] == OLD


def test_linux_flash_without_the_service_installs_nothing(klipper_checkout, printer_cfg, daemon, dbus_client,
                                                          wait_for, ctl, tmp_path, host, systemd):
    h = host()
    h.config = "\n[Mcu %s]\nProgram=%s\nService=klipper-host.service\n" % (MCU_ID, h.program)
    start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h)
    message = failed_flash(ctl, linux_image(tmp_path))
    assert "klipper-host.service" in message and "nothing was installed" in message, message
    assert "Service=" in message
    assert h.installed() == h.old_bytes
    assert systemd.calls("RestartUnit") == []


def test_linux_install_failure_is_told_from_the_installer(klipper_checkout, printer_cfg, daemon, dbus_client,
                                                          wait_for, ctl, tmp_path, host):
    """What the installer (run by systemd, not by the daemon) says reaches
    the job: here the configured Program= is a directory."""
    h = host()
    target = tmp_path / "usr-local-bin" / "not-a-file"
    target.mkdir()
    start(klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, h,
          extra="Program=%s\n" % target)
    message = failed_flash(ctl, linux_image(tmp_path))
    assert "is not a regular file; not replaced" in message, message
    assert "is unchanged" in message, message
    assert target.is_dir() and h.restarts() == []
