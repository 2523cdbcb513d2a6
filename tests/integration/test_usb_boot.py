"""The USB bootloader protocols of the daemon against simulated ROM
bootloaders on umockdev's emulated usbfs: daemon/transport/usb.c,
daemon/proto/dfu.c and daemon/proto/picoboot.c, built into a small driver
with gcc (this file needs no meson target), talk to Stm32DfuSim and
Rp2040BootSim from tests/sim/usb_boot.py; Debian's dfu-util runs against
the DFU simulator too, as the proof that the simulator is what a real host
tool accepts.

Covered: DFU status, memory layout, erase, download, upload, leave (and the
device vanishing on leave), poll timeouts honoured, recovery from stalls,
device-reported errors, a stuck busy device, unplug mid-download;
PICOBOOT exclusive access, EXIT_XIP, erase, write, read back, reboot,
device-reported errors with interface reset, stalls, a device that never
acknowledges, unplug mid-write.  Not covered here: the daemon's jobs that
use these (their own tests), UF2 images, the RP2040's mass storage side.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "sim"))

import harness  # noqa: E402
import usb_boot  # noqa: E402

SOURCES = ["daemon/transport/usb.c", "daemon/proto/dfu.c", "daemon/proto/picoboot.c",
           "daemon/shared/log.c", "daemon/shared/interrupt.c"]
CFLAGS = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wshadow",
          "-Wmissing-prototypes", "-Wstrict-prototypes", "-Werror", "-D_GNU_SOURCE",
          "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
# umockdev's preload comes before the ASan runtime.
ASAN_OPTIONS = "verify_asan_link_order=0:detect_leaks=1"

# Bus 3 is not used by the harness's boards (bus 1).
DFU_PORT, DFU_BUS, DFU_DEV = "3-2", 3, 7
PICO_PORT, PICO_BUS, PICO_DEV = "3-3", 3, 8
APP = 0x08008000                # behind a 32 KiB bootloader, as Klipper builds it
RP2040_FLASH = 0x10000000

DRIVER = r"""
/* Runs daemon/proto/dfu.c or picoboot.c steps against one USB device and
 * prints "OK <step> [details]" or "ERR <step> <errno> <text>" per step; an
 * error does not stop the run, the exit status is 2 if any step failed.
 *   driver dfu  <bus:dev|port> [alt:N] STEP…  status state layout idle
 *       timeout:MS erase:A masserase setaddr:A write:A:LEN:SEED read:A:LEN leave:A
 *   driver pico <bus:dev|port> STEP…  status timeout:MS exclusive:M exitxip
 *       erase:A:SIZE write:A:LEN:SEED read:A:LEN reboot:DELAY
 *   driver leave-app <bus:dev> ADDRESS     dfu_leave_to_application()
 *   driver reboot-app <bus:dev>            picoboot_reboot_to_application()
 * write sends LEN bytes of pattern SEED, read prints the bytes as hex. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/dfu.h"
#include "proto/picoboot.h"
#include "shared/log.h"
#include "transport/usb.h"

struct step {
        char name[32];
        unsigned long arg[3];
};

static void parse_step(const char *text, struct step *s) {
        const char *p = strchr(text, ':');
        size_t n = p ? (size_t) (p - text) : strlen(text);

        memset(s, 0, sizeof(*s));
        snprintf(s->name, sizeof(s->name), "%.*s", (int) MIN(n, sizeof(s->name) - 1), text);
        for (int i = 0; p && i < 3; i++) {
                s->arg[i] = strtoul(p + 1, NULL, 0);
                p = strchr(p + 1, ':');
        }
}

static uint8_t *pattern(size_t len, unsigned long seed) {
        uint8_t *buf = malloc(len ? len : 1);

        for (size_t i = 0; buf && i < len; i++)
                buf[i] = (uint8_t) (seed + i * 7 + (i >> 8));
        return buf;
}

static void print_hex(const char *text, const uint8_t *buf, size_t len) {
        printf("OK %s ", text);
        for (size_t i = 0; i < len; i++)
                printf("%02x", buf[i]);
        printf("\n");
}

static int report(const char *text, int r) {
        if (r < 0)
                printf("ERR %s %d %s\n", text, -r, strerror(-r));
        else if (r > 0)
                printf("OK %s\n", text);
        fflush(stdout);
        return r < 0 ? 2 : 0;
}

/* Returns < 0 on error, > 0 when the OK line is still to be printed, 0 when printed. */
static int dfu_step(struct dfu_device *d, const char *text, const struct step *s) {
        size_t size = d->functional.transfer_size;
        struct dfu_status st;
        int r;

        if (streq(s->name, "timeout")) {
                d->operation_timeout_ms = (unsigned) s->arg[0];
                return 1;
        }
        if (streq(s->name, "status")) {
                r = dfu_get_status(d, &st);
                if (r >= 0)
                        printf("OK %s state=%u status=%u poll=%u\n", text, st.state, st.status,
                               st.poll_timeout_ms);
                return r;
        }
        if (streq(s->name, "state")) {
                r = dfu_get_state(d);
                if (r >= 0)
                        printf("OK %s state=%d\n", text, r);
                return MIN(r, 0);
        }
        if (streq(s->name, "layout")) {
                if (!d->layout)
                        return -ENOENT;
                printf("OK %s name=%s", text, d->layout->name);
                for (size_t i = 0; i < d->layout->n_segments; i++)
                        printf(" 0x%08x:%u*%u:%u", d->layout->segments[i].start,
                               d->layout->segments[i].sector_count, d->layout->segments[i].sector_size,
                               d->layout->segments[i].flags);
                printf("\n");
                return 0;
        }
        if (streq(s->name, "idle"))
                return dfu_ensure_idle(d) ?: 1;
        if (streq(s->name, "erase"))
                return dfuse_erase_sector(d, (uint32_t) s->arg[0]) ?: 1;
        if (streq(s->name, "masserase"))
                return dfuse_mass_erase(d) ?: 1;
        if (streq(s->name, "setaddr"))
                return dfuse_set_address(d, (uint32_t) s->arg[0]) ?: 1;
        if (streq(s->name, "leave"))
                return dfuse_leave(d, (uint32_t) s->arg[0]) ?: 1;
        if (streq(s->name, "write")) {
                _cleanup_free_ uint8_t *buf = pattern(s->arg[1], s->arg[2]);

                r = dfuse_set_address(d, (uint32_t) s->arg[0]);
                for (size_t off = 0; r >= 0 && off < s->arg[1]; off += size)
                        r = dfu_download_block(d, (uint16_t) (2 + off / size), buf + off,
                                               MIN(size, s->arg[1] - off));
                return r ?: 1;
        }
        if (streq(s->name, "read")) {
                _cleanup_free_ uint8_t *buf = malloc(s->arg[1] ? s->arg[1] : 1);

                r = dfuse_set_address(d, (uint32_t) s->arg[0]);
                for (size_t off = 0; r >= 0 && off < s->arg[1]; off += size) {
                        size_t want = MIN(size, s->arg[1] - off);

                        r = dfu_upload_block(d, (uint16_t) (2 + off / size), buf + off, want);
                        if (r >= 0 && (size_t) r != want)
                                r = -EIO;
                }
                if (r >= 0)
                        print_hex(text, buf, s->arg[1]);
                return MIN(r, 0);
        }
        return -EINVAL;
}

static int pico_step(struct picoboot_device *p, const char *text, const struct step *s) {
        struct picoboot_status st;
        int r;

        if (streq(s->name, "timeout")) {
                p->command_timeout_ms = p->data_timeout_ms = (unsigned) s->arg[0];
                return 1;
        }
        if (streq(s->name, "status")) {
                r = picoboot_get_status(p, &st);
                if (r >= 0)
                        printf("OK %s token=%u code=%u cmd=0x%02x busy=%d\n", text, st.token, st.code,
                               st.command, st.in_progress);
                return r;
        }
        if (streq(s->name, "exclusive"))
                return picoboot_exclusive_access(p, (enum picoboot_exclusive) s->arg[0]) ?: 1;
        if (streq(s->name, "exitxip"))
                return picoboot_exit_xip(p) ?: 1;
        if (streq(s->name, "erase"))
                return picoboot_flash_erase(p, (uint32_t) s->arg[0], (uint32_t) s->arg[1]) ?: 1;
        if (streq(s->name, "reboot"))
                return picoboot_reboot(p, 0, 0, (uint32_t) s->arg[0]) ?: 1;
        if (streq(s->name, "write")) {
                _cleanup_free_ uint8_t *buf = pattern(s->arg[1], s->arg[2]);

                return picoboot_write(p, (uint32_t) s->arg[0], buf, (uint32_t) s->arg[1]) ?: 1;
        }
        if (streq(s->name, "read")) {
                _cleanup_free_ uint8_t *buf = malloc(s->arg[1] ? s->arg[1] : 1);

                r = picoboot_read(p, (uint32_t) s->arg[0], buf, (uint32_t) s->arg[1]);
                if (r >= 0)
                        print_hex(text, buf, s->arg[1]);
                return r;
        }
        return -EINVAL;
}

int main(int argc, char **argv) {
        _cleanup_(usb_closep) struct usb_device *usb = NULL;
        _cleanup_(dfu_freep) struct dfu_device *dfu = NULL;
        _cleanup_(picoboot_freep) struct picoboot_device *pico = NULL;
        unsigned bus, dev, alt = 0;
        int first = 3, failed = 0, r;

        if (argc < 3)
                return 1;
        log_set_max_level(LOG_DEBUG);
        if (streq(argv[1], "leave-app") || streq(argv[1], "reboot-app")) {
                if (sscanf(argv[2], "%u:%u", &bus, &dev) != 2)
                        return 1;
                if (streq(argv[1], "leave-app"))
                        r = dfu_leave_to_application(bus, dev,
                                                     (uint32_t) strtoul(argc > 3 ? argv[3] : "0", NULL, 0));
                else
                        r = picoboot_reboot_to_application(bus, dev);
                return report(argv[1], r < 0 ? r : 1);
        }
        if (sscanf(argv[2], "%u:%u", &bus, &dev) == 2)
                r = usb_open_busdev(bus, dev, &usb);
        else
                r = usb_open_port(argv[2], &usb);
        if (report("usb-open", r < 0 ? r : 1) != 0)
                return 2;

        if (streq(argv[1], "dfu")) {
                if (argc > 3 && startswith(argv[3], "alt:"))
                        alt = (unsigned) strtoul(argv[first++] + 4, NULL, 0);
                r = dfu_open(usb, alt, &dfu);
                if (report("open", r) != 0)
                        return 2;
                printf("OK open interface=%u alt=%u dfuse=%d transfer=%u version=%04x name=%s\n",
                       dfu->interface, dfu->alt, dfu->dfuse, dfu->functional.transfer_size,
                       dfu->functional.dfu_version, dfu->alt_name);
        } else {
                r = picoboot_open(usb, &pico);
                if (report("open", r) != 0)
                        return 2;
                printf("OK open interface=%u out=0x%02x in=0x%02x\n", pico->interface, pico->ep_out,
                       pico->ep_in);
        }

        for (int i = first; i < argc; i++) {
                struct step s;

                parse_step(argv[i], &s);
                r = dfu ? dfu_step(dfu, argv[i], &s) : pico_step(pico, argv[i], &s);
                failed |= report(argv[i], r);
        }
        return failed;
}
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("usb-boot-driver")
    src = out / "usb-boot-driver.c"
    src.write_text(DRIVER)
    exe = str(out / "usb-boot-driver")
    cflags = subprocess.run(["pkg-config", "--cflags", "libusb-1.0"], capture_output=True,
                            text=True, check=True).stdout.split()
    cmd = ["gcc"] + CFLAGS + ["-I", os.path.join(REPO, "daemon")] + cflags + [str(src)] + \
        [os.path.join(REPO, s) for s in SOURCES] + ["-lusb-1.0", "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True, env=harness.clean_env())
    assert build.returncode == 0, "driver build failed:\n" + build.stderr
    return exe


class Run:
    """The driver's output: step -> [(ok, details)], one per time the step
    was given."""

    def __init__(self, proc, sims):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.steps = {}
        for line in proc.stdout.splitlines():
            status, _, rest = line.partition(" ")
            step, _, details = rest.partition(" ")
            self.steps.setdefault(step, []).append((status == "OK", details))
        self._sims = sims

    def context(self):
        events = "\n".join("\n".join(s.events[-40:]) for s in self._sims)
        return "--- stdout\n%s--- stderr (tail)\n%s\n--- simulator\n%s" % (
            self.stdout, self.stderr[-4000:], events)

    def _result(self, step, n):
        results = self.steps.get(step, [])
        assert len(results) > n, "step %s (#%d) did not run\n%s" % (step, n, self.context())
        return results[n]

    def ok(self, step, n=0):
        """The details of the @n-th run of @step, which must have succeeded."""
        ok, details = self._result(step, n)
        assert ok, "step %s (#%d) failed: %s\n%s" % (step, n, details, self.context())
        return details

    def error(self, step, n=0):
        """The errno of the @n-th run of @step, which must have failed."""
        ok, details = self._result(step, n)
        assert not ok, "step %s (#%d) did not fail\n%s" % (step, n, self.context())
        return int(details.split()[0])


@pytest.fixture
def usb(testbed, driver):
    """usb.plug(sim, port, busnum, devnum) puts a simulator on the testbed;
    usb.run(kind, device, *steps) runs the driver inside the testbed."""
    class Usb:
        def __init__(self):
            self.sims = []

        def plug(self, sim, port, busnum, devnum):
            sim.plug(testbed.tb, port, busnum, devnum)
            self.sims.append(sim)
            return sim

        def run(self, kind, device, *steps, timeout=20):
            env = harness.clean_env(ASAN_OPTIONS=ASAN_OPTIONS, **testbed.env())
            proc = subprocess.run([driver, kind, device] + list(steps), env=env,
                                  capture_output=True, text=True, timeout=timeout)
            run = Run(proc, self.sims)
            assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, \
                run.context()
            return run

    u = Usb()
    yield u
    for sim in u.sims:
        sim.detach()


def pattern(length, seed):
    """The bytes the driver's write:ADDR:LEN:SEED sends."""
    return bytes((seed + i * 7 + (i >> 8)) & 0xff for i in range(length))


def dfu_sim(usb, **kwargs):
    kwargs.setdefault("poll_timeout_ms", 20)
    return usb.plug(usb_boot.Stm32DfuSim(**kwargs), DFU_PORT, DFU_BUS, DFU_DEV)


def pico_sim(usb, **kwargs):
    return usb.plug(usb_boot.Rp2040BootSim(**kwargs), PICO_PORT, PICO_BUS, PICO_DEV)


DFU = "%d:%d" % (DFU_BUS, DFU_DEV)
PICO = "%d:%d" % (PICO_BUS, PICO_DEV)


# ---------------------------------------------------------------------------
# STM32 DFU


def test_dfu_download_upload_leave(usb):
    left = []
    sim = dfu_sim(usb, on_leave=left.append)
    r = usb.run("dfu", DFU, "status", "layout", "idle", "erase:%#x" % APP,
                "write:%#x:5000:1" % APP, "read:%#x:5000" % APP, "leave:%#x" % APP)
    assert r.ok("open").endswith("name=@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg")
    assert "dfuse=1 transfer=2048 version=011a" in r.ok("open")
    assert r.ok("status") == "state=2 status=0 poll=0"
    assert r.ok("layout") == ("name=Internal Flash 0x08000000:4*16384:7 0x08010000:1*65536:7 "
                              "0x08020000:7*131072:7")
    r.ok("erase:%#x" % APP)
    r.ok("write:%#x:5000:1" % APP)
    assert bytes.fromhex(r.ok("read:%#x:5000" % APP)) == pattern(5000, 1)
    r.ok("leave:%#x" % APP)
    assert r.returncode == 0, r.context()

    sim.wait_for(lambda: left)
    assert left == [APP]
    with sim.lock:
        assert sim.erased == [APP]
        assert sim.writes == [(APP, 2048), (APP + 2048, 2048), (APP + 4096, 904)]
        assert sim.read_flash(APP, 5000) == pattern(5000, 1)
        assert sim.read_flash(APP + 5000, 16) == b"\xff" * 16
        assert sim.violations == []
        assert sim.early_getstatus == [], "bwPollTimeout not honoured"
        assert sim.disconnected


def test_dfu_open_by_port_and_alt(usb):
    dfu_sim(usb)
    r = usb.run("dfu", DFU_PORT, "alt:1", "layout")
    assert "interface=0 alt=1" in r.ok("open")
    assert r.ok("layout") == "name=Option Bytes 0x1fffc000:1*16:5"


def test_dfu_interface_held_elsewhere(usb, testbed):
    dfu_sim(usb)
    # Another program claims the DFU interface (USBDEVFS_CLAIMINTERFACE) and
    # keeps the node open: the driver gets EBUSY until it lets go.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, struct, sys\n"
         "fd = os.open('/dev/bus/usb/%03d/%03d', os.O_RDWR)\n"
         "fcntl.ioctl(fd, 0x8004550f, struct.pack('<I', 0))\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n" % (DFU_BUS, DFU_DEV)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=harness.clean_env(**testbed.env()))
    try:
        assert holder.stdout.readline() == "held\n"
        r = usb.run("dfu", DFU, "status")
        assert r.error("open") == 16                    # EBUSY
    finally:
        holder.communicate("", timeout=10)
    r = usb.run("dfu", DFU, "status")
    r.ok("status")


def test_dfu_recovers_from_stalls(usb):
    sim = dfu_sim(usb, fault="stall:erase")
    r = usb.run("dfu", DFU, "erase:%#x" % APP, "idle", "erase:%#x" % APP)
    assert r.error("erase:%#x" % APP) == 32            # EPIPE, then dfuERROR
    r.ok("idle")
    r.ok("erase:%#x" % APP, 1)
    with sim.lock:
        assert sim.fault_hits == ["stall:erase"]
        assert sim.erased == [APP]
        assert ("CLRSTATUS", 0, 0) in sim.requests

    sim.set_fault("stall:getstatus")
    r = usb.run("dfu", DFU, "write:%#x:64:2" % APP, "idle", "write:%#x:64:2" % APP)
    assert r.error("write:%#x:64:2" % APP) == 32
    r.ok("write:%#x:64:2" % APP, 1)
    assert r.returncode == 2
    with sim.lock:
        assert sim.read_flash(APP, 64) == pattern(64, 2)


def test_dfu_device_errors(usb):
    sim = dfu_sim(usb)
    # The bootloader's sectors are refused (errTARGET), as is programming
    # flash that is not erased (errPROG): the device says so in GETSTATUS.
    r = usb.run("dfu", DFU, "erase:0x08000000", "idle", "erase:%#x" % APP, "write:%#x:16:1" % APP,
                "write:%#x:16:2" % APP, "status")
    assert r.error("erase:0x08000000") == 121           # EREMOTEIO
    r.ok("erase:%#x" % APP)
    r.ok("write:%#x:16:1" % APP)
    assert r.error("write:%#x:16:2" % APP) == 121
    assert r.ok("status") == "state=10 status=6 poll=0"  # dfuERROR, errPROG
    with sim.lock:
        assert sim.violations == [
            "erase of sector 0x08000000 inside the bootloader",
            "write of 16 bytes at 0x08008000 to flash that is not erased"]


def test_dfu_stuck_busy_times_out(usb):
    sim = dfu_sim(usb, fault="busy", poll_timeout_ms=10)
    start = time.monotonic()
    r = usb.run("dfu", DFU, "timeout:300", "erase:%#x" % APP)
    assert r.error("erase:%#x" % APP) == 110             # ETIMEDOUT
    assert time.monotonic() - start < 5
    with sim.lock:
        assert sim.early_getstatus == []


def test_dfu_unplugged_mid_download(usb):
    gone = []
    sim = dfu_sim(usb, fault="disconnect:write", on_disconnect=gone.append)
    r = usb.run("dfu", DFU, "erase:%#x" % APP, "write:%#x:4096:1" % APP, "status")
    assert r.error("write:%#x:4096:1" % APP) == 19       # ENODEV
    assert r.error("status") == 19
    assert gone == ["write"]
    with sim.lock:
        assert sim.writes == []


@pytest.mark.parametrize("fault", ["disconnect:leave", "stall:leave"])
def test_dfu_leave_survives_reset(usb, fault):
    left = []
    sim = dfu_sim(usb, fault=fault, on_leave=left.append)
    r = usb.run("dfu", DFU, "leave:0x08000000")
    r.ok("leave:0x08000000")
    sim.wait_for(lambda: left)
    assert left == [0x08000000]


def test_dfu_leave_to_application(usb):
    left = []
    sim = dfu_sim(usb, on_leave=left.append)
    with sim.lock:
        sim.state, sim.status = usb_boot.DFU_ERROR, usb_boot.ERR_UNKNOWN    # as some ROMs start
    r = usb.run("leave-app", DFU, "%#x" % APP)
    r.ok("leave-app")
    sim.wait_for(lambda: left)
    assert left == [APP]
    with sim.lock:
        assert [q[0] for q in sim.requests] == ["GETSTATUS", "CLRSTATUS", "GETSTATUS", "DNLOAD",
                                                "GETSTATUS", "GETSTATUS", "DNLOAD", "GETSTATUS"]


def dfu_util(testbed, *args):
    if shutil.which("dfu-util") is None:
        pytest.skip("dfu-util is not installed (apt-get install dfu-util)")
    env = harness.clean_env(**testbed.env())
    return subprocess.run(["dfu-util"] + list(args), env=env, capture_output=True, text=True,
                          timeout=30)


def test_dfu_util_lists_simulator(usb, testbed):
    dfu_sim(usb)
    proc = dfu_util(testbed, "-l")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ('Found DFU: [0483:df11] ver=2200, devnum=7, cfg=1, intf=0, path="3-2", alt=0, '
            'name="@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg", '
            'serial="2E0036000851363131363530"') in proc.stdout
    assert 'alt=1, name="@Option Bytes  /0x1FFFC000/01*016 e"' in proc.stdout


def test_dfu_util_flashes_simulator(usb, testbed, tmp_path):
    left = []
    sim = dfu_sim(usb, on_leave=left.append)
    image = pattern(5000, 9)
    (tmp_path / "small.bin").write_bytes(image)
    proc = dfu_util(testbed, "-a", "0", "-s", "%#x:leave" % APP, "-D", str(tmp_path / "small.bin"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "File downloaded successfully" in proc.stdout
    sim.wait_for(lambda: left)
    assert left == [APP]
    with sim.lock:
        assert sim.read_flash(APP, len(image)) == image
        assert sim.erased == [APP]
        assert sim.violations == []
        assert sim.early_getstatus == []


# ---------------------------------------------------------------------------
# RP2040 PICOBOOT


def test_picoboot_erase_write_read_reboot(usb):
    reboots = []
    sim = pico_sim(usb, on_reboot=lambda *args: reboots.append(args))
    r = usb.run("pico", PICO, "exclusive:1", "exitxip", "erase:%#x:8192" % RP2040_FLASH,
                "write:%#x:512:3" % RP2040_FLASH, "read:%#x:512" % RP2040_FLASH, "status",
                "reboot:100")
    assert r.ok("open") == "interface=1 out=0x03 in=0x84"
    for step in ("exclusive:1", "exitxip", "erase:%#x:8192" % RP2040_FLASH,
                 "write:%#x:512:3" % RP2040_FLASH, "reboot:100"):
        r.ok(step)
    assert bytes.fromhex(r.ok("read:%#x:512" % RP2040_FLASH)) == pattern(512, 3)
    assert r.ok("status") == "token=5 code=0 cmd=0x84 busy=0"
    assert r.returncode == 0, r.context()

    sim.wait_for(lambda: reboots)
    assert reboots == [(0, 0, 100)]
    with sim.lock:
        assert sim.exclusive == 1
        assert sim.xip_exited
        assert sim.erased == [(RP2040_FLASH, 8192)]
        assert sim.writes == [(RP2040_FLASH, 512)]
        assert sim.read_flash(RP2040_FLASH, 512) == pattern(512, 3)
        assert sim.read_flash(RP2040_FLASH + 512, 16) == b"\xff" * 16
        assert [c[0] for c in sim.commands] == ["exclusive", "exitxip", "erase", "write", "read",
                                                "reboot"]
        assert [c[1] for c in sim.commands] == [1, 2, 3, 4, 5, 6]      # tokens count up
        assert sim.violations == []
        assert sim.disconnected


def test_picoboot_reboot_to_application(usb):
    reboots = []
    sim = pico_sim(usb, on_reboot=lambda *args: reboots.append(args))
    start = time.monotonic()
    r = usb.run("reboot-app", PICO)
    r.ok("reboot-app")
    assert time.monotonic() - start < 0.5           # acked at once, reboots 500 ms later
    sim.wait_for(lambda: reboots, timeout=3)
    assert reboots == [(0, 0, 500)]


def test_picoboot_device_error_and_recovery(usb):
    sim = pico_sim(usb)
    # Flash writes before EXIT_XIP: the ROM stalls, reports INVALID_STATE;
    # the interface reset makes the next commands work.
    r = usb.run("pico", PICO, "write:%#x:256:1" % RP2040_FLASH, "exitxip",
                "erase:%#x:4096" % RP2040_FLASH, "write:%#x:256:1" % RP2040_FLASH)
    assert r.error("write:%#x:256:1" % RP2040_FLASH) == 16     # EBUSY
    r.ok("exitxip")
    r.ok("erase:%#x:4096" % RP2040_FLASH)
    r.ok("write:%#x:256:1" % RP2040_FLASH, 1)
    with sim.lock:
        assert sim.violations == ["WRITE to flash without EXIT_XIP"]
        assert sim.interface_resets == 2                        # open + recovery
        assert sim.read_flash(RP2040_FLASH, 256) == pattern(256, 1)


def test_picoboot_checks_alignment_before_sending(usb):
    sim = pico_sim(usb)
    r = usb.run("pico", PICO, "exitxip", "erase:0x10000800:4096", "write:0x10000010:256:1",
                "write:0x20000001:3:1", "read:0x20000001:3")
    assert r.error("erase:0x10000800:4096") == 22
    assert r.error("write:0x10000010:256:1") == 22
    assert r.ok("read:0x20000001:3") == pattern(3, 1).hex()   # RAM takes any alignment
    with sim.lock:
        assert [c[0] for c in sim.commands] == ["exitxip", "write", "read"]


def test_picoboot_faults(usb):
    gone = []
    sim = pico_sim(usb, fault="stall:erase", on_disconnect=gone.append)
    r = usb.run("pico", PICO, "exitxip", "erase:%#x:4096" % RP2040_FLASH,
                "erase:%#x:4096" % RP2040_FLASH)
    assert r.error("erase:%#x:4096" % RP2040_FLASH) == 5       # EIO (UNKNOWN_ERROR)
    r.ok("erase:%#x:4096" % RP2040_FLASH, 1)
    with sim.lock:
        assert sim.erased == [(RP2040_FLASH, 4096)]             # the retry worked
        sim.set_fault("busy")
    start = time.monotonic()
    r = usb.run("pico", PICO, "timeout:300", "exclusive:1")
    assert r.error("exclusive:1") == 110                        # ETIMEDOUT
    assert time.monotonic() - start < 5

    sim.set_fault("disconnect:write")
    r = usb.run("pico", PICO, "exitxip", "write:%#x:256:1" % RP2040_FLASH, "status")
    assert r.error("write:%#x:256:1" % RP2040_FLASH) == 19     # ENODEV
    assert r.error("status") == 19
    assert gone == ["write"]
