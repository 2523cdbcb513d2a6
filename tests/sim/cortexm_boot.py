"""Would a Cortex-M start the image written at an address?  (For the
bootloader simulators: protocols.md §15.3.)

On reset or a bootloader's jump, a Cortex-M loads its stack pointer from
word 0 of the vector table and jumps to the reset handler in word 1.  An
image linked for another address has its reset handler outside the bytes
written there (or the table is not there at all): the real MCU faults
and, in these simulations, its bootloader stays.  check() says why an
image would not start, or None; it knows the RAM of each family Klipper
builds for.  Only the two words the core itself uses are looked at.
"""

import struct

# config.MCU prefix -> RAM ranges (start, size) the initial SP may top.
_RAM = [
    ("stm32h7", [(0x20000000, 0x20000), (0x24000000, 0x100000)]),
    ("stm32", [(0x20000000, 0x80000)]),
    ("rp2", [(0x20000000, 0x82000)]),
    ("sam3", [(0x20000000, 0x18000), (0x20070000, 0x18000)]),
    ("same70", [(0x20400000, 0x60000)]),
    ("sam", [(0x20000000, 0x40000)]),
    ("lpc176", [(0x10000000, 0x8000)]),
    ("hc32f460", [(0x1FFF8000, 0x30000)]),
]
# When the MCU type is not known: any of them.
_ANY_RAM = sorted({r for _, ranges in _RAM for r in ranges})


def ram_ranges(mcu):
    for prefix, ranges in _RAM:
        if mcu and mcu.startswith(prefix):
            return ranges
    return _ANY_RAM


def written(flash, base, address):
    """The bytes of @flash (a bytes-like starting at @base, 0xFF = erased)
    from @address to the last byte written."""
    data = bytes(flash[address - base:])
    return data.rstrip(b"\xff")


def check(image, address, mcu=None):
    """None if a Cortex-M of type @mcu starts @image (the bytes written
    from @address on); else the reason it does not."""
    if len(image) < 8:
        return "no vector table at 0x%08x" % address
    sp, reset = struct.unpack_from("<II", image)
    if not any(start < sp <= start + size for start, size in ram_ranges(mcu)):
        return "initial SP 0x%08x at 0x%08x is not in RAM" % (sp, address)
    if not reset & 1:
        return "reset vector 0x%08x is not Thumb code" % reset
    if not address <= (reset & ~1) < address + len(image):
        return ("reset handler 0x%08x lies outside the image written at 0x%08x (%d bytes)"
                % (reset & ~1, address, len(image)))
    return None
