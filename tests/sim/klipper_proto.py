"""Klipper's MCU message protocol for test simulators and test code.

Written from protocols.md section 1 (not copied from Klipper): the CRC16
(CRC-16/MCRF4XX, byte-wise form), VLQ integers, message ids, message blocks,
message encoding/decoding from a Klipper format string, and a stream
decoder that resynchronises on garbage the way the firmware does.  Both the
MCU side (klipper_mcu.py) and host-side test code use it.

It does not do I/O, timing, retransmission or sequence bookkeeping: callers
own the file descriptor and decide what to send when.
"""

import bz2
import re
import zlib

MESSAGE_MIN = 5
MESSAGE_MAX = 64
MESSAGE_HEADER_SIZE = 2
MESSAGE_TRAILER_SIZE = 3
MESSAGE_PAYLOAD_MAX = MESSAGE_MAX - MESSAGE_MIN
MESSAGE_DEST = 0x10
MESSAGE_SEQ_MASK = 0x0F
MESSAGE_SYNC = 0x7E

MSGID_IDENTIFY_RESPONSE = 0
MSGID_IDENTIFY = 1
IDENTIFY_FORMAT = "identify offset=%u count=%c"
IDENTIFY_RESPONSE_FORMAT = "identify_response offset=%u data=%.*s"
IDENTIFY_CHUNK = 40


class ProtocolError(ValueError):
    """Input that is not valid Klipper protocol."""


def crc16(data):
    """CRC-16/MCRF4XX (init 0xffff, reflected 0x1021) as Klipper computes it."""
    crc = 0xFFFF
    for b in data:
        d = (b ^ (crc & 0xFF)) & 0xFF
        d ^= (d & 0x0F) << 4
        d &= 0xFF
        crc = (((d << 8) | (crc >> 8)) ^ (d >> 4) ^ (d << 3)) & 0xFFFF
    return crc


def vlq_encode(value):
    """Encode a signed/unsigned 32-bit integer as a Klipper VLQ."""
    if value < -(1 << 31) or value >= (1 << 32):
        raise ValueError("value %d does not fit 32 bits" % value)
    out = bytearray()
    if value >= 0xC000000 or value < -0x4000000:
        out.append(((value >> 28) & 0x7F) | 0x80)
    if value >= 0x180000 or value < -0x80000:
        out.append(((value >> 21) & 0x7F) | 0x80)
    if value >= 0x3000 or value < -0x1000:
        out.append(((value >> 14) & 0x7F) | 0x80)
    if value >= 0x60 or value < -0x20:
        out.append(((value >> 7) & 0x7F) | 0x80)
    out.append(value & 0x7F)
    return bytes(out)


def vlq_decode(data, pos=0):
    """Decode one VLQ at data[pos]; returns (signed 32-bit value, new pos)."""
    if pos >= len(data):
        raise ProtocolError("VLQ truncated")
    first = data[pos]
    pos += 1
    if (first & 0x60) == 0x60:
        value = -0x20 | (first & 0x7F)
    else:
        value = first & 0x7F
    b = first
    count = 1
    while b & 0x80:
        if pos >= len(data):
            raise ProtocolError("VLQ truncated")
        if count >= 5:
            raise ProtocolError("VLQ longer than 5 bytes")
        b = data[pos]
        pos += 1
        count += 1
        value = (value << 7) | (b & 0x7F)
    value &= 0xFFFFFFFF
    if value >= (1 << 31):
        value -= 1 << 32
    return value, pos


def msgid_decode(data, pos=0):
    """Parse a message id the way the MCU does: 1 byte, or 2 when bit 7 of
    the first is set.  Returns (internal id, new pos)."""
    if pos >= len(data):
        raise ProtocolError("message id truncated")
    b0 = data[pos]
    if not b0 & 0x80:
        return b0, pos + 1
    if pos + 1 >= len(data):
        raise ProtocolError("message id truncated")
    return ((b0 & 0x7F) << 7) | data[pos + 1], pos + 2


def dict_id_to_internal(dict_id):
    """Map an id as stored in a data dictionary (the VLQ-decoded value of
    the encoded id, possibly negative) to the MCU's internal id."""
    internal, _ = msgid_decode(vlq_encode(dict_id))
    return internal


def internal_to_dict_id(internal):
    """Inverse of dict_id_to_internal (what a build writes into the JSON)."""
    if internal >= 1 << 14 or internal < 0:
        raise ValueError("message id %d out of range" % internal)
    if internal < 0x80:
        encoded = bytes([internal])
    else:
        encoded = bytes([(internal >> 7) | 0x80, internal & 0x7F])
    value, _ = vlq_decode(encoded)
    return value


def build_block(seq, content=b""):
    """One message block: len, 0x10|seq, content, CRC (big-endian), 0x7e."""
    content = bytes(content)
    if len(content) > MESSAGE_PAYLOAD_MAX:
        raise ValueError("content of %d bytes exceeds %d" % (len(content), MESSAGE_PAYLOAD_MAX))
    head = bytes([len(content) + MESSAGE_MIN, MESSAGE_DEST | (seq & MESSAGE_SEQ_MASK)]) + content
    crc = crc16(head)
    return head + bytes([crc >> 8, crc & 0xFF, MESSAGE_SYNC])


def parse_block(block):
    """Check one complete block; returns (seq 0..15, content bytes)."""
    block = bytes(block)
    if len(block) < MESSAGE_MIN:
        raise ProtocolError("block shorter than %d bytes" % MESSAGE_MIN)
    length = block[0]
    if length != len(block):
        raise ProtocolError("length byte %d but %d bytes" % (length, len(block)))
    if length > MESSAGE_MAX:
        raise ProtocolError("block longer than %d bytes" % MESSAGE_MAX)
    if block[1] & ~MESSAGE_SEQ_MASK != MESSAGE_DEST:
        raise ProtocolError("bad sequence byte 0x%02x" % block[1])
    if block[-1] != MESSAGE_SYNC:
        raise ProtocolError("no sync byte at end")
    crc = crc16(block[:-MESSAGE_TRAILER_SIZE])
    if (block[-3] << 8 | block[-2]) != crc:
        raise ProtocolError("bad CRC")
    return block[1] & MESSAGE_SEQ_MASK, block[MESSAGE_HEADER_SIZE:-MESSAGE_TRAILER_SIZE]


class StreamDecoder:
    """Incremental block finder that behaves like the firmware's.

    feed() returns a list of events:
      ("block", seq, content)  a block with valid length, seq byte, sync and CRC
      ("nak",)                 the firmware would send a nak now (first bad
                               block after a valid one; repeated garbage
                               without a valid block in between naks once)
    Leading 0x7e bytes are dropped silently.  On a malformed block the bytes
    up to and including the next 0x7e are discarded.
    """

    def __init__(self):
        self.buf = bytearray()
        self.need_sync = False
        self.nak_sent = False
        self.discarded = 0

    def reset(self):
        self.__init__()

    def feed(self, data):
        self.buf += data
        events = []
        while self.buf:
            if self.need_sync:
                if not self._skip_to_sync():
                    break
                continue
            if len(self.buf) < MESSAGE_MIN:
                break
            length = self.buf[0]
            if (length < MESSAGE_MIN or length > MESSAGE_MAX
                    or (self.buf[1] & ~MESSAGE_SEQ_MASK) != MESSAGE_DEST):
                self._error(events)
                continue
            if len(self.buf) < length:
                break
            block = bytes(self.buf[:length])
            if block[-1] != MESSAGE_SYNC or crc16(block[:-3]) != (block[-3] << 8 | block[-2]):
                self._error(events)
                continue
            del self.buf[:length]
            self.nak_sent = False
            events.append(("block", block[1] & MESSAGE_SEQ_MASK,
                           block[MESSAGE_HEADER_SIZE:-MESSAGE_TRAILER_SIZE]))
        return events

    def _error(self, events):
        if self.buf[0] == MESSAGE_SYNC:
            # A leading sync byte is dropped without a nak.
            del self.buf[0]
            self.discarded += 1
            return
        self.need_sync = True
        self._skip_to_sync()
        if not self.nak_sent:
            self.nak_sent = True
            events.append(("nak",))

    def _skip_to_sync(self):
        idx = self.buf.find(bytes([MESSAGE_SYNC]))
        if idx < 0:
            self.discarded += len(self.buf)
            self.buf.clear()
            return False
        self.discarded += idx + 1
        del self.buf[:idx + 1]
        self.need_sync = False
        return True


# ---------------------------------------------------------------------------
# Messages described by Klipper format strings

_PARAM_RE = re.compile(r"(\w+)=(%[^ ]+)")
_TYPES = {"%u": "uint32", "%i": "int32", "%hu": "uint16", "%hi": "int16",
          "%c": "byte", "%s": "string", "%.*s": "buffer", "%*s": "progmem_buffer"}


class MessageFormat:
    """One message: name, parameter list from its format string, and id."""

    def __init__(self, fmt, msgid):
        parts = fmt.split()
        self.format = fmt
        self.name = parts[0]
        self.msgid = msgid                      # as stored in the dictionary
        self.params = []
        for part in parts[1:]:
            m = _PARAM_RE.fullmatch(part)
            if not m or m.group(2) not in _TYPES:
                raise ValueError("bad parameter %r in %r" % (part, fmt))
            self.params.append((m.group(1), _TYPES[m.group(2)]))

    def encode(self, **values):
        out = bytearray(vlq_encode(self.msgid))
        for name, kind in self.params:
            v = values[name]
            if kind in ("string", "buffer", "progmem_buffer"):
                v = v.encode() if isinstance(v, str) else bytes(v)
                out.append(len(v))
                out += v
            else:
                out += vlq_encode(int(v))
        return bytes(out)

    def decode_params(self, data, pos):
        """Decode the parameters after the id; returns (dict, new pos)."""
        values = {}
        for name, kind in self.params:
            if kind in ("string", "buffer", "progmem_buffer"):
                if pos >= len(data):
                    raise ProtocolError("%s: buffer length missing" % self.name)
                n = data[pos]
                if pos + 1 + n > len(data):
                    raise ProtocolError("%s: buffer truncated" % self.name)
                v = bytes(data[pos + 1:pos + 1 + n])
                pos += 1 + n
            else:
                v, pos = vlq_decode(data, pos)
                if kind in ("uint32", "uint16", "byte"):
                    v &= 0xFFFFFFFF
            values[name] = v
        return values, pos


class MessageParser:
    """Decode a block's content into messages using a set of formats."""

    def __init__(self, formats):
        # formats: iterable of (format string, dictionary id)
        self.by_internal = {}
        self.by_name = {}
        for fmt, msgid in formats:
            mf = MessageFormat(fmt, msgid)
            self.by_internal[dict_id_to_internal(msgid)] = mf
            self.by_name[mf.name] = mf

    def parse(self, content):
        """Returns a list of (name, params dict); an unknown id yields
        ("#unknown", {"id": internal id, "rest": bytes}) and stops parsing,
        since its parameters cannot be skipped."""
        msgs = []
        pos = 0
        while pos < len(content):
            internal, pos = msgid_decode(content, pos)
            mf = self.by_internal.get(internal)
            if mf is None:
                msgs.append(("#unknown", {"id": internal, "rest": bytes(content[pos:])}))
                break
            params, pos = mf.decode_params(content, pos)
            msgs.append((mf.name, params))
        return msgs

    def encode(self, name, **values):
        return self.by_name[name].encode(**values)


IDENTIFY = MessageFormat(IDENTIFY_FORMAT, MSGID_IDENTIFY)
IDENTIFY_RESPONSE = MessageFormat(IDENTIFY_RESPONSE_FORMAT, MSGID_IDENTIFY_RESPONSE)
BOOT_PARSER = MessageParser([(IDENTIFY_FORMAT, MSGID_IDENTIFY),
                             (IDENTIFY_RESPONSE_FORMAT, MSGID_IDENTIFY_RESPONSE)])


def identify_block(seq, offset, count=IDENTIFY_CHUNK):
    """A host's identify request block."""
    return build_block(seq, IDENTIFY.encode(offset=offset, count=count))


def inflate_dictionary(compressed):
    """The JSON text of a downloaded dictionary: zlib (Klipper) or bzip2
    (Kalico), told apart by the magic bytes."""
    if bytes(compressed[:3]) == b"BZh":
        return bz2.decompress(compressed).decode()
    return zlib.decompress(compressed).decode()
