"""The flashers of daemon/flash/ (Katapult, STM32 DfuSe, RP2040 PICOBOOT)
against the simulators: a small C driver (tests/tools/flash_driver.py),
compiled here with sanitizers from daemon/flash/*.c and the protocol,
transport and shared files they use, runs one flasher per call and prints
its progress and result.  Katapult runs on a plain pty (KatapultSerial);
DFU and PICOBOOT run inside the umockdev testbed against Stm32DfuSim and
Rp2040BootSim, as test_usb_boot.py does.

Checked: the image lands byte-exact in the simulated flash (last block or
page padded with 0xFF), the bootloader region is never touched, images
that do not fit the bootloader (wrong chip, wrong start, outside the
layout) are refused before anything is written, a device that stalls or
disconnects mid-write gives -EIO/-ENODEV with a message and a second
attempt succeeds, cancelling between blocks gives -ECANCELED, and the
flashers never leave the bootloader (no COMPLETE, no DFU leave, no
REBOOT).  Not covered: Katapult over CAN (same code with another
transport; test_can*.py cover the CAN stream), the daemon's Flash job.
"""

import errno
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "sim"))
sys.path.insert(0, os.path.join(REPO, "tests", "tools"))

import flash_driver  # noqa: E402
import harness  # noqa: E402
import katapult_serial  # noqa: E402
import usb_boot  # noqa: E402

# Bus 3 is not used by the harness's boards (bus 1).
DFU_PORT, DFU_BUS, DFU_DEV = "3-2", 3, 7
PICO_PORT, PICO_BUS, PICO_DEV = "3-3", 3, 8
STM32_FLASH = 0x08000000
APP = 0x08008000                # behind a 32 KiB bootloader, as Klipper builds it
RP2040_FLASH = 0x10000000
RP2040_APP = 0x10004000         # behind a 16 KiB Katapult


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        return flash_driver.build(tmp_path_factory.mktemp("flash-driver"), env=harness.clean_env())
    except flash_driver.BuildError as e:
        pytest.fail(str(e), pytrace=False)


class Result:
    """What one driver run printed: .errno (0 = success), .message,
    .progress [(phase, done, total)]."""

    def __init__(self, proc, sims):
        self.stdout, self.stderr = proc.stdout, proc.stderr
        out = flash_driver.Output(proc.stdout)
        self.progress, self.errno, self.message = out.progress, out.errno, out.message
        self._sims = sims
        assert proc.returncode == 0 and self.errno is not None, self.context()
        assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, \
            self.context()

    def context(self):
        events = "\n".join("\n".join(getattr(s, "events", [])[-40:]) for s in self._sims)
        return "--- stdout (tail)\n%s\n--- stderr (tail)\n%s\n--- simulator\n%s" % (
            self.stdout[-3000:], self.stderr[-4000:], events)

    def ok(self):
        assert self.errno == 0, "flasher failed: %s (%s)\n%s" % (
            os.strerror(self.errno), self.message, self.context())
        assert self.message == ""

    def failed(self, code):
        assert self.errno == code, "expected %s, got %s (%s)\n%s" % (
            errno.errorcode[code], errno.errorcode.get(self.errno, self.errno), self.message,
            self.context())
        assert self.message, "no message for a failure"

    def last(self, phase):
        runs = [p for p in self.progress if p[0] == phase]
        return runs[-1][1:] if runs else None


def pattern(length, seed):
    return bytes((seed + i * 7 + (i >> 8)) & 0xff for i in range(length))


def run_driver(driver, tmp_path, bootloader, link, image, start, app_start, *options, env=None,
               sims=(), timeout=60):
    path = tmp_path / ("image-%d.bin" % len(list(tmp_path.glob("image-*.bin"))))
    path.write_bytes(image)
    proc = subprocess.run(flash_driver.command(driver, bootloader, link, path, start, app_start,
                                               *options),
                          env=env or harness.clean_env(ASAN_OPTIONS=flash_driver.ASAN_OPTIONS),
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc, sims)


# ---------------------------------------------------------------------------
# Katapult on a serial line


@pytest.fixture
def katapult():
    made = []

    def make(**kwargs):
        kwargs.setdefault("app_start", APP)
        k = katapult_serial.KatapultPty(**kwargs)
        made.append(k)
        return k
    yield make
    for k in made:
        k.stop()


def katapult_flash(driver, tmp_path, k, image, start=APP, app_start=APP, *options):
    return run_driver(driver, tmp_path, "katapult", "serial:" + k.path, image, start, app_start,
                      *options)


def test_katapult_writes_and_verifies(driver, tmp_path, katapult):
    k = katapult(block_size=64)
    image = pattern(5000, 1)
    r = katapult_flash(driver, tmp_path, k, image, APP, APP, "mcu=stm32f446xx")
    r.ok()
    padded = 5056                                   # 79 blocks of 64
    assert r.last("writing") == (padded, padded)
    assert r.last("verifying") == (padded, padded)
    assert [p for p in r.progress if p[0] == "writing"][0] == ("writing", 64, padded)
    with k.sim.lock:
        assert k.sim.core.image() == image + b"\xff" * (padded - len(image))
        assert min(k.sim.flash) == APP              # nothing below the application
        names = [katapult_serial.katapult_core.COMMAND_NAMES.get(c, "0x%02x" % c)
                 for c, _ in k.sim.commands]
    assert names[:2] == ["0x90", "CONNECT"]
    assert names.count("SEND_BLOCK") == 79 and names.count("REQUEST_BLOCK") == 79
    assert names.index("SEND_EOF") == 2 + 79
    assert "COMPLETE" not in names                  # leaving is the reboot step's job
    assert k.sim.left is None


def test_katapult_refuses_wrong_target(driver, tmp_path, katapult):
    k = katapult(mcu="stm32f446xx", app_start=APP)
    image = pattern(256, 2)
    r = katapult_flash(driver, tmp_path, k, image, APP, APP, "mcu=stm32f103xe")
    r.failed(errno.EMEDIUMTYPE)
    assert "stm32f103xe" in r.message and "stm32f446xx" in r.message
    r = katapult_flash(driver, tmp_path, k, image, STM32_FLASH + 0x2000, STM32_FLASH + 0x2000)
    r.failed(errno.EMEDIUMTYPE)
    assert "0x08002000" in r.message and "0x08008000" in r.message
    assert "SEND_BLOCK" not in k.sim.command_names()
    assert k.sim.flash == {}


def test_katapult_disconnect_then_retry(driver, tmp_path, katapult):
    k = katapult(fault="disconnect:10")
    image = pattern(3000, 3)
    r = katapult_flash(driver, tmp_path, k, image)
    r.failed(errno.ENODEV)
    assert "disconnected" in r.message
    # The board comes back in Katapult (its flash as it was); try again.
    again = katapult(flash=k.sim.flash)
    r = katapult_flash(driver, tmp_path, again, image)
    r.ok()
    assert again.sim.image()[:len(image)] == image


def test_katapult_cancel_between_blocks(driver, tmp_path, katapult):
    k = katapult()
    r = katapult_flash(driver, tmp_path, k, pattern(4096, 4), APP, APP, "cancel-after=3")
    r.failed(errno.ECANCELED)
    names = k.sim.command_names()
    assert names.count("SEND_BLOCK") == 3
    assert "SEND_EOF" not in names and "COMPLETE" not in names


# ---------------------------------------------------------------------------
# USB: STM32 DfuSe and RP2040 PICOBOOT inside the testbed


@pytest.fixture
def usb(testbed, driver, tmp_path):
    """usb.plug(sim, port, busnum, devnum) puts a simulator on the testbed;
    usb.unplug(sim); usb.flash(bootloader, bus, dev, image, start,
    app_start, *options) runs the driver inside the testbed."""
    class Usb:
        def __init__(self):
            self.sims = []

        def plug(self, sim, port, busnum, devnum):
            sim.plug(testbed.tb, port, busnum, devnum)
            self.sims.append(sim)
            return sim

        def unplug(self, sim):
            sim.unplug(testbed.tb)

        def flash(self, bootloader, bus, dev, image, start, app_start, *options):
            env = harness.clean_env(ASAN_OPTIONS=flash_driver.ASAN_OPTIONS, **testbed.env())
            return run_driver(driver, tmp_path, bootloader, "usb:%d:%d" % (bus, dev), image, start,
                              app_start, *options, env=env, sims=self.sims)

    u = Usb()
    yield u
    for sim in u.sims:
        sim.detach()


BOOTLOADER = pattern(APP - STM32_FLASH, 0x5a)


def dfu_sim(usb, devnum=DFU_DEV, flash=None, **kwargs):
    kwargs.setdefault("poll_timeout_ms", 5)
    sim = usb_boot.Stm32DfuSim(**kwargs)
    with sim.lock:
        if flash is not None:
            sim.flash[:] = flash
        else:
            sim.flash[:len(BOOTLOADER)] = BOOTLOADER
    return usb.plug(sim, DFU_PORT, DFU_BUS, devnum)


def test_dfu_writes_erases_and_verifies(usb):
    sim = dfu_sim(usb)
    image = pattern(40000, 5)                       # 0x08008000..0x08011c40
    r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, image, APP, APP)
    r.ok()
    assert r.last("erasing") == (16384 + 16384 + 65536, 16384 + 16384 + 65536)
    assert r.last("writing") == (40000, 40000)
    assert r.last("verifying") == (40000, 40000)
    with sim.lock:
        assert sim.erased == [APP, APP + 0x4000, APP + 0x8000]
        assert sim.read_flash(APP, len(image)) == image
        assert sim.read_flash(APP + len(image), 64) == b"\xff" * 64
        assert sim.read_flash(STM32_FLASH, len(BOOTLOADER)) == BOOTLOADER
        assert sim.violations == []
        assert sim.early_getstatus == [], "bwPollTimeout not honoured"
        assert all(length <= 2048 for _, length in sim.writes)
        assert sim.left is None and not sim.disconnected    # still in DFU mode
        assert sim.state == usb_boot.DFU_IDLE


def test_dfu_refuses_ranges_outside_the_application(usb):
    sim = dfu_sim(usb)
    image = pattern(1024, 6)
    # Into the bootloader, before the allowed start, beyond the flash.
    for start in (STM32_FLASH, APP - 0x100, STM32_FLASH + 0x100000 - 512):
        r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, image, start, APP)
        r.failed(errno.EINVAL)
    # A start inside a sector that begins below the allowed start.
    r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, image, APP + 0x100, APP + 0x80)
    r.failed(errno.EINVAL)
    assert "bootloader" in r.message
    with sim.lock:
        assert sim.erased == [] and sim.writes == []
        assert [q for q in sim.requests if q[0] == "DNLOAD"] == []
        assert sim.read_flash(STM32_FLASH, len(BOOTLOADER)) == BOOTLOADER


def test_dfu_stall_then_retry(usb):
    sim = dfu_sim(usb, fault="stall:write")
    image = pattern(5000, 7)
    r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, image, APP, APP)
    r.failed(errno.EIO)
    assert "0x08008000" in r.message
    r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, image, APP, APP)
    r.ok()
    with sim.lock:
        assert sim.fault_hits == ["stall:write"]
        assert sim.read_flash(APP, len(image)) == image
        assert sim.read_flash(STM32_FLASH, len(BOOTLOADER)) == BOOTLOADER
        assert sim.violations == []


def test_dfu_cancel_between_blocks(usb):
    sim = dfu_sim(usb)
    r = usb.flash("stm32-dfu", DFU_BUS, DFU_DEV, pattern(5000, 9), APP, APP, "cancel-after=1")
    r.failed(errno.ECANCELED)
    with sim.lock:
        assert sim.writes == [(APP, 2048)]
        assert sim.read_flash(STM32_FLASH, len(BOOTLOADER)) == BOOTLOADER


KATAPULT_RP2040 = pattern(RP2040_APP - RP2040_FLASH, 0xa5)


def pico_sim(usb, devnum=PICO_DEV, flash=None, **kwargs):
    sim = usb_boot.Rp2040BootSim(**kwargs)
    with sim.lock:
        if flash is not None:
            sim.flash[:] = flash
        else:
            sim.flash[:len(KATAPULT_RP2040)] = KATAPULT_RP2040
    return usb.plug(sim, PICO_PORT, PICO_BUS, devnum)


def test_picoboot_writes_erases_and_verifies(usb):
    sim = pico_sim(usb)
    image = pattern(10000, 10)
    r = usb.flash("picoboot", PICO_BUS, PICO_DEV, image, RP2040_APP, RP2040_APP)
    r.ok()
    assert r.last("erasing") == (12288, 12288)
    assert r.last("writing") == (10240, 10240)      # 40 pages of 256
    assert r.last("verifying") == (10240, 10240)
    with sim.lock:
        names = [c[0] for c in sim.commands]
        assert names[:2] == ["exclusive", "exitxip"]
        assert sim.exclusive == 1
        assert sim.erased == [(RP2040_APP + n * 4096, 4096) for n in range(3)]
        assert all(a % 256 == 0 and n % 256 == 0 for a, n in sim.writes)
        assert sim.read_flash(RP2040_APP, len(image)) == image
        assert sim.read_flash(RP2040_APP + len(image), 12288 - len(image)) == \
            b"\xff" * (12288 - len(image))
        assert sim.read_flash(RP2040_FLASH, len(KATAPULT_RP2040)) == KATAPULT_RP2040
        assert sim.violations == []
        assert "reboot" not in names and sim.reboots == []


def test_picoboot_refuses_bad_ranges(usb):
    sim = pico_sim(usb)
    image = pattern(512, 11)
    for start, app_start in ((RP2040_FLASH, RP2040_APP),         # over Katapult
                             (RP2040_APP + 256, RP2040_APP),     # not on a sector
                             (0x20000000, RP2040_FLASH),         # RAM, not flash
                             (RP2040_FLASH + 0x1000000 - 256, RP2040_FLASH)):  # beyond the window
        r = usb.flash("picoboot", PICO_BUS, PICO_DEV, image, start, app_start)
        r.failed(errno.EINVAL)
    with sim.lock:
        assert sim.commands == []
        assert sim.read_flash(RP2040_FLASH, len(KATAPULT_RP2040)) == KATAPULT_RP2040


def test_picoboot_stall_then_retry(usb):
    sim = pico_sim(usb, fault="stall:write")
    image = pattern(6000, 12)
    r = usb.flash("picoboot", PICO_BUS, PICO_DEV, image, RP2040_APP, RP2040_APP)
    r.failed(errno.EIO)
    r = usb.flash("picoboot", PICO_BUS, PICO_DEV, image, RP2040_APP, RP2040_APP)
    r.ok()
    with sim.lock:
        assert sim.fault_hits == ["stall:write"]
        assert sim.read_flash(RP2040_APP, len(image)) == image
        assert sim.read_flash(RP2040_FLASH, len(KATAPULT_RP2040)) == KATAPULT_RP2040


# Per USB flasher: its simulator, bus/device, application start, and the
# bootloader region it must never touch.
USB_FLASHERS = {
    "stm32-dfu": (lambda usb, **kw: dfu_sim(usb, **kw), DFU_BUS, DFU_DEV, APP, STM32_FLASH, BOOTLOADER),
    "picoboot": (lambda usb, **kw: pico_sim(usb, **kw), PICO_BUS, PICO_DEV, RP2040_APP, RP2040_FLASH,
                 KATAPULT_RP2040),
}


@pytest.mark.parametrize("kind,phase", [("stm32-dfu", p) for p in ("erase", "setaddress", "write", "getstatus")] +
                         [("picoboot", p) for p in ("exclusive", "exitxip", "erase", "write", "read")])
def test_usb_disconnect_then_retry(usb, kind, phase):
    """Unplugged in each phase before the image is complete and verified: a
    clear error, and the next session (after re-enumeration, the flash as
    it was) writes it all, the bootloader region untouched."""
    make_sim, bus, dev, app, flash_base, protected = USB_FLASHERS[kind]
    sim = make_sim(usb, fault="disconnect:" + phase)
    image = pattern(6000, 8)
    r = usb.flash(kind, bus, dev, image, app, app)
    r.failed(errno.ENODEV)
    assert "disconnected" in r.message
    assert sim.fault_hits == ["disconnect:" + phase]
    usb.unplug(sim)
    with sim.lock:
        flash = bytes(sim.flash)
    again = make_sim(usb, devnum=dev + 1, flash=flash)
    r = usb.flash(kind, bus, dev + 1, image, app, app)
    r.ok()
    with again.lock:
        assert again.read_flash(app, len(image)) == image
        assert again.read_flash(flash_base, len(protected)) == protected
        assert again.violations == []


def test_picoboot_cancel_between_blocks(usb):
    sim = pico_sim(usb)
    r = usb.flash("picoboot", PICO_BUS, PICO_DEV, pattern(10000, 14), RP2040_APP, RP2040_APP,
                  "cancel-after=1")
    r.failed(errno.ECANCELED)
    with sim.lock:
        assert sim.writes == [(RP2040_APP, 4096)]
        assert sim.reboots == []


# ---------------------------------------------------------------------------
# The Linux process MCU's program


def test_linux_installs_keeps_the_old_one_and_restores(driver, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "klipper_mcu"
    old = pattern(70000, 1)
    program.write_bytes(old)
    os.chmod(program, 0o750)
    new = pattern(150000, 2)

    r = run_driver(driver, tmp_path, "linux", "file:%s" % program, new, 0, 0)
    r.ok()
    assert program.read_bytes() == new
    assert (bindir / "klipper_mcu.old").read_bytes() == old
    assert os.stat(program).st_mode & 0o7777 == 0o750
    assert sorted(os.listdir(bindir)) == ["klipper_mcu", "klipper_mcu.old"]
    assert r.last("writing") == (len(new), len(new)) and r.last("verifying") == (len(new), len(new))

    # A first install (nothing there yet) makes it 0755, no .old.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = run_driver(driver, tmp_path, "linux", "file:%s" % (fresh / "klipper_mcu"), new, 0, 0)
    r.ok()
    assert os.stat(fresh / "klipper_mcu").st_mode & 0o7777 == 0o755
    assert os.listdir(fresh) == ["klipper_mcu"]


def test_linux_failures_leave_the_program_alone(driver, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "klipper_mcu"
    old = pattern(5000, 3)
    program.write_bytes(old)

    # Cancelled while writing: nothing replaced, no debris.
    r = run_driver(driver, tmp_path, "linux", "file:%s" % program, pattern(300000, 4), 0, 0,
                   "cancel-after=1")
    r.failed(errno.ECANCELED)
    assert program.read_bytes() == old
    assert os.listdir(bindir) == ["klipper_mcu"]

    # No such directory; not a regular file; relative path.
    r = run_driver(driver, tmp_path, "linux", "file:%s" % (tmp_path / "nowhere" / "klipper_mcu"),
                   pattern(100, 5), 0, 0)
    r.failed(errno.ENOENT)
    assert "Cannot create a file" in r.message
    r = run_driver(driver, tmp_path, "linux", "file:%s" % bindir, pattern(100, 5), 0, 0)
    r.failed(errno.EINVAL)
    assert "not a regular file" in r.message
    r = run_driver(driver, tmp_path, "linux", "file:klipper_mcu", pattern(100, 5), 0, 0)
    r.failed(errno.EINVAL)
    assert program.read_bytes() == old


def test_unknown_bootloader(driver, tmp_path):
    r = run_driver(driver, tmp_path, "no-such-bootloader", "serial:/dev/null", b"\0", 0, 0)
    assert r.errno == errno.ENOENT
