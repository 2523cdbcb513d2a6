#!/usr/bin/python3
"""Build Cortex-M test firmware that is laid out like real Klipper builds.

startup.c and link.ld.in are compiled with Debian's arm-none-eabi-gcc for
each family and link address of VARIANTS (protocols.md §15.3, §15.4): the
reset handler tens of KiB into the image, a .data copy whose literals name
the link address, SCB->VTOR set to the vector table on STM32 (a table copy
on Cortex-M0), RP2040 handlers running from RAM, and a zlib-compressed
Klipper data dictionary from tests/sim/klipper_dict.py.  Outputs per
variant: NAME.elf, NAME.bin (objcopy -O binary), NAME.hex (Intel HEX) and,
for an RP2040 at 0x10000000, NAME.uf2; NAME is MCU-LINKADDRESS, e.g.
stm32f103xe-08002000.  The files are test inputs, not runnable firmware.

When arm-none-eabi-gcc is missing, compiler() returns None and
`fwimage.py --outdir DIR` writes DIR/SKIPPED with the reason (the tests that
need the images skip then).

CLI: fwimage.py --outdir DIR [--version V] [--stamp FILE]
"""

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "sim"))
import klipper_dict  # noqa: E402

DEFAULT_VERSION = "v0.13.0-730-g1a2b3c4d"
PAD_SIZE = 0x6800                   # the reset handler lands ~0x6C00 in
UF2_FAMILY_RP2040 = 0xE48BFF56


class Variant:
    def __init__(self, mcu, start, cpu, ram_start, ram_length, stack_end, vtor=None, ram_handlers=False,
                 boot2=False, link="usb", flash_length=0x100000):
        self.mcu = mcu
        self.start = start
        self.cpu = cpu
        self.ram_start = ram_start
        self.ram_length = ram_length
        self.stack_end = stack_end
        self.vtor = vtor                # None, "vtor" or "copy"
        self.ram_handlers = ram_handlers
        self.boot2 = boot2
        self.link = link
        self.flash_length = flash_length

    @property
    def name(self):
        return "%s-%08x" % (self.mcu, self.start)

    @property
    def vector_address(self):
        return self.start + 0x100 if self.boot2 else self.start

    def formats(self):
        out = ["elf", "bin", "hex"]
        if self.boot2:
            out.append("uf2")
        return out


# config.MCU prefix -> (CPU, RAM start, initial SP, VTOR kind, handlers in RAM)
# (protocols.md §15.3).  Cortex-M0 (STM32F0) has no VTOR: its bootloader
# builds copy the table to RAM ("copy"); SAMD, SAM3X and LPC176x startup
# code sets no VTOR.
FAMILIES = [
    ("stm32f0", ("cortex-m0", 0x20000000, 0x20004000, "copy", False)),
    ("stm32f1", ("cortex-m3", 0x20000000, 0x20010000, "vtor", False)),
    ("stm32f4", ("cortex-m4", 0x20000000, 0x20020000, "vtor", False)),
    ("stm32f429", ("cortex-m4", 0x20000000, 0x20030000, "vtor", False)),
    ("stm32g0", ("cortex-m0plus", 0x20000000, 0x20024000, "vtor", False)),
    ("stm32h7", ("cortex-m7", 0x20000000, 0x20020000, "vtor", False)),
    ("samd21", ("cortex-m0plus", 0x20000000, 0x20008000, None, False)),
    ("samd51", ("cortex-m4", 0x20000000, 0x20040000, None, False)),
    ("sam3x", ("cortex-m3", 0x20000000, 0x20018000, None, False)),
    ("lpc176", ("cortex-m3", 0x10000000, 0x10008000, None, False)),
    ("rp2040", ("cortex-m0plus", 0x20000000, 0x20042000, "vtor", True)),
]
FLASH_BASES = {"stm32": 0x08000000, "rp2040": 0x10000000, "sam3x": 0x80000}


def make_variant(mcu, start, link="usb"):
    """A Variant for any @mcu of FAMILIES linked at @start (an RP2040 at
    0x10000000 is a no-bootloader build with boot2)."""
    found = None
    for prefix, values in FAMILIES:
        if mcu.startswith(prefix) and (found is None or len(prefix) > len(found[0])):
            found = (prefix, values)
    if found is None:
        raise KeyError("fwimage knows no family for %s" % mcu)
    cpu, ram_start, stack_end, vtor, ram_handlers = found[1]
    base = next((b for p, b in FLASH_BASES.items() if mcu.startswith(p)), 0)
    if vtor == "copy" and start == base:
        vtor = None             # nothing to relocate without a bootloader
    boot2 = mcu.startswith("rp2040") and start == 0x10000000
    return Variant(mcu, start, cpu, ram_start, stack_end - ram_start, stack_end, vtor=vtor,
                   ram_handlers=ram_handlers, boot2=boot2, link=link,
                   flash_length=0x200000 if mcu.startswith("rp2040") else 0x100000)


# protocols.md §15.3/§15.4: each family at the link addresses Klipper offers.
VARIANTS = [
    make_variant("stm32f072xb", 0x08000000, link="can"),
    make_variant("stm32f072xb", 0x08002000, link="can"),
    make_variant("stm32f103xe", 0x08000000),
    make_variant("stm32f103xe", 0x08002000),
    make_variant("stm32f103xe", 0x08000800),
    make_variant("stm32f429xx", 0x08000000),
    make_variant("stm32f429xx", 0x08008000),
    make_variant("stm32f429xx", 0x08004000),
    make_variant("stm32g0b1xx", 0x08002000, link="can"),
    make_variant("stm32h723xx", 0x08020000, link="canbridge"),
    make_variant("samd21g18a", 0x2000),
    make_variant("samd21g18a", 0x0),
    make_variant("samd51p20a", 0x4000),
    # SAM3X: no bootloader (ROM SAM-BA), SP at the top of SRAM0+SRAM1.
    make_variant("sam3x8e", 0x80000),
    make_variant("lpc1769", 0x4000),
    make_variant("lpc1769", 0x0),
    make_variant("rp2040", 0x10004000),
    make_variant("rp2040", 0x10000000),
]


def compiler():
    """The cross compiler's path, or None."""
    return shutil.which("arm-none-eabi-gcc")


def objcopy():
    return shutil.which("arm-none-eabi-objcopy")


def _uf2(address, data, family):
    payload = 256
    blocks = [data[i:i + payload] for i in range(0, len(data), payload)]
    out = b""
    for n, block in enumerate(blocks):
        block = block + b"\0" * (payload - len(block))
        header = struct.pack("<8I", 0x0A324655, 0x9E5D5157, 0x2000, address + n * payload, payload,
                             n, len(blocks), family)
        out += header + block + b"\0" * (476 - payload) + struct.pack("<I", 0x0AB16F30)
    return out


def build(v, outdir, version=DEFAULT_VERSION, name=None, extra_config=None):
    """Compile variant @v into @outdir; returns {format: path}."""
    gcc, copy = compiler(), objcopy()
    if not gcc or not copy:
        raise RuntimeError("arm-none-eabi-gcc/objcopy not installed (Debian: gcc-arm-none-eabi "
                           "binutils-arm-none-eabi)")
    name = name or v.name
    os.makedirs(outdir, exist_ok=True)
    _, compressed = klipper_dict.build(version, v.mcu, link=v.link, extra_config=extra_config)
    with tempfile.TemporaryDirectory(prefix="fwimage-") as tmp:
        with open(os.path.join(tmp, "fwimage-config.h"), "w") as f:
            f.write("#define FW_PAD_SIZE 0x%x\n" % PAD_SIZE)
            f.write("#define FW_DICT_BYTES %s\n" % ",".join("0x%02x" % b for b in compressed))
        with open(os.path.join(HERE, "link.ld.in")) as f:
            script = f.read()
        for key, value in (("FLASH_START", v.start), ("FLASH_LENGTH", v.flash_length),
                           ("RAM_START", v.ram_start), ("RAM_LENGTH", v.ram_length),
                           ("STACK_END", v.stack_end)):
            script = script.replace("@%s@" % key, "0x%x" % value)
        ld = os.path.join(tmp, "link.ld")
        with open(ld, "w") as f:
            f.write(script)
        defines = []
        if v.vtor == "vtor":
            defines.append("-DFW_VTOR")
        elif v.vtor == "copy":
            defines.append("-DFW_VTOR_COPY")
        if v.ram_handlers:
            defines.append("-DFW_RAM_HANDLERS")
        if v.boot2:
            defines.append("-DFW_BOOT2")
        elf = os.path.join(outdir, name + ".elf")
        subprocess.run([gcc, "-mthumb", "-mcpu=" + v.cpu, "-O2", "-std=gnu11", "-ffreestanding", "-nostdlib",
                        "-fno-builtin", "-fno-tree-loop-distribute-patterns", "-Wall", "-Werror",
                        "-I", tmp] + defines +
                       [os.path.join(HERE, "startup.c"), "-Wl,-T," + ld, "-Wl,--build-id=none", "-o", elf],
                       check=True)
    out = {"elf": elf}
    for fmt, target in (("bin", "binary"), ("hex", "ihex")):
        path = os.path.join(outdir, name + "." + fmt)
        subprocess.run([copy, "-O", target, elf, path], check=True)
        out[fmt] = path
    if v.boot2:
        with open(out["bin"], "rb") as f:
            data = f.read()
        out["uf2"] = os.path.join(outdir, name + ".uf2")
        with open(out["uf2"], "wb") as f:
            f.write(_uf2(v.start, data, UF2_FAMILY_RP2040))
    return out


def build_bytes(mcu, start, fmt, version=DEFAULT_VERSION, link="usb", extra_config=None):
    """The bytes of one image of @mcu linked at @start (tests), built in a
    temporary directory."""
    v = make_variant(mcu, start, link=link)
    with tempfile.TemporaryDirectory(prefix="fwimage-out-") as tmp:
        paths = build(v, tmp, version=version, extra_config=extra_config)
        with open(paths[fmt], "rb") as f:
            return f.read()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build Klipper-like Cortex-M test images.")
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--stamp", help="file to touch when done")
    args = parser.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    skipped = os.path.join(args.outdir, "SKIPPED")
    if not compiler() or not objcopy():
        with open(skipped, "w") as f:
            f.write("arm-none-eabi-gcc is not installed (Debian: gcc-arm-none-eabi binutils-arm-none-eabi)\n")
    else:
        if os.path.exists(skipped):
            os.unlink(skipped)
        for v in VARIANTS:
            build(v, args.outdir, version=args.version)
    if args.stamp:
        with open(args.stamp, "w") as f:
            f.write("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
