#!/usr/bin/python3
"""Write the seed corpora of the libFuzzer targets (tests/fuzz/seeds/TARGET/).

A few valid inputs per target, made with the test tools that model the real
peers: tests/tools/mkimage.py for firmware images, tests/sim for Klipper's
data dictionary and framing, Katapult frames and klippy's API messages;
printer.cfg, mcuflashd.conf, DFU, PICOBOOT and CAN inputs are written out
here in the shapes the unit tests use.  The seeds are committed; run this
again (/usr/bin/python3 tests/fuzz/make-seeds.py) after changing it.
"""

import bz2
import json
import os
import shutil
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sim"))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import katapult_core  # noqa: E402
import klipper_dict  # noqa: E402
import klipper_proto  # noqa: E402
import mkimage  # noqa: E402

VERSION = "v0.12.0-100-gabcdef12"


def write(target, name, data):
    path = os.path.join(HERE, "seeds", target, name)
    if isinstance(data, str):
        data = data.encode()
    with open(path, "wb") as f:
        f.write(data)


def small_dict_json(mcu="stm32f103xe"):
    return json.dumps({"app": "Klipper", "version": VERSION,
                       "build_versions": "gcc: (15:12.2.rel1-1) 12.2.1 binutils: 2.40",
                       "config": {"MCU": mcu, "CLOCK_FREQ": 72000000},
                       "commands": {"identify offset=%u count=%c": 1}},
                      separators=(",", ":"))


def image_seeds():
    for mcu, start, fmt, size in (("stm32f103xe", 0x08007000, "bin", 6144),
                                  ("stm32f446xx", 0x08008000, "elf", 6144),
                                  ("stm32g0b1xx", 0x08002000, "hex", 4096),
                                  ("rp2040", 0x10000000, "uf2", 4096)):
        write("image", "%s.%s" % (mcu, fmt), mkimage.build(mcu, VERSION, start, fmt, size=size))
    # Linux process MCU: klipper_mcu, a host ELF.
    write("image", "linux.elf", mkimage.build("linux", VERSION, 0, "elf"))


def dictionary_seeds():
    text, compressed = klipper_dict.build(VERSION, "stm32f446xx")
    small = small_dict_json()
    write("dictionary", "zlib-stm32f446", b"\x00" + compressed)
    write("dictionary", "zlib-small", b"\x00" + zlib.compress(small.encode(), 9))
    write("dictionary", "json-stm32f446", b"\x01" + text.encode()[:16000])
    write("dictionary", "json-small", b"\x01" + small.encode())
    write("dictionary", "json-old-build", b"\x02" + json.dumps(
        {"version": "v0.9.1-5-g1234567", "commands": {}, "config": {"MCU": "atmega2560",
                                                                  "CLOCK_FREQ": "16000000"}}).encode())
    write("dictionary", "embedded", b"\x03" + small.encode())
    # Kalico: bzip2, with the embedded build config (protocols.md §15.5).
    kalico = json.loads(small)
    kalico.update(app="Kalico", kconfig="CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32G0B1=y\n"
                  "CONFIG_STM32_FLASH_START_2000=y\n")
    write("dictionary", "bzip2-kalico-kconfig", b"\x00" + bz2.compress(json.dumps(kalico).encode(), 9))


def klipper_seeds():
    compressed = zlib.compress(small_dict_json().encode(), 9)
    stream = b""
    seq = 1
    offset = 0
    while True:
        chunk = compressed[offset:offset + klipper_proto.IDENTIFY_CHUNK]
        content = (klipper_proto.vlq_encode(0) + klipper_proto.vlq_encode(offset)
                   + bytes([len(chunk)]) + chunk)
        stream += klipper_proto.build_block(seq, content)
        seq = (seq + 1) & 15
        offset += len(chunk)
        if not chunk:
            break
    write("klipper", "identify", stream)
    # An ack, garbage before a block, a block for a reset MCU (seq 5).
    write("klipper", "ack-garbage-identify", klipper_proto.build_block(1) + b"\x00\x7e\x7eGARBAGE\x7e" + stream)
    write("klipper", "other-seq", klipper_proto.build_block(5) + stream)
    write("klipper", "vlqs", klipper_proto.build_block(3, b"".join(
        klipper_proto.vlq_encode(v) for v in (0, 1, -1, 95, 96, -32, -33, 12345, -2**31, 2**31 - 1))))


def katapult_seeds():
    f = katapult_core.frame
    connect = struct.pack("<IIII", katapult_core.CONNECT, 0x00010100, 0x08002000, 64) + \
        b"stm32f103xe\0v0.0.1-91-g2dbca5e\0"
    session = (f(katapult_core.COMMAND_ERROR)
               + f(katapult_core.ACK, connect)
               + f(katapult_core.ACK, struct.pack("<I", katapult_core.GET_CANBUS_ID) + bytes.fromhex("0e0d81e4210c"))
               + f(katapult_core.ACK, struct.pack("<II", katapult_core.SEND_BLOCK, 0x08002000))
               + f(katapult_core.ACK, struct.pack("<II", katapult_core.REQUEST_BLOCK, 0x08002000) + bytes(range(64)))
               + f(katapult_core.ACK, struct.pack("<II", katapult_core.SEND_EOF, 1))
               + f(katapult_core.ACK, struct.pack("<I", katapult_core.COMPLETE)))
    write("katapult", "session", session)
    old = struct.pack("<IIII", katapult_core.CONNECT, 0x00010000, 0x08008000, 512) + b"stm32f446xx\0"
    write("katapult", "connect-1.0", f(katapult_core.COMMAND_ERROR) + f(katapult_core.ACK, old))
    write("katapult", "busy-nack", f(katapult_core.BUSY) + f(katapult_core.NACK) + b"\x01\x88\x01" + session)


def klippy_seeds():
    def enc(m):
        return json.dumps(m, separators=(",", ":")).encode() + b"\x03"
    mcu = {"mcu_version": VERSION, "mcu_build_versions": "gcc: 12.2.1 binutils: 2.40",
           "mcu_constants": {"MCU": "stm32f446xx", "CLOCK_FREQ": 180000000}}
    info = {"id": 1, "result": {"state": "ready", "state_message": "Printer is ready",
                                "hostname": "pi", "software_version": VERSION,
                                "klipper_path": "/home/pi/klipper", "config_file": "/home/pi/printer_data/config/printer.cfg",
                                "log_file": "/tmp/klippy.log"}}
    listing = {"id": 2, "result": {"objects": ["webhooks", "configfile", "print_stats", "mcu", "mcu EBBCan",
                                               "toolhead", "heater_bed"]}}
    subscribed = {"id": 3, "result": {"eventtime": 1.5, "status": {
        "webhooks": {"state": "ready", "state_message": "Printer is ready"},
        "print_stats": {"state": "standby"}, "mcu": mcu, "mcu EBBCan": dict(mcu, mcu_version="v0.12.0-99-g0123456")}}}
    notify = {"mcuflashd": "status", "params": [{"print_stats": {"state": "printing"}}, 2.5]}
    write("klippy", "session", enc(info) + enc(listing) + enc(subscribed) + enc(notify))
    write("klippy", "startup", enc({"id": 1, "result": {"state": "startup", "state_message": "Printer is not ready"}})
          + enc({"id": 2, "error": {"error": "WebRequestError", "message": "nope"}}) + b"\x03" + enc(info))
    write("klippy", "shutdown", enc(info) + enc({"mcuflashd": "status", "params": [
        {"webhooks": {"state": "shutdown", "state_message": "Shutdown"}, "mcu": {"mcu_version": ""}}, 3.0]}))


def printercfg_seeds():
    # Found by this fuzzer: headers that differ only in invalid UTF-8 bytes.
    write("printercfg", "utf8-duplicate-sections",
          b"[mcu \xff]\nserial: /dev/ttyACM0\n[mcu \xfe]\nbaud: 115200\n")
    write("printercfg", "voron", """\
# This file contains common pin mappings for a printer.
[include extra.cfg]

[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32f446xx_2A0039000851363131363530-if00
restart_method: command

[mcu EBBCan]
canbus_uuid: 0E0D81E4210C
canbus_interface: can0

[mcu  rpi ]
serial = /tmp/klipper_host_mcu

[printer]
kinematics: corexy
max_velocity: 300
gcode:
  G28
  M117 ready ; comment

[stepper_x]
step_pin: PF13

#*# <---------------------- SAVE_CONFIG ---------------------->
#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.
#*#
#*# [mcu EBBCan]
#*# canbus_uuid = aabbccddeeff
#*#
#*# [extruder]
#*# control = pid
""")
    write("printercfg", "serial-baud", "[mcu]\nserial: /dev/ttyAMA0\nbaud: 250000\n[include *.cfg]\n"
          "[mcu x]\nserial:\n  /dev/ttyUSB0\nbaud: +115200\n")


def config_seeds():
    shutil.copy(os.path.join(HERE, "..", "..", "data", "mcuflashd.conf"),
                os.path.join(HERE, "seeds", "config", "packaged"))
    write("config", "all-set", """\
[Klipper]
Path=/home/pi/klipper
PrinterConfig=/home/pi/printer_data/config/printer.cfg
ApiSocket=/home/pi/printer_data/comms/klippy.sock
Service=klipper.service

[Discovery]
SerialDevices=/dev/ttyAMA0 /dev/ttyS0
SerialDevices=/dev/ttyUSB3
IdentifyTimeoutSec=1.5
OfflineTimeoutSec=2min

[Jobs]
BootloaderTimeoutSec=250ms
JobRetentionSec=0

[Mcu 2E0036000851363131363530]
FlashStart=0x08008000
FlashSize=512K

[Mcu linux-klipper_host_mcu]
Program=/usr/local/bin/klipper_mcu
Service=klipper-mcu.service
; comment
""")
    write("config", "bad-value", "[Discovery]\nIdentifyTimeoutSec=5 hours\n")


def canbus_seeds():
    def frame(can_id, data):
        return struct.pack("<IB3x8s", can_id, len(data), bytes(data))
    uuid = bytes.fromhex("0e0d81e4210c")
    write("canbus", "discovery",
          frame(0x3F1, b"\x20" + uuid + b"\x01")                       # Klipper node
          + frame(0x3F1, b"\x20" + bytes.fromhex("aabbccddeeff") + b"\x11")  # Katapult node
          + frame(0x3F1, b"\x20" + uuid + b"\x01")                     # the same again
          + frame(0x3F0, b"\x01" + uuid + b"\x04")                     # Klipper's host assigns 4
          + frame(0x3F0, b"\x11" + uuid + b"\x80")                     # flashtool assigns 128
          + frame(0x108, b"\x01\x02")                                   # node 4 talking
          + frame(0x80000123 | 0x1ABC000, b"\x00")                      # extended frame
          + frame(0x40000100, b""))                                     # RTR
    write("canbus", "uuid-string", b"0E0D81E4210C")


def dfu_seeds():
    write("dfu", "status-busy", bytes([0x00, 0x64, 0x00, 0x00, 4, 0x00]))
    write("dfu", "functional", bytes([0x09, 0x21, 0x0b, 0xff, 0x00, 0x00, 0x08, 0x1a, 0x01]))
    write("dfu", "descriptors", bytes([0x05, 0x24, 0x00, 0x10, 0x01, 0x07, 0x21, 0x09, 0xff, 0x00, 0x00, 0x04]))
    for i, layout in enumerate(("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg",
                                "@Option Bytes  /0x1FFFC000/01*016 e",
                                "@Internal Flash   /0x08000000/08*128Kg,/0x08100000/08*128Kg",
                                "@SRAM /0x20000000/64*001Bg/0x90000000/2*1Md",
                                "@Top/0xFFFFF000/1*4Kg")):
        write("dfu", "layout-%d" % i, layout)


def picoboot_seeds():
    write("picoboot", "ok", struct.pack("<IIBB6x", 7, 0, 0x03, 0))
    write("picoboot", "bad-alignment", struct.pack("<IIBB6x", 8, 5, 0x05, 1))


def version_seeds():
    write("version", "equal", "v0.12.0-100-gabcdef12\nv0.12.0-100-gabcdef1")
    write("version", "dirty-stamp", "v0.13.0-46-g8c72b4a5-dirty-20240101_120000-raspberrypi\nv0.13.0-46-g8c72b4a5")
    write("version", "tag-sha", "v0.13.0\nabcdef12")
    write("version", "kalico", "v2025.01.00-12-g0123456a\n?")


def main():
    for target in ("image", "dictionary", "klipper", "katapult", "klippy", "printercfg", "config",
                   "canbus", "dfu", "picoboot", "version"):
        d = os.path.join(HERE, "seeds", target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    image_seeds()
    dictionary_seeds()
    klipper_seeds()
    katapult_seeds()
    klippy_seeds()
    printercfg_seeds()
    config_seeds()
    canbus_seeds()
    dfu_seeds()
    picoboot_seeds()
    version_seeds()


if __name__ == "__main__":
    main()
