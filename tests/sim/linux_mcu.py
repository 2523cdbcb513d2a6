#!/usr/bin/python3
"""The Linux process MCU (klipper_mcu) as a simulator: a pty whose both ends
it keeps open, as klipper_mcu does, a symlink to the slave at the path
printer.cfg names (/tmp/klipper_host_mcu by default), and a KlipperMcu
speaking Klipper's protocol with a "linux" dictionary on the master.
stop() removes the symlink, like klipper_mcu exiting.  LinuxMcuService
runs it the way klipper-mcu.service does, restarted through the systemd
mock, from whatever program is installed."""

import os
import sys
import termios
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from klipper_mcu import KlipperMcu  # noqa: E402


class LinuxMcuProcess:
    def __init__(self, link, version, **sim_kwargs):
        self.link = link
        self.master, self.slave = os.openpty()
        tty.setraw(self.master, termios.TCSANOW)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.ttyname(self.slave), link)
        self.sim = KlipperMcu(self.master, version=version, mcu="linux", link="serial",
                              **sim_kwargs)
        self.sim.start()

    def stop(self):
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if os.path.lexists(self.link):
            os.unlink(self.link)
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass
        self.slave = self.master = -1


class LinuxMcuService:
    """klipper-mcu.service as systemd runs it, on the systemd mock
    (systemd_mock.SystemdMock): every RestartUnit of @unit stops the running
    klipper_mcu and starts the program installed at @program, a
    LinuxMcuProcess answering with the version in that file's dictionary
    (mkimage.image_version), after @restart_delay seconds.  A program that
    is missing, carries no Klipper dictionary or whose version is in
    @broken "exits at once": no pty appears.  started() lists the versions
    that came up, in order."""

    def __init__(self, systemd, unit, program, link, restart_delay=0.2, broken=()):
        import threading
        self.systemd = systemd
        self.unit = unit
        self.program = program
        self.link = link
        self.restart_delay = restart_delay
        self.broken = set(broken)
        self.process = None
        self._started = []
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _program_version(self):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
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
