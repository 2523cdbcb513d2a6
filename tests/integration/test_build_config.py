"""Newer firmware (protocols.md §15.5), end to end: MCUs whose identify data
is bzip2 (Kalico) or zlib with an embedded build config, Kalico's "app",
a compression bomb, klippy's mcu_kconfig — what the Mcu properties,
`mcuflashctl info` and `status --json` show for them and for older builds."""

import bz2
import json
import sys
import os

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sim"))
import klipper_dict  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
KALICO = "v2026.09.00-3-g1a2b3c4d"
EBB_UUID = "0e0d81e4210c"
SB_UUID = "a1b2c3d4e5f6"
OCTOPUS_SERIAL = "2E0036000851363131363530"
EDDY_SERIAL = "E66138935F4A2B2C"
EBB36_LINES = [
    "CONFIG_MACH_STM32=y",
    "CONFIG_MACH_STM32G0B1=y",
    "CONFIG_STM32_FLASH_START_2000=y",
    "CONFIG_STM32_CLOCK_REF_8M=y",
    "CONFIG_STM32_CANBUS_PB0_PB1=y",
    "CONFIG_CANBUS_FREQUENCY=1000000",
]
EBB36_KCONFIG = "".join(line + "\n" for line in EBB36_LINES)


def props_when(dbus_client, wait_for, selector, check, what):
    return wait_for(lambda: (lambda p: p if check(p) else None)(
        dbus_client.mcu_props(dbus_client.get_mcu(selector))), timeout=20, what=what)


def identified(dbus_client, wait_for, selector):
    return props_when(dbus_client, wait_for, selector,
                      lambda p: p["State"] == "application" and p["FirmwareVersion"],
                      "%s identified" % selector)


def status_json(ctl, name):
    status = json.loads(ctl("status", "--json").stdout)
    return [m for m in status["mcus"] if m["name"] == name][0]


def test_can_node_with_bzip2_identify_and_build_config(can_hub, can_node, klipper_checkout,
                                                       printer_cfg, daemon, dbus_client,
                                                       wait_for, ctl):
    klipper_checkout(HOST)
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n\n[mcu sb]\ncanbus_uuid: %s\n" % (EBB_UUID, SB_UUID))
    can_hub.add_iface("can0", bitrate=1000000)
    ebb = can_node("klipper", uuid=EBB_UUID, version=HOST, mcu="stm32g0b1xx",
                   compression="bzip2", kconfig=EBB36_KCONFIG)
    can_node("klipper", uuid=SB_UUID, version=OLD, mcu="rp2040")
    assert ebb.dict_compressed[:4] == b"BZh9"
    daemon(can_hub=can_hub)

    props = identified(dbus_client, wait_for, "EBBCan")
    assert props["Firmware"] == "Klipper"
    assert props["FirmwareVersion"] == HOST
    assert props["McuType"] == "stm32g0b1xx"
    assert props["VersionMatchesHost"] == "yes"
    assert props["BuildConfig"] == EBB36_KCONFIG
    assert ebb.received("identify")     # downloaded by the daemon, not made up

    info = json.loads(ctl("info", "EBBCan", "--json").stdout)
    assert info["build_config"].splitlines() == EBB36_LINES
    assert status_json(ctl, "mcu EBBCan")["build_config"] == EBB36_KCONFIG
    text = ctl("info", "EBBCan").stdout
    label = [line for line in text.splitlines() if line.strip().startswith("Build config")]
    assert label and label[0].rstrip().endswith(":")
    for line in EBB36_LINES:
        assert ("  " + line) in text.splitlines()[text.splitlines().index(label[0]) + 1 +
                                                   EBB36_LINES.index(line)]

    # The older build: zlib, no config — known as such, not an error.
    sb = identified(dbus_client, wait_for, "sb")
    assert sb["BuildConfig"] == ""
    assert sb["FirmwareVersion"] == OLD
    assert status_json(ctl, "mcu sb")["build_config"] == ""
    assert json.loads(ctl("info", "sb", "--json").stdout)["build_config"] == ""
    assert "Build config: (not embedded)" in ctl("info", "sb").stdout


def test_kalico_usb_mcu_is_klippers_kin(testbed, klipper_checkout, daemon, dbus_client, wait_for,
                                        ctl):
    # A Kalico host: its checkout describes as Kalico's versions do.
    klipper_checkout(KALICO)
    # Kalico: its own "app", bzip2, the early {"defconfig": ...} shape.
    kalico = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, mcu="stm32f429xx", version=KALICO,
                                     app="Kalico", compression="bzip2",
                                     kconfig={"defconfig": "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F429=y\n"})
    testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    assert kalico.sim.dict_compressed[:3] == b"BZh"
    daemon()

    props = identified(dbus_client, wait_for, OCTOPUS_SERIAL)
    assert props["Firmware"] == "Kalico"
    assert props["FirmwareVersion"] == KALICO
    assert props["McuType"] == "stm32f429xx"
    assert props["BuildConfig"] == "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F429=y\n"
    assert props["VersionMatchesHost"] == "yes"
    info = json.loads(ctl("info", OCTOPUS_SERIAL, "--json").stdout)
    assert (info["firmware"], info["version"]) == ("Kalico", KALICO)
    assert info["build_config"] == "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F429=y\n"

    # An old Klipper build beside it: no config, and not the host's version.
    olds = identified(dbus_client, wait_for, EDDY_SERIAL)
    assert (olds["Firmware"], olds["BuildConfig"], olds["VersionMatchesHost"]) == ("Klipper", "", "no")


def test_dictionary_bomb_is_refused_with_a_reason(testbed, klipper_checkout, daemon, dbus_client,
                                                  wait_for):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=HOST)
    # 16 MiB of JSON in a few hundred bytes of bzip2.
    bomb = bz2.compress(b'{"version":"v1","x":"' + b"A" * (16 * 1024 * 1024) + b'"}', 9)
    assert len(bomb) < 4096
    with board.sim.lock:
        board.sim.dict_compressed = bomb
    daemon()
    props = props_when(dbus_client, wait_for, EDDY_SERIAL, lambda p: p["StateReason"],
                       "bomb refused")
    assert props["State"] == "unknown"
    assert "decompresses to more than 1024 KiB" in props["StateReason"]
    assert props["BuildConfig"] == ""
    # Still there, still answering D-Bus.
    assert dbus_client.list_mcus()


def test_garbage_compressed_dictionary_is_unreadable(testbed, klipper_checkout, daemon,
                                                     dbus_client, wait_for):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=HOST)
    good = klipper_dict.compress(board.sim.dict_json, "bzip2")
    with board.sim.lock:
        board.sim.dict_compressed = good[:len(good) // 2]      # cut short
    daemon()
    props = props_when(dbus_client, wait_for, EDDY_SERIAL, lambda p: p["StateReason"],
                       "truncated bzip2 refused")
    assert "data dictionary that cannot be read" in props["StateReason"]


def test_klippy_reports_mcu_kconfig(testbed, klipper_checkout, printer_cfg, klippy, daemon,
                                    dbus_client, wait_for, ctl):
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, version=HOST, mcu="stm32f429xx")
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    fields = klippy_api.default_mcu(HOST, "stm32f429xx")
    fields["mcu_kconfig"] = "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F429=y\n"
    server = klippy(mcus={"mcu": fields})
    daemon()

    props = props_when(dbus_client, wait_for, "mcu", lambda p: p["BuildConfig"],
                       "build config from klippy")
    assert props["BuildConfig"] == "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F429=y\n"
    assert props["Firmware"] == "Klipper"
    assert board.sim.rx_bytes == 0      # Klipper's MCU: nothing sent to it
    assert json.loads(ctl("info", "mcu", "--json").stdout)["build_config"].startswith(
        "CONFIG_MACH_STM32=y\n")

    # Reflashed with an older build: klippy reports no config any more.
    server.set_mcu("mcu", version=OLD, mcu_kconfig="")
    props_when(dbus_client, wait_for, "mcu", lambda p: p["BuildConfig"] == "" and
               p["FirmwareVersion"] == OLD, "config gone with the older build")


def test_flashing_a_kalico_bzip2_image_then_an_older_one(can_hub, can_node, klipper_checkout,
                                                         printer_cfg, daemon, dbus_client, wait_for,
                                                         ctl, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import mkimage
    klipper_checkout(KALICO)
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    node = can_node("klipper", uuid=EBB_UUID, version=OLD, mcu="stm32g0b1xx", app_start=0x08002000)
    daemon(can_hub=can_hub)
    assert identified(dbus_client, wait_for, "EBBCan")["BuildConfig"] == ""

    # The image's dictionary is bzip2 with app Kalico: found, accepted, flashed.
    kalico = tmp_path / "kalico.bin"
    kalico.write_bytes(mkimage.build("stm32g0b1xx", KALICO, 0x08002000, link="can", app="Kalico",
                                     compression="bzip2", kconfig=EBB36_KCONFIG))
    out = ctl("flash", "EBBCan", str(kalico), timeout=120)
    assert out.returncode == 0, out.stderr
    props = props_when(dbus_client, wait_for, "EBBCan",
                       lambda p: p["State"] == "application" and p["FirmwareVersion"] == KALICO,
                       "EBBCan runs the Kalico build")
    assert node.dict_compressed[:3] == b"BZh"      # it serves what the image embeds
    assert (props["Firmware"], props["VersionMatchesHost"]) == ("Kalico", "yes")
    assert props["BuildConfig"] == EBB36_KCONFIG

    # Back to an older Klipper build: zlib, no config.
    older = tmp_path / "older.bin"
    older.write_bytes(mkimage.build("stm32g0b1xx", OLD, 0x08002000, link="can"))
    out = ctl("flash", "EBBCan", str(older), timeout=120)
    assert out.returncode == 0, out.stderr
    props = props_when(dbus_client, wait_for, "EBBCan",
                       lambda p: p["State"] == "application" and p["FirmwareVersion"] == OLD,
                       "EBBCan runs the older build")
    assert (props["Firmware"], props["BuildConfig"]) == ("Klipper", "")
