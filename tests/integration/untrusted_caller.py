"""A D-Bus caller of Mcu.Flash that hands the daemon a hostile file
descriptor (tests/integration/test_untrusted_fd.py runs it as uid 65534 or
as root): it makes the fd, calls Flash once, and prints the outcome as JSON
on stdout.  `spam` instead sends Rescan and Refresh calls as fast as it can
without waiting for their answers, until it is killed.

    untrusted_caller.py BUS_ADDRESS MCU_PATH KIND [IMAGE_PATH]
    untrusted_caller.py BUS_ADDRESS MCU_PATH spam
"""

import json
import os
import socket
import sys
import tempfile
import threading
import time

import dbus
import dbus.lowlevel

BUS_NAME = "io.mcuflash1"


def make_fd(kind, image_path, keep):
    """The fd to hand over; @keep collects what must stay open meanwhile."""
    if kind in ("silent-pipe", "slow-pipe"):
        r, w = os.pipe()
        keep.append(w)      # the writer stays open: a reader would wait forever
        if kind == "slow-pipe":
            def drip():
                try:
                    for _ in range(60):
                        os.write(w, b":")
                        time.sleep(0.5)
                except OSError:
                    pass
            threading.Thread(target=drip, daemon=True).start()
        return r
    if kind == "eventfd":
        return os.eventfd(0)    # blocking: a read waits forever
    if kind == "dev-zero":
        return os.open("/dev/zero", os.O_RDONLY)
    if kind == "directory":
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    if kind == "socket":
        a, b = socket.socketpair()
        keep.append(b)
        return a.detach()
    if kind == "write-only":
        fd, path = tempfile.mkstemp(prefix="untrusted-")
        os.write(fd, b":00000001FF\n")
        os.close(fd)
        keep.append(path)
        return os.open(path, os.O_WRONLY)
    if kind == "sparse":
        fd, path = tempfile.mkstemp(prefix="untrusted-")
        os.ftruncate(fd, 2 * 1024 * 1024 * 1024)
        keep.append(path)
        return fd
    if kind == "truncated":
        return os.open(image_path, os.O_RDONLY)
    raise SystemExit("unknown kind " + kind)


def flash(conn, mcu_path, kind, image_path):
    keep = []
    fd = make_fd(kind, image_path, keep)
    start = time.monotonic()
    result = {"kind": kind}
    try:
        job = conn.call_blocking(BUS_NAME, mcu_path, "io.mcuflash1.Mcu", "Flash", "ha{sv}",
                                 (dbus.types.UnixFd(fd), dbus.Dictionary({}, signature="sv")), timeout=60)
        result.update(job=str(job))
    except dbus.exceptions.DBusException as e:
        result.update(error=e.get_dbus_name(), message=e.get_dbus_message())
    result["seconds"] = time.monotonic() - start
    for k in keep:
        if isinstance(k, str):
            os.unlink(k)
    print(json.dumps(result), flush=True)


def spam(conn, mcu_path):
    """Rescan and Refresh, never waiting for an answer."""
    while True:
        for _ in range(50):
            for path, iface, member in (("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan"),
                                        (mcu_path, "io.mcuflash1.Mcu", "Refresh")):
                msg = dbus.lowlevel.MethodCallMessage(BUS_NAME, path, iface, member)
                conn.send_message(msg)
        conn.flush()
        time.sleep(0.05)


def main():
    address, mcu_path, kind = sys.argv[1:4]
    conn = dbus.bus.BusConnection(address)
    if kind == "spam":
        spam(conn, mcu_path)
    else:
        flash(conn, mcu_path, kind, sys.argv[4] if len(sys.argv) > 4 else None)


if __name__ == "__main__":
    main()
