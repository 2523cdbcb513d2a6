#!/usr/bin/python3
"""The Linux process MCU (klipper_mcu) as a simulator that behaves like the
real program (protocols.md §17.3): its own process, named klipper_mcu, that
opens a pty (/dev/ptmx) and keeps both ends, replaces a stale symlink at the
path printer.cfg names (/tmp/klipper_host_mcu by default) with one to the
slave, answers Klipper's protocol with a "linux" dictionary (KlipperMcu) on
the master, and never removes the symlink: after SIGTERM or SIGKILL it
dangles, and once the kernel hands the pty number to another program it
leads to that program's terminal.

The process names itself with prctl(PR_SET_NAME): the kernel names the real
program "klipper_mcu" after its file, and mcuflashd takes a pty whose master
a process of that name holds for the Linux MCU (besides one that runs the
configured Program=, which a Python simulator cannot).  --name gives it
another name, to play a program that is not klipper_mcu.

Command line (what LinuxMcuProcess runs):
  /usr/bin/python3 tests/sim/linux_mcu.py --link /tmp/klipper_host_mcu \\
      --version v0.13.0-46-g8c72b4a5 [--name klipper_mcu] [--user UID]
It prints "ready /dev/pts/N" once the link is in place, then answers the
line "stats" on stdin with one JSON line of KlipperMcu's counters (rx_bytes,
tx_bytes, requests); it exits on SIGTERM, SIGKILL or the end of stdin (the
test that started it went away), the link left behind in every case.

LinuxMcuService runs it the way klipper-mcu.service does, restarted through
the systemd mock, from whatever program is installed."""

import argparse
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PR_SET_NAME = 15


def set_process_name(name):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def pty_index(path):
    """N of the pty slave /dev/pts/N that @path is or leads to."""
    rdev = os.stat(path).st_rdev
    return (os.major(rdev) - 136) * 256 + os.minor(rdev)


class LinuxMcuProcess:
    """A running klipper_mcu simulator (see the module docstring): .pid,
    .pts (/dev/pts/N it serves), .index (N), rx_bytes (asked from the
    process).  @interpreter is the Python executable it runs as (its
    /proc/PID/exe), @name its process name, @user (a uid) whom it runs as
    once its pty and link are made.  stop()/terminate() send SIGTERM, kill() SIGKILL; the link
    stays in every case, as the real program leaves it."""

    def __init__(self, link, version, name="klipper_mcu", interpreter="/usr/bin/python3", user=None,
                 ready_timeout=20):
        self.link = link
        self.version = version
        env = dict(os.environ)
        for k in ("LD_PRELOAD", "UMOCKDEV_DIR"):
            env.pop(k, None)
        self.proc = subprocess.Popen([interpreter, os.path.join(HERE, "linux_mcu.py"), "--link", link,
                                      "--version", version, "--name", name]
                                     + (["--user", str(user)] if user is not None else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     bufsize=1)
        line = self._readline(ready_timeout)
        if not line.startswith("ready "):
            self.kill()
            raise RuntimeError("linux_mcu.py did not start: %r" % line)
        self.pts = line.split()[1]
        self.index = int(self.pts.rsplit("/", 1)[1])

    @property
    def pid(self):
        return self.proc.pid

    def _readline(self, timeout):
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return ""
        return self.proc.stdout.readline().strip()

    def running(self):
        return self.proc.poll() is None

    def stats(self):
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        line = self._readline(10)
        if not line:
            raise RuntimeError("linux_mcu.py does not answer stats")
        return json.loads(line)

    @property
    def rx_bytes(self):
        return self.stats()["rx_bytes"]

    def _end(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def terminate(self):
        self._end(signal.SIGTERM)

    def kill(self):
        self._end(signal.SIGKILL)

    stop = terminate


class LinuxMcuService:
    """klipper-mcu.service as systemd runs it, on the systemd mock
    (systemd_mock.SystemdMock): every RestartUnit of @unit stops the running
    klipper_mcu (SIGTERM; its link stays) and starts the program installed
    at @program, a LinuxMcuProcess answering with the version in that
    file's dictionary (mkimage.image_version), after @restart_delay seconds.
    A program that is missing, carries no Klipper dictionary or whose
    version is in @broken "exits at once": no new pty appears.  started()
    lists the versions that came up, in order."""

    def __init__(self, systemd, unit, program, link, restart_delay=0.2, broken=()):
        self.systemd = systemd
        self.unit = unit
        self.program = program
        self.link = link
        self.restart_delay = restart_delay
        self.broken = set(broken)
        self.process = None
        self.pids = []                  # of every klipper_mcu it started
        self._started = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _program_version(self):
        sys.path.insert(0, os.path.join(HERE, "..", "tools"))
        import mkimage
        try:
            with open(self.program, "rb") as f:
                return mkimage.image_version(f.read())
        except OSError:
            return None

    def _run_program(self):
        if self.process is not None:
            self.process.stop()
            self.process = None
        version = self._program_version()
        if version is None or version in self.broken:
            self._started.append(None)
            return
        self.process = LinuxMcuProcess(self.link, version)
        self.pids.append(self.process.pid)
        self._started.append(version)

    def _watch(self):
        while not self._stop.wait(0.05):
            try:
                restarts = [args for args in self.systemd.calls("RestartUnit") if args[0] == self.unit]
            except Exception:       # the mock went away at the end of a test
                return
            while self._seen < len(restarts):
                self._seen += 1
                if self.process is not None:
                    self.process.stop()
                    self.process = None
                time.sleep(self.restart_delay)
                self._run_program()

    def start(self):
        self._run_program()
        self._thread.start()
        return self

    def started(self):
        return list(self._started)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        if self.process is not None:
            self.process.stop()
            self.process = None


def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a simulated klipper_mcu (Linux process MCU).")
    ap.add_argument("--link", required=True, help="the symlink to make to the pty slave")
    ap.add_argument("--version", required=True)
    ap.add_argument("--name", default="klipper_mcu", help="the process name (comm)")
    ap.add_argument("--user", type=int, default=None, help="uid to run as once the link is made")
    args = ap.parse_args(argv)

    set_process_name(args.name)
    from klipper_mcu import KlipperMcu

    # As klipper_mcu: a pty with both ends kept, a stale link replaced.
    master, slave = os.openpty()
    tty.setraw(master, termios.TCSANOW)
    slave_name = os.ttyname(slave)
    if os.path.lexists(args.link):
        os.unlink(args.link)
    os.symlink(slave_name, args.link)
    if args.user is not None:
        os.setgroups([])
        os.setresgid(args.user, args.user, args.user)
        os.setresuid(args.user, args.user, args.user)
    sim = KlipperMcu(master, version=args.version, mcu="linux", link="serial").start()
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))   # the link stays
    print("ready %s" % slave_name, flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            with sim.lock:
                stats = {"rx_bytes": sim.rx_bytes, "tx_bytes": sim.tx_bytes, "requests": sim.requests}
            print(json.dumps(stats), flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
