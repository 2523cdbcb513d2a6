"""Mcu.Flash end to end through mcuflashctl: images built like Klipper's
(tests/tools/mkimage.py), boards that re-enumerate into their bootloader,
and the bytes that land in the simulated flash."""

import json
import os
import sys

import dbus
import pytest

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
import mkimage  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
OCTOPUS = "2E0036000851363131363530"
EBB_UUID = "0e0d81e4210c"


def write_image(tmp_path, name, mcu, version, start, fmt="bin", **kw):
    path = tmp_path / name
    data = mkimage.build(mcu, version, start, fmt=fmt, **kw)
    path.write_bytes(data)
    return str(path), data


def katapult_bytes(board, start, length):
    """What Katapult's simulated flash holds from @start."""
    out = bytearray()
    blocks = dict(board.flash)
    addr = start
    while len(out) < length:
        block = blocks.get(addr)
        assert block is not None, "nothing written at 0x%08x" % addr
        out += bytes(block)
        addr += len(block)
    return bytes(out[:length])


def props(dbus_client, selector):
    return dbus_client.mcu_props(dbus_client.get_mcu(selector))


def wait_app(dbus_client, wait_for, selector, version=None):
    return wait_for(lambda: (lambda p: p if p["State"] == "application" and (
        version is None or p["FirmwareVersion"] == version) else None)(props(dbus_client, selector)),
        timeout=20, what="%s running %s" % (selector, version))


def test_katapult_usb_flash_lands_and_version_follows(testbed, klipper_checkout, printer_cfg,
                                                      daemon, dbus_client, wait_for, ctl, tmp_path):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x08008000})
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon()
    assert wait_app(dbus_client, wait_for, "mcu")["VersionMatchesHost"] == "no"
    path, data = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08008000)

    out = ctl("flash", "mcu", path, "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded" and job["kind"] == "flash"
    assert job["bytes_total"] >= len(data) and job["progress"] == 1.0
    assert katapult_bytes(board, 0x08008000, len(data)) == data
    p = wait_app(dbus_client, wait_for, "mcu", HOST)
    assert p["VersionMatchesHost"] == "yes"
    assert board.history[-3:] == ["klipper", "katapult", "klipper"]

    # Already current: nothing happens unless forced.
    written = len(board.flash)
    out = ctl("flash", "mcu", path)
    assert out.returncode == 0, out.stderr
    assert board.history[-1] == "klipper" and len(board.history) == 3
    out = ctl("flash", "mcu", path, "--force")
    assert out.returncode == 0, out.stderr
    assert board.history.count("katapult") == 2
    assert len(board.flash) == written


@pytest.mark.parametrize("kind", ["stm32-dfu", "picoboot"])
def test_rom_bootloader_flash_lands(testbed, klipper_checkout, printer_cfg, daemon, dbus_client,
                                    wait_for, ctl, tmp_path, kind):
    klipper_checkout(HOST)
    if kind == "stm32-dfu":
        mcu, start, base, fmt, extra = "stm32f429xx", 0x08008000, 0x08000000, "bin", \
            "\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS
    else:
        mcu, start, base, fmt, extra = "rp2040", 0x10000000, 0x10000000, "uf2", ""
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu=mcu, bootloader=kind)
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon(extra_config=extra)
    wait_app(dbus_client, wait_for, "mcu")
    path, data = write_image(tmp_path, "klipper." + fmt, mcu, HOST, start, fmt=fmt)
    out = ctl("flash", "mcu", path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "runs Klipper %s" % HOST in out.stdout
    wait_app(dbus_client, wait_for, "mcu", HOST)
    rom = board.rom_flash
    assert rom is not None
    if kind == "stm32-dfu":
        assert rom[start - base:start - base + len(data)] == data
        assert rom[:start - base] == b"\xff" * (start - base) or rom[:start - base] != data[:start - base]
    else:
        # The UF2's payload, 256 bytes a block, from the start of flash.
        payload = b"".join(data[i + 32:i + 32 + 256] for i in range(0, len(data), 512))
        assert rom[:len(payload)] == payload


def test_can_katapult_flash(can_hub, can_node, klipper_checkout, printer_cfg, daemon, dbus_client,
                            wait_for, ctl, tmp_path):
    klipper_checkout(HOST)
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    node = can_node("klipper", uuid=EBB_UUID, version=OLD, mcu="stm32g0b1xx", app_start=0x08002000)
    daemon(can_hub=can_hub)
    wait_app(dbus_client, wait_for, "EBBCan")
    path, data = write_image(tmp_path, "klipper.bin", "stm32g0b1xx", HOST, 0x08002000, link="can")
    out = ctl("flash", "EBBCan", path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert wait_app(dbus_client, wait_for, "EBBCan", HOST)["VersionMatchesHost"] == "yes"
    assert node.image()[:len(data)] == data


@pytest.mark.parametrize("case,error", [
    ("wrong-chip", "ImageMismatch"),
    ("wrong-offset", "ImageMismatch"),
    ("truncated", "InvalidImage"),
    ("garbage", "InvalidImage"),
    ("no-dictionary", "InvalidImage"),
])
def test_bad_images_are_refused_before_anything_is_sent(testbed, klipper_checkout, printer_cfg, daemon,
                                                        dbus_client, wait_for, tmp_path, case, error):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f429xx", bootloader="stm32-dfu")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon(extra_config="\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS)
    wait_app(dbus_client, wait_for, "mcu")
    good = mkimage.build("stm32f429xx", HOST, 0x08008000)
    data = {
        "wrong-chip": mkimage.build("stm32f103xe", HOST, 0x08007000),
        "wrong-offset": mkimage.build("stm32f429xx", HOST, 0x08000000),
        "truncated": mkimage.build("stm32f429xx", HOST, 0x08008000, fmt="hex")[:-200],
        "garbage": os.urandom(4096),
        "no-dictionary": good[:256] + b"\x00" * 4096,
    }[case]
    path = tmp_path / "image"
    path.write_bytes(data)
    with open(path, "rb") as f:
        with pytest.raises(dbus.exceptions.DBusException) as e:
            dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "Flash",
                             dbus.types.UnixFd(f.fileno()), dbus.Dictionary({}, signature="sv"))
    assert e.value.get_dbus_name() == "io.mcuflash1.Error." + error, e.value.get_dbus_message()
    # Nothing was sent: the board never left Klipper.
    assert board.history == ["klipper"] and not board.sim.bootloader_requested
    assert dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs") == []
    if case == "wrong-chip":
        assert "stm32f103xe" in e.value.get_dbus_message() and "stm32f429xx" in e.value.get_dbus_message()


def test_flash_refused_while_printing(testbed, klipper_checkout, printer_cfg, klippy, daemon, dbus_client,
                                      wait_for, ctl, tmp_path, manager_props):
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    klippy(mcus={"mcu": klippy_api.default_mcu(OLD, "stm32f446xx")}, print_state="printing")
    daemon()
    wait_for(lambda: manager_props()["PrinterState"] == "printing", timeout=10)
    path, _ = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08008000)
    out = ctl("flash", "mcu", path)
    assert out.returncode == 1 and "print" in out.stderr
    assert board.history == ["klipper"] and board.sim.rx_bytes == 0


def test_oversize_image_is_refused_by_the_bootloader_layout(testbed, klipper_checkout, printer_cfg, daemon,
                                                            dbus_client, wait_for, ctl, tmp_path):
    """The MCU's flash size is only known once its DFU bootloader tells its
    memory layout: refused there, before a single byte is erased."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f429xx", bootloader="stm32-dfu")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon(extra_config="\n[Mcu %s]\nFlashStart=0x08008000\n" % OCTOPUS)
    wait_app(dbus_client, wait_for, "mcu")
    # 1.5 MiB: an stm32f429xx may have 2 MiB, this one says it has 1 MiB.
    path, _ = write_image(tmp_path, "big.bin", "stm32f429xx", HOST, 0x08008000, size=1536 * 1024)
    out = ctl("flash", "mcu", path, timeout=120)
    assert out.returncode == 1
    assert "bootloader" in out.stderr
    sim = board.bootloader_sim
    assert sim is not None and sim.erased == [] and sim.writes == []
    # It stays reachable: back to Klipper on request.
    assert ctl("reboot", "mcu", timeout=60).returncode == 0


def test_unplug_mid_write_fails_cleanly_and_a_second_flash_works(testbed, klipper_checkout, printer_cfg,
                                                                 daemon, dbus_client, wait_for, ctl,
                                                                 tmp_path):
    klipper_checkout(HOST)
    kw = dict(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
              katapult_kwargs={"app_start": 0x08008000}, port="1-1.2")
    board = testbed.add_klipper_usb(**kw)
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon()
    wait_app(dbus_client, wait_for, "mcu")
    path = dbus_client.get_mcu("mcu")
    image, data = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08008000, size=200 * 1024)
    with open(image, "rb") as f:
        job = dbus_client.call(path, "io.mcuflash1.Mcu", "Flash", dbus.types.UnixFd(f.fileno()),
                               dbus.Dictionary({}, signature="sv"))
    wait_for(lambda: dbus_client.get_all(job, "io.mcuflash1.Job")["BytesDone"] > 0, timeout=30,
             what="writing started")
    testbed.remove(board)
    done = wait_for(lambda: (lambda p: p if p["Phase"] == "done" else None)(
        dbus_client.get_all(job, "io.mcuflash1.Job")), timeout=60, what="job over")
    assert done["State"] == "failed"
    assert done["Error"] in ("io.mcuflash1.Error.Disconnected", "io.mcuflash1.Error.Timeout",
                             "io.mcuflash1.Error.Protocol"), done
    assert done["ErrorMessage"]
    assert ctl("status").returncode == 0

    # Plugged in again (Katapult keeps the board in the bootloader after a
    # broken write; here it comes back as it was): the same object, and the
    # next flash goes through.
    testbed.add_klipper_usb(**kw)
    wait_app(dbus_client, wait_for, "mcu")
    assert dbus_client.get_mcu("mcu") == path
    out = ctl("flash", "mcu", image, timeout=180)
    assert out.returncode == 0, out.stderr
    assert wait_app(dbus_client, wait_for, "mcu", HOST)["VersionMatchesHost"] == "yes"


def test_uart_katapult_flash(testbed, klipper_checkout, printer_cfg, daemon, dbus_client, wait_for, ctl,
                             tmp_path):
    klipper_checkout(HOST)
    uart = testbed.add_uart("ttyAMA0", klipper={"version": OLD, "mcu": "stm32f103xe"}, bootloader="katapult",
                            katapult_kwargs={"app_start": 0x08002000})
    printer_cfg("[mcu]\nserial: /dev/ttyAMA0\n")
    daemon()
    wait_app(dbus_client, wait_for, "mcu")
    path, data = write_image(tmp_path, "klipper.bin", "stm32f103xe", HOST, 0x08002000, link="serial")
    out = ctl("flash", "mcu", path, timeout=180)
    assert out.returncode == 0, out.stderr
    assert wait_app(dbus_client, wait_for, "mcu", HOST)["VersionMatchesHost"] == "yes"
    assert katapult_bytes(uart, 0x08002000, len(data)) == data


def test_katapult_wrong_offset_is_refused_by_its_answer_and_the_mcu_returns(testbed, klipper_checkout,
                                                                            printer_cfg, daemon, dbus_client,
                                                                            wait_for, ctl, tmp_path):
    """Where Katapult puts applications is only known once it answers: the
    job enters it, refuses the image (nothing written) and starts Klipper
    again; from then on the daemon knows and refuses at once."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="stm32f446xx", bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x08008000})
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon()
    wait_app(dbus_client, wait_for, "mcu")
    # Built for "no bootloader": it would overwrite Katapult.
    path, _ = write_image(tmp_path, "klipper.bin", "stm32f446xx", HOST, 0x08000000)
    out = ctl("flash", "mcu", path, timeout=120)
    assert out.returncode == 1
    assert "overwrite the bootloader" in out.stderr and "nothing was written" in out.stderr, out.stderr
    assert board.flash == {}
    p = wait_app(dbus_client, wait_for, "mcu", OLD)
    assert board.history == ["klipper", "katapult", "klipper"]
    assert p["FlashStart"] == 0x08008000

    # Known now: refused before the MCU is touched.
    with open(path, "rb") as f:
        with pytest.raises(dbus.exceptions.DBusException) as e:
            dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "Flash",
                             dbus.types.UnixFd(f.fileno()), dbus.Dictionary({}, signature="sv"))
    assert e.value.get_dbus_name() == "io.mcuflash1.Error.ImageMismatch"
    assert board.history == ["klipper", "katapult", "klipper"]


@pytest.mark.parametrize("case", ["wrong-chip", "wrong-offset", "truncated"])
def test_picoboot_bad_images_are_refused_before_anything_is_sent(testbed, klipper_checkout, printer_cfg, daemon,
                                                                 dbus_client, wait_for, ctl, tmp_path, case):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS, version=OLD, mcu="rp2040", bootloader="picoboot")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    daemon()
    wait_app(dbus_client, wait_for, "mcu")
    data = {
        "wrong-chip": mkimage.build("stm32f446xx", HOST, 0x08000000, fmt="uf2"),
        # A Katapult build (application at 0x10004000) for a board without it.
        "wrong-offset": mkimage.build("rp2040", HOST, 0x10004000, fmt="uf2"),
        "truncated": mkimage.build("rp2040", HOST, 0x10000000, fmt="uf2")[:-700],
    }[case]
    path = tmp_path / "klipper.uf2"
    path.write_bytes(data)
    out = ctl("flash", "mcu", str(path), timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    if case == "wrong-offset":
        # Whether a bootloader sits below the application is only known
        # once the boot ROM answers: the job looks, writes nothing and
        # starts Klipper again; the next try is refused at once.
        assert "nothing was written, and the MCU runs its application again" in out.stderr, out.stderr
        assert board.history == ["klipper", "picoboot", "klipper"]
        assert wait_app(dbus_client, wait_for, "mcu", OLD)["FlashStart"] == 0x10000000
        out = ctl("flash", "mcu", str(path))
        assert out.returncode == 1 and "0x10004000" in out.stderr, out.stderr
        assert board.history == ["klipper", "picoboot", "klipper"]
        return
    # Nothing was sent: the board never left Klipper.
    assert board.history == ["klipper"] and not board.sim.bootloader_requested
