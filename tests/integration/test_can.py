"""CAN MCUs and living beside Klipper, end to end: the real daemon under the
LD_PRELOAD CAN shim, the test CAN hub with Klipper and Katapult node
simulators, a fake klippy API server, and what D-Bus and mcuflashctl show."""

import json
import os
import threading

import pytest

HOST = "v0.13.0-46-g8c72b4a5"
OLD = "v0.12.0-396-g2d5a2aa8"
EBB_UUID = "0e0d81e4210c"
SB_UUID = "a1b2c3d4e5f6"
KATAPULT_UUID = "5ab1e0000001"


def props_of(dbus_client, selector):
    return dbus_client.mcu_props(dbus_client.get_mcu(selector))


def wait_state(dbus_client, wait_for, selector, state, timeout=15):
    return wait_for(lambda: (lambda p: p if p["State"] == state else None)(
        props_of(dbus_client, selector)), timeout=timeout, what="%s %s" % (selector, state))


def admin_names(node):
    with node.lock:
        return [name for name, _ in node.admin]


def test_two_can_nodes_found_with_uuid_version_and_type(can_hub, can_node, klipper_checkout,
                                                        printer_cfg, daemon, dbus_client,
                                                        wait_for, ctl):
    klipper_checkout(HOST)
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0", bitrate=1000000)
    ebb = can_node("klipper", uuid=EBB_UUID, version=HOST, mcu="stm32g0b1xx")
    kat = can_node("katapult", uuid=KATAPULT_UUID, mcu="stm32f103xe")
    daemon(can_hub=can_hub)

    props = wait_state(dbus_client, wait_for, "EBBCan", "application")
    assert props["Id"] == EBB_UUID
    assert props["Name"] == "mcu EBBCan"
    assert props["Transport"] == "can"
    assert props["CanInterface"] == "can0"
    assert props["CanUuid"] == EBB_UUID
    assert props["FirmwareVersion"] == HOST
    assert props["McuType"] == "stm32g0b1xx"
    assert props["VersionMatchesHost"] == "yes"
    # The node id came from the daemon's own range, not Klipper's.
    assert 64 <= ebb.nodeid <= 127

    kprops = wait_state(dbus_client, wait_for, KATAPULT_UUID, "bootloader")
    assert kprops["Firmware"] == "Katapult"
    assert kprops["Bootloader"] == "katapult"
    assert kprops["CanUuid"] == KATAPULT_UUID
    # Given a Katapult node id (128, the first of Katapult's range) and asked CONNECT.
    assert kat.nodeid == 128
    assert kprops["McuType"] == "stm32f103xe"
    assert kprops["FlashStart"] == kat.app_start

    status = json.loads(ctl("status", "--json").stdout)
    ebb_json = [m for m in status["mcus"] if m["name"] == "mcu EBBCan"][0]
    assert (ebb_json["can_interface"], ebb_json["can_uuid"]) == ("can0", EBB_UUID)
    table = ctl("status").stdout
    assert EBB_UUID in table and "can0" in table
    assert ctl("info", EBB_UUID.upper()).returncode == 0


def test_hot_added_interface_with_a_node(can_hub, can_node, klipper_checkout, daemon,
                                         dbus_client, wait_for):
    klipper_checkout(HOST)
    can_hub.add_iface("can0")
    daemon(can_hub=can_hub)
    assert dbus_client.list_mcus() == []

    can_node("klipper", iface="can1", uuid=SB_UUID, version=OLD, mcu="rp2040")
    can_hub.add_iface("can1", bitrate=500000)
    props = wait_state(dbus_client, wait_for, SB_UUID, "application")
    assert props["CanInterface"] == "can1"
    assert props["FirmwareVersion"] == OLD
    assert props["VersionMatchesHost"] == "no"


def test_interface_down_offline_up_same_object(can_hub, can_node, klipper_checkout, daemon,
                                               dbus_client, wait_for):
    klipper_checkout(HOST)
    can_hub.add_iface("can0")
    node = can_node("klipper", uuid=EBB_UUID, version=HOST)
    daemon(can_hub=can_hub)
    wait_state(dbus_client, wait_for, EBB_UUID, "application")
    path = dbus_client.get_mcu(EBB_UUID)
    nodeid = node.nodeid

    can_hub.set_up("can0", False)
    props = wait_state(dbus_client, wait_for, EBB_UUID, "offline")
    assert "can0" in props["StateReason"]
    assert props["FirmwareVersion"] == HOST       # kept while offline

    can_hub.set_up("can0", True)
    wait_state(dbus_client, wait_for, EBB_UUID, "application")
    assert dbus_client.get_mcu(EBB_UUID) == path
    assert dbus_client.list_mcus() == [path]
    # Asked again on the id it already had: no new assignment.
    assert node.nodeid == nodeid
    assert node.shutdown_reason is None

    # The interface vanishes entirely: offline as well.
    can_hub.remove_iface("can0")
    wait_state(dbus_client, wait_for, EBB_UUID, "offline")


def test_node_ids_never_collide_with_nodes_in_use(can_hub, can_node, klipper_checkout,
                                                  klipper_host, printer_cfg, daemon, dbus_client,
                                                  wait_for):
    klipper_checkout(HOST)
    # A Klipper the daemon cannot ask (no ApiSocket=) holds two nodes:
    # EBBCan on id 4, as printer.cfg implies, and one on id 64 - right in
    # the daemon's range - that is busy talking to its host.
    cfg = printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    held4 = can_node("klipper", uuid=EBB_UUID, version=HOST, assigned_by_klipper=4)
    held64 = can_node("klipper", uuid="c0ffee000064", version=HOST, assigned_by_klipper=64)
    stop = threading.Event()

    def klipper_polls_its_node():
        while not stop.wait(0.05):
            can_hub.inject("can0", 0x100 + 2 * 64, bytes([0x05, 0x10, 0x9e, 0x81, 0x7e]))
    poller = threading.Thread(target=klipper_polls_its_node, daemon=True)
    poller.start()
    try:
        fresh = can_node("klipper", uuid=SB_UUID, version=HOST)
        daemon(can_hub=can_hub, config_text="[Klipper]\nPath=%s\nPrinterConfig=%s\n"
               % (klipper_host.checkout, cfg))
        wait_state(dbus_client, wait_for, SB_UUID, "application")
    finally:
        stop.set()
        poller.join()
    assert fresh.nodeid not in (4, 64)
    assert 64 < fresh.nodeid <= 127
    assert (held4.nodeid, held64.nodeid) == (4, 64)
    assert held4.shutdown_reason is None and held64.shutdown_reason is None
    # Nobody told the held nodes anything, nor spoke on their ids.
    for held in (held4, held64):
        with held.lock:
            assert [data for name, data in held.admin
                    if name == "set_klipper_nodeid" and bytes(data[1:7]) == held.uuid] == []
    assert held4.frames_to(0x100 + 2 * 4) == []
    # The held printer.cfg node is not on D-Bus as found: it never answered.
    assert SB_UUID in [dbus_client.mcu_props(p)["Id"] for p in dbus_client.list_mcus()]
    assert EBB_UUID not in [dbus_client.mcu_props(p)["Id"] for p in dbus_client.list_mcus()]


def test_klippy_owns_the_mcus_versions_come_from_its_api(
        can_hub, can_node, testbed, klipper_checkout, printer_cfg, klippy, daemon, dbus_client,
        wait_for, ctl, tmp_path, manager_props):
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial="2E0036000851363131363530", version=HOST,
                                    mcu="stm32f429xx")
    can_hub.add_iface("can0")
    ebb = can_node("klipper", uuid=EBB_UUID, version=OLD, mcu="stm32g0b1xx", assigned_by_klipper=4)
    printer_cfg("[mcu]\nserial: %s\n\n[mcu EBBCan]\ncanbus_uuid: %s\n" % (board.by_id, EBB_UUID))
    server = klippy(mcus={
        "mcu": klippy_api.default_mcu(HOST, "stm32f429xx"),
        "mcu EBBCan": klippy_api.default_mcu(OLD, "stm32g0b1xx"),
    })
    daemon(can_hub=can_hub)

    mcu = wait_for(lambda: (lambda p: p if p["FirmwareVersion"] == HOST else None)(
        props_of(dbus_client, "mcu")), timeout=15, what="mcu version from klippy")
    assert mcu["State"] == "application"
    assert "Klipper" in mcu["StateReason"]
    ebb_props = wait_for(lambda: (lambda p: p if p["FirmwareVersion"] == OLD else None)(
        props_of(dbus_client, "EBBCan")), timeout=15, what="EBBCan from klippy")
    assert ebb_props["McuType"] == "stm32g0b1xx"
    assert ebb_props["Transport"] == "can"
    assert ebb_props["VersionMatchesHost"] == "no"
    assert manager_props()["PrinterState"] == "idle"

    # Not one byte to the MCUs Klipper owns.
    assert board.sim.rx_bytes == 0
    assert ebb.frames_to(0x100 + 2 * 4) == []
    assert "set_klipper_nodeid" not in admin_names(ebb)

    # Refresh does not take a link from Klipper either.
    with pytest.raises(Exception) as e:
        dbus_client.call(dbus_client.get_mcu("mcu"), "io.mcuflash1.Mcu", "Refresh")
    assert "io.mcuflash1.Error.Busy" in str(e.value)
    assert board.sim.rx_bytes == 0

    # PrinterState follows Klipper.
    server.set_print_state("printing")
    wait_for(lambda: manager_props()["PrinterState"] == "printing", timeout=10)
    assert json.loads(ctl("status", "--json").stdout)["printer_state"] == "printing"
    server.set_print_state("paused")
    wait_for(lambda: manager_props()["PrinterState"] == "paused", timeout=10)
    server.set_state("shutdown")
    wait_for(lambda: manager_props()["PrinterState"] == "shutdown", timeout=10)

    # Klipper exits: the MCUs are free and the daemon reads them itself.
    server.stop()
    wait_for(lambda: manager_props()["PrinterState"] == "stopped", timeout=10)
    wait_for(lambda: board.sim.rx_bytes > 0, timeout=10, what="daemon identifies the USB MCU")
    mcu = wait_for(lambda: (lambda p: p if p["State"] == "application" and not p["StateReason"]
                            else None)(props_of(dbus_client, "mcu")), timeout=15)
    assert mcu["FirmwareVersion"] == HOST
    # EBBCan keeps Klipper's stale node id 4 until the daemon takes it over.
    wait_for(lambda: ebb.nodeid is not None and 64 <= ebb.nodeid <= 127, timeout=20,
             what="EBBCan given a node id by the daemon")
    ebb_props = wait_for(lambda: (lambda p: p if ebb.requests > 0 and p["State"] == "application"
                                  else None)(props_of(dbus_client, "EBBCan")), timeout=20,
                         what="EBBCan identified by the daemon")
    assert ebb_props["FirmwareVersion"] == OLD
    assert "Klipper" not in ebb_props["StateReason"]

    # ... and comes back: they are Klipper's again, the daemon keeps off.
    server.restart()
    wait_for(lambda: manager_props()["PrinterState"] == "idle", timeout=15)
    rx = board.sim.rx_bytes
    wait_for(lambda: "Klipper" in props_of(dbus_client, "mcu")["StateReason"], timeout=10)
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    assert board.sim.rx_bytes == rx


def test_printer_state_without_klipper_is_stopped(klipper_checkout, daemon, manager_props):
    klipper_checkout(HOST)
    daemon()
    assert manager_props()["PrinterState"] == "stopped"


def test_printer_state_unknown_without_api_socket(klipper_host, klipper_checkout, daemon,
                                                  manager_props):
    klipper_checkout(HOST)
    daemon(config_text="[Klipper]\nPath=%s\n" % klipper_host.checkout)
    assert manager_props()["PrinterState"] == "unknown"


def test_klippy_starting_up_then_ready(testbed, klipper_checkout, printer_cfg, klippy, daemon,
                                       manager_props, wait_for, dbus_client):
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(version=HOST)
    printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
    server = klippy(state="startup", mcus={"mcu": klippy_api.default_mcu(HOST)})
    daemon()
    wait_for(lambda: manager_props()["PrinterState"] == "startup", timeout=10)
    assert board.sim.rx_bytes == 0
    server.set_state("ready")
    wait_for(lambda: manager_props()["PrinterState"] == "idle", timeout=10)
    wait_for(lambda: props_of(dbus_client, "mcu")["FirmwareVersion"] == HOST, timeout=10)
    assert board.sim.rx_bytes == 0


def test_names_from_the_printer_cfg_klippy_runs(testbed, klipper_host, klipper_checkout, klippy,
                                                daemon, dbus_client, wait_for, tmp_path):
    """Without PrinterConfig=, the printer.cfg klippy names in its API gives
    the names."""
    import klippy_api
    klipper_checkout(HOST)
    board = testbed.add_klipper_usb(serial="E66138935F4A2B2C", mcu="rp2040", version=OLD)
    cfg = tmp_path / "elsewhere.cfg"
    cfg.write_text("[mcu eddy]\nserial: %s\n" % board.by_id)
    klippy(config_file=str(cfg), mcus={"mcu eddy": klippy_api.default_mcu(OLD, "rp2040")})
    daemon(config_text="[Klipper]\nPath=%s\nApiSocket=%s\n" % (klipper_host.checkout,
                                                              klipper_host.api_socket))
    props = wait_for(lambda: (lambda p: p if p["Name"] == "mcu eddy" and p["FirmwareVersion"] == OLD
                              else None)(props_of(dbus_client, "E66138935F4A2B2C")), timeout=15)
    assert "Klipper" in props["StateReason"]
    assert board.sim.rx_bytes == 0
