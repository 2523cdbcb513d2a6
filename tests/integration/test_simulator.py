"""Fidelity tests of the simulators and simulated devices themselves,
independent of mcuflashd: the Klipper protocol code against protocols.md's
worked examples, the KlipperMcu simulator's sequence/ack/nak/resync
behaviour byte for byte, its dictionary, its faults, and the umockdev
device records (udev properties, /dev nodes, uevents, pty transparency)
as a child process under umockdev's preload sees them.

Nothing here needs a built daemon or a D-Bus bus.
"""

import ctypes.util
import errno
import json
import os
import select
import subprocess
import sys
import termios
import time
import zlib

import pytest

import harness

import klipper_dict  # noqa: E402  (tests/sim is on sys.path via harness)
import klipper_mcu
import klipper_proto as kp

SIM_SCRIPT = os.path.join(harness.SIM_DIR, "klipper_mcu.py")


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def pty_sim(request):
    """factory: (KlipperMcu on a fresh os.openpty master, slave fd)."""
    made = []

    def make(**kwargs):
        master, slave = os.openpty()
        tty_raw(slave)
        sim = klipper_mcu.KlipperMcu(master, own_fd=True, **kwargs).start()
        made.append((sim, slave))
        return sim, slave

    yield make
    for sim, slave in made:
        sim.stop()
        os.close(slave)


def tty_raw(fd):
    import tty
    tty.setraw(fd, termios.TCSANOW)


def read_for(fd, duration):
    """Everything readable from @fd within @duration seconds."""
    out = bytearray()
    deadline = time.monotonic() + duration
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out)
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk


def read_exact(fd, n, timeout=2.0):
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, "got only %r" % bytes(out)
        r, _, _ = select.select([fd], [], [], left)
        if r:
            out += os.read(fd, n - len(out))
    return bytes(out)


def split_blocks(data):
    """Split well-formed back-to-back blocks (no garbage)."""
    blocks = []
    while data:
        n = data[0]
        blocks.append(data[:n])
        data = data[n:]
    return blocks


# ---------------------------------------------------------------------------
# protocol code against protocols.md §1


def test_crc16_check_value():
    assert kp.crc16(b"123456789") == 0x6F91


@pytest.mark.parametrize("value,encoded", [
    (0, "00"), (40, "28"), (95, "5f"), (96, "80 60"), (100, "80 64"), (1000, "87 68"),
    (-1, "7f"), (-32, "60"), (-33, "ff 5f"), (12288, "80 e0 00"), (-4096, "e0 00"),
    (250000, "8f a1 10"), (0xFFFFFFFF, "8f ff ff ff 7f"),
])
def test_vlq_vectors(value, encoded):
    assert kp.vlq_encode(value).hex(" ") == encoded
    decoded, pos = kp.vlq_decode(kp.vlq_encode(value))
    assert pos == len(bytes.fromhex(encoded))
    assert decoded & 0xFFFFFFFF == value & 0xFFFFFFFF


def test_block_vectors():
    assert kp.identify_block(0, 0) == bytes.fromhex("08 10 01 00 28 5E 9F 7E")
    assert kp.identify_block(1, 0) == bytes.fromhex("08 11 01 00 28 42 24 7E")
    assert kp.identify_block(1, 40) == bytes.fromhex("08 11 01 28 28 AF D7 7E")
    assert kp.identify_block(2, 200) == bytes.fromhex("09 12 01 81 48 28 E0 AC 7E")
    assert kp.build_block(0) == bytes.fromhex("05 10 9E 81 7E")
    assert kp.build_block(1) == bytes.fromhex("05 11 8F 08 7E")
    assert kp.build_block(2) == bytes.fromhex("05 12 BD 93 7E")
    assert kp.parse_block(bytes.fromhex("08 10 01 00 28 5E 9F 7E")) == (0, b"\x01\x00\x28")
    with pytest.raises(kp.ProtocolError):
        kp.parse_block(bytes.fromhex("08 10 01 00 28 5E 9E 7E"))


def test_message_ids_roundtrip():
    for internal in range(2, 3000):
        assert kp.dict_id_to_internal(kp.internal_to_dict_id(internal)) == internal
    assert kp.internal_to_dict_id(96) == -32
    assert kp.internal_to_dict_id(127) == -1
    assert kp.internal_to_dict_id(200) == 200


def test_stream_decoder_rules():
    d = kp.StreamDecoder()
    block = kp.identify_block(0, 0)
    # Leading sync bytes are dropped silently.
    assert d.feed(b"\x7e\x7e\x7e" + block) == [("block", 0, b"\x01\x00\x28")]
    # Garbage: one nak, bytes dropped up to and including the next 0x7e.
    assert d.feed(b"\x1b\x01\x00\x01\x0e\x11\x04") == [("nak",)]
    assert d.feed(b"more junk\x7e" + block) == [("block", 0, b"\x01\x00\x28")]
    # Repeated garbage without a valid block in between naks only once.
    assert d.feed(b"junk one\x7ejunk two\x7e") == [("nak",)]
    assert d.feed(bytes([0x30]) * 3 + b"\x7e") == []
    assert d.feed(block[:3]) == []
    assert d.feed(block[3:]) == [("block", 0, b"\x01\x00\x28")]


# ---------------------------------------------------------------------------
# simulator: byte-level behaviour


def test_identify_reply_bytes(pty_sim):
    sim, host = pty_sim()
    os.write(host, bytes.fromhex("08 10 01 00 28 5E 9F 7E"))
    reply = read_exact(host, 48 + 5)
    block, ack = reply[:48], reply[48:]
    assert block[0] == 48                       # 5 + id + offset + len + 40 bytes
    assert block[1] == 0x11                     # next expected host seq
    assert block[2:5] == b"\x00\x00\x28"        # identify_response, offset 0, 40 bytes
    assert block[5:45] == sim.dict_compressed[:40]
    assert block[5:7] == b"\x78\xda"            # zlib level 9
    assert kp.crc16(block[:-3]) == block[-3] << 8 | block[-2]
    assert block[-1] == 0x7E
    assert ack == bytes.fromhex("05 11 8F 08 7E")
    assert read_for(host, 0.1) == b""
    assert sim.received("identify") == [{"offset": 0, "count": 40}]


def test_identify_offset_200_seq_1(pty_sim):
    sim, host = pty_sim(start_seq=2)
    os.write(host, bytes.fromhex("09 12 01 81 48 28 E0 AC 7E"))
    blocks = split_blocks(read_exact(host, 49 + 5))
    seq, content = kp.parse_block(blocks[0])
    assert seq == 3
    assert kp.BOOT_PARSER.parse(content) == [
        ("identify_response", {"offset": 200, "data": sim.dict_compressed[200:240]})]
    assert blocks[1] == kp.build_block(3)


def test_seq_mismatch_naks_every_time(pty_sim):
    sim, host = pty_sim()
    for _ in range(3):
        os.write(host, bytes.fromhex("08 11 01 00 28 42 24 7E"))   # seq 1, MCU expects 0
        assert read_exact(host, 5) == bytes.fromhex("05 10 9E 81 7E")
        assert read_for(host, 0.05) == b""
    assert sim.messages == []
    assert sim.naks_sent == 3
    os.write(host, kp.identify_block(0, 0))
    blocks = split_blocks(read_exact(host, 48 + 5))
    assert blocks[1] == bytes.fromhex("05 11 8F 08 7E")


def test_garbage_then_block_one_nak(pty_sim):
    sim, host = pty_sim()
    # What Klipper's host sends on a UART before its first identify.
    os.write(host, bytes.fromhex("1B 01 00 01 0E 11 04") + b"\x7e")
    assert read_exact(host, 5) == kp.build_block(0)
    os.write(host, b"\x00\x01\x02\x03\x04\x05\x7e" + kp.identify_block(0, 0))
    blocks = split_blocks(read_exact(host, 48 + 5))
    assert kp.parse_block(blocks[0])[0] == 1
    assert sim.naks_sent == 1


def test_leading_sync_bytes_no_nak(pty_sim):
    sim, host = pty_sim()
    os.write(host, b"\x7e\x7e\x7e" + kp.identify_block(0, 0))
    reply = read_exact(host, 48 + 5)
    assert reply[-5:] == kp.build_block(1)
    assert sim.naks_sent == 0


def test_bad_crc_naks_once_until_valid(pty_sim):
    sim, host = pty_sim()
    bad = bytearray(kp.identify_block(0, 0))
    bad[-2] ^= 1
    os.write(host, bytes(bad))
    assert read_exact(host, 5) == kp.build_block(0)
    os.write(host, bytes(bad))
    assert read_for(host, 0.1) == b""           # second bad block: no second nak
    os.write(host, kp.identify_block(0, 0))
    assert len(read_exact(host, 48 + 5)) == 53
    os.write(host, bytes(bad))                  # valid block in between: nak again
    assert read_exact(host, 5) == kp.build_block(1)


def test_unknown_id_acked_without_reply(pty_sim):
    sim, host = pty_sim()
    unknown = bytes([0x80 | (2000 >> 7), 2000 & 0x7F, 0x05])
    os.write(host, kp.build_block(0, unknown))
    assert read_exact(host, 5) == kp.build_block(1)
    assert read_for(host, 0.1) == b""
    assert sim.messages[0][0] == "#unknown"
    assert sim.messages[0][1]["id"] == 2000


def test_get_uptime_and_clock(pty_sim):
    sim, host = pty_sim()
    parser = kp.MessageParser(json.loads(sim.dict_json)["commands"].items())
    responses = kp.MessageParser(json.loads(sim.dict_json)["responses"].items())
    os.write(host, kp.build_block(0, parser.encode("get_uptime") + parser.encode("get_clock")))
    dec = kp.StreamDecoder()
    events = dec.feed(read_for(host, 0.3))
    contents = [e[2] for e in events if e[0] == "block"]
    assert len(contents) == 3 and contents[2] == b""
    assert responses.parse(contents[0])[0][0] == "uptime"
    assert responses.parse(contents[1])[0][0] == "clock"


def test_bytes_pass_unmangled(pty_sim):
    sim, host = pty_sim()
    parser = kp.MessageParser(json.loads(sim.dict_json)["commands"].items())
    payload = bytes([0x03, 0x04, 0x0A, 0x0D, 0x11, 0x13, 0x1A, 0x1C, 0x7F, 0xFF, 0x00, 0x7E] * 4)
    os.write(host, kp.build_block(0, parser.encode("debug_ping", data=payload)))
    assert read_exact(host, 5) == kp.build_block(1)
    assert sim.received("debug_ping") == [{"data": payload}]


# ---------------------------------------------------------------------------
# simulator: dictionary


def test_full_dictionary_download(pty_sim):
    sim, host = pty_sim(version=harness.OLD_VERSION, mcu="rp2040")
    compressed, stats = klipper_mcu.host_identify(host, timeout=5.0)
    assert compressed == sim.dict_compressed
    text = kp.inflate_dictionary(compressed)
    assert text == sim.dict_json
    d = json.loads(text)
    assert d["version"] == harness.OLD_VERSION
    assert d["config"]["MCU"] == "rp2040"
    assert stats["naks"] == 1                   # host starts with seq 1, fresh MCU expects 0
    offsets = [p["offset"] for p in sim.received("identify")]
    assert offsets[-1] == len(compressed)       # the final empty chunk was asked for
    assert all(p["count"] == 40 for p in sim.received("identify"))


def test_sequence_state_survives_reopen(pty_sim):
    sim, host = pty_sim()
    klipper_mcu.host_identify(host)
    expected = sim.next_seq
    assert expected != 0
    os.write(host, kp.identify_block(0, 0))     # a new host starting at 0 is nak'ed
    assert read_exact(host, 5) == kp.build_block(expected)


@pytest.mark.parametrize("mcu,link", [("stm32f429xx", "usb"), ("rp2040", "usb"),
                                      ("linux", "usb"), ("stm32g0b1xx", "can"),
                                      ("stm32f446xx", "serial"), ("stm32h723xx", "canbridge")])
def test_dictionary_is_realistic(mcu, link):
    text, compressed = klipper_dict.build(harness.HOST_VERSION, mcu, link=link)
    assert 9000 <= len(text) <= 16000
    assert 3000 <= len(compressed) <= 6000
    assert compressed[:2] == b"\x78\xda"
    assert zlib.decompress(compressed).decode() == text
    d = json.loads(text)
    assert text == json.dumps(d, separators=(",", ":"), sort_keys=True)
    assert set(d) == {"app", "build_versions", "commands", "config", "enumerations",
                      "license", "output", "responses", "version"}
    assert d["app"] == "Klipper" and d["license"] == "GNU GPLv3"
    assert d["build_versions"].startswith("gcc: ") and " binutils: " in d["build_versions"]
    assert d["commands"]["identify offset=%u count=%c"] == 1
    assert d["responses"]["identify_response offset=%u data=%.*s"] == 0
    assert len(d["commands"]) >= 100 and len(d["responses"]) >= 30
    for key in ("MCU", "CLOCK_FREQ", "STATS_SUMSQ_BASE", "ADC_MAX", "RECEIVE_WINDOW"):
        assert key in d["config"]
    assert d["config"]["MCU"] == mcu
    if link == "usb" and mcu.startswith("stm32"):
        assert d["config"]["RESERVE_PINS_USB"] == "PA11,PA12"
    if link == "serial":
        assert d["config"]["SERIAL_BAUD"] == 250000
    if link in ("can", "canbridge"):
        assert d["config"]["CANBUS_FREQUENCY"] == 1000000
        assert "get_canbus_id" in d["commands"]
    ids = list(d["commands"].values()) + list(d["responses"].values()) + list(d["output"].values())
    assert len(ids) == len(set(ids))
    assert any(i < 0 for i in ids)              # ids 96..127 are stored negative
    for fmt, msgid in list(d["commands"].items()) + list(d["responses"].items()):
        kp.MessageFormat(fmt, msgid)
    assert "pin" in d["enumerations"] and "static_string_id" in d["enumerations"]


# ---------------------------------------------------------------------------
# simulator: faults


def test_fault_silent(pty_sim):
    sim, host = pty_sim(fault="silent")
    os.write(host, kp.identify_block(0, 0))
    assert read_for(host, 0.3) == b""
    assert sim.wait_for(lambda s: s.rx_bytes == 8, 1)
    with pytest.raises(TimeoutError):
        klipper_mcu.host_identify(host, timeout=0.5)


def test_fault_garbage(pty_sim):
    sim, host = pty_sim(fault="garbage", seed=1)
    os.write(host, kp.identify_block(0, 0))
    junk = read_for(host, 0.3)
    assert len(junk) >= 8 and 0x7E not in junk  # 8..40 bytes per read the simulator did
    assert kp.StreamDecoder().feed(junk) in ([], [("nak",)])
    with pytest.raises(TimeoutError):
        klipper_mcu.host_identify(host, timeout=0.5)


def test_fault_crc_first(pty_sim):
    sim, host = pty_sim(fault="crc_first")
    os.write(host, kp.identify_block(0, 0))
    blocks = split_blocks(read_exact(host, 48 + 5))
    with pytest.raises(kp.ProtocolError):
        kp.parse_block(blocks[0])
    assert blocks[1] == kp.build_block(1)       # the ack is intact
    compressed, stats = klipper_mcu.host_identify(host, first_seq=1)
    assert compressed == sim.dict_compressed


def test_fault_crc_every_third_recoverable(pty_sim):
    sim, host = pty_sim(fault="crc:3")
    compressed, stats = klipper_mcu.host_identify(host, timeout=10)
    assert compressed == sim.dict_compressed
    assert stats["retransmits"] > 0


def test_fault_hang_mid_dict(pty_sim):
    sim, host = pty_sim(fault="hang_mid_dict:400")
    with pytest.raises(TimeoutError, match=r"\(400 bytes\)"):
        klipper_mcu.host_identify(host, timeout=1.0)
    assert sim.hung
    assert max(p["offset"] for p in sim.received("identify")) == 400


def test_fault_disconnect(pty_sim):
    sim, host = pty_sim(fault="disconnect:3")
    with pytest.raises(ConnectionError):
        klipper_mcu.host_identify(host, timeout=2.0)
    assert sim.wait_for(lambda s: s.disconnected, 2) and sim.requests == 3
    try:                                        # the slave stays hung up
        assert os.read(host, 10) == b""
    except OSError as e:
        assert e.errno == errno.EIO


def test_fault_changed_at_run_time(pty_sim):
    sim, host = pty_sim(fault="silent")
    with pytest.raises(TimeoutError):
        klipper_mcu.host_identify(host, timeout=0.3)
    sim.set_fault(None)
    compressed, _ = klipper_mcu.host_identify(host)
    assert compressed == sim.dict_compressed


def test_unknown_fault_rejected():
    with pytest.raises(ValueError):
        klipper_mcu.parse_fault("explode")


def test_cli_serves_pty_link(tmp_path):
    link = str(tmp_path / "ttyKlipper")
    proc = subprocess.Popen([sys.executable, SIM_SCRIPT, "--pty-link", link, "--mcu", "linux",
                             "--version", harness.OLD_VERSION],
                            stderr=subprocess.PIPE, env=harness.clean_env(), text=True)
    try:
        assert "klipper_mcu:" in proc.stderr.readline()
        assert os.path.islink(link)
        out = subprocess.run([sys.executable, SIM_SCRIPT, "--identify", link], check=True,
                             capture_output=True, text=True, env=harness.clean_env(), timeout=20)
        d = json.loads(out.stdout)
        assert d["version"] == harness.OLD_VERSION and d["config"]["MCU"] == "linux"
        # only the master end is held: nobody has the slave open now
        slave = os.readlink(link)
        holders = [p for p in os.listdir("/proc") if p.isdigit() and _holds(p, slave)]
        assert holders == []
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stderr.close()
    assert not os.path.lexists(link)


def _holds(pid, path):
    try:
        fds = os.listdir("/proc/%s/fd" % pid)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == path:
                return True
        except OSError:
            pass
    return False


# ---------------------------------------------------------------------------
# umockdev device records, seen from a child process under the preload

UDEV_PROBE = r'''
import ctypes, json, select, sys, os
lib = ctypes.CDLL("libudev.so.1")
P = ctypes.c_void_p
S = ctypes.c_char_p
for name, res, args in [
        ("udev_new", P, []), ("udev_enumerate_new", P, [P]),
        ("udev_enumerate_add_match_subsystem", ctypes.c_int, [P, S]),
        ("udev_enumerate_scan_devices", ctypes.c_int, [P]),
        ("udev_enumerate_get_list_entry", P, [P]), ("udev_list_entry_get_next", P, [P]),
        ("udev_list_entry_get_name", S, [P]), ("udev_list_entry_get_value", S, [P]),
        ("udev_device_new_from_syspath", P, [P, S]), ("udev_device_get_devnode", S, [P]),
        ("udev_device_get_syspath", S, [P]), ("udev_device_get_action", S, [P]),
        ("udev_device_get_subsystem", S, [P]),
        ("udev_device_get_properties_list_entry", P, [P]),
        ("udev_device_get_parent_with_subsystem_devtype", P, [P, S, S]),
        ("udev_device_get_sysattr_value", S, [P, S]), ("udev_device_get_driver", S, [P]),
        ("udev_monitor_new_from_netlink", P, [P, S]),
        ("udev_monitor_filter_add_match_subsystem_devtype", ctypes.c_int, [P, S, S]),
        ("udev_monitor_enable_receiving", ctypes.c_int, [P]),
        ("udev_monitor_get_fd", ctypes.c_int, [P]),
        ("udev_monitor_receive_device", P, [P])]:
    getattr(lib, name).restype = res
    getattr(lib, name).argtypes = args

def s(b):
    return b.decode() if b is not None else None

def describe(dev):
    props = {}
    e = lib.udev_device_get_properties_list_entry(dev)
    while e:
        props[s(lib.udev_list_entry_get_name(e))] = s(lib.udev_list_entry_get_value(e))
        e = lib.udev_list_entry_get_next(e)
    out = {"syspath": s(lib.udev_device_get_syspath(dev)),
           "devnode": s(lib.udev_device_get_devnode(dev)),
           "action": s(lib.udev_device_get_action(dev)), "props": props}
    usb = lib.udev_device_get_parent_with_subsystem_devtype(dev, b"usb", b"usb_device")
    if usb:
        out["usb"] = {a: s(lib.udev_device_get_sysattr_value(usb, a.encode())) for a in
                      ("idVendor", "idProduct", "serial", "manufacturer", "product",
                       "busnum", "devnum", "devpath")}
        out["usb"]["syspath"] = s(lib.udev_device_get_syspath(usb))
    iface = lib.udev_device_get_parent_with_subsystem_devtype(dev, b"usb", b"usb_interface")
    if iface:
        out["driver"] = s(lib.udev_device_get_driver(iface))
    return out

udev = lib.udev_new()
mon = lib.udev_monitor_new_from_netlink(udev, b"udev")
lib.udev_monitor_filter_add_match_subsystem_devtype(mon, b"tty", None)
lib.udev_monitor_enable_receiving(mon)
en = lib.udev_enumerate_new(udev)
lib.udev_enumerate_add_match_subsystem(en, b"tty")
lib.udev_enumerate_scan_devices(en)
e = lib.udev_enumerate_get_list_entry(en)
while e:
    dev = lib.udev_device_new_from_syspath(udev, lib.udev_list_entry_get_name(e))
    print(json.dumps({"enumerated": describe(dev)}), flush=True)
    e = lib.udev_list_entry_get_next(e)
print(json.dumps({"ready": True}), flush=True)
fd = lib.udev_monitor_get_fd(mon)
for _ in range(int(sys.argv[1])):
    r, _, _ = select.select([fd], [], [], 10)
    if not r:
        print(json.dumps({"timeout": True}), flush=True)
        break
    dev = lib.udev_monitor_receive_device(mon)
    print(json.dumps({"event": describe(dev) if dev else None}), flush=True)
'''


def preload_child(testbed, argv, **kwargs):
    env = harness.clean_env(**testbed.env())
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True, **kwargs)


def need_preload():
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("needs umockdev's preload (tests/run-integration)")


def test_udev_monitor_sees_klipper_board(testbed):
    need_preload()
    assert ctypes.util.find_library("udev")
    child = preload_child(testbed, [sys.executable, "-c", UDEV_PROBE, "2"])
    try:
        assert json.loads(child.stdout.readline()) == {"ready": True}   # nothing plugged yet
        board = testbed.add_klipper_usb(serial="2E0036000851363131363530", mcu="stm32f429xx",
                                        port="1-1.2")
        ev = json.loads(child.stdout.readline())["event"]
        assert ev["action"] == "add"
        assert ev["devnode"] == "/dev/ttyACM0"
        assert ev["syspath"] == board.syspath
        p = ev["props"]
        assert p["SUBSYSTEM"] == "tty"
        assert p["ID_VENDOR_ID"] == "1d50" and p["ID_MODEL_ID"] == "614e"
        assert p["ID_SERIAL_SHORT"] == "2E0036000851363131363530"
        assert p["ID_VENDOR"] == "Klipper" and p["ID_MODEL"] == "stm32f429xx"
        assert p["ID_USB_INTERFACE_NUM"] == "00"
        assert p["ID_PATH"] == "pci-0000:00:14.0-usb-0:1.2:1.0"
        assert ("/dev/serial/by-id/usb-Klipper_stm32f429xx_2E0036000851363131363530-if00"
                in p["DEVLINKS"].split())
        assert ev["usb"]["idVendor"] == "1d50" and ev["usb"]["idProduct"] == "614e"
        assert ev["usb"]["serial"] == "2E0036000851363131363530"
        assert ev["usb"]["manufacturer"] == "Klipper" and ev["usb"]["product"] == "stm32f429xx"
        assert ev["usb"]["busnum"] == "1" and ev["usb"]["devnum"] == "5"
        assert ev["usb"]["syspath"].endswith("/usb1/1-1/1-1.2")
        assert ev["driver"] == "cdc_acm"
        testbed.remove(board)
        ev = json.loads(child.stdout.readline())["event"]
        assert ev["action"] == "remove" and ev["syspath"] == board.syspath
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_enumeration_of_several_boards(testbed):
    need_preload()
    a = testbed.add_klipper_usb(mcu="stm32f429xx", serial="2E0036000851363131363530",
                                port="1-1.2")
    b = testbed.add_klipper_usb(mcu="rp2040", serial="E66138935F4A2B2C", port="1-1.3",
                                version=harness.OLD_VERSION)
    c = testbed.add_usb_serial_bridge(port="1-1.4")
    assert (a.tty, b.tty, c.tty) == ("ttyACM0", "ttyACM1", "ttyUSB0")
    child = preload_child(testbed, [sys.executable, "-c", UDEV_PROBE, "0"])
    out = [json.loads(line) for line in child.stdout]
    child.wait()
    child.stdout.close()
    found = {e["enumerated"]["devnode"]: e["enumerated"] for e in out if "enumerated" in e}
    assert set(found) == {"/dev/ttyACM0", "/dev/ttyACM1", "/dev/ttyUSB0"}
    assert found["/dev/ttyACM1"]["props"]["ID_SERIAL_SHORT"] == "E66138935F4A2B2C"
    assert found["/dev/ttyACM1"]["usb"]["devnum"] != found["/dev/ttyACM0"]["usb"]["devnum"]
    assert found["/dev/ttyUSB0"]["props"]["ID_VENDOR_ID"] == "1a86"
    assert "ID_SERIAL_SHORT" not in found["/dev/ttyUSB0"]["props"]
    assert found["/dev/ttyUSB0"]["usb"]["serial"] is None
    # Unplug and replug on another port: a new node (umockdev cannot reuse
    # a tty name, see harness.Testbed._free_tty), same serial, found by udev.
    testbed.remove(a)
    d = testbed.add_klipper_usb(mcu="stm32f429xx", serial="2E0036000851363131363530",
                                port="1-1.5")
    assert d.tty == "ttyACM2" and d.by_id == a.by_id
    child = preload_child(testbed, [sys.executable, "-c", UDEV_PROBE, "0"])
    out = [json.loads(line) for line in child.stdout]
    child.wait()
    child.stdout.close()
    found = {e["enumerated"]["devnode"]: e["enumerated"] for e in out if "enumerated" in e}
    assert set(found) == {"/dev/ttyACM1", "/dev/ttyACM2", "/dev/ttyUSB0"}
    assert found["/dev/ttyACM2"]["props"]["ID_PATH"] == "pci-0000:00:14.0-usb-0:1.5:1.0"


@pytest.mark.parametrize("path_kind", ["devnode", "by_id", "by_path"])
def test_identify_through_testbed_pty(testbed, path_kind):
    need_preload()
    board = testbed.add_klipper_usb(mcu="rp2040", serial="E66138935F4A2B2C", port="1-1.3",
                                    version=harness.OLD_VERSION)
    path = getattr(board, path_kind)
    child = preload_child(testbed, [sys.executable, SIM_SCRIPT, "--identify", path])
    out, _ = child.communicate(timeout=20)
    assert child.returncode == 0
    d = json.loads(out)
    assert d["version"] == harness.OLD_VERSION and d["config"]["MCU"] == "rp2040"
    assert board.sim.received("identify")[-1]["offset"] == len(board.sim.dict_compressed)


def test_testbed_pty_is_raw_and_transparent(testbed):
    need_preload()
    board = testbed.add_klipper_usb(simulate=False)
    # umockdev only clears ICANON/ECHO/ICRNL...; the simulator makes the slave fully raw.
    sim = klipper_mcu.KlipperMcu(board.master_fd).start()
    try:
        script = (
            "import os, sys, termios, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)\n"
            "a = termios.tcgetattr(fd)\n"
            "print(a[0] & (termios.IXON | termios.ICRNL | termios.ISTRIP), a[1] & termios.OPOST,"
            " a[3] & (termios.ISIG | termios.ICANON | termios.ECHO | termios.IEXTEN))\n"
            "os.write(fd, bytes.fromhex('7e08100100285e9f7e'))\n"
            "got = b''\n"
            "while len(got) < 53: got += os.read(fd, 100)\n"
            "print(got.hex())\n")
        child = preload_child(testbed, [sys.executable, "-c", script, board.devnode])
        out, _ = child.communicate(timeout=10)
        flags, reply = out.splitlines()
        assert flags == "0 0 0"
        reply = bytes.fromhex(reply)
        assert kp.parse_block(reply[:48]) == (1, b"\x00\x00\x28" + sim.dict_compressed[:40])
        assert reply[48:] == kp.build_block(1)
    finally:
        sim.stop()


def test_remove_hangs_up_the_port(testbed):
    need_preload()
    board = testbed.add_klipper_usb()
    script = ("import os, sys\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)\n"
              "print('open', flush=True)\n"
              "try:\n"
              "    print('eof' if os.read(fd, 10) == b'' else 'data')\n"
              "except OSError as e:\n"
              "    print('errno', e.errno)\n")
    child = preload_child(testbed, [sys.executable, "-c", script, board.devnode])
    try:
        assert child.stdout.readline().strip() == "open"
        testbed.remove(board)
        out, _ = child.communicate(timeout=5)
        assert out.strip() in ("eof", "errno %d" % errno.EIO)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not os.path.lexists(testbed.root + board.by_id)


def test_bridge_without_klipper_stays_silent(testbed):
    need_preload()
    board = testbed.add_usb_serial_bridge()
    assert board.sim is None
    child = preload_child(testbed, [sys.executable, SIM_SCRIPT, "--identify", board.devnode,
                                    "--timeout", "0.5"], stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=10)
    child.stderr.close()
    assert child.returncode != 0 and "TimeoutError" in err
