#!/usr/bin/python3
"""Build realistic Klipper firmware images for tests and the demo.

build(mcu, version, start, fmt) lays out what a Klipper build puts into
flash (protocols.md §15.3): a Cortex-M vector table (initial SP = top of the
family's RAM, the reset handler tens of KiB in like in real builds, RP2040
handlers in RAM), filler standing in for code, the reset handler's literal
pool (.data copy source/start/end, the VTOR value), .rodata holding
strings and the compressed data dictionary from klipper_dict.build() (zlib;
bzip2 as Kalico does, and an embedded build config, when asked) at an
unaligned offset, and .data's initial values last.  Images compiled
from real startup code are tests/tools/fwimage (which needs
arm-none-eabi-gcc); these need nothing and are the same in the respects
the daemon checks.  The result is encoded as a raw .bin,
a minimal ELF32 ARM executable (PT_LOAD segments at their load addresses,
as `readelf -l` shows them), Intel HEX (with type 04 records) or UF2
(256-byte payloads).  RP2040 UF2 images start at 0x10000000 with a 256-byte
boot2 stage and the vector table at 0x10000100.  The bytes are not
executable firmware.

For the Linux process MCU (mcu "linux") build() returns what Klipper's
"linux" target leaves in out/klipper.elf: a 64-bit little-endian PIE for
the host's machine (x86-64 unless told otherwise) with PT_PHDR, PT_INTERP
and PT_LOAD headers and the dictionary in its .rodata; image_version()
reads the version back out of such a file, as klipper_mcu would answer.

CLI: mkimage.py --mcu stm32f429xx --version V --start 0x08008000 --format bin -o out.bin
"""

import argparse
import os
import random
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sim"))
import klipper_dict  # noqa: E402

# Top of RAM (initial stack pointer) per MCU prefix.
_RAM_TOP = [
    ("stm32f0", 0x20004000),
    ("stm32f1", 0x20010000),
    ("stm32f2", 0x20020000),
    ("stm32f4", 0x20020000),
    ("stm32f7", 0x20040000),
    ("stm32g0", 0x20024000),
    ("stm32g4", 0x20020000),
    ("stm32h7", 0x20020000),
    ("stm32l4", 0x20018000),
    ("rp2040", 0x20042000),
    ("rp2350", 0x20082000),
    ("samd21", 0x20008000),
    ("samc21", 0x20008000),
    ("samd51", 0x20030000),
    ("same70", 0x20460000),
    ("lpc176", 0x10008000),
]

# UF2 family ids (protocols.md §7.4 and the UF2 family list).
_UF2_FAMILY = [
    ("rp2040", 0xE48BFF56),
    ("rp2350", 0xE48BFF59),
    ("stm32f1", 0x5EE21072),
    ("stm32f4", 0x57755A57),
    ("stm32g0", 0x300F5633),
    ("stm32h7", 0x6DB66082),
]

RP2040_UF2_FAMILY = 0xE48BFF56
UF2_FLAG_FAMILY_ID = 0x2000
VECTOR_COUNT = 64           # 16 system + 48 IRQ vectors = 0x100 bytes


def _lookup(table, mcu, default=None):
    for prefix, value in table:
        if mcu.startswith(prefix):
            return value
    return default


def ram_top(mcu):
    return _lookup(_RAM_TOP, mcu, 0x20010000)


def _thumb_filler(rng, n):
    """Bytes that look like Thumb code (16-bit little-endian halfwords)."""
    ops = [0xB580, 0xAF00, 0x4618, 0x6803, 0x2B00, 0xD0FB, 0xBD80, 0x4770, 0xF000, 0xF800,
           0x6013, 0x3301, 0x681B, 0x4A05, 0x4B06, 0xE7FE, 0x2200, 0x601A, 0x0000, 0xBF00]
    out = bytearray()
    while len(out) < n:
        out += struct.pack("<H", rng.choice(ops))
    return bytes(out[:n])


def _rodata_strings():
    return b"".join(s.encode() + b"\0" for s in (
        "Timer too close", "Move queue overflow", "Rescheduled timer in the past",
        "Stepper too far in past", "Invalid oid type", "sentinel timer called"))


DATA_SIZE = 0x90            # bytes of .data initial values, stored last


def reset_offset(size):
    """Where the reset handler sits in an image of @size bytes: real builds
    have it ~0x6000-0x7700 in (protocols.md §15.3), smaller ones 3/5 in."""
    return min(0x6F38, (size * 3 // 5) & ~0x7)


def flat_image(mcu, version, start, size=20 * 1024, ram_top_address=None, link="usb", **dict_args):
    """The application bytes from the vector table on, linked at @start,
    laid out like a real build (protocols.md §15.3): the handlers tens of
    KiB in (behind stand-in code), the reset handler's literal pool with
    the .data copy's flash source, RAM start and end (the initial values
    are the image's last DATA_SIZE bytes) and, on STM32 and RP2040, the
    vector table's address for SCB->VTOR; RP2040 handlers other than reset
    run from RAM.  @dict_args (app, kconfig, compression) go to
    klipper_dict.build()."""
    rng = random.Random("%s-%s-%x" % (mcu, version, start))
    sp = ram_top_address if ram_top_address is not None else ram_top(mcu)
    ram_base = 0x10000000 if mcu.startswith("lpc176") else 0x20000000
    table_size = VECTOR_COUNT * 4
    size = max(size, 4096)
    size += (-size) % 4
    handlers_at = reset_offset(size) - 0x100
    reset = start + reset_offset(size) + 1
    if mcu.startswith("rp2040"):
        default_handler = ram_base + 0x7A61             # runs from RAM
        other = lambda i: ram_base + 0x7A01 + 4 * i     # noqa: E731
    else:
        default_handler = start + handlers_at + 0x21
        other = lambda i: start + handlers_at + 0x41 + 4 * i  # noqa: E731
    vectors = [sp, reset]
    for i in range(2, VECTOR_COUNT):
        if i in (7, 8, 9, 10, 13):             # reserved system vectors
            vectors.append(0)
        elif i < 16:
            vectors.append(other(i))
        else:
            vectors.append(default_handler)
    table = struct.pack("<%dI" % VECTOR_COUNT, *vectors)

    _, compressed = klipper_dict.build(version, mcu, link=link, **dict_args)
    code = _thumb_filler(rng, handlers_at - table_size)
    # The handlers, then the reset handler: copy .data, clear .bss, set
    # VTOR; its literal pool follows.
    handlers = _thumb_filler(rng, 0x100)
    reset_code = _thumb_filler(rng, 0x3C)
    pool = struct.pack("<III", ram_base, ram_base + DATA_SIZE, start + size - DATA_SIZE)
    pool += struct.pack("<II", ram_base + 0x100, ram_base + 0x400)      # .bss start, end
    if mcu.startswith("stm32") or mcu.startswith("rp2040"):
        pool += struct.pack("<I", start)                                 # SCB->VTOR
    rodata = _rodata_strings() + b"\x01\x02\x03"   # the dictionary is not aligned
    body = table + code + handlers + reset_code + pool + rodata + compressed + _rodata_strings()
    tail = size - DATA_SIZE
    if len(body) < tail:
        body += _thumb_filler(rng, tail - len(body))
    body += (-len(body)) % 4 * b"\0"
    data = struct.pack("<4I", 1, 2, 3, 5) + bytes(rng.randrange(256) for _ in range(DATA_SIZE - 16))
    return body + data


def _elf(segments, entry):
    """ELF32 LE ARM executable.

    @segments: list of (name, vaddr, paddr, data, memsz, flags); each gets a
    PT_LOAD program header and a section header (so objcopy can read it).
    """
    ehsize, phentsize, shentsize = 52, 32, 40
    phoff = ehsize
    data_off = (phoff + phentsize * len(segments) + 0xFFF) & ~0xFFF
    phdrs = b""
    blob = b""
    offsets = []
    for name, vaddr, paddr, data, memsz, flags in segments:
        offset = data_off + len(blob)
        offsets.append(offset)
        phdrs += struct.pack("<8I", 1, offset if data else 0, vaddr, paddr, len(data), memsz,
                             flags, 0x1000 if data else 4)
        blob += data
        blob += b"\0" * ((-len(blob)) % 4)
    names = b"\0" + b"".join(seg[0].encode() + b"\0" for seg in segments) + b".shstrtab\0"
    strtab_off = data_off + len(blob)
    shoff = (strtab_off + len(names) + 3) & ~3
    shdrs = b"\0" * shentsize
    name_pos = 1
    for (name, vaddr, paddr, data, memsz, flags), offset in zip(segments, offsets):
        sh_type = 1 if data else 8                              # PROGBITS / NOBITS
        sh_flags = 0x2 | (0x4 if flags & 1 else 0x1)            # ALLOC + EXECINSTR / WRITE
        shdrs += struct.pack("<10I", name_pos, sh_type, sh_flags, vaddr, offset,
                             len(data) if data else memsz, 0, 0, 4, 0)
        name_pos += len(name) + 1
    shdrs += struct.pack("<10I", name_pos, 3, 0, 0, strtab_off, len(names), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 40, 1, entry, phoff, shoff, 0x05000200,
                                 ehsize, phentsize, len(segments), shentsize, len(segments) + 2,
                                 len(segments) + 1)
    out = header + phdrs
    out += b"\0" * (data_off - len(out))
    out += blob + names
    out += b"\0" * (shoff - len(out))
    return out + shdrs


def _hex(chunks, entry):
    """Intel HEX with type 04 records; @chunks: list of (address, data)."""
    lines = []

    def record(rtype, address, data):
        raw = bytes([len(data), (address >> 8) & 0xFF, address & 0xFF, rtype]) + data
        checksum = (-sum(raw)) & 0xFF
        lines.append(":" + (raw + bytes([checksum])).hex().upper())

    upper = None
    for address, data in chunks:
        pos = 0
        while pos < len(data):
            a = address + pos
            # At most 16 bytes, and never across a 64 KiB boundary.
            n = min(16, len(data) - pos, 0x10000 - (a & 0xFFFF))
            if (a >> 16) != upper:
                upper = a >> 16
                record(0x04, 0, struct.pack(">H", upper))
            record(0x00, a & 0xFFFF, data[pos:pos + n])
            pos += n
    record(0x05, 0, struct.pack(">I", entry))
    record(0x01, 0, b"")
    return ("\n".join(lines) + "\n").encode()


def _uf2(address, data, family):
    payload = 256
    blocks = [data[i:i + payload] for i in range(0, len(data), payload)]
    out = b""
    for n, block in enumerate(blocks):
        block = block + b"\0" * (payload - len(block))
        flags = UF2_FLAG_FAMILY_ID if family is not None else 0
        header = struct.pack("<8I", 0x0A324655, 0x9E5D5157, flags, address + n * payload, payload,
                             n, len(blocks), family if family is not None else 0)
        out += header + block + b"\0" * (476 - payload) + struct.pack("<I", 0x0AB16F30)
    return out


def _boot2(rng):
    code = _thumb_filler(rng, 252)
    return code + struct.pack("<I", 0x7A4EB274)   # stands in for the CRC32 of boot2


# ELF e_machine of the Linux machines the host-program builder knows.
ELF_MACHINES = {"x86-64": 62, "aarch64": 183, "arm": 40, "i386": 3, "riscv": 243}


def host_machine():
    """The ELF machine name of this host (os.uname)."""
    machine = os.uname().machine
    return {"x86_64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64", "i686": "i386",
            "riscv64": "riscv"}.get(machine, "arm" if machine.startswith("arm") else machine)


def host_program(version, machine=None, size=48 * 1024):
    """klipper_mcu as Klipper's "linux" build links it: ELF64 LE ET_DYN."""
    machine = machine or host_machine()
    rng = random.Random("linux-%s-%s" % (version, machine))
    _, compressed = klipper_dict.build(version, "linux", link="serial")
    interp = b"/lib64/ld-linux-x86-64.so.2\0" if machine == "x86-64" else b"/lib/ld-linux-aarch64.so.1\0"
    ehsize, phentsize, phnum = 64, 56, 3
    phoff = ehsize
    interp_off = phoff + phentsize * phnum
    text_off = (interp_off + len(interp) + 0xF) & ~0xF
    text = _thumb_filler(rng, 0x3000)
    rodata = _rodata_strings() + b"\x05\x06\x07" + compressed + _rodata_strings()
    body = text + rodata
    if len(body) + text_off < size:
        body += _thumb_filler(rng, size - len(body) - text_off)
    total = text_off + len(body)
    phdrs = struct.pack("<IIQQQQQQ", 6, 4, phoff, phoff, phoff, phentsize * phnum, phentsize * phnum, 8)
    phdrs += struct.pack("<IIQQQQQQ", 3, 4, interp_off, interp_off, interp_off, len(interp), len(interp), 1)
    phdrs += struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, total, total, 0x1000)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, ELF_MACHINES[machine], 1, text_off + 0x41, phoff, 0, 0,
                                 ehsize, phentsize, phnum, 64, 0, 0)
    out = header + phdrs + interp
    out += b"\0" * (text_off - len(out))
    return out + body


def image_version(data):
    """The version in the first Klipper data dictionary inside @data, or None."""
    import json
    text = klipper_dict.find_dictionary(data)
    return json.loads(text).get("version") if text is not None else None


def build(mcu, version, start, fmt="bin", size=20 * 1024, ram_top=None, link="usb", **dict_args):
    """A Klipper image for @mcu (config.MCU) with @version, linked at @start.

    fmt: "bin", "elf", "hex" or "uf2".  dict_args: app ("Klipper", "Kalico"),
    kconfig (the embedded build config), compression ("zlib", "bzip2") of
    the dictionary, as klipper_dict.build() takes them.  For an RP2040 UF2 at 0x10000000 the
    image includes boot2 and the vector table sits at 0x10000100.
    """
    if mcu == "linux":
        if fmt != "elf":
            raise ValueError("a Linux process MCU image is an ELF program")
        return host_program(version)
    app_start = start
    prefix = b""
    if mcu.startswith("rp2040") and start == 0x10000000:
        prefix = _boot2(random.Random(version))
        app_start = start + 0x100
    app = flat_image(mcu, version, app_start, size=size, ram_top_address=ram_top, link=link, **dict_args)
    image = prefix + app
    entry = app_start + reset_offset(len(app)) + 1
    if fmt == "bin":
        return image
    if fmt == "elf":
        # .text at its address, .data's initial values loaded right behind
        # it (LMA in flash, VMA in RAM), .bss without file contents.
        data_init = struct.pack("<8I", *range(8))
        return _elf([(".text", start, start, image, len(image), 5),
                     (".data", 0x20000000, start + len(image), data_init, len(data_init), 6),
                     (".bss", 0x20000000 + len(data_init), 0x20000000 + len(data_init), b"", 0x400, 6)],
                    entry)
    if fmt == "hex":
        return _hex([(start, image)], entry)
    if fmt == "uf2":
        return _uf2(start, image, _lookup(_UF2_FAMILY, mcu))
    raise ValueError("unknown format %r" % fmt)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a realistic Klipper firmware image.")
    parser.add_argument("--mcu", required=True, help="config.MCU, e.g. stm32f429xx")
    parser.add_argument("--version", required=True, help="firmware version, e.g. v0.13.0-46-g8c72b4a5")
    parser.add_argument("--start", default=0, type=lambda s: int(s, 0), help="link address")
    parser.add_argument("--format", default="bin", choices=("bin", "elf", "hex", "uf2"))
    parser.add_argument("--size", default=20 * 1024, type=lambda s: int(s, 0), help="approximate size")
    parser.add_argument("--ram-top", default=None, type=lambda s: int(s, 0), help="initial stack pointer")
    parser.add_argument("--link", default="usb", choices=("usb", "serial", "can", "canbridge"))
    parser.add_argument("--app", default="Klipper", help='dictionary "app" (Klipper, Kalico)')
    parser.add_argument("--kconfig", default=None, metavar="FILE",
                        help="embed this build config (savedefconfig text) in the dictionary")
    parser.add_argument("--compression", default="zlib", choices=("zlib", "bzip2"))
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    kconfig = None
    if args.kconfig is not None:
        with open(args.kconfig) as f:
            kconfig = f.read()
    data = build(args.mcu, args.version, args.start, fmt=args.format, size=args.size,
                 ram_top=args.ram_top, link=args.link, app=args.app, kconfig=kconfig,
                 compression=args.compression)
    with open(args.output, "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
