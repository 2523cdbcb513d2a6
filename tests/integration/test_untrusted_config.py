"""printer.cfg and outside strings are untrusted, end to end (issue 10,
point 2): the real mcuflashd reads printer.cfg in a worker thread, only
regular files the owner of printer.cfg could read, within bounds, without
ever logging what the files contain; and a name that is not valid UTF-8
reaches D-Bus and mcuflashctl's JSON as U+FFFD instead of breaking them.

What is asserted is what a user sees: D-Bus answers (and how soon, with
generous bounds), MCU names, mcuflashctl output, and the daemon's log."""

import json
import os
import shutil
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
OCTOPUS_SERIAL = "2E0036000851363131363530"
EDDY_SERIAL = "E66138935F4A2B2C"
NOBODY = 65534
# A D-Bus call the loop answers is quick; anything near this means it hung.
ANSWER_BOUND = 5.0


def wait_identified(dbus_client, wait_for, usb_serial):
    def ready():
        p = dbus_client.find_mcu(UsbSerial=usb_serial)
        return p if p and p["State"] == "application" else None
    return wait_for(ready, timeout=15, what="%s identified" % usb_serial)


def timed_call(dbus_client):
    """Seconds the daemon takes to answer a Manager call."""
    start = time.monotonic()
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListMcus", timeout=30)
    return time.monotonic() - start


def timed_status(ctl):
    start = time.monotonic()
    out = ctl("status", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return time.monotonic() - start, json.loads(out.stdout)


def wait_log(d, text, timeout=15):
    deadline = time.monotonic() + timeout
    while text not in d.log():
        if time.monotonic() > deadline:
            raise AssertionError("%r not in the daemon log:\n%s" % (text, d.log()[-4000:]))
        time.sleep(0.05)


@pytest.fixture
def world_dir():
    """A directory every user can search (pytest's tmp_path is root's 0700)."""
    path = tempfile.mkdtemp(prefix="mcuflashd-cfg-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_include_of_a_root_only_file_is_not_read(testbed, klipper_host, klipper_checkout, daemon,
                                                 dbus_client, wait_for, ctl, world_dir):
    """printer.cfg belongs to uid 65534; its [include] of a root-only file
    (a password hash, and an [mcu] section) is skipped unread: nothing of it
    in the log, its MCU not named from it, the rest of printer.cfg used."""
    klipper_checkout(HOST)
    octopus = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, mcu="stm32f429xx", version=HOST,
                                      port="1-1.2")
    eddy = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD, port="1-1.3")
    secret = os.path.join(world_dir, "shadow.cfg")
    with open(secret, "w") as f:
        f.write("root:$6$TOPSECRETSALT$TOPSECRETHASH:19000:0:99999:7:::\n"
                "[mcu TOPSECRETNAME]\nserial: %s\n" % eddy.by_id)
    os.chmod(secret, 0o600)
    cfg = os.path.join(world_dir, "printer.cfg")
    with open(cfg, "w") as f:
        f.write("[mcu]\nserial: %s\n[include shadow.cfg]\n" % octopus.by_id)
    os.chown(cfg, NOBODY, NOBODY)
    klipper_host.printer_cfg_path = cfg

    d = daemon()
    mcu = wait_identified(dbus_client, wait_for, OCTOPUS_SERIAL)
    other = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert mcu["Name"] == "mcu"
    assert other["Name"] == ""
    wait_log(d, "not readable for the owner of printer.cfg (uid %d)" % NOBODY)
    out = ctl("status", "--json")
    assert out.returncode == 0, out.stderr
    assert "TOPSECRET" not in out.stdout
    assert "TOPSECRET" not in d.log()

    # Made readable for its owner, it is used.
    os.chown(secret, NOBODY, NOBODY)
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL)["Name"] == "mcu TOPSECRETNAME",
             timeout=15)


def test_include_of_a_fifo_does_not_hang(testbed, klipper_checkout, printer_cfg, daemon,
                                         dbus_client, wait_for, ctl, tmp_path):
    """An [include] of a FIFO nobody writes to: the daemon starts, answers,
    and says printer.cfg is unusable; the MCU shows without a name."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    path = printer_cfg("[mcu eddy]\nserial: %s\n[include pipe.cfg]\n" % board.by_id)
    os.mkfifo(os.path.join(os.path.dirname(path), "pipe.cfg"))

    d = daemon()
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert props["Name"] == ""
    wait_log(d, "pipe.cfg: a FIFO, not a configuration file")
    wait_log(d, "printer.cfg %s is not used" % path)
    assert timed_call(dbus_client) < ANSWER_BOUND
    elapsed, status = timed_status(ctl)
    assert elapsed < ANSWER_BOUND * 4
    assert [m["name"] for m in status["mcus"]] == [""]

    # Rescan reads it again: still answering, still refused.
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    assert timed_call(dbus_client) < ANSWER_BOUND
    assert d.running()


def test_printer_cfg_klippy_reports_goes_through_the_same_reader(
        testbed, klipper_host, klipper_checkout, klippy, daemon, dbus_client, wait_for, tmp_path):
    """Without PrinterConfig=, the config_file klippy reports is read the
    same way: a FIFO there never blocks the daemon."""
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    fifo = tmp_path / "klippy-printer.cfg"
    os.mkfifo(str(fifo))
    klippy(config_file=str(fifo), mcus={"mcu eddy": klippy_api.default_mcu(OLD, "rp2040")})
    d = daemon(config_text="[Klipper]\nPath=%s\nApiSocket=%s\n" % (klipper_host.checkout,
                                                                  klipper_host.api_socket))
    wait_log(d, "klippy-printer.cfg: a FIFO, not a configuration file")
    assert timed_call(dbus_client) < ANSWER_BOUND
    # Nothing names it; while Klipper runs with a printer.cfg the daemon
    # cannot use, the MCU may be Klipper's: shown, not opened.
    props = wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL), timeout=15)
    assert props["Name"] == ""
    assert timed_call(dbus_client) < ANSWER_BOUND
    assert board.sim.rx_bytes == 0


def write_options(path, n):
    with open(path, "w") as f:
        f.write("[mcu]\n")
        for i in range(n):
            f.write("option_%d: %d\n" % (i, i))


def test_many_options_are_bounded_and_the_loop_answers(testbed, klipper_checkout, printer_cfg, daemon,
                                                       dbus_client, wait_for, ctl):
    """Close to 100k options: read (only [mcu]'s few options are kept) while
    the daemon answers; over the line bound: refused, names unavailable."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    path = printer_cfg("")
    write_options(path, 99000)
    with open(path, "a") as f:
        f.write("serial: %s\n" % board.by_id)

    d = daemon()
    wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL)["Name"] == "mcu", timeout=15)

    # Re-read it over and over; every answer comes within the bound.
    for _ in range(5):
        dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
        assert timed_call(dbus_client) < ANSWER_BOUND
        elapsed, status = timed_status(ctl)
        assert elapsed < ANSWER_BOUND * 4

    write_options(path, 200000)
    with open(path, "a") as f:
        f.write("serial: %s\n" % board.by_id)
    start = time.monotonic()
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    assert timed_call(dbus_client) < ANSWER_BOUND
    wait_log(d, "More than 100000 lines in all")
    wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL)["Name"] == "", timeout=15)
    assert time.monotonic() - start < 15


def test_exponential_includes_are_refused_quickly(testbed, klipper_checkout, printer_cfg, daemon,
                                                  dbus_client, wait_for, ctl):
    """Each file includes the next one twice, 30 levels deep (2^30 reads
    unbounded): refused at the file bound, the daemon answering."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    path = printer_cfg("[mcu eddy]\nserial: %s\n[include level0.cfg]\n" % board.by_id)
    config_dir = os.path.dirname(path)
    for i in range(30):
        with open(os.path.join(config_dir, "level%d.cfg" % i), "w") as f:
            f.write("[include level%d.cfg]\n[include level%d.cfg]\n" % (i + 1, i + 1))
    with open(os.path.join(config_dir, "level30.cfg"), "w") as f:
        f.write("[printer]\nkinematics: none\n")

    start = time.monotonic()
    d = daemon()
    assert timed_call(dbus_client) < ANSWER_BOUND
    # Depth-first, the depth bound (8) comes before the file bound.
    wait_log(d, "Includes nested deeper than 8 levels")
    wait_log(d, "is not used: it exceeds a bound")
    assert time.monotonic() - start < 30
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert props["Name"] == ""
    elapsed, status = timed_status(ctl)
    assert elapsed < ANSWER_BOUND * 4

    # Within the depth bound, 7 levels of two includes each are 2^7 reads:
    # the file bound.  First the same without doubling: used.
    for i in range(7):
        with open(os.path.join(config_dir, "level%d.cfg" % i), "w") as f:
            f.write("[include level%d.cfg]\n" % (i + 1))
    with open(os.path.join(config_dir, "level7.cfg"), "w") as f:
        f.write("[printer]\nkinematics: none\n")
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL)["Name"] == "mcu eddy", timeout=15)
    for i in range(7):
        with open(os.path.join(config_dir, "level%d.cfg" % i), "w") as f:
            f.write("[include level%d.cfg]\n[include level%d.cfg]\n" % (i + 1, i + 1))
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    wait_log(d, "More than 100 files read")
    wait_for(lambda: dbus_client.find_mcu(UsbSerial=EDDY_SERIAL)["Name"] == "", timeout=15)
    assert timed_call(dbus_client) < ANSWER_BOUND


def test_invalid_utf8_mcu_name(testbed, klipper_host, klipper_checkout, daemon, dbus_client, wait_for,
                               ctl):
    """[mcu \\xff\\xfe]: status, GetManagedObjects and PropertiesChanged keep
    working for every MCU; the name shows with U+FFFD."""
    klipper_checkout(HOST)
    octopus = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, mcu="stm32f429xx", version=HOST,
                                      port="1-1.2")
    eddy = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD, port="1-1.3")
    os.makedirs(os.path.dirname(klipper_host.printer_cfg_path), exist_ok=True)
    with open(klipper_host.printer_cfg_path, "wb") as f:
        f.write(b"[mcu]\nserial: " + octopus.by_id.encode() + b"\n"
                b"[mcu \xff\xfe\x1b[2J]\nserial: " + eddy.by_id.encode() + b"\n")

    d = daemon()
    wait_identified(dbus_client, wait_for, OCTOPUS_SERIAL)
    # Its identify finishing is a PropertiesChanged carrying the odd name's object.
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert props["Name"] == "mcu \ufffd\ufffd[2J"

    objects = dbus_client.call("/io/mcuflash1", "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects")
    names = sorted(ifaces["io.mcuflash1.Mcu"]["Name"] for ifaces in objects.values()
                   if "io.mcuflash1.Mcu" in ifaces)
    assert names == ["mcu", "mcu \ufffd\ufffd[2J"]

    out = ctl("status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert sorted(m["name"] for m in status["mcus"]) == ["mcu", "mcu \ufffd\ufffd[2J"]
    table = ctl("status")
    assert table.returncode == 0, table.stderr
    assert "\ufffd" in table.stdout
    assert "Cannot emit" not in d.log()
