"""Bootloader entry and return on simulated boards, without the daemon.

The test drives the boards from Python the way mcuflashd does: the USB CDC
"1200 baud touch" and the UART magic string on the testbed's ttys (the test
process runs under umockdev's preload, so os.open/termios on a board's
devnode reach its pty), a libudev monitor (ctypes on libudev.so.1, in this
process) for the re-enumeration, Katapult's protocol on the bootloader's
tty, and Klipper's identify on the application's.  It checks the harness
(Testbed/Board re-enumeration, tests/data/katapult-usb-acm.umockdev) and the
simulators (KlipperMcu's request detection, katapult_serial.KatapultSerial,
katapult_core.KatapultCore); the daemon's side has its own tests.  The ROM
bootloaders (stm32-dfu, picoboot) are checked only when tests/sim/usb_boot.py
provides their simulators, the DFU one with dfu-util as a real host when it
is installed.  Test monitors are drained after every step: umockdev aborts
the process when a listener's socket queue is full.
"""

import ctypes
import json
import os
import select
import shutil
import struct
import subprocess
import termios
import time
import tty
import zlib

import pytest

import harness
import katapult_core as kc
import katapult_serial
import klipper_dict
import klipper_mcu

SERIAL = "2E0036000851363131363530"
RP2040_SERIAL = "E66138935F4A2B2C"
NEW_VERSION = "v0.13.0-99-gdeadbee"


@pytest.fixture(autouse=True)
def need_preload():
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("needs umockdev's preload (tests/run-integration)")


# ---------------------------------------------------------------------------
# Host side helpers


class UdevMonitor:
    """A libudev monitor in this process (it sees the testbed through the
    preload, like the daemon).  events() returns dicts with action,
    subsystem, devtype, syspath, devnode, the udev properties and, for
    usb_device events, the sysfs attributes a daemon reads."""

    _FUNCS = [
        ("udev_new", "P", []), ("udev_unref", "P", ["P"]),
        ("udev_monitor_new_from_netlink", "P", ["P", "S"]),
        ("udev_monitor_enable_receiving", "i", ["P"]),
        ("udev_monitor_get_fd", "i", ["P"]), ("udev_monitor_unref", "P", ["P"]),
        ("udev_monitor_receive_device", "P", ["P"]), ("udev_device_unref", "P", ["P"]),
        ("udev_device_get_action", "S", ["P"]), ("udev_device_get_syspath", "S", ["P"]),
        ("udev_device_get_devnode", "S", ["P"]), ("udev_device_get_subsystem", "S", ["P"]),
        ("udev_device_get_devtype", "S", ["P"]),
        ("udev_device_get_properties_list_entry", "P", ["P"]),
        ("udev_list_entry_get_next", "P", ["P"]), ("udev_list_entry_get_name", "S", ["P"]),
        ("udev_list_entry_get_value", "S", ["P"]),
        ("udev_device_get_sysattr_value", "S", ["P", "S"]),
    ]
    _TYPES = {"P": ctypes.c_void_p, "S": ctypes.c_char_p, "i": ctypes.c_int}

    def __init__(self):
        lib = ctypes.CDLL("libudev.so.1")
        for name, res, args in self._FUNCS:
            fn = getattr(lib, name)
            fn.restype = self._TYPES[res]
            fn.argtypes = [self._TYPES[a] for a in args]
        self.lib = lib
        self.udev = lib.udev_new()
        self.mon = lib.udev_monitor_new_from_netlink(self.udev, b"udev")
        assert lib.udev_monitor_enable_receiving(self.mon) == 0
        self.fd = lib.udev_monitor_get_fd(self.mon)

    def close(self):
        self.lib.udev_monitor_unref(self.mon)
        self.lib.udev_unref(self.udev)

    def _describe(self, dev):
        lib = self.lib

        def s(b):
            return b.decode() if b is not None else None
        props = {}
        e = lib.udev_device_get_properties_list_entry(dev)
        while e:
            props[s(lib.udev_list_entry_get_name(e))] = s(lib.udev_list_entry_get_value(e))
            e = lib.udev_list_entry_get_next(e)
        out = {"action": s(lib.udev_device_get_action(dev)),
               "subsystem": s(lib.udev_device_get_subsystem(dev)),
               "devtype": s(lib.udev_device_get_devtype(dev)),
               "syspath": s(lib.udev_device_get_syspath(dev)),
               "devnode": s(lib.udev_device_get_devnode(dev)), "props": props}
        if out["devtype"] == "usb_device" and out["action"] != "remove":
            out["attrs"] = {a: s(lib.udev_device_get_sysattr_value(dev, a.encode()))
                            for a in ("idVendor", "idProduct", "serial", "manufacturer",
                                      "product", "busnum", "devnum", "devpath")}
        return out

    def events(self, count, timeout=5.0):
        """The next @count events (fewer if @timeout passes first)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                break
            dev = self.lib.udev_monitor_receive_device(self.mon)
            if dev:
                out.append(self._describe(dev))
                self.lib.udev_device_unref(dev)
        return out


@pytest.fixture
def monitor(testbed):
    mon = UdevMonitor()
    yield mon
    mon.close()


def open_raw(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def identify(path):
    """The firmware version a Klipper tty reports (dictionary download)."""
    fd = open_raw(path)
    try:
        compressed, _ = klipper_mcu.host_identify(fd, timeout=5)
    finally:
        os.close(fd)
    return klipper_dict_version(zlib.decompress(compressed).decode())


def klipper_dict_version(text):
    return json.loads(text)["version"]


def katapult_session(path, *commands):
    """Open @path, CONNECT, run each (cmd, payload) and close; returns
    (connect info, [(code, payload), ...])."""
    fd = open_raw(path)
    try:
        info = katapult_serial.host_connect(fd)
        answers = [katapult_serial.host_command(fd, cmd, payload) for cmd, payload in commands]
    finally:
        os.close(fd)
    return info, answers


def firmware_image(version, mcu, link="usb", start=0x08008000):
    """A flat .bin like a Klipper build linked at @start: vector table
    (the simulated bootloaders start it only there), code, and the
    compressed data dictionary somewhere inside, padded to 64 bytes."""
    _, compressed = klipper_dict.build(version, mcu, link=link)
    image = struct.pack("<II", 0x20020000, start + 0x101) + b"\x5a" * 1016 + compressed
    return image + b"\xff" * (-len(image) % 64)


def flash_commands(image, start, block_size=64):
    cmds = [(kc.SEND_BLOCK, struct.pack("<I", start + off) + image[off:off + block_size])
            for off in range(0, len(image), block_size)]
    return cmds + [(kc.SEND_EOF, b"")]


def summary(events):
    return [(e["action"], e["subsystem"], e["devtype"] or "", e["syspath"].rsplit("/", 1)[1])
            for e in events]


def usb_device_event(events, action):
    found = [e for e in events if e["action"] == action and e["devtype"] == "usb_device"]
    assert len(found) == 1, summary(events)
    return found[0]


def tty_event(events, action):
    found = [e for e in events if e["action"] == action and e["subsystem"] == "tty"]
    assert len(found) == 1, summary(events)
    return found[0]


# ---------------------------------------------------------------------------
# Simulators on plain ptys


def test_katapult_serial_protocol_on_a_pty():
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    done = []
    sim = katapult_serial.KatapultSerial(
        master, "stm32f446xx", app_start=0x08008000, katapult_version="v0.0.1-110-gb0bf421",
        own_fd=True, on_complete=lambda s, mode, d: done.append((mode, d))).start()
    try:
        info = katapult_serial.host_connect(slave)
        assert info == {"proto_version": 0x00010100, "app_start": 0x08008000, "block_size": 64,
                        "mcu": "stm32f446xx", "version": "v0.0.1-110-gb0bf421"}
        # flashtool's prime frame and the CAN-only GET_CANBUS_ID are errors here.
        assert katapult_serial.host_command(slave, kc.PRIME) == (kc.COMMAND_ERROR, b"")
        assert katapult_serial.host_command(slave, kc.GET_CANBUS_ID) == (kc.COMMAND_ERROR, b"")
        os.write(slave, b"\x01\x88\x11\x00\x00\x00\x99\x03")          # bad CRC
        reader = kc.ResponseReader()
        got = []
        while not got:
            select.select([slave], [], [], 2)
            got = reader.feed(os.read(slave, 100))
        assert got == [(kc.NACK, b"")]
        assert katapult_serial.host_connect(slave)["mcu"] == "stm32f446xx"   # resynchronised

        # Two sessions' worth of writes: the second erases the pages it touches.
        image = firmware_image(NEW_VERSION, "stm32f446xx")
        for cmd, payload in [(kc.SEND_BLOCK, struct.pack("<I", 0x08008000 + 2048 + 64)
                              + b"\x11" * 64), (kc.SEND_EOF, b"")] + \
                flash_commands(image, 0x08008000):
            code, answer = katapult_serial.host_command(slave, cmd, payload)
            assert code == kc.ACK and struct.unpack_from("<I", answer)[0] == cmd
        assert struct.unpack("<II", answer) == (kc.SEND_EOF, (len(image) + 2047) // 2048)
        code, answer = katapult_serial.host_command(slave, kc.REQUEST_BLOCK,
                                                    struct.pack("<I", 0x08008000 + 2048 + 64))
        assert answer[8:] == image[2048 + 64:2048 + 128]
        assert sim.image() == image and sim.pages_written == 1 + (len(image) + 2047) // 2048
        assert katapult_serial.host_command(slave, kc.COMPLETE) == (
            kc.ACK, struct.pack("<I", kc.COMPLETE))
        assert sim.wait_for(lambda s: s.completed, 2)
        assert done[0][0] == "klipper" and klipper_dict_version(done[0][1]) == NEW_VERSION
        with pytest.raises(TimeoutError):                 # "resetting": silent
            katapult_serial.host_connect(slave, timeout=0.3)
        assert sim.command_names()[:3] == ["CONNECT", "0x90", "GET_CANBUS_ID"]
    finally:
        sim.stop()
        os.close(slave)


def test_katapult_boot_targets():
    core = kc.KatapultCore("rp2040", app_start=0x10004000)
    assert core.boot_target(None) == ("katapult", None)
    assert core.boot_target('{"version": "x"}') == ("klipper", '{"version": "x"}')
    # A vector table that starts at 0x10004000, no dictionary: a foreign application.
    core.feed(kc.frame(kc.SEND_BLOCK, struct.pack("<III", 0x10004000, 0x20042000, 0x10004021) + b"\0" * 56))
    assert core.boot_target('{"version": "x"}') == ("foreign", None) and core.boot_failure is None
    # Linked elsewhere (reset handler outside what was written): Katapult stays.
    core.feed(kc.frame(kc.SEND_BLOCK, struct.pack("<III", 0x10004000, 0x20042000, 0x10000141) + b"\0" * 56))
    assert core.boot_target('{"version": "x"}') == ("katapult", None)
    assert "reset handler 0x10000140 lies outside" in core.boot_failure
    # No stack pointer in RAM: nothing runs either.
    core.feed(kc.frame(kc.SEND_BLOCK, struct.pack("<I", 0x10004000) + b"\0" * 64))
    assert core.boot_target('{"version": "x"}') == ("katapult", None)
    assert "not in RAM" in core.boot_failure


def test_rom_bootloaders_start_only_an_image_that_fits_where_it_was_written():
    """ST's ROM DFU starts the image at its leave address, the RP2040 boot
    ROM boot2 and then the vector table at 0x10000100: an image linked
    elsewhere does not start, and the ROM bootloader stays."""
    import usb_boot

    old = '{"version": "v0.12.0-1-gold"}'
    good = firmware_image(NEW_VERSION, "stm32f429xx", start=0x08008000)
    dfu = usb_boot.Stm32DfuSim(bootloader_size=0)
    assert dfu.boot_target(old) == ("klipper", old) and dfu.boot_failure is None   # nothing written
    dfu.flash[0x8000:0x8000 + len(good)] = good
    dfu.left = 0x08008000
    mode, dictionary = dfu.boot_target(old)
    assert mode == "klipper" and klipper_dict_version(dictionary) == NEW_VERSION
    # Linked for 0x08008000, started at 0x08000000 (nothing there) or
    # written at 0x08000000 and started there: stays in DFU.
    dfu.left = 0x08000000
    assert dfu.boot_target(old) == ("bootloader", None) and "not in RAM" in dfu.boot_failure
    dfu.flash[:] = b"\xff" * len(dfu.flash)
    dfu.flash[0:len(good)] = good
    assert dfu.boot_target(old) == ("bootloader", None) and "lies outside" in dfu.boot_failure

    pico = usb_boot.Rp2040BootSim()
    app = firmware_image(NEW_VERSION, "rp2040", start=0x10000100)
    pico.flash[0:256] = b"\x4b" * 256                   # boot2
    pico.flash[256:256 + len(app)] = app
    mode, dictionary = pico.boot_target(None)
    assert mode == "klipper" and klipper_dict_version(dictionary) == NEW_VERSION
    # A Katapult build (linked at 0x10004000) written at 0x10000000.
    pico.flash[256:256 + len(app)] = firmware_image(NEW_VERSION, "rp2040", start=0x10004000)
    assert pico.boot_target(None) == ("bootloader", None) and "lies outside" in pico.boot_failure
    # Written at 0x10004000 without boot2: the boot ROM stays in BOOTSEL.
    pico.flash[:] = b"\xff" * len(pico.flash)
    pico.flash[0x4000:0x4000 + len(app)] = firmware_image(NEW_VERSION, "rp2040", start=0x10004000)
    assert pico.boot_target(None) == ("bootloader", None) and "boot2" in pico.boot_failure


def test_klipper_sim_sees_the_1200_baud_touch_on_a_pty():
    master, slave = os.openpty()
    requests = []
    sim = klipper_mcu.KlipperMcu(master, own_fd=True,
                                 on_bootloader_request=lambda s, how: requests.append(how))
    sim.start()
    try:
        path = os.ttyname(slave)
        attrs = termios.tcgetattr(slave)
        attrs[4] = attrs[5] = termios.B115200
        termios.tcsetattr(slave, termios.TCSANOW, attrs)     # not a request
        assert sim.wait_for(lambda s: s.line_speeds == [termios.B115200], 2)
        klipper_mcu.touch_1200(path)
        assert sim.wait_for(lambda s: s.bootloader_requested, 2)
        assert requests == ["usb-1200-baud"] and sim.bootloader_request_how == "usb-1200-baud"
        tty.setraw(slave, termios.TCSANOW)
        with pytest.raises(TimeoutError):                    # reset: no answer
            klipper_mcu.host_identify(slave, timeout=0.3)
        assert sim.dropped_after_request > 0
        sim.reset()
        assert klipper_mcu.host_identify(slave, timeout=3)[0] == sim.dict_compressed
    finally:
        sim.stop()
        os.close(slave)


def test_serial_magic_only_as_a_whole_block():
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    sim = klipper_mcu.KlipperMcu(master, own_fd=True, link="serial").start()
    try:
        # Glued to junk before it, the firmware pops junk+magic as one block.
        os.write(slave, b"\x01\x02" + klipper_mcu.SERIAL_BOOTLOADER_MAGIC)
        assert sim.wait_for(lambda s: s.rx_bytes == 34, 2)
        assert klipper_mcu.host_identify(slave, timeout=3)[0] == sim.dict_compressed
        assert not sim.bootloader_requested
        # Split over two writes, after a 0x7e: a request.
        os.write(slave, b"~" + klipper_mcu.SERIAL_BOOTLOADER_MAGIC[:10])
        time.sleep(0.05)
        os.write(slave, klipper_mcu.SERIAL_BOOTLOADER_MAGIC[10:])
        assert sim.wait_for(lambda s: s.bootloader_requested, 2)
        assert sim.bootloader_request_how == "serial-magic"
    finally:
        sim.stop()
        os.close(slave)


# ---------------------------------------------------------------------------
# USB: Klipper -> Katapult -> Klipper on the same port


def test_usb_touch_reenumerates_into_katapult_and_back(testbed, monitor):
    board = testbed.add_klipper_usb(serial=SERIAL, mcu="stm32f446xx", port="1-1.3",
                                    bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x08008000,
                                                     "katapult_version": "v0.0.1-110-gb0bf421"})
    plugged = monitor.events(4)
    assert [e["action"] for e in plugged] == ["add"] * 4
    klipper_tty = board.devnode
    usb_syspath = board.usb_syspath
    assert board.mode == "klipper" and board.history == ["klipper"]
    assert identify(klipper_tty) == harness.HOST_VERSION

    t0 = time.monotonic()
    klipper_mcu.touch_1200(klipper_tty)
    events = monitor.events(8)
    elapsed = time.monotonic() - t0
    assert summary(events) == [
        ("remove", "tty", "", "ttyACM0"), ("remove", "usb", "usb_interface", "1-1.3:1.1"),
        ("remove", "usb", "usb_interface", "1-1.3:1.0"), ("remove", "usb", "usb_device", "1-1.3"),
        ("add", "usb", "usb_device", "1-1.3"), ("add", "usb", "usb_interface", "1-1.3:1.0"),
        ("add", "usb", "usb_interface", "1-1.3:1.1"), ("add", "tty", "", "ttyACM1")]
    assert elapsed < 2.0
    old_usb = usb_device_event(events, "remove")
    new_usb = usb_device_event(events, "add")
    assert old_usb["syspath"] == new_usb["syspath"] == usb_syspath
    assert new_usb["attrs"] == {"idVendor": "1d50", "idProduct": "6177", "serial": SERIAL,
                                "manufacturer": "katapult", "product": "stm32f446xx",
                                "busnum": "1", "devnum": "6", "devpath": "1.3"}
    assert new_usb["devnode"] == "/dev/bus/usb/001/006"
    kat = tty_event(events, "add")
    p = kat["props"]
    assert (p["ID_VENDOR_ID"], p["ID_MODEL_ID"], p["ID_SERIAL_SHORT"]) == ("1d50", "6177", SERIAL)
    assert p["ID_VENDOR"] == "katapult" and p["ID_MODEL"] == "stm32f446xx"
    assert p["ID_PATH"] == "pci-0000:00:14.0-usb-0:1.3:1.0"
    assert "/dev/serial/by-id/usb-katapult_stm32f446xx_%s-if00" % SERIAL in p["DEVLINKS"]

    board.wait_mode("katapult")
    assert board.devnode == kat["devnode"] == "/dev/ttyACM1" != klipper_tty
    assert board.sim is None and board.history == ["klipper", "katapult"]
    assert (board.vendor_id, board.product_id, board.usb_serial) == (0x1d50, 0x6177, SERIAL)
    assert os.path.islink(testbed.root + board.by_id)
    assert not os.path.lexists(testbed.root + "/dev/serial/by-id/usb-Klipper_stm32f446xx_%s-if00"
                               % SERIAL)
    info, answers = katapult_session(board.devnode, (kc.COMPLETE, b""))
    assert info == {"proto_version": 0x00010100, "app_start": 0x08008000, "block_size": 64,
                    "mcu": "stm32f446xx", "version": "v0.0.1-110-gb0bf421"}
    assert answers == [(kc.ACK, struct.pack("<I", kc.COMPLETE))]

    events = monitor.events(8)
    assert [e["action"] for e in events] == ["remove"] * 4 + ["add"] * 4
    back = tty_event(events, "add")
    assert back["props"]["ID_MODEL_ID"] == "614e"
    assert back["props"]["ID_SERIAL_SHORT"] == SERIAL
    assert back["props"]["ID_PATH"] == "pci-0000:00:14.0-usb-0:1.3:1.0"
    assert usb_device_event(events, "add")["attrs"]["devnum"] == "7"
    board.wait_mode("klipper")
    assert board.history == ["klipper", "katapult", "klipper"]
    assert board.devnode == back["devnode"] == "/dev/ttyACM2"
    assert identify(board.devnode) == harness.HOST_VERSION       # nothing flashed
    assert board.sim.next_seq != 0 and board.version == harness.HOST_VERSION
    assert testbed.action_errors == []


def test_katapult_flash_over_usb_boots_the_new_version(testbed, monitor):
    board = testbed.add_klipper_usb(serial=RP2040_SERIAL, mcu="rp2040", port="1-1.2",
                                    version=harness.OLD_VERSION, bootloader="katapult",
                                    katapult_kwargs={"app_start": 0x10004000})
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    # Keep the monitor drained: umockdev aborts when a listener's socket is
    # full (net.unix.max_dgram_qlen, 10 by default).
    assert len(monitor.events(8)) == 8
    board.wait_mode("katapult")
    image = firmware_image(NEW_VERSION, "rp2040", start=0x10004000)
    info, answers = katapult_session(board.devnode, *flash_commands(image, 0x10004000),
                                     (kc.COMPLETE, b""))
    assert info["app_start"] == 0x10004000 and info["mcu"] == "rp2040"
    assert all(code == kc.ACK for code, _ in answers)
    assert board.bootloader_sim.image() == image
    assert len(monitor.events(8)) == 8
    board.wait_mode("klipper")
    assert board.version == NEW_VERSION
    assert identify(board.devnode) == NEW_VERSION
    assert board.by_id.endswith("usb-Klipper_rp2040_%s-if00" % RP2040_SERIAL)

    # Back in Katapult the flash still holds the image.
    klipper_mcu.touch_1200(board.devnode)
    assert len(monitor.events(8)) == 8
    board.wait_mode("katapult")
    _, answers = katapult_session(board.devnode,
                                  (kc.REQUEST_BLOCK, struct.pack("<I", 0x10004000 + 64)))
    assert answers[0][1][8:] == image[64:128]
    assert testbed.action_errors == []


def test_foreign_image_leaves_nothing_on_the_port(testbed, monitor):
    board = testbed.add_klipper_usb(bootloader="katapult", port="1-1.4")
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    board.wait_mode("katapult")
    monitor.events(8)
    foreign = struct.pack("<II", 0x20010000, 0x08002041) + b"\x12" * 248
    katapult_session(board.devnode, *flash_commands(foreign, 0x08002000),
                     (kc.COMPLETE, b""))
    board.wait_mode("foreign", present=False)
    assert summary(monitor.events(8, timeout=1))[-1] == ("remove", "usb", "usb_device", "1-1.4")
    assert not board.present and board.sim is None


def test_requests_a_board_does_not_act_on(testbed, monitor):
    # No bootloader: the firmware ignores the touch.
    plain = testbed.add_klipper_usb(port="1-1.2")
    # Katapult on USB: the UART magic string means nothing to usb_cdc.c.
    kat = testbed.add_klipper_usb(port="1-1.3", bootloader="katapult")
    monitor.events(8)
    klipper_mcu.touch_1200(plain.devnode)
    assert plain.sim.wait_for(lambda s: s.ignored_bootloader_requests == ["usb-1200-baud"], 2)
    fd = open_raw(kat.devnode)
    try:
        klipper_mcu.send_serial_bootloader_request(fd)
        assert kat.sim.wait_for(lambda s: s.rx_bytes == 33, 2)
    finally:
        os.close(fd)
    assert identify(plain.devnode) == identify(kat.devnode) == harness.HOST_VERSION
    assert monitor.events(1, timeout=0.3) == []
    assert plain.history == kat.history == ["klipper"]
    assert not plain.sim.bootloader_requested and not kat.sim.bootloader_requested


def test_bootloader_that_never_enumerates(testbed, monitor):
    board = testbed.add_klipper_usb(port="1-1.2", bootloader_request=True)
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    assert [e["action"] for e in monitor.events(4)] == ["remove"] * 4
    assert board.wait_for(lambda b: not b.present, 2) and board.mode is None
    assert monitor.events(1, timeout=0.3) == []


def test_unplug_during_reboot_abandons_it(testbed, monitor):
    board = testbed.add_klipper_usb(port="1-1.2", bootloader="katapult", enumerate_delay=0.3)
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    assert [e["action"] for e in monitor.events(4)] == ["remove"] * 4
    testbed.remove(board)                       # while "rebooting"
    assert monitor.events(1, timeout=0.6) == []
    assert board.history == ["klipper"] and not board.plugged
    again = testbed.add_klipper_usb(port="1-1.2", bootloader="katapult")
    assert again.tty == "ttyACM1"               # names are never reused
    assert testbed.action_errors == []


# ---------------------------------------------------------------------------
# UART: Klipper -> Katapult -> Klipper on the same tty, no uevents


@pytest.mark.parametrize("kind", ["uart", "ch340"])
def test_uart_magic_switches_the_same_tty_to_katapult_and_back(testbed, monitor, kind):
    klipper = {"version": harness.OLD_VERSION, "mcu": "stm32f103xe"}
    if kind == "uart":
        board = testbed.add_uart("ttyAMA0", klipper=klipper, bootloader="katapult",
                                 katapult_kwargs={"app_start": 0x08002000})
        devnode = "/dev/ttyAMA0"
    else:
        board = testbed.add_usb_serial_bridge(port="1-1.4", klipper=klipper,
                                              bootloader="katapult")
        devnode = "/dev/ttyUSB0"
    monitor.events(4, timeout=0.3)
    assert identify(board.devnode) == harness.OLD_VERSION
    klipper = board.sim
    fd = open_raw(board.devnode)
    try:
        klipper_mcu.send_serial_bootloader_request(fd)
        board.wait_mode("katapult")
        assert klipper.bootloader_request_how == "serial-magic"
        info = katapult_serial.host_connect(fd)
        assert info["mcu"] == "stm32f103xe" and info["app_start"] == 0x08002000
        image = firmware_image(NEW_VERSION, "stm32f103xe", link="serial", start=0x08002000)
        for cmd, payload in flash_commands(image, 0x08002000) + [(kc.COMPLETE, b"")]:
            assert katapult_serial.host_command(fd, cmd, payload)[0] == kc.ACK
    finally:
        os.close(fd)
    board.wait_mode("klipper")
    assert board.devnode == devnode and board.history == ["klipper", "katapult", "klipper"]
    assert identify(board.devnode) == NEW_VERSION and board.version == NEW_VERSION
    assert board.sim is not klipper and board.sim.link == "serial"
    # A 1200 baud setting means nothing to a UART.
    fd = open_raw(board.devnode)
    try:
        attrs = termios.tcgetattr(fd)
        attrs[4] = attrs[5] = termios.B1200
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    finally:
        os.close(fd)
    time.sleep(0.1)
    assert board.mode == "klipper" and not board.sim.bootloader_requested
    assert monitor.events(1, timeout=0.2) == []         # never a uevent
    assert testbed.action_errors == []


# ---------------------------------------------------------------------------
# ROM bootloaders (tests/sim/usb_boot.py)


def test_st_dfu_serial_differs_from_klipper():
    assert harness.st_dfu_serial(SERIAL) == "306B365F3136"
    assert harness.st_dfu_serial("12345") != "12345"


@pytest.mark.parametrize("mode,mcu,serial,usb_id,expected_serial", [
    ("stm32-dfu", "stm32f446xx", SERIAL, ("0483", "df11"), harness.st_dfu_serial(SERIAL)),
    ("picoboot", "rp2040", RP2040_SERIAL, ("2e8a", "0003"), RP2040_SERIAL),
])
def test_rom_bootloader_on_the_same_port(testbed, monitor, mode, mcu, serial, usb_id,
                                         expected_serial):
    pytest.importorskip("usb_boot", reason="tests/sim/usb_boot.py is not there yet")
    board = testbed.add_klipper_usb(serial=serial, mcu=mcu, port="1-1.5", bootloader=mode)
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    board.wait_mode(mode)
    events = monitor.events(8, timeout=2)
    added = usb_device_event(events, "add")
    assert added["syspath"].endswith("/1-1.5")
    assert (added["attrs"]["idVendor"], added["attrs"]["idProduct"]) == usb_id
    assert added["attrs"]["serial"] == expected_serial
    assert board.devnode == added["devnode"] and board.master_fd is None
    callback = harness.USB_BOOTLOADERS[mode][1]
    getattr(board.bootloader_sim, callback)()           # what the host's leave/reboot does
    board.wait_mode("klipper")
    back = tty_event(monitor.events(20, timeout=2), "add")
    assert back["props"]["ID_SERIAL_SHORT"] == serial
    assert identify(board.devnode) == harness.HOST_VERSION
    assert testbed.action_errors == []


@pytest.mark.skipif(not shutil.which("dfu-util"), reason="dfu-util is not installed")
def test_dfu_util_flashes_through_the_rom_and_klipper_comes_back(testbed, monitor, tmp_path):
    """flash_usb.py's way: touch, wait for 0483:df11 on the same port, let
    dfu-util (a real DfuSe host, under the testbed) write and leave.
    (flash_usb.py adds -R, which makes dfu-util 0.11 exit 251, "can't
    detach", once the device has gone after the leave.)"""
    pytest.importorskip("usb_boot", reason="tests/sim/usb_boot.py is not there yet")
    board = testbed.add_klipper_usb(serial=SERIAL, mcu="stm32f446xx", port="1-1.5",
                                    bootloader="stm32-dfu")
    monitor.events(4)
    klipper_mcu.touch_1200(board.devnode)
    events = monitor.events(6)
    assert summary(events)[3:] == [("remove", "usb", "usb_device", "1-1.5"),
                                   ("add", "usb", "usb_device", "1-1.5"),
                                   ("add", "usb", "usb_interface", "1-1.5:1.0")]
    board.wait_mode("stm32-dfu")
    image = firmware_image(NEW_VERSION, "stm32f446xx")
    path = tmp_path / "klipper.bin"
    path.write_bytes(image)
    r = subprocess.run(["dfu-util", "-p", board.port, "-a", "0", "-s",
                        "0x08008000:leave", "-D", str(path)],
                       env=harness.clean_env(**testbed.env()), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(monitor.events(6)) == 6
    board.wait_mode("klipper")
    assert board.history == ["klipper", "stm32-dfu", "klipper"]
    assert identify(board.devnode) == NEW_VERSION
    assert board.rom_flash[0x8000:0x8000 + len(image)] == image
    assert testbed.action_errors == []
