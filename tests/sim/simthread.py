"""The thread machinery the simulators share (klipper_mcu.py, can_node.py,
canhub.py, klippy_api.py): one serving thread, a non-blocking wake pipe that
interrupts its poll, a threading.Condition (.lock) that guards the recorded
state and is notified on every event, and wait_for(predicate, timeout) for
tests.  Also parse_fault(), which reads the "name[:N]" fault strings of the
firmware simulators against each one's own FAULTS table.

ThreadedSim holds only that machinery: what the thread serves, how it is
started (sockets to bind, ptys to adopt; ptysim.py holds the pty part the
serial simulators share) and what stop() closes besides the thread and the
pipe stay in each simulator.  A subclass calls
ThreadedSim.__init__() early, opens the wake pipe when it wants (before
_start_thread()), implements _run() and its own start() and stop().
"""

import os
import select
import threading
import time


def parse_fault(fault, faults):
    """'disconnect:3' -> ('disconnect', 3); None -> (None, None).  @faults
    maps the known fault names to their help text."""
    if not fault:
        return None, None
    name, _, arg = fault.partition(":")
    if name not in faults:
        raise ValueError("unknown fault %r (known: %s)" % (fault, ", ".join(sorted(faults))))
    return name, int(arg) if arg else None


class ThreadedSim:
    """Base of a simulator served from one thread; see the module docstring."""

    def __init__(self):
        self.lock = threading.Condition()
        self._thread = None
        self._stopping = False
        self._wake_r = self._wake_w = -1

    # -- thread and wake pipe ----------------------------------------------

    def _open_wake_pipe(self):
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def _close_wake_pipe(self):
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    def _start_thread(self, name):
        """Run self._run() in a daemon thread called @name."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _stop_thread(self):
        """Ask the thread to stop, wake it and join it (5 s at most).
        False when no thread was running."""
        if self._thread is None:
            return False
        self._stopping = True
        self.wake()
        self._thread.join(5)
        self._thread = None
        return True

    def wake(self):
        """Interrupt the thread's poll (it looks at its requests again)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _poller(self, fd):
        """A select.poll watching @fd and the wake pipe for input."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        return poller

    def _poll(self, poller, timeout_ms):
        """{fd: events} from one poll of @poller (empty on timeout or
        interruption), or None when the thread is asked to stop."""
        try:
            events = dict(poller.poll(timeout_ms))
        except InterruptedError:
            return {}
        if self._wake_r in events or self._stopping:
            return None
        return events

    # -- for tests ---------------------------------------------------------

    def wait_for(self, predicate, timeout=5.0):
        """Wait until predicate(self) is true (re-checked on every event)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
            return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
