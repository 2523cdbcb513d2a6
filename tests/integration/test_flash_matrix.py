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

from flashrig import KINDS, HOST, OLD, flash_outcome
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
