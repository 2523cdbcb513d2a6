"""Katapult's bootloader protocol (protocols.md §5) for simulators, without
a transport.

KatapultCore is the bootloader's command processor: feed() takes bytes as
they arrive (from CAN frames, a USB CDC pty or a UART pty) and returns the
bytes to send back.  It behaves like Katapult's src/command.c and
src/flashcmd.c: frames 01 88 cmd nwords payload crc 99 03, one NACK after
malformed input and a resynchronisation on the next 0x01, CONNECT
(protocol version, application start, block size, MCU, Katapult version),
GET_CANBUS_ID (only when built for CAN, i.e. given a uuid), SEND_BLOCK,
SEND_EOF, REQUEST_BLOCK against a flash memory (a dict address -> block;
erased = 0xFF; the first block written to a page in a transfer erases that
page, as Katapult writes whole pages), COMPLETE, COMMAND_ERROR for
anything else.  After COMPLETE it calls on_complete(); the transport
decides when the "reset" happens (Katapult jumps to the application about
0.1 s later, COMPLETE_DELAY) and asks boot_target() what then runs: the
flashed image if it carries a Klipper data dictionary (§15.2), a foreign
application if it does not, the previous application if nothing was
flashed, or Katapult again when there is no application at all — or when
the flashed image would not start at the application address (its vector
table does not fit there, cortexm_boot.py; boot_failure says why).

It does no I/O, no timing and no threading: can_node.py (CAN) and
katapult_serial.py (USB CDC and UART ptys) do that.  Host-side helpers
(frame building, response parsing, CONNECT payload parsing) are here too.
"""

import struct

import cortexm_boot
import klipper_dict
import klipper_proto

DEFAULT_KATAPULT_VERSION = "v0.0.1-95-g2b22438"

CONNECT = 0x11
SEND_BLOCK = 0x12
SEND_EOF = 0x13
REQUEST_BLOCK = 0x14
COMPLETE = 0x15
GET_CANBUS_ID = 0x16
ACK = 0xA0
NACK = 0xF1
COMMAND_ERROR = 0xF2
BUSY = 0xF3
PRIME = 0x90                    # flashtool's dummy "prime" command
PROTO_VERSION = 0x00010100
MESSAGE_MIN = 8
MESSAGE_MAX = 128               # Katapult's command buffer with 64-byte blocks
COMPLETE_DELAY = 0.1
COMMAND_NAMES = {CONNECT: "CONNECT", SEND_BLOCK: "SEND_BLOCK", SEND_EOF: "SEND_EOF",
                 REQUEST_BLOCK: "REQUEST_BLOCK", COMPLETE: "COMPLETE",
                 GET_CANBUS_ID: "GET_CANBUS_ID", ACK: "ACK", NACK: "NACK",
                 COMMAND_ERROR: "COMMAND_ERROR", BUSY: "BUSY"}


def frame(cmd, payload=b""):
    """One Katapult frame (§5.1); @payload is padded to whole words."""
    payload = pad_words(bytes(payload))
    body = bytes([cmd, len(payload) // 4]) + payload
    return b"\x01\x88" + body + struct.pack("<H", klipper_proto.crc16(body)) + b"\x99\x03"


def pad_words(data):
    return data + b"\0" * (-len(data) % 4)


def parse_connect_payload(payload):
    """The CONNECT ACK payload (after the echoed command word) as a dict."""
    proto, start, block_size = struct.unpack_from("<III", payload)
    strings = [s.decode(errors="replace") for s in payload[12:].split(b"\0") if s]
    return {"proto_version": proto, "app_start": start, "block_size": block_size,
            "mcu": strings[0] if strings else "",
            "version": strings[1] if len(strings) > 1 else ""}


def find_klipper_dictionary(image):
    """JSON text of the first Klipper (or Kalico) data dictionary in a flat
    image, or None: klipper_dict.find_dictionary(), whose answer remembers
    the compression (zlib or bzip2) the image used."""
    return klipper_dict.find_dictionary(image)


class ResponseReader:
    """Host side: finds whole response frames in a byte stream.
    feed(data) returns [(code, payload)] of frames with a good CRC;
    malformed ones are returned as (None, raw bytes)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        out = []
        while True:
            start = self.buf.find(b"\x01\x88")
            if start < 0:
                del self.buf[:max(0, len(self.buf) - 1)]
                return out
            del self.buf[:start]
            if len(self.buf) < MESSAGE_MIN:
                return out
            length = self.buf[3] * 4 + 8
            if len(self.buf) < length:
                return out
            body = bytes(self.buf[:length])
            crc = body[-4] | body[-3] << 8
            if body[-2:] != b"\x99\x03" or klipper_proto.crc16(body[2:-4]) != crc:
                del self.buf[:2]
                out.append((None, body))
                continue
            del self.buf[:length]
            out.append((body[2], body[4:-4]))


class _Stats:
    """Counters when the caller does not share its own object."""
    naks_sent = 0
    responses_sent = 0
    requests = 0
    pages_written = 0


class KatapultCore:
    """The bootloader's command processor; see the module docstring.

    mcu, app_start, block_size, page_size, katapult_version, proto_version
                  what CONNECT reports and how flash is laid out (any block
                  size is accepted, so a test can offer one flashtool rejects)
    canbus_uuid   6 bytes for a CAN build (GET_CANBUS_ID answers), None else
    flash         dict address -> block_size bytes, shared with the caller
                  (persists across bootloader sessions if the caller keeps it)
    commands      list that receives (cmd, payload) of every valid frame
    stats         object whose naks_sent, responses_sent, requests and
                  pages_written are incremented (default: a private one,
                  readable as .stats)
    on_complete   callable() run (inside feed) when COMPLETE is acknowledged
    random        random.Random for the "garbage" behaviour (set .garbage
                  True: every valid frame is answered with junk instead)
    log           callable(text) for debug lines
    jump_to       where the MCU really starts the application (default
                  app_start): a Katapult that reports one start and jumps
                  to another, so that an image the host accepted can still
                  fail to start
    """

    def __init__(self, mcu, app_start=0x08002000, block_size=64, page_size=2048,
                 katapult_version=DEFAULT_KATAPULT_VERSION, proto_version=PROTO_VERSION,
                 canbus_uuid=None, flash=None, commands=None, stats=None, on_complete=None,
                 random=None, log=None, jump_to=None):
        self.mcu = mcu
        self.app_start = app_start
        self.block_size = block_size
        self.page_size = page_size
        self.katapult_version = katapult_version
        self.proto_version = proto_version
        self.canbus_uuid = canbus_uuid
        self.flash = flash if flash is not None else {}
        self.commands = commands if commands is not None else []
        self.stats = stats if stats is not None else _Stats()
        self.on_complete = on_complete
        self.random = random
        self.log = log
        self.garbage = False
        self.completes = 0
        self.boot_failure = None        # why the flashed image did not start, or None
        self.jump_to = jump_to
        self.reset()

    def reset(self):
        """A fresh boot: empty receive buffer, no transfer in progress."""
        self.buf = bytearray()
        self.need_sync = False
        self.nack_sent = False
        self.transfer_pages = set()

    def _debug(self, fmt, *args):
        if self.log:
            self.log(fmt % args if args else fmt)

    # -- input -------------------------------------------------------------

    def feed(self, data):
        """Process received bytes; returns the bytes to send back."""
        self.buf += data
        out = bytearray()
        buf = self.buf
        while buf:
            if self.need_sync:
                # Resynchronise on the next header byte.
                idx = buf.find(b"\x01")
                if idx < 0:
                    del buf[:]
                    break
                del buf[:idx]
                self.need_sync = False
                continue
            # Katapult looks at a frame's header once more than 4 bytes
            # are in.  Its command buffer holds a block and 64 bytes more
            # (128 with its 64-byte blocks): a frame whose word count says
            # more is NACKed then, never waited for.
            if len(buf) <= 4:
                break
            length = buf[3] * 4 + 8
            limit = self.block_size + 64
            if buf[0] != 0x01 or buf[1] != 0x88 or length > limit:
                self._error(out)
                continue
            if len(buf) < MESSAGE_MIN:
                break
            if len(buf) < length:
                break
            raw = bytes(buf[:length])
            crc = raw[length - 4] | raw[length - 3] << 8
            if raw[-2:] != b"\x99\x03" or klipper_proto.crc16(raw[2:length - 4]) != crc:
                self._error(out)
                continue
            del buf[:length]
            self.nack_sent = False
            if self.garbage:
                out += bytes(self.random.choice([b for b in range(256) if b != 0x01])
                             for _ in range(self.random.randint(8, 40)))
                continue
            out += self._dispatch(raw[2], raw[4:length - 4])
        return bytes(out)

    def _error(self, out):
        del self.buf[0]                 # the start of the bad frame
        self.need_sync = True
        if not self.nack_sent:
            self.nack_sent = True
            self.stats.naks_sent += 1
            out += frame(NACK)

    def _ack(self, cmd, extra=b""):
        self.stats.responses_sent += 1
        return frame(ACK, struct.pack("<I", cmd) + extra)

    def _dispatch(self, cmd, payload):
        self.commands.append((cmd, bytes(payload)))
        self.stats.requests += 1
        self._debug("katapult command 0x%02x (%s), %d bytes", cmd,
                    COMMAND_NAMES.get(cmd, "?"), len(payload))
        if cmd == CONNECT:
            extra = struct.pack("<III", self.proto_version, self.app_start, self.block_size)
            extra += pad_words(self.mcu.encode())
            if self.proto_version >= 0x00010100:
                extra += b"\0\0\0\0" + pad_words(self.katapult_version.encode())
            return self._ack(cmd, extra)
        if cmd == GET_CANBUS_ID and self.canbus_uuid is not None:
            return self._ack(cmd, bytes(self.canbus_uuid) + b"\0\0")
        if cmd == SEND_BLOCK:
            if len(payload) != 4 + self.block_size:
                return frame(COMMAND_ERROR)
            address = struct.unpack_from("<I", payload)[0]
            if address < self.app_start or (address - self.app_start) % self.block_size:
                return frame(COMMAND_ERROR)
            page = address // self.page_size
            if page not in self.transfer_pages:
                # Katapult writes whole pages: the page's old content goes.
                self.transfer_pages.add(page)
                for old in [a for a in self.flash if a // self.page_size == page]:
                    del self.flash[old]
            self.flash[address] = bytes(payload[4:])
            return self._ack(cmd, struct.pack("<I", address))
        if cmd == SEND_EOF:
            pages = len(self.transfer_pages)
            self.stats.pages_written += pages
            self.transfer_pages = set()
            return self._ack(cmd, struct.pack("<I", pages))
        if cmd == REQUEST_BLOCK:
            if len(payload) < 4:
                return frame(COMMAND_ERROR)
            address = struct.unpack_from("<I", payload)[0]
            block = self.flash.get(address, b"\xff" * self.block_size)
            return self._ack(cmd, struct.pack("<I", address) + block)
        if cmd == COMPLETE:
            self.completes += 1
            reply = self._ack(cmd)
            if self.on_complete:
                self.on_complete()
            return reply
        return frame(COMMAND_ERROR)

    # -- state for the transport -------------------------------------------

    def image(self, start=None):
        """The flashed bytes from app_start (or @start, block-aligned) to
        the end of the highest block."""
        if not self.flash:
            return b""
        end = max(self.flash) + self.block_size
        return b"".join(self.flash.get(a, b"\xff" * self.block_size)
                        for a in range(self.app_start if start is None else start, end, self.block_size))

    def boot_target(self, app_dictionary):
        """What Katapult's application jump leads to, given the dictionary
        of the application that was there before (None: none):
        ("klipper", dictionary JSON), ("foreign", None) for a flashed image
        without a Klipper dictionary, or ("katapult", None) when there is
        no application (Katapult stays)."""
        self.boot_failure = None
        if self.flash:
            jump = self.app_start if self.jump_to is None else self.jump_to
            self.boot_failure = cortexm_boot.check(self.image(jump).rstrip(b"\xff"), jump, self.mcu)
            if self.boot_failure:
                self._debug("the application does not start (%s): Katapult stays", self.boot_failure)
                return "katapult", None
            dictionary = find_klipper_dictionary(self.image())
            if dictionary is None:
                return "foreign", None
            return "klipper", dictionary
        if app_dictionary is None:
            return "katapult", None
        return "klipper", app_dictionary
