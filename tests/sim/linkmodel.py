"""A rate-limited wire for the simulators, for scripts/bench (opt-in: a
simulator given no rate has no LinkModel and runs as fast as it can, as
every test expects).

A simulator that has one calls occupy() for everything that keeps its
link busy: bytes in either direction at the line rate (serial_seconds(),
can_frame_seconds(), bytes over a USB rate), and time the protocol makes
the host wait for the device (a DFU bwPollTimeout).  The wire is modelled
half duplex: one transfer at a time, each starting when the previous one
has ended, so link_seconds (the sum) never exceeds the wall time of a
run.  A simulator counts what it receives without waiting (it works on
the bytes while they still "arrive", so its own CPU time hides in the
link's) and lets the wall clock catch up before it answers (the end of
the wait is spun, so that late wake-ups are not counted against the
host).  A host can never beat the link, and a host that waits for nothing
but the link measures link_seconds / wall_seconds = 1.

What it does not model: full-duplex overlap, USB frames and token
overhead, CAN arbitration and errors.  It knows nothing of protocols; the
simulators decide what costs how much.
"""

import threading
import time


def serial_seconds(nbytes, baud):
    """Wire time of @nbytes on a UART at @baud (8N1: 10 bits a byte)."""
    return nbytes * 10.0 / baud


# Bits of a classic CAN frame with an 11-bit id besides its data (SOF,
# arbitration, control, CRC, delimiters, ACK, EOF, interframe space), and
# of those the part that bit stuffing applies to (SOF to the end of the CRC).
CAN_FRAME_BITS = 47
CAN_STUFFED_BITS = 34
CAN_STUFFING = 0.2


def can_frame_seconds(dlc, bitrate):
    """Wire time of one classic CAN frame carrying @dlc data bytes at
    @bitrate, with ~20% stuff bits over the stuffable part."""
    stuffable = CAN_STUFFED_BITS + 8 * dlc
    return (CAN_FRAME_BITS + 8 * dlc + CAN_STUFFING * stuffable) / bitrate


# Sleeping wakes up late (timer slack, scheduling): sleep until this much
# before the wire is free, then spin, so that the simulator's lateness is
# not counted against the host.
SPIN_SECONDS = 0.0003


class LinkModel:
    """The wire of one simulated device; see the module docstring.

    link_seconds  time the wire (or the device the host waits for) was busy
    transfers     how many occupy() calls counted
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self.reset()

    def reset(self):
        """Forget what was counted (the start of a measured run)."""
        with self._mutex:
            self.link_seconds = 0.0
            self.transfers = 0
            self._free_at = 0.0

    def occupy(self, seconds, wait=True, lock=None, since=None):
        """The wire is busy for @seconds from when it is next free, but not
        before @since (a time.monotonic() value: when the host started the
        transfer; default now); returns when it ends.  With @wait, return
        only once that time has passed (wait_until()).  wait=False counts the time without
        waiting for it: bytes that arrive while the simulator already
        works on them, or a device busy after its answer; the next
        waiting transfer waits for it too."""
        with self._mutex:
            start = max(time.monotonic() if since is None else since, self._free_at)
            self._free_at = end = start + seconds
            self.link_seconds += seconds
            self.transfers += 1
        if wait:
            self.wait_until(end, lock)
        return end

    def wait_free(self, lock=None):
        """Return once everything occupied so far has passed."""
        self.wait_until(self._free_at, lock)

    @staticmethod
    def wait_until(end, lock=None, spin=True):
        """Return at time.monotonic() @end.  @lock is a threading.Condition
        the caller holds, released while sleeping (else the caller just
        sleeps).  spin=False ends the wait with the sleep, a little late,
        and leaves the CPU (and the GIL) to others meanwhile."""
        while True:
            left = end - time.monotonic()
            if left <= 0 or (not spin and left <= SPIN_SECONDS):
                return
            if left <= SPIN_SECONDS:
                continue
            if lock is not None:
                lock.wait(left - SPIN_SECONDS)
            else:
                time.sleep(left - SPIN_SECONDS)
