"""Faults in the middle of a flash, through the whole daemon, per flasher:
the bootloader stops answering (a timeout), stalls a request, or never
leaves for the application.  Every time the job fails with an error that
says where the MCU is, the MCU is found in its bootloader, and the next
Flash (the fault gone) lands byte-exact with the new version running.
Unplugging mid-write is in test_flash.py."""

import pytest

from flashrig import job_props, start_flash, wait_done
from test_flash import HOST, OLD, OCTOPUS, katapult_bytes, props, wait_app, write_image


@pytest.mark.parametrize("kind,fault,error", [
    ("katapult-usb", "silent", "Timeout"),
    ("katapult-uart", "silent", "Timeout"),
    ("katapult-can", "silent", "Timeout"),
    ("stm32-dfu", "busy", "Timeout"),
    ("stm32-dfu", "stall:write", "Protocol"),
    ("picoboot", "busy", "Timeout"),
    ("picoboot", "stall:write", "Protocol"),
])
def test_fault_mid_write_leaves_the_bootloader_and_the_next_flash_lands(rig, dbus_client, wait_for, ctl,
                                                                        kind, fault, error):
    r = rig(kind)
    wait_app(dbus_client, wait_for, r.selector)
    job = start_flash(dbus_client, r)
    # Mid-write: the first blocks are in, then the bootloader goes wrong.
    wait_for(lambda: job_props(dbus_client, job)["BytesDone"] > 0 and
             job_props(dbus_client, job)["Phase"] == "writing", timeout=60, what="writing started")
    r.sim().set_fault(fault)
    done = wait_done(dbus_client, wait_for, job)
    assert done["State"] == "failed", done
    assert done["Error"] == "io.mcuflash1.Error." + error, done
    assert "bootloader" in done["ErrorMessage"] and "flash it again" in done["ErrorMessage"], done
    p = props(dbus_client, r.selector)
    assert (p["State"], p["Bootloader"]) == ("bootloader", r.bootloader), p
    assert p["FirmwareVersion"] != HOST

    # The fault goes; the MCU is still in its bootloader; flashing again works.
    r.sim().set_fault(None)
    out = ctl("flash", r.selector, r.image, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_app(dbus_client, wait_for, r.selector, HOST)["VersionMatchesHost"] == "yes"
    assert r.flashed(len(r.data)) == r.data


def test_bootloader_that_never_leaves_fails_with_where_the_mcu_is(testbed, klipper_checkout, printer_cfg, daemon,
                                                                  dbus_client, wait_for, ctl, tmp_path):
    """Katapult takes the image but never starts it (a stuck bootloader):
    the job times out saying the image is written and the MCU stays in its
    bootloader; a reboot later starts the new application."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x08008000, "complete_delay": 3600})
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=3\n")
    wait_app(dbus_client, wait_for, "mcu")
    image, data = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08008000)
    out = ctl("flash", "mcu", image, timeout=120)
    assert out.returncode != 0
    assert katapult_bytes(board, 0x08008000, len(data)) == data
    message = out.stdout + out.stderr
    assert "bootloader" in message, message
    assert props(dbus_client, "mcu")["State"] in ("bootloader", "unknown")
