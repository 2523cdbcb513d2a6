"""One MCU of each kind the daemon flashes, behind its bootloader, ready
for a test to flash through the whole daemon: Katapult over USB, UART and
CAN, ST's ROM DFU and the RP2040 boot ROM.  The `rig` fixture in
conftest.py builds one: rig("katapult-can").

A Rig has
  .kind, .selector (the MCU's name), .bootloader, .mcu (config.MCU),
  .start (where its application goes), .fmt and .link (of its images),
  .image / .data       a good image at the host version (path, bytes)
  .build(...)          another image: (path, bytes)
  .build_real(...)     one compiled from tests/tools/fwimage (needs
                       arm-none-eabi-gcc: real_builds() says whether)
  .sim()               what takes a fault, while in the bootloader
  .flashed(n)          the first n bytes at the application start
  .flash_state()       everything the simulated flash holds (to compare)
  .boots()             every mode the board entered, in order
"""

import os
import sys

import dbus

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import mkimage  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "fwimage"))
import fwimage  # noqa: E402

from test_flash import HOST, OLD, OCTOPUS, EBB_UUID, katapult_bytes  # noqa: E402

KINDS = ("katapult-usb", "katapult-uart", "katapult-can", "stm32-dfu", "picoboot")


class Rig:
    size = 16 * 1024
    fmt = "bin"
    link = "usb"

    def build(self, name=None, mcu=None, version=HOST, start=None, size=None, fmt=None):
        fmt = fmt or self.fmt
        data = mkimage.build(mcu or self.mcu, version, self.start if start is None else start, fmt=fmt,
                             size=size or self.size, link=self.link)
        path = self.tmp_path / (name or "klipper." + fmt)
        path.write_bytes(data)
        return str(path), data

    def build_real(self, name=None, version=HOST, start=None, fmt=None):
        """An image compiled from real startup code (tests/tools/fwimage),
        linked at @start (default: the rig's)."""
        fmt = fmt or self.fmt
        data = fwimage.build_bytes(self.mcu, self.start if start is None else start, fmt, version=version,
                                   link=self.link)
        path = self.tmp_path / (name or "real." + fmt)
        path.write_bytes(data)
        return str(path), data

    def payload(self, data):
        """What of an image's bytes lands in flash."""
        if self.fmt == "uf2":
            return b"".join(data[i + 32:i + 32 + 256] for i in range(0, len(data), 512))
        return data


def real_builds():
    """None when images can be compiled, else why not."""
    if fwimage.compiler() and fwimage.objcopy():
        return None
    return "arm-none-eabi-gcc is not installed (Debian: gcc-arm-none-eabi binutils-arm-none-eabi)"


def _board_rig(rig, printer_cfg, daemon, board, serial, extra_config=""):
    rig.board = board
    printer_cfg("[mcu]\nserial: %s\n" % serial)
    daemon(extra_config=extra_config)
    rig.selector = "mcu"
    rig.sim = lambda: rig.board.bootloader_sim
    rig.boots = lambda: list(rig.board.history)


def _katapult_flash(rig):
    """Katapult's simulated flash on the board: address -> block."""
    rig.flashed = lambda n: katapult_bytes(rig.board, rig.start, n)
    rig.flash_state = lambda: dict((a, bytes(b)) for a, b in rig.board.flash.items())


def katapult_usb(rig, testbed, printer_cfg, daemon, **_):
    rig.mcu, rig.start, rig.bootloader, rig.size = "stm32f446xx", 0x08008000, "katapult", 48 * 1024
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=rig.mcu, bootloader="katapult",
                                    katapult_kwargs={"app_start": rig.start})
    _board_rig(rig, printer_cfg, daemon, board, board.by_id)
    _katapult_flash(rig)


def katapult_uart(rig, testbed, printer_cfg, daemon, **_):
    rig.mcu, rig.start, rig.bootloader, rig.size, rig.link = "stm32f103xe", 0x08002000, "katapult", 24 * 1024, \
        "serial"
    board = testbed.add_uart("ttyAMA0", klipper={"version": OLD, "mcu": rig.mcu}, bootloader="katapult",
                             katapult_kwargs={"app_start": rig.start})
    _board_rig(rig, printer_cfg, daemon, board, "/dev/ttyAMA0")
    _katapult_flash(rig)


def katapult_can(rig, printer_cfg, daemon, can_hub, can_node, **_):
    rig.mcu, rig.start, rig.bootloader, rig.link = "stm32g0b1xx", 0x08002000, "katapult", "can"
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    rig.node = can_node("klipper", uuid=EBB_UUID, version=OLD, mcu=rig.mcu, app_start=rig.start)
    daemon(can_hub=can_hub)
    rig.selector = "EBBCan"
    rig.sim = lambda: rig.node
    rig.boots = lambda: list(rig.node.boots)
    rig.flashed = lambda n: rig.node.image()[:n]
    rig.flash_state = lambda: rig.node.image()


def rom(rig, testbed, printer_cfg, daemon, **_):
    if rig.kind == "stm32-dfu":
        rig.mcu, rig.start, base = "stm32f429xx", 0x08008000, 0x08000000
        extra = "\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS
    else:
        rig.mcu, rig.start, base, rig.fmt, extra = "rp2040", 0x10000000, 0x10000000, "uf2", ""
    rig.bootloader, rig.size = rig.kind, 64 * 1024
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=rig.mcu, bootloader=rig.kind)
    _board_rig(rig, printer_cfg, daemon, board, board.by_id, extra)
    rig.flashed = lambda n: bytes(rig.board.rom_flash[rig.start - base:rig.start - base + n])
    # The boot ROM's simulated flash starts erased (the old application is
    # modelled apart): None until something is written there.
    rig.flash_state = lambda: None if rig.board.rom_flash is None or \
        rig.board.rom_flash.count(0xFF) == len(rig.board.rom_flash) else bytes(rig.board.rom_flash)


SETUPS = {
    "katapult-usb": katapult_usb,
    "katapult-uart": katapult_uart,
    "katapult-can": katapult_can,
    "stm32-dfu": rom,
    "picoboot": rom,
}


def make_rig(kind, tmp_path, **fixtures):
    """@fixtures: testbed, printer_cfg, daemon (+ can_hub, can_node for CAN)."""
    rig = Rig()
    rig.kind, rig.tmp_path = kind, tmp_path
    SETUPS[kind](rig, **fixtures)
    rig.image, image = rig.build()
    rig.data = rig.payload(image)
    return rig


def job_props(dbus_client, job):
    return dbus_client.get_all(job, "io.mcuflash1.Job")


def start_flash(dbus_client, rig, path=None, force=False):
    """Mcu.Flash of @path (the rig's good image): the job's path."""
    options = dbus.Dictionary({"force": dbus.Boolean(True)} if force else {}, signature="sv")
    with open(path or rig.image, "rb") as f:
        return dbus_client.call(dbus_client.get_mcu(rig.selector), "io.mcuflash1.Mcu", "Flash",
                                dbus.types.UnixFd(f.fileno()), options)


def wait_done(dbus_client, wait_for, job, timeout=90):
    return wait_for(lambda: (lambda p: p if p["Phase"] == "done" else None)(job_props(dbus_client, job)),
                    timeout=timeout, what="job over")


def flash_outcome(dbus_client, wait_for, rig, path, timeout=90):
    """Flash @path and wait: (D-Bus error name or "", message).  A refusal
    is either the call's error or the job's."""
    try:
        job = start_flash(dbus_client, rig, path)
    except dbus.exceptions.DBusException as e:
        return e.get_dbus_name(), e.get_dbus_message()
    done = wait_done(dbus_client, wait_for, job, timeout)
    return str(done["Error"]), str(done["ErrorMessage"])
