"""The CAN transport and the admin exchanges against simulated CAN nodes:
a small C driver built from daemon/transport/can.c, daemon/proto/canbus.c
and the identify code runs under the LD_PRELOAD shim (tests/shim/canshim.c)
on the test hub (tests/sim/canhub.py) and talks to KlipperCanNode
simulators (tests/sim/can_node.py): discovery of unassigned nodes, node id
assignment, identify over the node's data ids, and an interface that goes
away under an open transport.

The driver is compiled with gcc into the test's tmp_path, so this file
needs no meson target; the shim is taken from the build dir when it was
built there, else compiled the same way.  It does not start the daemon:
the daemon's CAN discovery has its own tests.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "sim"))

import canhub  # noqa: E402
import can_node  # noqa: E402

DAEMON_SOURCES = [
    "daemon/transport/can.c",
    "daemon/transport/fdwait.c",
    "daemon/proto/canbus.c",
    "daemon/proto/klipper.c",
    "daemon/image/dictionary.c",
    "daemon/shared/log.c",
    "daemon/shared/interrupt.c",
]

CFLAGS = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wshadow",
          "-Wmissing-prototypes", "-Wstrict-prototypes", "-Werror", "-D_GNU_SOURCE",
          "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]

# discover IFACE LISTEN_MS: query, assign the daemon's first free node id
#   to every node found, identify each over its data ids.
# hold IFACE NODEID: open the stream transport, say "ready", then report
#   what read and write return (the test removes the interface meanwhile).
DRIVER = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "image/dictionary.h"
#include "proto/canbus.h"
#include "proto/klipper.h"
#include "shared/log.h"
#include "transport/can.h"

static int discover(const char *ifname, int listen_ms) {
        bool used[CANBUS_NODEID_MAX + 1] = {};
        struct canbus_node *nodes = NULL;
        int fd, n;

        fd = can_socket_open(ifname, NULL, 0);
        if (fd < 0) {
                printf("open %d\n", fd);
                return 1;
        }
        n = canbus_query(fd, listen_ms, used, &nodes);
        printf("query %d\n", n);
        if (n < 0)
                return 1;
        for (int i = 0; i < CANBUS_NODEID_MAX + 1; i++)
                if (used[i])
                        printf("used %d\n", i);

        for (int i = 0; i < n; i++) {
                char uuid[CANBUS_UUID_STRING_LEN];
                struct transport *t = NULL;
                struct klipper_dict *dict = NULL;
                uint8_t *data = NULL;
                size_t len = 0;
                int nodeid, r;

                canbus_uuid_to_string(nodes[i].uuid, uuid);
                nodeid = canbus_pick_nodeid(used);
                if (nodeid < 0) {
                        printf("pick %d\n", nodeid);
                        return 1;
                }
                used[nodeid] = true;
                r = canbus_set_klipper_nodeid(fd, nodes[i].uuid, (unsigned) nodeid);
                printf("node %s app %u nodeid %d set %d\n", uuid, nodes[i].app, nodeid, r);
                if (r < 0)
                        return 1;

                r = can_stream_transport_open(ifname, (unsigned) nodeid, &t);
                if (r < 0) {
                        printf("transport %d\n", r);
                        return 1;
                }
                r = klipper_identify(t, NULL, &data, &len);
                transport_free(t);
                if (r < 0) {
                        printf("identify %s %d\n", uuid, r);
                        return 1;
                }
                r = klipper_dict_parse_compressed(data, len, 0, &dict);
                free(data);
                if (r < 0) {
                        printf("dictionary %s %d\n", uuid, r);
                        return 1;
                }
                printf("version %s %s mcu %s\n", uuid, dict->version, dict->mcu ? dict->mcu : "");
                klipper_dict_free(dict);
        }

        free(nodes);
        close(fd);
        return 0;
}

static int hold(const char *ifname, unsigned nodeid) {
        struct transport *t = NULL;
        char line[64];
        uint8_t buf[64];
        ssize_t n;
        int r;

        r = can_stream_transport_open(ifname, nodeid, &t);
        printf("open %d\n", r);
        fflush(stdout);
        if (r < 0)
                return 1;
        if (!fgets(line, sizeof(line), stdin))
                return 1;
        n = transport_read(t, buf, sizeof(buf), 3000);
        printf("read %zd\n", n);
        r = transport_write(t, "\x7e", 1, 500);
        printf("write %d\n", r);
        transport_free(t);
        return 0;
}

int main(int argc, char **argv) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        if (getenv("DRIVER_DEBUG"))
                log_set_max_level(LOG_DEBUG);
        if (argc == 4 && strcmp(argv[1], "discover") == 0)
                return discover(argv[2], atoi(argv[3]));
        if (argc == 4 && strcmp(argv[1], "hold") == 0)
                return hold(argv[2], (unsigned) atoi(argv[3]));
        fprintf(stderr, "usage: driver discover IFACE LISTEN_MS | hold IFACE NODEID\n");
        return 2;
}
"""


def _build_dir():
    return os.environ.get("MCUFLASHD_BUILDDIR") or os.path.join(REPO, "build")


def _gcc(args, cwd):
    env = dict(os.environ, LD_PRELOAD="")
    result = subprocess.run(["gcc"] + args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail("gcc failed:\n%s%s" % (result.stdout, result.stderr), pytrace=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(driver path, shim path)"""
    out = tmp_path_factory.mktemp("can-driver")
    cfg = out / "config.h"
    cfg.write_text('#define PACKAGE_VERSION "0.0.0"\n')
    source = out / "driver.c"
    source.write_text(DRIVER)
    driver = out / "driver"
    _gcc(CFLAGS + ["-I" + os.path.join(REPO, "daemon"), "-I" + str(out), "-o", str(driver),
                   str(source)] + [os.path.join(REPO, s) for s in DAEMON_SOURCES] +
         ["-ljson-c", "-lz", "-lbz2"], cwd=str(out))

    shim = os.path.join(_build_dir(), "tests", "shim", "libcanshim.so")
    if not os.path.exists(shim):
        shim = str(out / "libcanshim.so")
        _gcc(["-shared", "-fPIC", "-O1", "-o", shim, os.path.join(REPO, "tests", "shim", "canshim.c"),
              "-ldl"], cwd=str(out))
    return str(driver), shim


@pytest.fixture
def hub(tmp_path):
    log = print if os.environ.get("MCUFLASHD_SIM_LOG") else None
    h = canhub.CanHub(str(tmp_path / "hub.sock"), ifaces=("can0",), log=log)
    h.start()
    yield h
    h.stop()


def driver_env(hub, shim):
    env = dict(os.environ)
    # The shim first (testing.md §5); nothing else is needed by the driver.
    # The driver is built with ASan, which must be told that it is not.
    env["LD_PRELOAD"] = shim
    env["ASAN_OPTIONS"] = "verify_asan_link_order=0:detect_leaks=1:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    env["CANSHIM_HUB"] = hub.path
    env["CANSHIM_IFACES"] = "can0"
    env.pop("CANSHIM_DEBUG", None)
    return env


def run_driver(built, hub, *args, timeout=20):
    driver, shim = built
    result = subprocess.run([driver] + [str(a) for a in args], env=driver_env(hub, shim),
                            capture_output=True, text=True, timeout=timeout)
    return result


class Chatter:
    """Inject frames on @can_id from a thread until stopped, so that the
    driver sees them whenever it listens."""

    def __init__(self, hub, can_id, interval=0.02):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(hub, can_id, interval),
                                        daemon=True)

    def _run(self, hub, can_id, interval):
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            hub.inject("can0", can_id, b"\x01")
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def assigned_ids(stdout):
    """uuid -> (app, node id) from the driver's "node" lines (all set 0)."""
    found = {}
    for line in stdout.splitlines():
        words = line.split()
        if words and words[0] == "node":
            assert words[6:] == ["set", "0"], line
            found[words[1]] = (int(words[3]), int(words[5]))
    return found


def test_discover_assign_identify(built, hub):
    held = can_node.KlipperCanNode(hub.path, "can0", "aabbccddeeff", version="v0.12.0-1-gheld",
                                   assigned_by_klipper=4)
    first = can_node.KlipperCanNode(hub.path, "can0", "0e0d81e4210c",
                                    version="v0.13.0-46-g8c72b4a5", mcu="stm32g0b1xx")
    second = can_node.KlipperCanNode(hub.path, "can0", "112233445566",
                                     version="v0.12.0-123-gabcdef12", mcu="rp2040")
    with held, first, second:
        result = run_driver(built, hub, "discover", "can0", 400)
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        lines = out.splitlines()
        # The node a Klipper host holds does not answer the query.
        assert "query 2" in lines, out
        ids = assigned_ids(out)
        assert sorted(ids) == ["0e0d81e4210c", "112233445566"]
        assert sorted(nodeid for _, nodeid in ids.values()) == [64, 65]
        assert all(app == can_node.APP_KLIPPER for app, _ in ids.values())
        assert "version 0e0d81e4210c v0.13.0-46-g8c72b4a5 mcu stm32g0b1xx" in lines, out
        assert "version 112233445566 v0.12.0-123-gabcdef12 mcu rp2040" in lines, out

        # The nodes took the ids and were identified over their data ids.
        assert first.nodeid == ids["0e0d81e4210c"][1]
        assert second.nodeid == ids["112233445566"][1]
        assert first.frames_to(0x100 + 2 * first.nodeid)
        assert second.frames_to(0x100 + 2 * second.nodeid)
        assert held.nodeid == 4 and held.shutdown_reason is None
        assert not held.frames_to(0x100 + 2 * 4)


def test_used_ids_avoided(built, hub):
    node = can_node.KlipperCanNode(hub.path, "can0", "0e0d81e4210c")
    with node:
        # Node 64 talks (0x181: node to host) while the driver listens.
        with Chatter(hub, 0x181):
            result = run_driver(built, hub, "discover", "can0", 300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "used 64" in result.stdout.splitlines()
        assert assigned_ids(result.stdout) == {"0e0d81e4210c": (can_node.APP_KLIPPER, 65)}
        assert node.nodeid == 65


def test_nothing_unassigned(built, hub):
    result = run_driver(built, hub, "discover", "can0", 200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["query 0"]


def test_missing_interface(built, hub):
    result = run_driver(built, hub, "discover", "can7", 100)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["open -19"]        # -ENODEV


def test_interface_down(built, hub):
    hub.set_up("can0", False)
    result = run_driver(built, hub, "discover", "can0", 100)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["open -100"]       # -ENETDOWN


@pytest.mark.parametrize("event", ["removed", "down"])
def test_interface_gone_under_transport(built, hub, event):
    driver, shim = built
    proc = subprocess.Popen([driver, "hold", "can0", "64"], env=driver_env(hub, shim),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "open 0"
        # The hub handles the socket's registration in its own thread.
        assert hub.wait_for(lambda h: h.registered("can0") == 1)
        if event == "removed":
            hub.remove_iface("can0")
        else:
            hub.set_up("can0", False)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    # Both directions report the vanished (or downed) interface as -ENODEV.
    assert out.splitlines() == ["read -19", "write -19"], out + err
