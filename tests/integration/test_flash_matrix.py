"""Every flasher, through the whole daemon and mcuflashctl, against the same
list of images a user may pick by mistake: built for another chip, for
another bootloader offset, too big for the chip, cut short, or not an
image at all.  Each is refused before a single byte reaches the simulated
flash, with the error a person can act on, and the MCU runs its old
application afterwards.  And a board already at the image's version is
left alone unless --force says otherwise.  (The Linux process MCU has the
same in test_flash_linux.py; faults mid-write are in test_flash_faults.py.)"""

import os

import pytest

from flashrig import KINDS, HOST, OLD, OCTOPUS, flash_outcome, real_builds
from test_flash import props, wait_app

# A chip of another family than each rig's, as its image would start.
OTHER_CHIP = {
    "stm32f446xx": ("stm32f103xe", 0x08007000),
    "stm32f103xe": ("stm32f446xx", 0x08008000),
    "stm32g0b1xx": ("stm32f103xe", 0x08002000),
    "stm32f429xx": ("stm32f103xe", 0x08007000),
    "rp2040": ("stm32g0b1xx", 0x08002000),
}

# Where each rig's chip has its flash, and how much its largest part has
# (daemon/image/chips.c): the "too big" image ends 4 KiB beyond it.
CHIP_FLASH = {
    "stm32f446xx": (0x08000000, 512 * 1024),
    "stm32f103xe": (0x08000000, 512 * 1024),
    "stm32g0b1xx": (0x08000000, 512 * 1024),
    "stm32f429xx": (0x08000000, 2 * 1024 * 1024),
    "rp2040": (0x10000000, 2 * 1024 * 1024),
}


def bad_image(rig, case):
    """(path, error, words the message must hold)"""
    if case == "wrong-chip":
        mcu, start = OTHER_CHIP[rig.mcu]
        path, _ = rig.build("other.%s" % rig.fmt, mcu=mcu, start=start)
        return path, "ImageMismatch", [mcu, rig.mcu]
    if case == "wrong-offset":
        # Built for "no bootloader" where one sits, or the other way round.
        start = {0x08008000: 0x08000000, 0x08002000: 0x08000000, 0x10000000: 0x10004000}[rig.start]
        path, _ = rig.build("offset.%s" % rig.fmt, start=start, fmt="bin" if rig.fmt == "bin" else "uf2")
        return path, "ImageMismatch", ["0x%08x" % start]
    if case == "too-big":
        base, size = CHIP_FLASH[rig.mcu]
        path, _ = rig.build("big.%s" % rig.fmt, size=base + size - rig.start + 4096)
        return path, "ImageMismatch", ["flash", "FlashSize="]
    if case == "truncated":
        fmt = "uf2" if rig.fmt == "uf2" else "hex"
        _, data = rig.build(fmt=fmt)
        path = rig.tmp_path / ("short." + fmt)
        path.write_bytes(data[:-700])
        return str(path), "InvalidImage", ["truncated"]
    path = rig.tmp_path / "garbage.bin"
    path.write_bytes(os.urandom(8192))
    return str(path), "InvalidImage", []


@pytest.mark.parametrize("case", ["wrong-chip", "wrong-offset", "too-big", "truncated", "garbage"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_image_is_refused_before_a_byte_is_written(rig, dbus_client, wait_for, kind, case):
    r = rig(kind)
    wait_app(dbus_client, wait_for, r.selector)
    before = r.flash_state()
    path, error, words = bad_image(r, case)

    name, message = flash_outcome(dbus_client, wait_for, r, path)
    assert name == "io.mcuflash1.Error." + error, (name, message)
    for word in words:
        assert word in message, (word, message)

    # Nothing reached the flash; the old application runs (some refusals
    # are only possible once the bootloader has answered: Katapult tells
    # where applications go, the boot ROM whether one sits below).
    p = wait_app(dbus_client, wait_for, r.selector, OLD)
    assert r.flash_state() == before
    assert p["State"] == "application" and p["FirmwareVersion"] == OLD
    boots = r.boots()
    if case == "wrong-offset" and r.kind in ("katapult-usb", "katapult-uart", "katapult-can", "picoboot"):
        # Only the bootloader's answer tells where applications go (or
        # whether a bootloader sits below); it is asked, and left again.
        assert boots in (["klipper"], ["klipper", r.bootloader, "klipper"]), boots
    else:
        assert boots == ["klipper"], "refused without touching the MCU: %s" % boots


@pytest.mark.parametrize("kind", KINDS)
def test_current_image_is_skipped_unless_forced(rig, dbus_client, wait_for, ctl, kind):
    r = rig(kind)
    wait_app(dbus_client, wait_for, r.selector)
    out = ctl("flash", r.selector, r.image, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_app(dbus_client, wait_for, r.selector, HOST)["VersionMatchesHost"] == "yes"
    assert r.flashed(len(r.data)) == r.data
    boots = r.boots()

    # At that version already: a success that does not touch the MCU.
    out = ctl("flash", r.selector, r.image, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "already" in out.stdout + out.stderr, out.stdout + out.stderr
    assert r.boots() == boots

    # --force flashes all the same (another build at the same version).
    path, data = r.build("forced.%s" % r.fmt, size=r.size + 4096)
    out = ctl("flash", r.selector, path, "--force", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    p = wait_app(dbus_client, wait_for, r.selector, HOST)
    assert len(r.boots()) > len(boots)
    data = r.payload(data)
    assert r.flashed(len(data)) == data
    assert props(dbus_client, r.selector)["VersionMatchesHost"] == "yes" == p["VersionMatchesHost"]


# Each rig's chip, compiled for the other starts its family offers
# (protocols.md §15.4), as a user would pick the wrong build: (start, format).
OTHER_STARTS = {
    "katapult-usb": [(0x08000000, "bin"), (0x08004000, "bin")],         # stm32f446xx, Katapult at 0x08008000
    "katapult-uart": [(0x08000000, "bin"), (0x08000800, "bin")],        # stm32f103xe, at 0x08002000
    "katapult-can": [(0x08000000, "bin")],                              # stm32g0b1xx, at 0x08002000
    "stm32-dfu": [(0x08000000, "bin"), (0x08004000, "bin")],            # stm32f429xx, FlashStart=0x08008000
    "picoboot": [(0x10004000, "elf")],                                  # rp2040 without a bootloader
}


@pytest.mark.parametrize("kind", KINDS)
def test_real_build_is_flashed_at_its_start_and_refused_at_any_other(rig, dbus_client, wait_for, ctl, kind):
    """Images compiled from real startup code (tests/tools/fwimage: reset
    handler ~0x6900 in, .data copy, SCB->VTOR), laid out as Klipper's own:
    the one linked where this MCU starts applications is flashed and runs;
    each built for another start is refused naming both addresses, with
    nothing written."""
    why = real_builds()
    if why:
        pytest.skip(why)
    r = rig(kind)
    wait_app(dbus_client, wait_for, r.selector)
    before = r.flash_state()
    for start, fmt in OTHER_STARTS[kind]:
        path, _ = r.build_real("wrong-%08x.%s" % (start, fmt), start=start, fmt=fmt)
        name, message = flash_outcome(dbus_client, wait_for, r, path)
        assert name == "io.mcuflash1.Error.ImageMismatch", (start, name, message)
        assert "0x%08x" % start in message and "0x%08x" % r.start in message, message
        assert wait_app(dbus_client, wait_for, r.selector, OLD)["FirmwareVersion"] == OLD
        assert r.flash_state() == before

    path, data = r.build_real()
    out = ctl("flash", r.selector, path, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_app(dbus_client, wait_for, r.selector, HOST)["VersionMatchesHost"] == "yes"
    data = r.payload(data)
    assert r.flashed(len(data)) == data


def test_image_that_does_not_start_leaves_the_mcu_in_katapult(testbed, klipper_checkout, printer_cfg, daemon,
                                                             dbus_client, wait_for, ctl, tmp_path):
    """A Katapult that reports 0x08008000 but jumps to 0x0800C000: the
    image passes every check and is written, but its vector table is not
    where the MCU starts it.  The simulated MCU stays in Katapult, and the
    job says so at once instead of waiting for Klipper."""
    import mkimage

    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x08008000, "jump_to": 0x0800C000})
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon()
    wait_app(dbus_client, wait_for, "mcu")
    path = tmp_path / "klipper.bin"
    path.write_bytes(mkimage.build("stm32f446xx", HOST, 0x08008000, size=32 * 1024))
    out = ctl("flash", "mcu", str(path), timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "stayed in its bootloader (katapult) after the write" in out.stderr, out.stderr
    p = props(dbus_client, "mcu")
    assert p["State"] == "bootloader" and p["Bootloader"] == "katapult", p
    assert board.history[-2:] == ["katapult", "katapult"], board.history


def test_flash_start_unknown_is_not_zero(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for,
                                         ctl):
    """FlashStart shows 0xFFFFFFFFFFFFFFFF (and `info --json` "") when no one
    stated it; 0x0 is a real start (a SAMD21 without a bootloader) and is
    shown as such."""
    import json

    klipper_checkout(HOST)
    unknown = testbed.add_klipper_usb(serial="AAAA00000000000000000001", version=OLD, mcu="stm32f429xx",
                                      bootloader="stm32-dfu")
    zero = testbed.add_klipper_usb(serial="AAAA00000000000000000002", version=OLD, mcu="samd21g18a")
    printer_cfg("[mcu]\nserial: %s\n\n[mcu zero]\nserial: %s\n" % (unknown.by_id, zero.by_id))
    daemon(extra_config="\n[Mcu AAAA00000000000000000002]\nFlashStart=0x0\n")
    assert wait_app(dbus_client, wait_for, "mcu")["FlashStart"] == 2 ** 64 - 1
    assert wait_app(dbus_client, wait_for, "mcu zero")["FlashStart"] == 0
    out = ctl("info", "mcu", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["flash_start"] == "", out.stdout + out.stderr
    out = ctl("info", "mcu zero", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["flash_start"] == "0x00000000", out.stdout + out.stderr


def test_embedded_build_config_names_the_start(rig, dbus_client, wait_for):
    """Newer builds carry their build config (protocols.md §15.5): its
    CONFIG_STM32_FLASH_START_… choice is what the image is checked by, and
    a refusal says so."""
    import mkimage

    r = rig("katapult-usb")                         # stm32f446xx, Katapult at 0x08008000
    wait_app(dbus_client, wait_for, r.selector)
    before = r.flash_state()
    path = r.tmp_path / "kconfig.bin"
    path.write_bytes(mkimage.build(r.mcu, HOST, 0x08008000, size=r.size, kconfig="CONFIG_MACH_STM32=y\n"
                                   "CONFIG_MACH_STM32F446=y\nCONFIG_STM32_FLASH_START_4000=y\n"))
    name, message = flash_outcome(dbus_client, wait_for, r, str(path))
    assert name == "io.mcuflash1.Error.ImageMismatch", (name, message)
    assert "image is linked for 0x08004000" in message and "as its build config shows" in message, message
    assert "0x08008000" in message, message
    assert wait_app(dbus_client, wait_for, r.selector, OLD)["FirmwareVersion"] == OLD
    assert r.flash_state() == before
