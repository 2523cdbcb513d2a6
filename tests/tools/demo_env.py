#!/usr/bin/python3
"""The simulated demo printer of design.md §5, with mcuflashd running on it.

Starts a private system-like D-Bus bus, a umockdev testbed with the demo's
USB MCUs (each a Klipper simulator speaking the real protocol), a fake
Klipper checkout and printer.cfg, and the built mcuflashd; waits until the
daemon has identified every MCU; then either runs the command given after
`--` (with mcuflashctl on PATH and DBUS_SYSTEM_BUS_ADDRESS set) and exits
with its status, or prints `mcuflashctl status`.  Everything it started is
stopped on the way out, also on Ctrl-C, SIGTERM or an error.

  demo_env.py [-v] [--keep] [-- CMD ARGS...]

It re-executes itself under umockdev-wrapper when the preload is missing.
The CAN toolboard (EBBCan) is a CAN node simulator on the test CAN hub
(tests/sim/canhub.py) and the daemon runs under the CAN shim, since this
kernel has no CAN; the Linux process MCU (rpi) is a pty with a Klipper
simulator behind a klipper_host_mcu symlink in the demo's temporary
directory (not /tmp/klipper_host_mcu, so that a real one is never touched),
run as klipper-mcu.service by the systemd mock (tests/sim/systemd_mock.py)
from the klipper_mcu program installed in the demo's usr-local-bin/: flashing
rpi installs $DEMO_IMAGES/rpi.elf there and the restarted service answers
with its version.  Without `--` the demo flashes the out-of-date eddy.  The build dir is
$MCUFLASHD_BUILDDIR (default <repo>/build); this script does not build
anything.
"""

import argparse
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))

REEXEC_MARK = "MCUFLASHD_DEMO_UNDER_UMOCKDEV"


def ensure_preload():
    if "libumockdev-preload" in os.environ.get("LD_PRELOAD", ""):
        return
    if os.environ.get(REEXEC_MARK):
        sys.exit("demo_env.py: umockdev's preload is still missing after re-executing "
                 "under umockdev-wrapper")
    env = dict(os.environ)
    env[REEXEC_MARK] = "1"
    env["LD_PRELOAD"] = ""
    os.execvpe("umockdev-wrapper", ["umockdev-wrapper", "/usr/bin/python3",
                                    os.path.abspath(__file__)] + sys.argv[1:], env)


ensure_preload()

import harness  # noqa: E402
from gi.repository import UMockdev  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "sim"))
import can_node  # noqa: E402
sys.path.insert(0, HERE)
import mkimage  # noqa: E402
import canhub  # noqa: E402
from linux_mcu import LinuxMcuService  # noqa: E402
import systemd_mock  # noqa: E402

MAIN = dict(name="mcu", mcu="stm32f429xx", serial="2E0036000851363131363530", port="1-1.2",
            version=harness.HOST_VERSION, bootloader="stm32-dfu")
EDDY = dict(name="mcu eddy", mcu="rp2040", serial="E66138935F4A2B2C", port="1-1.3",
            version=harness.OLD_VERSION, bootloader="picoboot")
EBBCAN = dict(name="mcu EBBCan", mcu="stm32g0b1xx", uuid="0e0d81e4210c", iface="can0",
              bitrate=1000000, version=harness.HOST_VERSION)
# The EBBCan runs a newer build (protocols.md §15.5): bzip2-compressed
# identify data carrying the build config of an EBB36 (STM32G0B1, 8 MHz
# crystal, 8 KiB Katapult, CAN on PB0/PB1 at 1 Mbit/s); the other MCUs run
# older builds (zlib, no config).
EBBCAN_BUILD = dict(compression="bzip2", kconfig=(
    "CONFIG_MACH_STM32=y\n"
    "CONFIG_MACH_STM32G0B1=y\n"
    "CONFIG_STM32_FLASH_START_2000=y\n"
    "CONFIG_STM32_CLOCK_REF_8M=y\n"
    "CONFIG_STM32_CANBUS_PB0_PB1=y\n"
    "CONFIG_CANBUS_FREQUENCY=1000000\n"))
RPI = dict(name="mcu rpi", version=harness.HOST_VERSION)

PRINTER_CFG = """\
# printer.cfg of the simulated demo printer (mcuflashd design.md §5):
# BTT Octopus Pro (stm32f429xx) as the main MCU, a BTT Eddy probe (rp2040),
# an EBB36 CAN toolboard and the Linux process MCU.

[mcu]
serial: /dev/serial/by-id/usb-Klipper_{main[mcu]}_{main[serial]}-if00

[mcu eddy]
serial: /dev/serial/by-id/usb-Klipper_{eddy[mcu]}_{eddy[serial]}-if00

# BTT EBB36 toolboard (stm32g0b1xx) on can0 at 1 Mbit/s, with Katapult.
[mcu EBBCan]
canbus_uuid: {ebb[uuid]}
canbus_interface: {ebb[iface]}

# The host itself, as Klipper's Linux process MCU.
[mcu rpi]
serial: {rpi_link}

[printer]
kinematics: corexy
max_velocity: 300
max_accel: 3000
max_z_velocity: 15
max_z_accel: 100

[stepper_x]
step_pin: PF13
dir_pin: PF12
enable_pin: !PF14
microsteps: 16
rotation_distance: 40
endstop_pin: PG6
position_endstop: 0
position_max: 300
homing_speed: 50

[probe_eddy_current btt_eddy]
sensor_type: ldc1612
i2c_mcu: eddy
i2c_bus: i2c0f
x_offset: 0
y_offset: 21.42
z_offset: 2.0

[temperature_sensor btt_eddy_mcu]
sensor_type: temperature_mcu
sensor_mcu: eddy
"""


def write_demo_images(folder):
    """$DEMO_IMAGES: images at the host version for each demo MCU, and one
    for another chip (what a user must never be able to flash)."""
    os.makedirs(folder, exist_ok=True)
    version = harness.HOST_VERSION
    for name, mcu, start, fmt, link, build in (
            ("mcu.bin", "stm32f429xx", 0x08008000, "bin", "usb", {}),
            ("eddy.uf2", "rp2040", 0x10000000, "uf2", "usb", {}),
            ("EBBCan.bin", "stm32g0b1xx", 0x08002000, "bin", "can", EBBCAN_BUILD),
            ("wrong-chip.bin", "stm32f103xe", 0x08007000, "bin", "usb", {}),
            ("rpi.elf", "linux", 0, "elf", "serial", {})):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(mkimage.build(mcu, version, start, fmt=fmt, link=link, **build))
    return folder


def install_klipper_mcu(workdir, version):
    """klipper_mcu at @version in the demo's own usr-local-bin/."""
    bindir = os.path.join(workdir, "usr-local-bin")
    os.makedirs(bindir, exist_ok=True)
    program = os.path.join(bindir, "klipper_mcu")
    with open(program, "wb") as f:
        f.write(mkimage.host_program(version))
    os.chmod(program, 0o755)
    return program


class Terminated(Exception):
    pass


def on_sigterm(signum, frame):
    raise Terminated()


def run(command, env):
    """Run @command; on Ctrl-C or SIGTERM stop it too before passing it on."""
    try:
        proc = subprocess.Popen(command, env=env)
    except OSError as e:
        print("demo_env.py: cannot run %s: %s" % (command[0], e), file=sys.stderr)
        return 127
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print the daemon's log when done")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the MCUs to be identified")
    argv = sys.argv[1:]
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, on_sigterm)
    env = harness.Environment(keep=args.keep)
    hub = ebb = rpi = systemd = None
    status = 1
    try:
        env.start_bus()
        testbed = env.start_testbed()
        if not UMockdev.in_mock_environment():
            raise harness.HarnessError("not inside the umockdev testbed")
        rpi_link = os.path.join(env.workdir, "klipper_host_mcu")
        env.host.set_version(harness.HOST_VERSION)
        env.host.write_printer_cfg(PRINTER_CFG.format(main=MAIN, eddy=EDDY, ebb=EBBCAN,
                                                      rpi_link=rpi_link))
        for b in (MAIN, EDDY):
            testbed.add_klipper_usb(serial=b["serial"], mcu=b["mcu"], version=b["version"],
                                    port=b["port"], bootloader=b["bootloader"])
        hub = canhub.CanHub(os.path.join(env.workdir, "canhub.sock"))
        hub.start()
        hub.add_iface(EBBCAN["iface"], bitrate=EBBCAN["bitrate"])
        ebb = can_node.KlipperCanNode(hub.path, EBBCAN["iface"], EBBCAN["uuid"],
                                      version=EBBCAN["version"], mcu=EBBCAN["mcu"], **EBBCAN_BUILD)
        ebb.start()
        systemd = systemd_mock.SystemdMock(env.bus.address, units={"klipper-mcu.service": "active"},
                                           job_delay=0.1).start()
        program = install_klipper_mcu(env.workdir, RPI["version"])
        rpi = LinuxMcuService(systemd, "klipper-mcu.service", program, rpi_link).start()
        shim = os.path.join(harness.build_dir(), "tests", "shim", "libcanshim.so")
        # The Octopus's ST ROM DFU cannot tell where Klipper goes (a 32 KiB
        # bootloader is kept below it): the configuration says so.
        env.start_daemon(env={
            "LD_PRELOAD": "%s:%s" % (shim, harness.umockdev_preload()),
            "CANSHIM_HUB": hub.path,
            "MCUFLASHD_CAN_TEST_HUB": hub.path,
        }, extra="\n[Mcu %s]\nFlashStart=0x08008000\n\n[Mcu linux-klipper_host_mcu]\nProgram=%s\n"
               "Service=klipper-mcu.service\n" % (MAIN["serial"], program))
        images = write_demo_images(os.path.join(env.workdir, "images"))

        def all_identified():
            found = [env.client.find_mcu(Name=b["name"]) for b in (MAIN, EDDY, EBBCAN, RPI)]
            return all(p is not None and p.get("State") == "application" for p in found)

        try:
            env.client.wait_for(all_identified, timeout=args.timeout,
                                what="every demo MCU in state application")
        except TimeoutError as e:
            print("demo_env.py: %s\n--- mcuflashd output ---\n%s" % (e, env.daemon.log()),
                  file=sys.stderr)
            return 1

        run_env = harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=env.bus.address, DEMO_IMAGES=images)
        run_env["PATH"] = os.path.join(harness.build_dir(), "client") + os.pathsep + \
            run_env.get("PATH", "/usr/bin:/bin")
        if command:
            status = run(command, run_env)
        else:
            # The evening a user wants: see the status, update the MCU that
            # is out of date, see every MCU match the host.
            ctl = harness.ctl_binary()
            status = run([ctl, "status"], run_env)
            if status == 0:
                print("\n$ mcuflashctl flash eddy $DEMO_IMAGES/eddy.uf2", flush=True)
                status = run([ctl, "flash", "eddy", os.path.join(images, "eddy.uf2")], run_env)
            if status == 0:
                print("\n$ mcuflashctl status", flush=True)
                status = run([ctl, "status"], run_env)
    except KeyboardInterrupt:
        status = 130
    except Terminated:
        status = 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        daemon = env.daemon
        daemon_status = env.close()
        for sim in (rpi, ebb, hub, systemd):
            if sim is not None:
                sim.stop()
        if daemon is not None and args.verbose:
            print("--- mcuflashd output ---\n%s" % daemon.log(), file=sys.stderr)
        if daemon_status not in (None, 0):
            print("demo_env.py: mcuflashd exited with status %s" % daemon_status,
                  file=sys.stderr)
            if status == 0:
                status = 1
        if args.keep:
            print("demo_env.py: kept %s" % env.workdir, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
