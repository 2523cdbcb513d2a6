"""The Linux process MCU: klipper_mcu's pty named in printer.cfg (not a udev
device), found when its symlink appears, identified over the pty, offline
when klipper_mcu exits, and left alone while klippy has it open."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))

from linux_mcu import LinuxMcuProcess  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"


@pytest.fixture
def linux_mcu(tmp_path):
    started = []

    def start(version=HOST):
        p = LinuxMcuProcess(str(tmp_path / "klipper_host_mcu"), version)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


def props_of(dbus_client, selector):
    return dbus_client.mcu_props(dbus_client.get_mcu(selector))


def wait_state(dbus_client, wait_for, selector, state):
    return wait_for(lambda: (lambda p: p if p["State"] == state else None)(
        props_of(dbus_client, selector)), timeout=15, what="%s %s" % (selector, state))


def test_linux_mcu_found_identified_and_offline(tmp_path, klipper_checkout, printer_cfg, daemon,
                                                dbus_client, wait_for, linux_mcu, ctl):
    klipper_checkout(HOST)
    link = str(tmp_path / "klipper_host_mcu")
    printer_cfg("[mcu rpi]\nserial: %s\n" % link)
    daemon()
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
    assert proc.sim.rx_bytes > 0
    path = dbus_client.get_mcu("rpi")

    out = ctl("status", "--json")
    rpi = [m for m in __import__("json").loads(out.stdout)["mcus"] if m["name"] == "mcu rpi"][0]
    assert rpi["transport"] == "linux"

    # klipper_mcu stops: its symlink goes away.
    proc.stop()
    wait_state(dbus_client, wait_for, "rpi", "offline")

    # ... and starts again: same object.
    linux_mcu()
    wait_state(dbus_client, wait_for, "rpi", "application")
    assert dbus_client.get_mcu("rpi") == path


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
        assert proc.sim.rx_bytes == 0
    finally:
        klippy.kill()
        klippy.wait()
