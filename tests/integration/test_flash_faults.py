"""Faults in the middle of a flash, through the whole daemon, per flasher:
the bootloader stops answering (a timeout), stalls a request, or never
leaves for the application.  Every time the job fails with an error that
says where the MCU is, the MCU is found in its bootloader, and the next
Flash (the fault gone) lands byte-exact with the new version running.
Unplugging mid-write is in test_flash.py."""

import os
import sys

import dbus
import pytest

from test_flash import HOST, OLD, OCTOPUS, EBB_UUID, katapult_bytes, props, wait_app, write_image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))


class Rig:
    """One MCU behind one bootloader, ready to flash: .selector, .image
    (path), .data, .sim() (what takes the fault, while in the bootloader),
    .flashed(n) (the first n bytes at the application start)."""


def katapult_usb(testbed, printer_cfg, daemon, tmp_path, **_):
    rig = Rig()
    rig.board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                        katapult_kwargs={"app_start": 0x08008000})
    printer_cfg("[mcu]\nserial: %s\n" % rig.board.by_id)
    daemon()
    rig.selector, rig.bootloader = "mcu", "katapult"
    rig.image, rig.data = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08008000, size=48 * 1024)
    rig.sim = lambda: rig.board.bootloader_sim
    rig.flashed = lambda n: katapult_bytes(rig.board, 0x08008000, n)
    return rig


def katapult_uart(testbed, printer_cfg, daemon, tmp_path, **_):
    rig = Rig()
    rig.board = testbed.add_uart("ttyAMA0", klipper={"version": OLD, "mcu": "stm32f103xe"}, bootloader="katapult",
                                 katapult_kwargs={"app_start": 0x08002000})
    printer_cfg("[mcu]\nserial: /dev/ttyAMA0\n")
    daemon()
    rig.selector, rig.bootloader = "mcu", "katapult"
    rig.image, rig.data = write_image(tmp_path, "klipper.bin", "stm32f103xe", HOST, 0x08002000, link="serial",
                                      size=24 * 1024)
    rig.sim = lambda: rig.board.bootloader_sim
    rig.flashed = lambda n: katapult_bytes(rig.board, 0x08002000, n)
    return rig


def katapult_can(printer_cfg, daemon, tmp_path, can_hub, can_node, **_):
    rig = Rig()
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    rig.node = can_node("klipper", uuid=EBB_UUID, version=OLD, mcu="stm32g0b1xx", app_start=0x08002000)
    daemon(can_hub=can_hub)
    rig.selector, rig.bootloader = "EBBCan", "katapult"
    rig.image, rig.data = write_image(tmp_path, "klipper.bin", "stm32g0b1xx", HOST, 0x08002000, link="can",
                                      size=16 * 1024)
    rig.sim = lambda: rig.node
    rig.flashed = lambda n: rig.node.image()[:n]
    return rig


def rom(kind, testbed, printer_cfg, daemon, tmp_path):
    rig = Rig()
    if kind == "stm32-dfu":
        mcu, start, base, fmt, extra = "stm32f429xx", 0x08008000, 0x08000000, "bin", \
            "\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS
    else:
        mcu, start, base, fmt, extra = "rp2040", 0x10000000, 0x10000000, "uf2", ""
    rig.board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=mcu, bootloader=kind)
    printer_cfg("[mcu]\nserial: %s\n" % rig.board.by_id)
    daemon(extra_config=extra)
    rig.selector, rig.bootloader = "mcu", kind
    rig.image, rig.data = write_image(tmp_path, "klipper." + fmt, mcu, HOST, start, fmt=fmt, size=64 * 1024)
    if fmt == "uf2":
        # What lands in flash: the UF2's payloads, 256 bytes a block.
        rig.data = b"".join(rig.data[i + 32:i + 32 + 256] for i in range(0, len(rig.data), 512))
    rig.sim = lambda: rig.board.bootloader_sim
    rig.flashed = lambda n: bytes(rig.board.rom_flash[start - base:start - base + n])
    return rig


RIGS = {
    "katapult-usb": katapult_usb,
    "katapult-uart": katapult_uart,
    "katapult-can": katapult_can,
    "stm32-dfu": lambda **kw: rom("stm32-dfu", kw["testbed"], kw["printer_cfg"], kw["daemon"], kw["tmp_path"]),
    "picoboot": lambda **kw: rom("picoboot", kw["testbed"], kw["printer_cfg"], kw["daemon"], kw["tmp_path"]),
}


@pytest.fixture
def rig(request, testbed, klipper_checkout, printer_cfg, daemon, tmp_path):
    def make(kind):
        klipper_checkout(HOST)
        kw = dict(testbed=testbed, printer_cfg=printer_cfg, daemon=daemon, tmp_path=tmp_path)
        if kind == "katapult-can":
            kw.update(can_hub=request.getfixturevalue("can_hub"), can_node=request.getfixturevalue("can_node"))
        return RIGS[kind](**kw)
    return make


def job_props(dbus_client, job):
    return dbus_client.get_all(job, "io.mcuflash1.Job")


def start_flash(dbus_client, rig):
    with open(rig.image, "rb") as f:
        return dbus_client.call(dbus_client.get_mcu(rig.selector), "io.mcuflash1.Mcu", "Flash",
                                dbus.types.UnixFd(f.fileno()), dbus.Dictionary({}, signature="sv"))


def wait_done(dbus_client, wait_for, job, timeout=90):
    return wait_for(lambda: (lambda p: p if p["Phase"] == "done" else None)(job_props(dbus_client, job)),
                    timeout=timeout, what="job over")


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
