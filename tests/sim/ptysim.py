"""The pty half the serial firmware simulators share (klipper_mcu.py,
katapult_serial.py): adopting a pty master (non-blocking, raw slave),
reading it from the serving thread, writing to it with a deadline, hanging
up and stop().

PtySim knows no protocol: what the bytes mean, the counters other than
tx_bytes/tx_dropped and when to hang up stay in each simulator.  A subclass
sets .fd, .own_fd, .disconnected, .tx_bytes, .tx_dropped and _debug()
before using these helpers.
"""

import errno
import fcntl
import os
import select
import termios
import time
import tty

from simthread import ThreadedSim


class PtySim(ThreadedSim):
    """ThreadedSim serving one pty master; see the module docstring."""

    def _adopt_pty(self, fd):
        """Open the wake pipe, make @fd non-blocking and its slave raw
        (termios requests on a pty master act on the slave).  No flush: a
        host may already have written to a freshly plugged port."""
        self._open_wake_pipe()
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        tty.setraw(fd, termios.TCSANOW)

    def stop(self):
        """Stop the thread; closes the fd only when own_fd was given."""
        self._stop_thread()
        self._close_wake_pipe()
        if self.own_fd and not self.disconnected and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read_pty(self, ev):
        """What the pty has after poll events @ev, or b"".  With no slave end
        open (POLLHUP) there is nobody to talk to: wait 20 ms (or a wake)
        before the thread looks again."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            data = b""
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            data = b""
        if not data and ev & (select.POLLHUP | select.POLLERR):
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.poll(20)
        return data

    def _write(self, data):
        """Write all of @data within 1 s; what does not fit counts as
        tx_dropped."""
        deadline = time.monotonic() + 1.0
        while data:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                n = 0
            self.tx_bytes += n
            data = data[n:]
            if data:
                if time.monotonic() > deadline:
                    self.tx_dropped += len(data)
                    return
                select.select([], [self.fd], [], 0.05)

    def _disconnect(self):
        """Hang up so the host side sees it.  The fd number stays valid
        (pointing at /dev/null) because whoever handed it to us closes it
        later."""
        self._debug("disconnecting")
        self.disconnected = True
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(null, self.fd)
        os.close(null)
