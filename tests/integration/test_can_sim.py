"""Tests of the CAN test infrastructure itself, without the daemon: the
LD_PRELOAD shim (tests/shim/canshim.c) with a small C program and with
can-utils' cansend/candump under it, the hub (tests/sim/canhub.py) with
its interface state and WATCH events, and the node simulators
(tests/sim/can_node.py) with the Klipper and Katapult admin/stream
protocols, node-id conflicts, bootloader entry and faults.

The shim comes from the meson build dir ($MCUFLASHD_BUILDDIR, default
<repo>/build) when it is built or can be built there, else it is compiled
with gcc into a temporary directory.  Nothing here needs umockdev or a bus.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import pytest

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(TESTS_DIR)
SIM_DIR = os.path.join(TESTS_DIR, "sim")
SHIM_SOURCE = os.path.join(TESTS_DIR, "shim", "canshim.c")
if SIM_DIR not in sys.path:
    sys.path.insert(0, SIM_DIR)

import can_node as cn  # noqa: E402
import canhub  # noqa: E402
import klipper_proto  # noqa: E402

# The project's warning flags (meson.build) plus -Werror, as CI builds.
WARNING_FLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-Wshadow", "-Wmissing-prototypes",
                 "-Wstrict-prototypes", "-Wformat=2", "-Wimplicit-fallthrough",
                 "-Wno-unused-parameter", "-Werror", "-D_GNU_SOURCE"]

UUID_A = "0e0d81e4210c"
UUID_B = "5a2b7c9d1e3f"
UUID_C = "c0ffee000001"
QUERY_TIMEOUT = 0.2         # nodes answer within milliseconds


def build_dir():
    return os.environ.get("MCUFLASHD_BUILDDIR") or os.path.join(REPO_DIR, "build")


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def scratch():
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="cansim-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shim(scratch):
    """Path of libcanshim.so: meson's if the build dir has (or can build)
    it, else compiled here with the project's warning flags."""
    builddir = build_dir()
    built = os.path.join(builddir, "tests", "shim", "libcanshim.so")
    if os.path.exists(os.path.join(builddir, "build.ninja")) and shutil.which("ninja"):
        r = subprocess.run(["ninja", "-C", builddir, "tests/shim/libcanshim.so"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and os.path.exists(built):
            return built
    if not shutil.which("gcc"):
        pytest.skip("the CAN shim is not built and gcc is missing")
    out = os.path.join(scratch, "libcanshim.so")
    r = subprocess.run(["gcc", *WARNING_FLAGS, "-O2", "-g", "-fPIC", "-shared", "-o", out,
                        SHIM_SOURCE, "-ldl", "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def client_binary(scratch):
    if not shutil.which("gcc"):
        pytest.skip("gcc is missing")
    source = os.path.join(scratch, "canclient.c")
    with open(source, "w") as f:
        f.write(CLIENT_SOURCE)
    out = os.path.join(scratch, "canclient")
    r = subprocess.run(["gcc", *WARNING_FLAGS, "-pthread", "-o", out, source], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def hub(scratch):
    path = os.path.join(tempfile.mkdtemp(dir=scratch), "hub.sock")
    log = print if os.environ.get("MCUFLASHD_SIM_LOG") else None
    h = canhub.CanHub(path, ifaces=["can0", "can1"], log=log).start()
    yield h
    h.stop()


class Nodes:
    def __init__(self, hub):
        self.hub = hub
        self.made = []

    def klipper(self, uuid, iface="can0", **kwargs):
        node = cn.KlipperCanNode(self.hub.path, iface, uuid, log=self._log(), **kwargs).start()
        self.made.append(node)
        return node

    def katapult(self, uuid, iface="can0", **kwargs):
        node = cn.KatapultCanNode(self.hub.path, iface, uuid, log=self._log(), **kwargs).start()
        self.made.append(node)
        return node

    @staticmethod
    def _log():
        return print if os.environ.get("MCUFLASHD_SIM_LOG") else None


@pytest.fixture
def nodes(hub):
    made = Nodes(hub)
    yield made
    for node in made.made:
        node.stop()


@pytest.fixture
def host(hub):
    """A Python host socket on can0."""
    client = canhub.CanHubClient(hub.path, "can0", name="pytest-host")
    yield client
    client.close()


class Shimmed:
    """Runs programs under the shim against one hub."""

    def __init__(self, shim, client, hub):
        self.shim = shim
        self.client = client
        self.hub = hub
        self.procs = []

    def env(self):
        # The shim must come first in LD_PRELOAD (testing.md §5).
        preload = [self.shim] + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
        # A shim from a sanitizer build is preloaded into programs that are
        # not sanitized (testing.md §5 pitfalls).
        asan = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS"),
                                      "verify_asan_link_order=0:detect_leaks=0"]))
        return dict(os.environ, LD_PRELOAD=":".join(preload), CANSHIM_HUB=self.hub.path,
                    CANSHIM_IFACES="can0,can1", ASAN_OPTIONS=asan)

    def start(self, *ops, argv=None):
        p = subprocess.Popen(argv or [self.client, *ops], env=self.env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    @staticmethod
    def finish(p, timeout=10):
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out.splitlines(), err

    def run(self, *ops):
        rc, lines, err = self.finish(self.start(*ops))
        return rc, lines

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait_registered(self, iface, count=1):
        assert self.hub.wait_for(lambda h: h.registered(iface) >= count, 5), \
            "no shimmed socket registered for %r: %r" % (iface, self.hub.clients())


@pytest.fixture
def shimmed(shim, client_binary, hub):
    s = Shimmed(shim, client_binary, hub)
    yield s
    s.stop_all()


def rx_lines(lines):
    return [line for line in lines if line.startswith("RX ")]


def klipper_exchange(client, nodeid, seq, content, duration=0.3):
    """Send one block to a Klipper node; the blocks (seq, content) it sends
    back within @duration seconds."""
    client.drain()
    cn.send_stream(client, nodeid, klipper_proto.build_block(seq, content))
    decoder = klipper_proto.StreamDecoder()
    got = []
    deadline = time.monotonic() + duration
    while True:
        frame = client.recv(max(0.0, deadline - time.monotonic()))
        if frame is None:
            return got
        if frame.can_id == cn.node_tx_id(nodeid):
            got += [(e[1], e[2]) for e in decoder.feed(frame.data) if e[0] == "block"]


# ---------------------------------------------------------------------------
# the shim


def test_shim_compiles_warning_free(scratch):
    compilers = [cc for cc in ("gcc", "clang") if shutil.which(cc)]
    if not compilers:
        pytest.skip("no C compiler")
    for cc in compilers:
        r = subprocess.run([cc, *WARNING_FLAGS, "-O2", "-fPIC", "-shared", "-o",
                            os.path.join(scratch, "warn-%s.so" % cc), SHIM_SOURCE, "-ldl",
                            "-lpthread"], capture_output=True, text=True)
        assert r.returncode == 0, "%s:\n%s" % (cc, r.stderr)


def test_query_unassigned_through_shim(hub, nodes, shimmed):
    node = nodes.klipper(UUID_A)
    rc, lines = shimmed.run("bind:can0", "send:3F0#00", "expect:3F1:2000")
    assert rc == 0, lines
    assert "RX can0 1001 3F1#20%s01" % UUID_A.upper() in lines
    assert node.admin == [("query_unassigned", b"\x00")]
    assert [str(f) for f in hub.frames_on("can0")] == ["can0 3F0#00",
                                                      "can0 3F1#20%s01" % UUID_A.upper()]


def test_set_nodeid_then_identify_through_shim(hub, nodes, shimmed):
    node = nodes.klipper(UUID_A)
    rc, lines = shimmed.run("bind:can0", "send:3F0#01%s05" % UUID_A, "identify:5:2000")
    assert rc == 0, lines
    # protocols.md §1.6: the seq-0 identify is accepted by a fresh MCU, whose
    # reply carries the next expected seq.
    assert "IDENTIFY seq=1 offset=0 datalen=40" in lines
    assert node.nodeid == 5
    assert node.received("identify") == [{"offset": 0, "count": 40}]
    # An assigned node no longer answers queries.
    rc, lines = shimmed.run("bind:can0", "send:3F0#00", "listen:200")
    assert rx_lines(lines) == []


def test_interface_info_through_shim(hub, shimmed):
    rc, lines = shimmed.run("info:can0", "info:can1", "info:vcan9")
    assert rc == 0, lines
    assert "INFO can0 nametoindex=1001 ifindex=1001 name=can0 mtu=16 up=1" in lines
    assert "INFO can1 nametoindex=1002 ifindex=1002 name=can1 mtu=16 up=1" in lines
    assert "INFO vcan9 nametoindex=0 (ENODEV) ifindex=ENODEV" in lines
    nameindex = [line for line in lines if line.startswith("NAMEINDEX")][0].split()
    assert "can0:1001" in nameindex and "can1:1002" in nameindex
    assert "lo:1" in nameindex                  # real interfaces are still listed


def kernel_has_can():
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(kernel_has_can(), reason="the kernel has CAN: nothing to tell apart")
def test_shim_is_inert_without_hub(shimmed):
    env = shimmed.env()
    del env["CANSHIM_HUB"]
    r = subprocess.run([shimmed.client, "info:can0"], env=env, capture_output=True, text=True,
                       timeout=10)
    assert r.stdout.splitlines() == ["SOCKET_ERR EAFNOSUPPORT"]


def test_filter_only_admin_replies(hub, nodes, shimmed):
    nodes.klipper(UUID_A)
    p = shimmed.start("bind:can0", "filter:3F1:7FF", "send:3F0#00", "listen:400")
    assert hub.wait_for(lambda h: any(c["filters"] == [(0x3F1, 0x7FF)]
                                      for c in h.clients("host")), 5)
    for can_id, data in ((0x123, b"\x01"), (0x3F0, b"\x05"), (0x3F1, b"\xaa"), (0x108, b"\x02")):
        hub.inject("can0", can_id, data)
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    assert sorted(rx_lines(lines)) == sorted(["RX can0 1001 3F1#20%s01" % UUID_A.upper(),
                                              "RX can0 1001 3F1#AA"])
    # The hub applies the filter too, so poll() does not wake for the rest.
    to_client = [f.can_id for f in hub.frames_on("can0")
                 if any("canclient" in name for name in f.receivers)]
    assert to_client == [0x3F1, 0x3F1]


FILTER_FRAMES = [0x100, 0x123, 0x1FF, 0x200, 0x123 | canhub.CAN_EFF_FLAG]


@pytest.mark.parametrize("filters,join,expected", [
    ("123:7FF", False, [0x123, 0x123 | canhub.CAN_EFF_FLAG]),   # mask without EFF: both
    ("123:C00007FF", False, [0x123]),                           # EFF|RTR in mask: SFF only
    ("100:700,123~7FF", False, FILTER_FRAMES),
    ("100:700,123~7FF", True, [0x100, 0x1FF]),
    ("", False, []),
])
def test_filter_semantics(hub, shimmed, filters, join, expected):
    ops = ["bind:can0", "filter:" + filters] + (["join"] if join else []) + ["listen:300"]
    p = shimmed.start(*ops)
    want = []                   # what the hub must have been told (FLT)
    for spec in filter(None, filters.split(",")):
        fid, mask = (int(v, 16) for v in spec.replace("~", ":").split(":"))
        want.append((fid | (canhub.CAN_INV_FILTER if "~" in spec else 0), mask))
    assert hub.wait_for(lambda h: any(c["filters"] == want for c in h.clients("host")), 5), \
        hub.clients()
    for can_id in FILTER_FRAMES:
        hub.inject("can0", can_id, b"\x11")
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    got = []
    for line in rx_lines(lines):
        ident = line.split()[3].split("#")[0]
        got.append(int(ident, 16) | (canhub.CAN_EFF_FLAG if len(ident) == 8 else 0))
    assert sorted(got) == sorted(expected)


def test_filter_change_applies_to_queued_frames_in_shim(hub, shimmed):
    # Frames the hub delivered before the filter changed are filtered by the
    # shim itself (a real kernel would still deliver them: documented).
    p = shimmed.start("bind:can0", "sleep:400", "filter:3F1:7FF", "listen:200")
    shimmed.wait_registered("can0")
    hub.inject("can0", 0x123, b"\x01")
    hub.inject("can0", 0x3F1, b"\x02")
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    assert rx_lines(lines) == ["RX can0 1001 3F1#02"]


def test_interface_down_drops_frames(hub, nodes, shimmed):
    node = nodes.klipper(UUID_A)
    p = shimmed.start("bind:can0", "sleep:400", "send:3F0#00", "listen:300")
    shimmed.wait_registered("can0")
    hub.set_up("can0", False)
    record = hub.inject("can0", 0x123, b"\x01")
    assert record.dropped == "down" and record.receivers == ()
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    assert "SEND_ERR ENETDOWN" in lines         # the shim knows can0 is down
    assert "RECV_ERR ENETDOWN" in lines         # the bound socket is told once
    assert rx_lines(lines) == []
    assert node.frames == [] and node.admin == []
    assert hub.frames_on("can0") == []          # nothing was sent on can0

    hub.set_up("can0", True)
    rc, lines = shimmed.run("bind:can0", "send:3F0#00", "expect:3F1:2000")
    assert rc == 0 and "RX can0 1001 3F1#20%s01" % UUID_A.upper() in lines


def test_interface_removed_and_added(hub, shimmed):
    p = shimmed.start("bind:can1", "sleep:400", "listen:200", "info:can1", "bind:can1",
                      "send:123#00")
    shimmed.wait_registered("can1")
    hub.remove_iface("can1")
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    assert "RECV_ERR ENODEV" in lines
    assert any(line.startswith("INFO can1 nametoindex=0 (ENODEV)") for line in lines)
    assert "BIND_ERR ENODEV" in lines
    assert "SEND_ERR ENXIO" in lines            # the socket was unbound
    assert hub.registered("can1") == 0

    hub.add_iface("can2", bitrate=500000)
    rc, lines = shimmed.run("info:can2", "bind:can2", "send:321#0102")
    assert rc == 0, lines
    assert "INFO can2 nametoindex=1003 ifindex=1003 name=can2 mtu=16 up=1" in lines
    nameindex = [line for line in lines if line.startswith("NAMEINDEX")][0].split()
    assert "can2:1003" in nameindex and not any(n.startswith("can1:") for n in nameindex)
    assert hub.wait_for(lambda h: h.frames_on("can2"), 2)
    assert [str(f) for f in hub.frames_on("can2")] == ["can2 321#0102"]


def test_bound_to_all_and_sendto(hub, nodes, shimmed):
    node0 = nodes.klipper(UUID_A, "can0")
    node1 = nodes.klipper(UUID_B, "can1")
    p = shimmed.start("bind:any", "sleep:200", "sendto:can1:3F0#00", "listen:400", "send:123#00")
    shimmed.wait_registered("")
    hub.inject("can0", 0x321, b"\x05")
    rc, lines, err = shimmed.finish(p)
    assert rc == 0, (lines, err)
    assert sorted(rx_lines(lines)) == sorted(["RX can0 1001 321#05",
                                              "RX can1 1002 3F1#20%s01" % UUID_B.upper()])
    assert "SEND_ERR ENXIO" in lines            # write() on a socket bound to all
    assert node1.admin == [("query_unassigned", b"\x00")]
    assert node0.admin == []
    assert [f.can_id for f in hub.frames_on("can0") if "canclient" in f.sender] == []


def test_threads_and_bursts_through_shim(hub, shimmed):
    # 4 threads open, bind, write 150 frames each without pause and close:
    # the shim's socket table is shared, and the bursts overflow the hub's
    # datagram queue (net.unix.max_dgram_qlen), which the shim waits out.
    receiver = canhub.CanHubClient(hub.path, "can0", kind="BUS", name="counter")
    try:
        rc, lines = shimmed.run("flood:4:150")
        assert rc == 0 and "FLOOD sent=600" in lines, lines
        assert hub.wait_for(lambda h: len(h.frames_on("can0", can_id=0x555)) == 600, 5)
        per_sender = {}
        for frame in hub.frames_on("can0", can_id=0x555):
            per_sender.setdefault(frame.sender, []).append(frame.data[0] | frame.data[1] << 8)
        assert len(per_sender) == 4, [(k, len(v)) for k, v in per_sender.items()]
        assert all(seqs == list(range(150)) for seqs in per_sender.values())
        assert hub.wait_for(lambda h: h.registered("can0") == 0, 2)    # all closed: BYE
    finally:
        receiver.close()


# ---------------------------------------------------------------------------
# the hub


def test_watch_snapshot_and_events(hub):
    hub.set_up("can1", False)
    watcher = canhub.HubWatcher(hub.path)
    try:
        assert watcher.snapshot_lines == ["IFACE can0 up 1000000", "IFACE can1 down"]
        assert hub.watchers() == 1
        hub.set_up("can0", False)
        assert watcher.next_event() == "IFACE can0 down"
        hub.set_up("can0", True, bitrate=500000)
        assert watcher.next_event() == "IFACE can0 up 500000"
        hub.add_iface("can2")
        assert watcher.next_event() == "IFACE can2 up 1000000"
        hub.remove_iface("can2")
        assert watcher.next_event() == "IFACE can2 gone"
        hub.set_up("can0", True, bitrate=500000)        # no change, no event
        assert watcher.next_event(0.1) is None
    finally:
        watcher.close()


def test_hub_cli_and_node_cli(scratch):
    path = os.path.join(scratch, "cli.sock")
    hub = subprocess.Popen([sys.executable, os.path.join(SIM_DIR, "canhub.py"), path,
                            "-i", "can0:500000", "-i", "can1::down", "--control"],
                           stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node = None
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        watcher = canhub.HubWatcher(path)
        assert watcher.snapshot == {"can0": "up 500000", "can1": "down"}
        hub.stdin.write("up can1\n")
        hub.stdin.flush()
        assert watcher.next_event(2) == "IFACE can1 up 1000000"
        watcher.close()

        node = subprocess.Popen([sys.executable, os.path.join(SIM_DIR, "can_node.py"), path,
                                 "can0", "--uuid", UUID_C, "--katapult"],
                                stderr=subprocess.PIPE, text=True)
        assert "can_node: katapult" in node.stderr.readline()
        with canhub.CanHubClient(path, "can0") as client:
            assert cn.query_unassigned(client, QUERY_TIMEOUT) == [(UUID_C, cn.APP_KATAPULT)]
    finally:
        for p in (node, hub):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                assert p.wait(5) == 0


# ---------------------------------------------------------------------------
# the node simulators


def test_klipper_node_dictionary_and_stream_commands(hub, nodes, host):
    node = nodes.klipper(UUID_A, version="v0.12.0-396-g2d5a2aa8", mcu="stm32h723xx",
                         canbus_frequency=500000)
    cn.set_klipper_nodeid(host, UUID_A, 4)
    assert node.wait_for(lambda n: n.nodeid == 4, 2)
    compressed, stats = cn.host_identify(host, 4)
    dictionary = json.loads(zlib.decompress(compressed))
    assert dictionary["version"] == "v0.12.0-396-g2d5a2aa8"
    assert dictionary["config"]["MCU"] == "stm32h723xx"
    assert dictionary["config"]["CANBUS_FREQUENCY"] == 500000
    assert "get_canbus_id" in dictionary["commands"]
    assert len(compressed) > 2000 and stats["naks"] == 1       # host starts at seq 1

    seq = node.next_seq
    blocks = klipper_exchange(host, 4, seq, node.commands.encode("get_canbus_id"))
    replies = [node.responses.parse(content) for _, content in blocks if content]
    assert replies == [[("canbus_id", {"canbus_uuid": bytes.fromhex(UUID_A),
                                       "canbus_nodeid": 4})]]
    assert blocks[-1] == ((seq + 1) & 0x0F, b"")                 # the ack


def test_nodeid_conflict_and_held_nodes(hub, nodes, host):
    a = nodes.klipper(UUID_A)
    b = nodes.klipper(UUID_B)
    c = nodes.klipper(UUID_C, assigned_by_klipper=6)
    assert sorted(cn.query_unassigned(host, QUERY_TIMEOUT)) == sorted([(UUID_A, 1), (UUID_B, 1)])
    cn.set_klipper_nodeid(host, UUID_A, 4)
    cn.set_klipper_nodeid(host, UUID_B, 5)
    assert b.wait_for(lambda n: n.nodeid == 5, 2) and a.wait_for(lambda n: n.nodeid == 4, 2)
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == []      # all assigned, C held by "Klipper"

    # Giving B the id A uses: A drops it and shuts down (canserial.c).
    cn.set_klipper_nodeid(host, UUID_B, 4)
    assert a.wait_for(lambda n: n.shutdown_reason is not None, 2)
    assert a.shutdown_reason == cn.CONFLICT_REASON and a.nodeid is None and a.is_shutdown
    assert b.wait_for(lambda n: n.nodeid == 4, 2) and b.shutdown_reason is None
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_A, 1)]

    # A shut down node still identifies, other commands get is_shutdown.
    cn.set_klipper_nodeid(host, UUID_A, 7)
    assert a.wait_for(lambda n: n.nodeid == 7, 2)
    blocks = klipper_exchange(host, 7, 0, a.commands.encode("allocate_oids", count=3))
    replies = [a.responses.parse(content) for _, content in blocks if content]
    reason_id = a.static_strings[cn.CONFLICT_REASON]
    assert replies == [[("is_shutdown", {"static_string_id": reason_id})]]

    # Another node transmitting on C's reply id is a conflict too.
    hub.inject("can0", cn.node_tx_id(6), b"\x00")
    assert c.wait_for(lambda n: n.nodeid is None, 2)
    assert c.shutdown_reason == cn.CONFLICT_REASON
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_C, 1)]


def test_katapult_node_query_and_connect_through_shim(hub, nodes, shimmed, host):
    node = nodes.katapult(UUID_B, mcu="stm32f446xx", app_start=0x08008000,
                          katapult_version="v0.0.1-110-gb0bf421")
    rc, lines = shimmed.run("bind:can0", "send:3F0#00", "expect:3F1:2000")
    assert rc == 0 and "RX can0 1001 3F1#20%s11" % UUID_B.upper() in lines
    # Klipper's set-nodeid means nothing to Katapult.
    cn.set_klipper_nodeid(host, UUID_B, 5)
    assert node.wait_for(lambda n: n.admin[-1][0] == "set_klipper_nodeid", 2)
    assert node.nodeid is None
    rc, lines = shimmed.run("bind:can0", "send:3F0#11%s80" % UUID_B,
                            "stream:128:01881100F17C9903:300")
    assert rc == 0, lines
    assert node.nodeid == 128
    stream = bytes.fromhex([line for line in lines if line.startswith("STREAM ")][0][7:])
    assert stream[:3] == b"\x01\x88\xa0" and stream[-2:] == b"\x99\x03"
    assert len(stream) == stream[3] * 4 + 8
    assert klipper_proto.crc16(stream[2:-4]) == struct.unpack("<H", stream[-4:-2])[0]
    assert struct.unpack_from("<I", stream, 4)[0] == cn.KATAPULT_CONNECT
    assert cn.parse_connect_payload(stream[8:-4]) == {
        "proto_version": 0x00010100, "app_start": 0x08008000, "block_size": 64,
        "mcu": "stm32f446xx", "version": "v0.0.1-110-gb0bf421"}

    code, payload = cn.katapult_command(host, 128, cn.KATAPULT_GET_CANBUS_ID)
    assert code == cn.KATAPULT_ACK and payload[4:] == bytes.fromhex(UUID_B) + b"\0\0"
    cn.clear_katapult_nodeids(host)
    assert node.wait_for(lambda n: n.nodeid is None, 2)
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_B, cn.APP_KATAPULT)]


def test_katapult_protocol_errors_and_old_version(hub, nodes, host):
    node = nodes.katapult(UUID_B, proto_version=0x00010000)
    cn.set_katapult_nodeid(host, UUID_B, 128)
    assert node.wait_for(lambda n: n.nodeid == 128, 2)
    info = cn.katapult_connect(host, 128)
    assert info["proto_version"] == 0x00010000 and info["mcu"] == cn.DEFAULT_MCU
    assert info["version"] == ""                # protocol < 1.1.0: MCU only
    assert cn.katapult_command(host, 128, 0x42) == (cn.KATAPULT_COMMAND_ERROR, b"")
    block = struct.pack("<I", 0x08000000) + b"\xff" * 64      # below the application
    assert cn.katapult_command(host, 128, cn.KATAPULT_SEND_BLOCK, block)[0] == \
        cn.KATAPULT_COMMAND_ERROR
    cn.send_stream(host, 128, b"\x01\x88\x11\x00\x00\x00\x99\x03")  # bad CRC
    assert host.recv_until(lambda f: f.can_id == cn.node_tx_id(128), 1)[-1].data == \
        cn.katapult_frame(cn.KATAPULT_NACK)
    assert cn.katapult_connect(host, 128)["mcu"] == cn.DEFAULT_MCU   # resynchronised
    # A frame longer than Katapult's 128-byte command buffer: NACKed at once,
    # as soon as its header is in (the real one never waits for the rest).
    cn.send_stream(host, 128, b"\x01\x88\x12\x1f\0")    # 31 words: 132 bytes
    assert host.recv_until(lambda f: f.can_id == cn.node_tx_id(128), 1)[-1].data == \
        cn.katapult_frame(cn.KATAPULT_NACK)
    assert cn.katapult_connect(host, 128)["mcu"] == cn.DEFAULT_MCU   # resynchronised


def test_bootloader_request_and_back(hub, nodes, shimmed, host):
    modes = []
    node = nodes.klipper(UUID_A, reboot_delay=0.05,
                         on_mode_change=lambda n, mode: modes.append(mode))
    rc, lines = shimmed.run("bind:can0", "send:3F0#01%s04" % UUID_A, "send:3F0#02%s" % UUID_B,
                            "send:3F0#02%s" % UUID_A)
    assert rc == 0, lines
    assert node.wait_for(lambda n: n.mode == "katapult", 2)
    assert node.bootloader_requested and node.nodeid is None
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_A, cn.APP_KATAPULT)]
    cn.set_katapult_nodeid(host, UUID_A, 128)
    assert node.wait_for(lambda n: n.nodeid == 128, 2)
    assert cn.katapult_connect(host, 128)["app_start"] == 0x08002000
    code, payload = cn.katapult_command(host, 128, cn.KATAPULT_COMPLETE)
    assert code == cn.KATAPULT_ACK and payload == struct.pack("<I", cn.KATAPULT_COMPLETE)
    assert node.wait_for(lambda n: n.mode == "klipper", 2)
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_A, cn.APP_KLIPPER)]
    assert node.boots == ["klipper", "katapult", "klipper"] and modes == ["katapult", "klipper"]


def test_katapult_flash_boots_the_new_firmware(hub, nodes, host):
    node = nodes.katapult(UUID_B)               # no application yet
    _, compressed = cn.can_dictionary("v0.13.0-99-gdeadbee", cn.DEFAULT_MCU)
    image = struct.pack("<II", 0x20024000, 0x08002101) + b"\0" * 248 + compressed + b"\0" * 100
    image += b"\xff" * (-len(image) % 64)
    cn.set_katapult_nodeid(host, UUID_B, 128)
    assert node.wait_for(lambda n: n.nodeid == 128, 2)
    start = cn.katapult_connect(host, 128)["app_start"]
    for offset in range(0, len(image), 64):
        address = start + offset
        code, payload = cn.katapult_command(host, 128, cn.KATAPULT_SEND_BLOCK,
                                            struct.pack("<I", address) + image[offset:offset + 64])
        assert code == cn.KATAPULT_ACK and payload == struct.pack("<II", cn.KATAPULT_SEND_BLOCK,
                                                                  address)
    code, payload = cn.katapult_command(host, 128, cn.KATAPULT_SEND_EOF)
    assert struct.unpack("<II", payload) == (cn.KATAPULT_SEND_EOF, (len(image) + 2047) // 2048)
    code, payload = cn.katapult_command(host, 128, cn.KATAPULT_REQUEST_BLOCK,
                                        struct.pack("<I", start + 64))
    assert payload[8:] == image[64:128]
    assert node.image() == image
    cn.katapult_command(host, 128, cn.KATAPULT_COMPLETE)
    assert node.wait_for(lambda n: n.mode == "klipper", 2)
    assert node.version == "v0.13.0-99-gdeadbee"
    assert cn.query_unassigned(host, QUERY_TIMEOUT) == [(UUID_B, cn.APP_KLIPPER)]
    cn.set_klipper_nodeid(host, UUID_B, 4)
    assert node.wait_for(lambda n: n.nodeid == 4, 2)
    compressed_back, _ = cn.host_identify(host, 4)
    assert zlib.decompress(compressed_back) == zlib.decompress(compressed)


def test_faults(hub, nodes, host, shimmed):
    silent = nodes.klipper(UUID_A, fault="silent")
    garbage = nodes.klipper(UUID_B, fault="garbage")
    flaky = nodes.klipper(UUID_C, fault="disconnect:3")
    assert sorted(cn.query_unassigned(host, QUERY_TIMEOUT)) == sorted([(UUID_B, 1), (UUID_C, 1)])
    assert silent.frames[0].data == b"\x00" and silent.sent == []   # seen, not answered
    cn.set_klipper_nodeid(host, UUID_B, 5)
    cn.set_klipper_nodeid(host, UUID_C, 6)      # the 3rd admin frame C handles
    assert garbage.wait_for(lambda n: n.nodeid == 5, 2) and flaky.wait_for(
        lambda n: n.nodeid == 6 and n.disconnected, 2)
    rc, lines = shimmed.run("bind:can0", "identify:5:500")
    assert rc == 2 and lines[-1].startswith("IDENTIFY_TIMEOUT")
    assert int(lines[-1].split("got=")[1]) >= 8                 # junk came back
    with pytest.raises(TimeoutError):
        cn.host_identify(host, 6, timeout=0.5)
    assert flaky.frames_to(cn.node_rx_id(6))                     # received, not answered
    flaky.set_fault(None)
    compressed, _ = cn.host_identify(host, 6)
    assert zlib.decompress(compressed)


@pytest.mark.skipif(not shutil.which("cansend") or not shutil.which("candump"),
                    reason="can-utils not installed")
def test_cansend_candump_under_shim(hub, nodes, shimmed):
    nodes.klipper(UUID_A)
    dump_all = shimmed.start(argv=["candump", "-L", "can0"])
    dump_replies = shimmed.start(argv=["candump", "-L", "any,3F1:7FF"])
    shimmed.wait_registered("can0")
    shimmed.wait_registered("")
    r = subprocess.run(["cansend", "can0", "3F0#00"], env=shimmed.env(), capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert hub.wait_for(lambda h: sum(1 for f in h.frames_on(can_id=0x3F1)
                                      for name in f.receivers if "candump" in name) == 2, 5)
    outputs = []
    for p in (dump_all, dump_replies):
        p.send_signal(signal.SIGINT)
        rc, lines, err = shimmed.finish(p)
        assert rc == 0, err
        outputs.append([line.split(" ", 1)[1] for line in lines])
    reply = "can0 3F1#20%s01" % UUID_A.upper()
    assert outputs[0] == ["can0 3F0#00", reply]
    assert outputs[1] == [reply]


CLIENT_SOURCE = r'''/* A SocketCAN test program for tests/integration/test_can_sim.py: runs the
 * operations given as arguments, in order, on one CAN_RAW socket the way a
 * daemon would (socket, setsockopt, bind, write/sendto, poll, recvfrom),
 * and prints one line per result.  Meant to run under the canshim preload. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/can.h>
#include <linux/can/raw.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int sock = -1;

static long now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *errname(int e) {
        const char *name = strerrorname_np(e);
        return name ? name : "?";
}

static int parse_hex(const char *hex, unsigned char *out, size_t max) {
        size_t n = strlen(hex);
        if (n % 2 || n / 2 > max)
                return -1;
        for (size_t i = 0; i < n / 2; i++) {
                unsigned v;
                if (sscanf(hex + 2 * i, "%2x", &v) != 1)
                        return -1;
                out[i] = (unsigned char) v;
        }
        return (int) (n / 2);
}

/* "123#DEADBEEF" or "12345678#00" (8 digits: extended id) */
static int parse_frame(const char *text, struct can_frame *frame) {
        const char *hash = strchr(text, '#');
        if (!hash)
                return -1;
        memset(frame, 0, sizeof(*frame));
        frame->can_id = (canid_t) strtoul(text, NULL, 16);
        if (hash - text == 8)
                frame->can_id |= CAN_EFF_FLAG;
        int n = parse_hex(hash + 1, frame->data, 8);
        if (n < 0)
                return -1;
        frame->len = (unsigned char) n;
        return 0;
}

static void print_frame(const char *what, int ifindex, const struct can_frame *frame) {
        char name[IF_NAMESIZE] = "?";
        if (!if_indextoname((unsigned) ifindex, name))
                snprintf(name, sizeof(name), "?%s", errname(errno));
        printf("%s %s %d ", what, name, ifindex);
        if (frame->can_id & CAN_EFF_FLAG)
                printf("%08X#", frame->can_id & CAN_EFF_MASK);
        else
                printf("%03X#", frame->can_id & CAN_SFF_MASK);
        for (int i = 0; i < frame->len && i < 8; i++)
                printf("%02X", frame->data[i]);
        printf("\n");
        fflush(stdout);
}

/* Wait up to @deadline for one frame; 1 = got one, 0 = timeout, -1 = error. */
static int receive(long deadline, struct can_frame *frame, int *ifindex) {
        for (;;) {
                long left = deadline - now_ms();
                if (left <= 0)
                        return 0;
                struct pollfd p = { .fd = sock, .events = POLLIN };
                int r = poll(&p, 1, (int) left);
                if (r == 0)
                        return 0;
                if (r < 0)
                        return -1;
                struct sockaddr_can addr;
                socklen_t len = sizeof(addr);
                ssize_t n = recvfrom(sock, frame, sizeof(*frame), MSG_DONTWAIT,
                                     (struct sockaddr *) &addr, &len);
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        continue;
                if (n < 0) {
                        printf("RECV_ERR %s\n", errname(errno));
                        fflush(stdout);
                        continue;
                }
                if (n != CAN_MTU || len < sizeof(addr) || addr.can_family != AF_CAN) {
                        printf("BAD_RECV n=%zd len=%u family=%d\n", n, len, addr.can_family);
                        return -1;
                }
                *ifindex = addr.can_ifindex;
                return 1;
        }
}

static void send_frame(const struct can_frame *frame, const char *ifname) {
        ssize_t n;
        if (ifname) {
                struct sockaddr_can addr = { .can_family = AF_CAN };
                addr.can_ifindex = (int) if_nametoindex(ifname);
                n = sendto(sock, frame, sizeof(*frame), 0, (struct sockaddr *) &addr, sizeof(addr));
        } else
                n = write(sock, frame, sizeof(*frame));
        if (n == CAN_MTU)
                printf("SEND_OK\n");
        else
                printf("SEND_ERR %s\n", n < 0 ? errname(errno) : "short");
        fflush(stdout);
}

static uint16_t crc16(const unsigned char *data, size_t len) {
        uint16_t crc = 0xffff;
        for (size_t i = 0; i < len; i++) {
                uint8_t d = data[i] ^ (crc & 0xff);
                d ^= d << 4;
                crc = ((uint16_t) d << 8 | crc >> 8) ^ (d >> 4) ^ ((uint16_t) d << 3);
        }
        return crc;
}

/* Send @bytes to node @nodeid and collect its reply stream for @ms. */
static int stream(int nodeid, const unsigned char *bytes, size_t len, int ms, bool identify) {
        for (size_t pos = 0; pos < len; pos += 8) {
                struct can_frame frame = { .can_id = 0x100 + 2 * (canid_t) nodeid };
                frame.len = (unsigned char) (len - pos < 8 ? len - pos : 8);
                memcpy(frame.data, bytes + pos, frame.len);
                if (write(sock, &frame, sizeof(frame)) != CAN_MTU) {
                        printf("SEND_ERR %s\n", errname(errno));
                        return 1;
                }
        }
        unsigned char buf[512];
        size_t have = 0;
        long deadline = now_ms() + ms;
        for (;;) {
                struct can_frame frame;
                int ifindex;
                int r = receive(deadline, &frame, &ifindex);
                if (r <= 0)
                        break;
                if (frame.can_id != 0x101 + 2 * (canid_t) nodeid || have + frame.len > sizeof(buf))
                        continue;
                memcpy(buf + have, frame.data, frame.len);
                have += frame.len;
                if (!identify)
                        continue;
                /* Look for a valid identify_response block (id 0). */
                for (size_t pos = 0; pos + 5 <= have; pos++) {
                        size_t blen = buf[pos];
                        if (blen < 5 || blen > 64 || pos + blen > have || (buf[pos + 1] & 0xf0) != 0x10 ||
                            buf[pos + blen - 1] != 0x7e)
                                continue;
                        uint16_t crc = crc16(buf + pos, blen - 3);
                        if ((buf[pos + blen - 3] << 8 | buf[pos + blen - 2]) != crc)
                                continue;
                        if (blen > 5 && buf[pos + 2] == 0x00) {
                                printf("IDENTIFY seq=%d offset=%d datalen=%d\n", buf[pos + 1] & 0x0f,
                                       buf[pos + 3], buf[pos + 4]);
                                fflush(stdout);
                                return 0;
                        }
                }
        }
        if (identify) {
                printf("IDENTIFY_TIMEOUT got=%zu\n", have);
                fflush(stdout);
                return 2;
        }
        printf("STREAM ");
        for (size_t i = 0; i < have; i++)
                printf("%02x", buf[i]);
        printf("\n");
        fflush(stdout);
        return 0;
}

static int set_filters(const char *list) {
        struct can_filter filters[16];
        int n = 0;
        char *copy = strdup(list), *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok && n < 16; tok = strtok_r(NULL, ",", &save)) {
                char *sep = strpbrk(tok, ":~");
                if (!sep)
                        return -1;
                filters[n].can_id = (canid_t) strtoul(tok, NULL, 16);
                filters[n].can_mask = (canid_t) strtoul(sep + 1, NULL, 16);
                if (sep - tok == 8)
                        filters[n].can_id |= CAN_EFF_FLAG;
                if (*sep == '~')
                        filters[n].can_id |= CAN_INV_FILTER;
                n++;
        }
        free(copy);
        if (setsockopt(sock, SOL_CAN_RAW, CAN_RAW_FILTER, filters, (socklen_t) (n * sizeof(filters[0]))) < 0) {
                printf("FILTER_ERR %s\n", errname(errno));
                return -1;
        }
        struct can_filter back[16];
        socklen_t len = sizeof(back);
        if (getsockopt(sock, SOL_CAN_RAW, CAN_RAW_FILTER, back, &len) < 0 ||
            len != n * sizeof(filters[0]) || memcmp(back, filters, len) != 0) {
                printf("FILTER_READBACK_ERR\n");
                return -1;
        }
        printf("FILTER %d\n", n);
        fflush(stdout);
        return 0;
}

static void info(const char *ifname) {
        struct ifreq ifr = {};
        unsigned idx = if_nametoindex(ifname);
        printf("INFO %s nametoindex=%u", ifname, idx);
        if (!idx)
                printf(" (%s)", errname(errno));
        strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
        if (ioctl(sock, SIOCGIFINDEX, &ifr) == 0)
                printf(" ifindex=%d", ifr.ifr_ifindex);
        else
                printf(" ifindex=%s", errname(errno));
        struct ifreq byindex = { .ifr_ifindex = ifr.ifr_ifindex };
        if (ioctl(sock, SIOCGIFNAME, &byindex) == 0)
                printf(" name=%s", byindex.ifr_name);
        if (ioctl(sock, SIOCGIFMTU, &ifr) == 0)
                printf(" mtu=%d", ifr.ifr_mtu);
        if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0)
                printf(" up=%d", (ifr.ifr_flags & IFF_UP) ? 1 : 0);
        printf("\nNAMEINDEX");
        struct if_nameindex *list = if_nameindex();
        for (struct if_nameindex *i = list; i && i->if_index; i++)
                printf(" %s:%u", i->if_name, i->if_index);
        if_freenameindex(list);
        printf("\n");
        fflush(stdout);
}

/* One thread of "flood": its own nonblocking socket on can0, @count frames
 * as fast as it can (more than the hub's queue holds), then close. */
static void *flood_thread(void *arg) {
        int count = *(int *) arg, sent = 0;
        int s = socket(AF_CAN, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, CAN_RAW);
        struct sockaddr_can addr = { .can_family = AF_CAN, .can_ifindex = (int) if_nametoindex("can0") };
        if (s < 0 || bind(s, (struct sockaddr *) &addr, sizeof(addr)) < 0)
                return NULL;
        for (int i = 0; i < count; i++) {
                struct can_frame frame = { .can_id = 0x555, .len = 2 };
                frame.data[0] = (unsigned char) i;
                frame.data[1] = (unsigned char) (i >> 8);
                if (write(s, &frame, sizeof(frame)) == CAN_MTU)
                        sent++;
        }
        close(s);
        return (void *) (intptr_t) sent;
}

int main(int argc, char **argv) {
        int type = SOCK_RAW | SOCK_CLOEXEC;
        int first = 1;
        if (argc > 1 && strcmp(argv[1], "-n") == 0) {
                type |= SOCK_NONBLOCK;
                first = 2;
        }
        sock = socket(AF_CAN, type, CAN_RAW);
        if (sock < 0) {
                printf("SOCKET_ERR %s\n", errname(errno));
                return 1;
        }
        for (int i = first; i < argc; i++) {
                char *op = argv[i], *arg = strchr(op, ':');
                if (arg)
                        *arg++ = 0;
                if (strcmp(op, "bind") == 0) {
                        struct sockaddr_can addr = { .can_family = AF_CAN };
                        if (strcmp(arg, "any") != 0) {
                                struct ifreq ifr = {};
                                strncpy(ifr.ifr_name, arg, IFNAMSIZ - 1);
                                addr.can_ifindex = ioctl(sock, SIOCGIFINDEX, &ifr) == 0 ? ifr.ifr_ifindex : 9999;
                        }
                        if (bind(sock, (struct sockaddr *) &addr, sizeof(addr)) < 0)
                                printf("BIND_ERR %s\n", errname(errno));
                        else
                                printf("BOUND %d\n", addr.can_ifindex);
                        fflush(stdout);
                } else if (strcmp(op, "filter") == 0) {
                        if (set_filters(arg) < 0)
                                return 1;
                } else if (strcmp(op, "join") == 0) {
                        int on = 1;
                        if (setsockopt(sock, SOL_CAN_RAW, CAN_RAW_JOIN_FILTERS, &on, sizeof(on)) < 0)
                                return 1;
                } else if (strcmp(op, "send") == 0 || strcmp(op, "sendto") == 0) {
                        const char *ifname = NULL;
                        if (op[4] == 't') {
                                ifname = arg;
                                arg = strchr(arg, ':');
                                *arg++ = 0;
                        }
                        struct can_frame frame;
                        if (parse_frame(arg, &frame) < 0)
                                return 1;
                        send_frame(&frame, ifname);
                } else if (strcmp(op, "expect") == 0 || strcmp(op, "listen") == 0) {
                        bool expect = op[0] == 'e';
                        canid_t want = expect ? (canid_t) strtoul(arg, &arg, 16) : 0;
                        long deadline = now_ms() + atol(expect ? arg + 1 : arg);
                        for (;;) {
                                struct can_frame frame;
                                int ifindex;
                                int r = receive(deadline, &frame, &ifindex);
                                if (r < 0)
                                        return 1;
                                if (r == 0) {
                                        if (expect) {
                                                printf("TIMEOUT\n");
                                                return 2;
                                        }
                                        break;
                                }
                                print_frame("RX", ifindex, &frame);
                                if (expect && (frame.can_id & CAN_EFF_MASK) == want)
                                        break;
                        }
                } else if (strcmp(op, "identify") == 0 || strcmp(op, "stream") == 0) {
                        int nodeid = (int) strtol(arg, &arg, 10);
                        unsigned char bytes[256];
                        int len;
                        if (op[0] == 'i') {
                                /* protocols.md §1.6: identify offset=0 count=40, seq 0 */
                                static const unsigned char block[] = { 0x08, 0x10, 0x01, 0x00, 0x28, 0x5e, 0x9f, 0x7e };
                                memcpy(bytes, block, sizeof(block));
                                len = sizeof(block);
                        } else {
                                char *hex = arg + 1;
                                arg = strchr(hex, ':');
                                *arg = 0;
                                len = parse_hex(hex, bytes, sizeof(bytes));
                        }
                        int r = stream(nodeid, bytes, (size_t) len, atoi(arg + 1), op[0] == 'i');
                        if (r)
                                return r;
                } else if (strcmp(op, "flood") == 0) {
                        int threads = atoi(arg), count = atoi(strchr(arg, ':') + 1), sent = 0;
                        pthread_t tids[16];
                        for (int t = 0; t < threads && t < 16; t++)
                                pthread_create(&tids[t], NULL, flood_thread, &count);
                        for (int t = 0; t < threads && t < 16; t++) {
                                void *result;
                                pthread_join(tids[t], &result);
                                sent += (int) (intptr_t) result;
                        }
                        printf("FLOOD sent=%d\n", sent);
                        fflush(stdout);
                } else if (strcmp(op, "info") == 0) {
                        info(arg);
                } else if (strcmp(op, "sleep") == 0) {
                        usleep((useconds_t) atoi(arg) * 1000);
                } else {
                        fprintf(stderr, "unknown operation %s\n", op);
                        return 1;
                }
        }
        close(sock);
        return 0;
}
'''
