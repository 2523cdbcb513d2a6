#!/usr/bin/python3
"""The Linux process MCU (klipper_mcu) as a simulator: a pty whose both ends
it keeps open, as klipper_mcu does, a symlink to the slave at the path
printer.cfg names (/tmp/klipper_host_mcu by default), and a KlipperMcu
speaking Klipper's protocol with a "linux" dictionary on the master.
stop() removes the symlink, like klipper_mcu exiting."""

import os
import sys
import termios
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
