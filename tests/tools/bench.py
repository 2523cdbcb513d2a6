#!/usr/bin/python3
"""The flashers' benchmark behind scripts/bench: how close each flasher of
daemon/flash/ comes to the speed of its link, and how it compares with a
real peer, all measured in this one run (design.md §6: speed goals are
ratios against something run side by side, never timed assertions in
tests).  It is not a test and is not part of scripts/run-tests.

Each flasher runs through the real C code, in the flash driver of
tests/tools/flash_driver.py (built here optimised, without sanitizers),
against a simulator whose link is rate-limited (tests/sim/linkmodel.py):
  katapult   KatapultSerial on a pty at SERIAL_BAUD, and a KatapultCanNode
             on the CAN hub at CAN_BITRATE (the driver under the CAN shim)
  stm32-dfu  Stm32DfuSim on the umockdev testbed at USB_RATE bytes/s, its
             bwPollTimeout counted as link time
  picoboot   Rp2040BootSim on the testbed at USB_RATE bytes/s
The simulator adds up link_seconds, the time the link (or the device the
host must wait for) was busy; the driver reports the wall time of the
flasher's write().  ratio = link_seconds / wall_seconds (<= 1; 1 = the
flasher waits for nothing but the link).  link-limit = image bytes /
link_seconds, measured = image bytes / wall_seconds.

The Linux process MCU's "link" is the file system: the linux flasher (a
whole driver process) is timed against `install -m 0755` of the same
bytes followed by `sync FILE` (fsync), alternately, RUNS times each;
medians; ratio = peer seconds / our seconds.  Peers: Debian's dfu-util
downloads (-D) and uploads (-U, the read back our flasher does too) the
same image into the same rate-limited DFU simulator; ratio = dfu-util's
seconds / ours, whole processes on both sides.

Prints one line per flasher, the peer lines and a summary, plus where
each run's time went (details).  Exit status: 0; 2 when something could
not be measured (a build or a flash failed); with --check, 1 when a
flasher's ratio is below TARGET.  Must run under umockdev's preload
(scripts/bench does that).

  bench.py [--check] [NAME...]    NAME: katapult-serial katapult-can
                                  stm32-dfu picoboot linux (default: all)
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for d in ("integration", "sim", "tools"):
    sys.path.insert(0, os.path.join(TESTS, d))

TARGET = 0.9
SERIAL_BAUD = 250000
CAN_BITRATE = 500000
# bytes/s.  USB full speed carries about 1000000, but umockdev's usbfs
# emulation costs ~1 ms per transfer whatever the rate (the details line
# shows it): at full speed the bench would time the emulation, not the
# flasher.  At this rate that cost stays around a tenth of the link time.
USB_RATE = 100000
RUNS = 15                       # linux: runs of ours and of the peer each

APP = 0x08008000                # STM32 application behind a 32 KiB bootloader
RP2040_APP = 0x10004000         # behind a 16 KiB Katapult
CAN_UUID = "0e0d81e4210c"
CAN_NODEID = 4
DFU_PORT, PICO_PORT, USB_BUS, DFU_DEV, PICO_DEV = "3-2", "3-3", 3, 7, 8

SIZES = {"katapult-serial": 32 * 1024, "katapult-can": 32 * 1024, "stm32-dfu": 64 * 1024,
         "picoboot": 256 * 1024, "linux": 1024 * 1024}


class BenchError(RuntimeError):
    """Something could not be measured."""


class Measurement:
    """One row: @link_seconds of the link (or the peer's seconds) and
    @wall_seconds of ours for @size bytes; details for the report."""

    def __init__(self, name, link, size, link_seconds, wall_seconds, details=""):
        self.name, self.link, self.size = name, link, size
        self.link_seconds, self.wall_seconds = link_seconds, wall_seconds
        self.details = details

    @property
    def ratio(self):
        return self.link_seconds / self.wall_seconds


def image_bytes(size, seed):
    return random.Random(seed).randbytes(size)


def gap_details(link, wall, count, unit):
    """Where the time beyond the link went, per @unit (round trip, USB
    transfer) of which the run had @count."""
    return ("wall %.3f s, link %.3f s, %d %ss: %.0f us beyond the link per %s"
            % (wall, link.link_seconds, count, unit, (wall - link.link_seconds) / max(count, 1) * 1e6,
               unit))


class Bench:
    def __init__(self, workdir, driver, builddir):
        self.workdir = workdir
        self.driver = driver
        self.builddir = builddir
        self.rows = []
        self.peers = []
        self.failures = []
        self._testbed = None

    # -- helpers -----------------------------------------------------------

    def testbed(self):
        if self._testbed is None:
            import harness
            self._testbed = harness.Testbed()
        return self._testbed

    def close(self):
        if self._testbed is not None:
            self._testbed.close()
            self._testbed = None

    def image_file(self, name, data):
        path = os.path.join(self.workdir, name + ".bin")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def flash(self, bootloader, link, image_path, start, env, *options, timeout=120):
        """Run the driver; returns (flash_driver.Output, process seconds)."""
        import flash_driver
        argv = flash_driver.command(self.driver, bootloader, link, image_path, start, start,
                                    *options)
        began = time.monotonic()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.monotonic() - began
        out = flash_driver.Output(proc.stdout)
        if proc.returncode != 0 or out.errno != 0 or out.seconds is None:
            raise BenchError("%s over %s failed (exit %s, errno %s): %s\n%s" % (
                bootloader, link, proc.returncode, out.errno, out.message, proc.stderr[-2000:]))
        return out, seconds

    @staticmethod
    def env(**extra):
        import harness
        return harness.clean_env(**extra)

    # -- the flashers --------------------------------------------------------

    def katapult_serial(self):
        import katapult_serial
        data = image_bytes(SIZES["katapult-serial"], 1)
        path = self.image_file("katapult-serial", data)
        k = katapult_serial.KatapultPty(app_start=APP, block_size=64, baud=SERIAL_BAUD)
        try:
            k.sim.link.reset()
            out, _ = self.flash("katapult", "serial:" + k.path, path, APP, self.env(),
                                "mcu=stm32f446xx")
            if k.sim.image()[:len(data)] != data:
                raise BenchError("katapult over serial: the image did not land in the flash")
            return Measurement("katapult", "serial %d baud" % SERIAL_BAUD, len(data),
                               k.sim.link.link_seconds, out.seconds,
                               gap_details(k.sim.link, out.seconds, len(k.sim.commands),
                                           "round trip"))
        finally:
            k.stop()

    def katapult_can(self):
        import can_node
        import canhub
        shim = os.path.join(self.builddir, "tests", "shim", "libcanshim.so")
        if not os.path.exists(shim):
            raise BenchError("%s is not built" % shim)
        data = image_bytes(SIZES["katapult-can"], 2)
        path = self.image_file("katapult-can", data)
        hub = canhub.CanHub(os.path.join(self.workdir, "canhub.sock"),
                            ifaces=[("can0", CAN_BITRATE)]).start()
        node = None
        try:
            node = can_node.KatapultCanNode(hub.path, "can0", CAN_UUID, mcu="stm32g0b1xx",
                                            app_start=APP, bitrate=CAN_BITRATE).start()
            with canhub.CanHubClient(hub.path, "can0", name="bench") as client:
                can_node.set_katapult_nodeid(client, CAN_UUID, CAN_NODEID)
                if not node.wait_for(lambda n: n.nodeid == CAN_NODEID, 5):
                    raise BenchError("the Katapult CAN node took no node id")
            node.link.reset()
            env = self.env(LD_PRELOAD=shim, CANSHIM_HUB=hub.path)
            out, _ = self.flash("katapult", "can:can0:%d" % CAN_NODEID, path, APP, env,
                                "mcu=stm32g0b1xx")
            if node.image()[:len(data)] != data:
                raise BenchError("katapult over CAN: the image did not land in the flash")
            return Measurement("katapult", "can %d bit/s" % CAN_BITRATE, len(data),
                               node.link.link_seconds, out.seconds,
                               gap_details(node.link, out.seconds, len(node.katapult_commands),
                                           "round trip"))
        finally:
            if node is not None:
                node.stop()
            hub.stop()

    def usb_flash(self, sim, port, devnum, bootloader, data, start):
        """Plug @sim, flash @data through @bootloader; (Measurement, process
        seconds).  The simulator stays plugged (for a peer).  A simulator
        without a link model gives a Measurement of the wall time only."""
        tb = self.testbed()
        sim.plug(tb.tb, port, USB_BUS, devnum)
        path = self.image_file(bootloader, data)
        if sim.link is not None:
            sim.link.reset()
        out, seconds = self.flash(bootloader, "usb:%d:%d" % (USB_BUS, devnum), path, start,
                                  self.env(**tb.env()))
        if sim.read_flash(start, len(data)) != data:
            raise BenchError("%s: the image did not land in the flash" % bootloader)
        if sim.link is None:
            return Measurement(bootloader, "usb", len(data), 0.0, out.seconds), seconds
        link = "usb %d B/s%s" % (USB_RATE, " + poll" if bootloader == "stm32-dfu" else "")
        with sim.lock:
            urbs = sim.ioctls.get("USBDEVFS_SUBMITURB", 0)
        return Measurement(bootloader, link, len(data), sim.link.link_seconds, out.seconds,
                           gap_details(sim.link, out.seconds, urbs, "USB transfer")), seconds

    def stm32_dfu(self):
        import usb_boot
        data = image_bytes(SIZES["stm32-dfu"], 3)
        sim = usb_boot.Stm32DfuSim(link_rate=USB_RATE)
        try:
            row, ours = self.usb_flash(sim, DFU_PORT, DFU_DEV, "stm32-dfu", data, APP)
            if sim.early_getstatus:
                raise BenchError("stm32-dfu did not honour bwPollTimeout: %r"
                                 % sim.early_getstatus[:5])
            try:
                self.dfu_util_peer(sim, data, ours)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                self.failures.append("dfu-util peer: %s" % e)
            return row
        finally:
            sim.unplug(self.testbed().tb)

    def dfu_util_peer(self, sim, data, ours):
        if shutil.which("dfu-util") is None:
            raise BenchError("dfu-util is not installed (apt-get install dfu-util)")
        path = self.image_file("dfu-util", data)
        readback = os.path.join(self.workdir, "dfu-util-readback.bin")
        env = self.env(**self.testbed().env())
        steps = [["-a", "0", "-s", "%#x" % APP, "-D", path],
                 ["-a", "0", "-s", "%#x:%d" % (APP, len(data)), "-U", readback]]
        with sim.lock:
            sim.flash[APP - sim.flash_base:APP - sim.flash_base + len(data)] = \
                b"\xff" * len(data)
        sim.link.reset()
        began = time.monotonic()
        for step in steps:
            proc = subprocess.run(["dfu-util"] + step, env=env, capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise BenchError("dfu-util %s failed:\n%s%s" % (" ".join(step), proc.stdout[-1500:],
                                                               proc.stderr[-1500:]))
        peer = time.monotonic() - began
        with open(readback, "rb") as f:
            if f.read() != data or sim.read_flash(APP, len(data)) != data:
                raise BenchError("dfu-util: the image did not land in the flash")
        version = subprocess.run(["dfu-util", "--version"], capture_output=True,
                                 text=True).stdout.split("\n")[0].strip()
        self.peers.append(Measurement(
            "stm32-dfu vs %s (-D, -U)" % version, "same DFU simulator", len(data), peer, ours,
            "dfu-util %.3f s (link %.3f s), ours %.3f s, whole processes"
            % (peer, sim.link.link_seconds, ours)))

    def picoboot(self):
        import usb_boot
        data = image_bytes(SIZES["picoboot"], 4)
        sim = usb_boot.Rp2040BootSim(link_rate=USB_RATE)
        try:
            row, _ = self.usb_flash(sim, PICO_PORT, PICO_DEV, "picoboot", data, RP2040_APP)
        finally:
            sim.unplug(self.testbed().tb)
        # No peer for PICOBOOT in Debian: the same flash without a rate
        # limit shows what one USB transfer costs in this emulation.
        sim = usb_boot.Rp2040BootSim()
        try:
            floor, _ = self.usb_flash(sim, PICO_PORT, PICO_DEV + 1, "picoboot", data, RP2040_APP)
            with sim.lock:
                urbs = sim.ioctls.get("USBDEVFS_SUBMITURB", 0)
        finally:
            sim.unplug(self.testbed().tb)
        row.details += "; without a rate limit %.3f s, %.0f us per USB transfer" % (
            floor.wall_seconds, floor.wall_seconds / max(urbs, 1) * 1e6)
        return row

    def linux(self):
        data = image_bytes(SIZES["linux"], 5)
        path = self.image_file("linux", data)
        # On the build directory's file system, not a tmpfs /tmp.
        target = tempfile.mkdtemp(prefix="bench-linux.", dir=self.builddir)
        try:
            ours, peer = [], []
            program = os.path.join(target, "klipper_mcu")
            peer_program = os.path.join(target, "klipper_mcu.peer")
            for _ in range(RUNS):
                _, seconds = self.flash("linux", "file:" + program, path, 0, self.env())
                ours.append(seconds)
                began = time.monotonic()
                for argv in (["install", "-m", "0755", path, peer_program],
                             ["sync", peer_program]):
                    subprocess.run(argv, check=True, env=self.env())
                peer.append(time.monotonic() - began)
            with open(program, "rb") as f:
                if f.read() != data:
                    raise BenchError("linux: the program was not installed")
            fstype = subprocess.run(["stat", "-f", "-c", "%T", target], capture_output=True,
                                    text=True).stdout.strip()
            return Measurement("linux", "file (peer: install + sync)", len(data),
                               statistics.median(peer), statistics.median(ours),
                               "medians of %d: ours %.2f ms, install -m 0755 + sync %.2f ms, "
                               "whole processes, on %s"
                               % (RUNS, statistics.median(ours) * 1e3,
                                  statistics.median(peer) * 1e3, fstype or "?"))
        finally:
            shutil.rmtree(target, ignore_errors=True)

    FLASHERS = (("katapult-serial", katapult_serial), ("katapult-can", katapult_can),
                ("stm32-dfu", stm32_dfu), ("picoboot", picoboot), ("linux", linux))

    def run(self, names):
        for name, method in self.FLASHERS:
            if names and name not in names:
                continue
            try:
                self.rows.append(method(self))
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                self.failures.append("%s: %s" % (name, e))


def print_report(bench):
    cols = "%-10s %-28s %11s %16s %14s %6s"
    print(cols % ("flasher", "link", "image-bytes", "link-limit(B/s)", "measured(B/s)", "ratio"))
    for r in bench.rows:
        print(cols % (r.name, r.link, r.size, "%.0f" % (r.size / r.link_seconds),
                      "%.0f" % (r.size / r.wall_seconds), "%.2f" % r.ratio))
    if bench.peers:
        print()
        pcols = "%-39s %11s %16s %14s %6s"
        print(pcols % ("peer, side by side", "image-bytes", "peer(B/s)", "ours(B/s)", "ratio"))
        for p in bench.peers:
            print(pcols % (p.name, p.size, "%.0f" % (p.size / p.link_seconds),
                           "%.0f" % (p.size / p.wall_seconds), "%.2f" % p.ratio))
    print()
    low = [r for r in bench.rows if r.ratio < TARGET]
    if bench.rows:
        worst = min(bench.rows, key=lambda r: r.ratio)
        print("summary: %d of %d flashers at or above %.2f of their link; lowest %.2f (%s, %s)"
              % (len(bench.rows) - len(low), len(bench.rows), TARGET, worst.ratio, worst.name,
                 worst.link))
    for p in bench.peers:
        print("summary: %s: ours takes %.2f of the peer's time"
              % (p.name, 1 / p.ratio))
    for f in bench.failures:
        print("NOT MEASURED: %s" % f)
    print()
    print("details:")
    for r in bench.rows + bench.peers:
        print("  %s, %s: %s" % (r.name, r.link, r.details))
    return low


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark the flashers against rate-limited "
                                 "simulated links and real peers.")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a flasher reaches less than %.2f of its link" % TARGET)
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help="flashers to run: " + " ".join(n for n, _ in Bench.FLASHERS))
    args = ap.parse_args(argv)
    unknown = set(args.names) - {n for n, _ in Bench.FLASHERS}
    if unknown:
        ap.error("unknown flasher %s" % ", ".join(sorted(unknown)))
    if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
        print("bench.py must run under umockdev-wrapper (use scripts/bench)", file=sys.stderr)
        return 2

    import flash_driver
    import harness
    builddir = harness.build_dir()
    workdir = tempfile.mkdtemp(prefix="mcuflashd-bench.")
    bench = None
    try:
        try:
            driver = flash_driver.build(workdir, sanitize=False, env=harness.clean_env())
        except flash_driver.BuildError as e:
            print(e, file=sys.stderr)
            return 2
        bench = Bench(workdir, driver, builddir)
        bench.run(args.names)
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    low = print_report(bench)
    if bench.failures:
        return 2
    if args.check and low:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
