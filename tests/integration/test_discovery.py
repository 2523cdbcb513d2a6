"""Discovery and identification, end to end: the real mcuflashd on a private
bus, fake udev devices with Klipper MCU simulators behind their ttys, and
the real mcuflashctl.  What is asserted is what a user sees: D-Bus
properties, mcuflashctl output, and the traffic that reached a simulator."""

import fcntl
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))

import klipper_dict  # noqa: E402

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
OCTOPUS_SERIAL = "2E0036000851363131363530"
EDDY_SERIAL = "E66138935F4A2B2C"

JSON_KEYS = ["id", "name", "transport", "device_path", "can_interface", "can_uuid",
             "usb_vid", "usb_pid", "usb_serial", "state", "bootloader", "firmware",
             "version", "mcu_type", "version_matches_host"]


def demo_printer_cfg(octopus, eddy):
    return ("[mcu]\nserial: %s\n\n[mcu eddy]\nserial: %s\n\n[printer]\nkinematics: none\n"
            % (octopus.by_id, eddy.by_id))


@pytest.fixture
def printer(testbed, klipper_checkout, printer_cfg):
    """The USB part of the demo printer: Octopus at the host version, Eddy older."""
    klipper_checkout(HOST)
    octopus = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, mcu="stm32f429xx", version=HOST,
                                      port="1-1.2")
    eddy = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD, port="1-1.3")
    printer_cfg(demo_printer_cfg(octopus, eddy))
    return octopus, eddy


def wait_identified(dbus_client, wait_for, selector, state="application"):
    def ready():
        p = dbus_client.mcu_props(dbus_client.get_mcu(selector))
        return p if p["State"] == state else None
    return wait_for(ready, timeout=15, what="%s in state %s" % (selector, state))


def test_two_mcus_with_versions_and_match(printer, daemon, dbus_client, wait_for, ctl):
    daemon()
    mcu = wait_identified(dbus_client, wait_for, "mcu")
    eddy = wait_identified(dbus_client, wait_for, "eddy")

    assert mcu["Name"] == "mcu"
    assert mcu["Id"] == OCTOPUS_SERIAL
    assert mcu["Transport"] == "usb-serial"
    assert mcu["Firmware"] == "Klipper"
    assert mcu["FirmwareVersion"] == HOST
    assert mcu["McuType"] == "stm32f429xx"
    assert mcu["VersionMatchesHost"] == "yes"
    assert (mcu["UsbVendorId"], mcu["UsbProductId"]) == (0x1d50, 0x614e)
    assert mcu["UsbSerial"] == OCTOPUS_SERIAL
    assert mcu["UsbPort"] == "1-1.2"
    assert mcu["BuildVersions"].startswith("gcc: ")
    assert mcu["Job"] == "/"

    assert eddy["Name"] == "mcu eddy"
    assert eddy["FirmwareVersion"] == OLD
    assert eddy["McuType"] == "rp2040"
    assert eddy["VersionMatchesHost"] == "no"

    assert dbus_client.manager_props()["HostVersion"] == HOST

    out = ctl("status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["host_version"] == HOST
    by_name = {m["name"]: m for m in status["mcus"]}
    assert set(by_name) == {"mcu", "mcu eddy"}
    for m in status["mcus"]:
        for key in JSON_KEYS:
            assert isinstance(m[key], str), key
    assert by_name["mcu"]["usb_vid"] == "1d50" and by_name["mcu"]["usb_pid"] == "614e"
    assert by_name["mcu"]["version_matches_host"] == "yes"
    assert by_name["mcu eddy"]["version"] == OLD
    assert by_name["mcu eddy"]["version_matches_host"] == "no"
    assert by_name["mcu eddy"]["mcu_type"] == "rp2040"

    table = ctl("status")
    assert table.returncode == 0, table.stderr
    assert HOST in table.stdout and OLD in table.stdout
    assert "eddy" in table.stdout and "rp2040" in table.stdout


@pytest.mark.parametrize("selector", ["eddy", "mcu eddy", "MCU EDDY", EDDY_SERIAL, EDDY_SERIAL.lower()])
def test_info_selectors(printer, daemon, dbus_client, wait_for, ctl, selector):
    daemon()
    wait_identified(dbus_client, wait_for, "eddy")
    out = ctl("info", selector, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["id"] == EDDY_SERIAL
    assert info["name"] == "mcu eddy"
    for key in JSON_KEYS:
        assert key in info


def test_info_by_device_path_and_main_mcu(printer, daemon, dbus_client, wait_for, ctl):
    octopus, eddy = printer
    daemon()
    wait_identified(dbus_client, wait_for, "eddy")
    out = ctl("info", eddy.devnode, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == EDDY_SERIAL
    out = ctl("info", "mcu")
    assert out.returncode == 0, out.stderr
    assert OCTOPUS_SERIAL in out.stdout


def test_unknown_selector_is_an_error(printer, daemon, ctl):
    daemon()
    out = ctl("info", "nosuchboard")
    assert out.returncode != 0
    assert "No MCU matches 'nosuchboard'" in out.stderr
    assert out.stdout == ""


def test_hot_add_and_remove_goes_offline_and_back(testbed, klipper_checkout, printer_cfg,
                                                  daemon, dbus_client, wait_for, ctl):
    klipper_checkout(HOST)
    printer_cfg("[mcu]\nserial: /dev/serial/by-id/usb-Klipper_stm32f429xx_%s-if00\n" % OCTOPUS_SERIAL)
    daemon()
    assert dbus_client.list_mcus() == []

    dbus_client.clear_signals()
    board = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, version=HOST, port="1-1.2")
    props = wait_identified(dbus_client, wait_for, "mcu")
    path = dbus_client.get_mcu("mcu")
    assert props["VersionMatchesHost"] == "yes"
    assert [s for s in dbus_client.signals_named("McuAdded") if s[3][0] == path]

    testbed.remove(board)
    offline = wait_identified(dbus_client, wait_for, "mcu", state="offline")
    # Kept, with its identity and last version, so a person can see what went away.
    assert offline["FirmwareVersion"] == HOST
    assert offline["Id"] == OCTOPUS_SERIAL
    assert dbus_client.list_mcus() == [path]
    assert "offline" in ctl("status").stdout

    # Plugged in again (on another port even): the same object comes back.
    testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, version=HOST, port="1-1.5")
    props = wait_identified(dbus_client, wait_for, "mcu")
    assert dbus_client.get_mcu("mcu") == path
    assert props["UsbPort"] == "1-1.5"
    assert props["StateReason"] == ""


def test_offline_mcu_is_dropped_after_timeout(testbed, klipper_checkout, daemon, dbus_client,
                                              wait_for):
    klipper_checkout(HOST)
    daemon(offline_timeout=1)
    board = testbed.add_klipper_usb(version=HOST)
    wait_for(lambda: dbus_client.list_mcus(), timeout=10, what="MCU added")
    path = dbus_client.list_mcus()[0]
    wait_for(lambda: dbus_client.mcu_props(path)["State"] == "application", timeout=15)
    dbus_client.clear_signals()
    testbed.remove(board)
    wait_for(lambda: dbus_client.list_mcus() == [], timeout=10, what="MCU dropped")
    assert [s for s in dbus_client.signals_named("McuRemoved") if s[3][0] == path]


def test_rescan_drops_offline_and_rereads_printer_cfg(printer, daemon, dbus_client, wait_for,
                                                      printer_cfg, testbed, ctl):
    octopus, eddy = printer
    daemon()
    wait_identified(dbus_client, wait_for, "eddy")
    wait_identified(dbus_client, wait_for, "mcu")
    testbed.remove(octopus)
    wait_identified(dbus_client, wait_for, OCTOPUS_SERIAL, state="offline")

    printer_cfg("[mcu probe]\nserial: %s\n" % eddy.by_id)
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    assert [dbus_client.mcu_props(p)["Id"] for p in dbus_client.list_mcus()] == [EDDY_SERIAL]
    assert dbus_client.mcu_props(dbus_client.get_mcu("probe"))["Name"] == "mcu probe"
    out = ctl("info", "eddy")
    assert out.returncode != 0


def test_names_follow_include_files(testbed, klipper_checkout, printer_cfg, daemon, dbus_client,
                                    wait_for, klipper_host):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    cfg_dir = os.path.dirname(klipper_host.printer_cfg_path)
    os.makedirs(os.path.join(cfg_dir, "boards"), exist_ok=True)
    with open(os.path.join(cfg_dir, "boards", "eddy.cfg"), "w") as f:
        f.write("[mcu eddy]\nserial: %s\n" % board.by_id)
    printer_cfg("[include boards/*.cfg]\n\n[printer]\nkinematics: none\n")
    daemon()
    props = wait_identified(dbus_client, wait_for, "eddy")
    assert props["Name"] == "mcu eddy"


@pytest.mark.parametrize("fault,reason", [
    ("silent", "no complete answer"),
    ("garbage", "not Klipper"),
    ("hang_mid_dict:400", "no complete answer"),
])
def test_bad_device_is_unknown_and_daemon_keeps_answering(testbed, klipper_checkout, daemon,
                                                          dbus_client, wait_for, ctl, fault,
                                                          reason):
    klipper_checkout(HOST)
    daemon(identify_timeout=1)
    bad = testbed.add_klipper_usb(serial="BAD0", version=HOST, fault=fault)
    good = testbed.add_klipper_usb(serial="GOOD1", version=HOST)

    # While the bad one is still being tried, the daemon answers at once.
    out = ctl("status", "--json", timeout=5)
    assert out.returncode == 0, out.stderr

    props = wait_for(lambda: (lambda p: p if p["StateReason"] else None)(
        dbus_client.mcu_props(dbus_client.get_mcu("BAD0"))), timeout=15, what="bad MCU settled")
    assert props["State"] == "unknown"
    assert reason in props["StateReason"]
    assert props["VersionMatchesHost"] == "unknown"
    assert bad.sim.rx_bytes > 0
    wait_identified(dbus_client, wait_for, "GOOD1")
    assert ctl("info", "BAD0").returncode == 0


def test_busy_port_is_not_opened(testbed, klipper_checkout, daemon, dbus_client, wait_for, ctl):
    """A port some other process holds (Klipper, a terminal) is left alone."""
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=OCTOPUS_SERIAL, version=HOST, simulate=True)
    # Hold the port the way Klipper does: open it and take pyserial's flock.
    holder = os.open(board.devnode, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        daemon()
        props = wait_for(lambda: (lambda p: p if p["StateReason"] else None)(
            dbus_client.mcu_props(dbus_client.get_mcu(OCTOPUS_SERIAL))), timeout=15,
            what="busy MCU settled")
        assert props["State"] == "unknown"
        assert "held by another process" in props["StateReason"]
        # What the USB descriptors tell is still shown.
        assert props["Firmware"] == "Klipper"
        assert props["McuType"] == "stm32f429xx"
        # Refresh does not steal it either, and says why.
        err = None
        try:
            dbus_client.call(dbus_client.get_mcu(OCTOPUS_SERIAL), "io.mcuflash1.Mcu", "Refresh")
        except Exception as e:
            err = e
        assert err is not None and "io.mcuflash1.Error.Busy" in str(err)
        assert board.sim.rx_bytes == 0
    finally:
        os.close(holder)

    # Released: a Refresh identifies it.
    dbus_client.call(dbus_client.get_mcu(OCTOPUS_SERIAL), "io.mcuflash1.Mcu", "Refresh")
    props = dbus_client.mcu_props(dbus_client.get_mcu(OCTOPUS_SERIAL))
    assert props["State"] == "application"
    assert props["FirmwareVersion"] == HOST


def test_refresh_reads_the_new_version(testbed, klipper_checkout, daemon, dbus_client, wait_for):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    daemon()
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert props["VersionMatchesHost"] == "no"
    path = dbus_client.get_mcu(EDDY_SERIAL)

    # The board now runs the host's version (flashed by hand, say).
    with board.sim.lock:
        board.sim.dict_json, board.sim.dict_compressed = klipper_dict.build(HOST, "rp2040")
    board.sim.reset()
    dbus_client.call(path, "io.mcuflash1.Mcu", "Refresh")
    props = dbus_client.mcu_props(path)
    assert props["FirmwareVersion"] == HOST
    assert props["VersionMatchesHost"] == "yes"


def test_refresh_of_offline_mcu_is_disconnected(testbed, klipper_checkout, daemon, dbus_client,
                                                wait_for):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    daemon()
    wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    testbed.remove(board)
    wait_identified(dbus_client, wait_for, EDDY_SERIAL, state="offline")
    with pytest.raises(Exception) as e:
        dbus_client.call(dbus_client.get_mcu(EDDY_SERIAL), "io.mcuflash1.Mcu", "Refresh")
    assert "io.mcuflash1.Error.Disconnected" in str(e.value)


def test_other_ttys_are_ignored_unless_configured(testbed, klipper_checkout, daemon, dbus_client,
                                                  wait_for, printer_cfg):
    klipper_checkout(HOST)
    # A CH340 bridge nobody named, and a UART named in SerialDevices= with
    # a Klipper MCU at 250000 baud behind it.
    bridge = testbed.add_usb_serial_bridge(klipper={"version": HOST, "mcu": "atmega2560"})
    uart = testbed.add_uart("ttyAMA0", klipper={"version": OLD, "mcu": "stm32f103xe"})
    printer_cfg("[mcu]\nserial: /dev/ttyAMA0\nbaud: 250000\n")
    daemon()
    props = wait_identified(dbus_client, wait_for, "mcu")
    assert props["Transport"] == "serial"
    assert props["McuType"] == "stm32f103xe"
    assert props["DevicePath"] == "/dev/ttyAMA0"
    assert props["UsbVendorId"] == 0
    assert len(dbus_client.list_mcus()) == 1
    assert bridge.sim.rx_bytes == 0
    assert uart.sim.rx_bytes > 0


def test_serial_devices_setting_adds_a_tty(testbed, klipper_checkout, daemon, dbus_client,
                                           wait_for):
    klipper_checkout(HOST)
    bridge = testbed.add_usb_serial_bridge(klipper={"version": HOST, "mcu": "atmega2560"})
    daemon(serial_devices=[bridge.devnode])
    props = wait_for(lambda: (lambda l: dbus_client.mcu_props(l[0]) if l else None)(
        dbus_client.list_mcus()), timeout=10, what="bridge MCU")
    path = props and dbus_client.list_mcus()[0]
    props = wait_for(lambda: (lambda p: p if p["State"] == "application" else None)(
        dbus_client.mcu_props(path)), timeout=15)
    assert props["McuType"] == "atmega2560"
    assert props["Transport"] == "usb-serial"
    # No chip serial: the port is the identity.
    assert props["Id"] == "usb-%s" % bridge.port


def test_host_version_unknown_gives_unknown_match(testbed, daemon, dbus_client, wait_for):
    # No klippy/.version and no git: the host version cannot be known.
    testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    daemon()
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert dbus_client.manager_props()["HostVersion"] == ""
    assert props["VersionMatchesHost"] == "unknown"


def test_api_matches_interface_xml(printer, daemon, dbus_client, wait_for):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import xmlcompare
    daemon()
    wait_identified(dbus_client, wait_for, "mcu")
    texts = [dbus_client.call(p, "org.freedesktop.DBus.Introspectable", "Introspect")
             for p in ("/io/mcuflash1", dbus_client.get_mcu("mcu"))]
    xml = os.path.join(os.path.dirname(__file__), "..", "..", "dbus", "io.mcuflash1.xml")
    assert xmlcompare.compare(xml, [str(t) for t in texts]) == []


def test_uart_is_opened_at_the_printer_cfg_baud(testbed, klipper_checkout, printer_cfg, daemon,
                                                 dbus_client, wait_for):
    """A hardware UART MCU is identified at the baud printer.cfg gives; the
    simulator sees the line settings the daemon made on its pty."""
    import termios
    klipper_checkout(HOST)
    uart = testbed.add_uart("ttyAMA1", klipper={"version": HOST, "mcu": "stm32f103xe"})
    printer_cfg("[mcu]\nserial: /dev/ttyAMA1\nbaud: 115200\n")
    daemon()
    props = wait_identified(dbus_client, wait_for, "mcu")
    assert props["Transport"] == "serial"
    attrs = termios.tcgetattr(uart.master_fd)
    assert attrs[4] == termios.B115200 and attrs[5] == termios.B115200


def test_broken_printer_cfg_warns_and_mcus_still_show(testbed, klipper_checkout, printer_cfg,
                                                       daemon, dbus_client, wait_for):
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial=EDDY_SERIAL, mcu="rp2040", version=OLD)
    printer_cfg("[mcu eddy\nserial %s\n[include nothing/here/*.cfg]\n\x00garbage: [\n" % board.by_id)
    d = daemon()
    props = wait_identified(dbus_client, wait_for, EDDY_SERIAL)
    assert props["FirmwareVersion"] == OLD
    assert props["Name"] == ""
    assert "<4>" in d.log()           # a warning, with journald's priority prefix
