"""Jobs that reboot MCUs into their bootloader and back, end to end: the real
daemon and mcuflashctl, boards that re-enumerate like real ones (a USB CDC
board after the 1200-baud touch, a UART board after the magic string, a CAN
node after the bootloader request), polkit and systemd mocked on the bus."""

import json
import os
import subprocess
import sys
import time

import pytest

import harness

HOST = "v0.13.0-46-g8c72b4a5"
OCTOPUS = "2E0036000851363131363530"
EBB_UUID = "0e0d81e4210c"
MCU_IFACE = "io.mcuflash1.Mcu"
JOB_IFACE = "io.mcuflash1.Job"


def props_of(dbus_client, selector):
    return dbus_client.mcu_props(dbus_client.get_mcu(selector))


def job_props(dbus_client, path):
    return dbus_client.get_all(path, JOB_IFACE)


def wait_job(dbus_client, wait_for, path, timeout=30):
    return wait_for(lambda: (lambda p: p if p["State"] in ("succeeded", "failed", "cancelled") else None)(
        job_props(dbus_client, path)), timeout=timeout, what="job %s finished" % path)


def start(dbus_client, selector, method, options=None):
    return dbus_client.call(dbus_client.get_mcu(selector), MCU_IFACE, method,
                            harness.dbus.Dictionary(options or {}, signature="sv"))


@pytest.fixture
def usb_printer(testbed, klipper_checkout, printer_cfg):
    klipper_checkout(HOST)

    def make(bootloader="katapult", **kw):
        kw.setdefault("mcu", "stm32f429xx")
        board = testbed.add_klipper_usb(serial=OCTOPUS, version=HOST, bootloader=bootloader, **kw)
        printer_cfg("[mcu]\nserial: %s\n" % board.by_id)
        return board
    return make


@pytest.mark.parametrize("bootloader,kind,firmware", [
    ("katapult", "katapult", "Katapult"),
    ("stm32-dfu", "stm32-dfu", "STM32 ROM DFU"),
    ("picoboot", "picoboot", "RP2040 boot ROM"),
])
def test_usb_to_bootloader_and_back_same_object(usb_printer, daemon, dbus_client, wait_for,
                                                bootloader, kind, firmware):
    board = usb_printer(bootloader, **({"mcu": "rp2040"} if bootloader == "picoboot" else {}))
    daemon()
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    path = dbus_client.get_mcu("mcu")

    job = start(dbus_client, "mcu", "RebootToBootloader")
    assert job.startswith("/io/mcuflash1/job/")
    assert dbus_client.mcu_props(path)["Job"] == job
    done = wait_job(dbus_client, wait_for, job)
    assert done["State"] == "succeeded", done["ErrorMessage"]
    assert done["Kind"] == "reboot" and done["Mcu"] == path and done["Phase"] == "done"
    props = dbus_client.mcu_props(path)
    assert (props["State"], props["Bootloader"], props["Firmware"]) == ("bootloader", kind, firmware)
    assert props["Job"] == "/"
    assert dbus_client.get_mcu("mcu") == path
    board.wait_mode(bootloader, timeout=5)
    if kind == "katapult":
        assert props["FlashStart"] == board.bootloader_sim.app_start if hasattr(
            board.bootloader_sim, "app_start") else props["FlashStart"] > 0
    finished = [s for s in dbus_client.signals_named("Finished") if s[0] == job]
    assert finished and finished[-1][3][0] == "succeeded"

    job = start(dbus_client, "mcu", "RebootToApplication")
    done = wait_job(dbus_client, wait_for, job)
    assert done["State"] == "succeeded", done["ErrorMessage"]
    props = dbus_client.mcu_props(path)
    assert (props["State"], props["Firmware"], props["FirmwareVersion"]) == ("application", "Klipper", HOST)
    board.wait_mode("klipper", timeout=5)
    assert board.history[-3:] == ["klipper", bootloader, "klipper"]


def test_can_node_to_katapult_and_back(can_hub, can_node, klipper_checkout, printer_cfg, daemon,
                                       dbus_client, wait_for, ctl):
    klipper_checkout(HOST)
    printer_cfg("[mcu EBBCan]\ncanbus_uuid: %s\n" % EBB_UUID)
    can_hub.add_iface("can0")
    node = can_node("klipper", uuid=EBB_UUID, version=HOST, mcu="stm32g0b1xx", app_start=0x08002000)
    daemon(can_hub=can_hub)
    wait_for(lambda: props_of(dbus_client, "EBBCan")["State"] == "application", timeout=15)
    path = dbus_client.get_mcu("EBBCan")

    out = ctl("bootloader", "EBBCan", timeout=60)
    assert out.returncode == 0, out.stderr
    props = dbus_client.mcu_props(path)
    assert (props["State"], props["Bootloader"], props["Firmware"]) == ("bootloader", "katapult", "Katapult")
    assert props["FlashStart"] == 0x08002000
    assert props["McuType"] == "stm32g0b1xx"
    assert node.bootloader_requested
    assert dbus_client.get_mcu(EBB_UUID) == path

    out = ctl("reboot", "EBBCan", timeout=60)
    assert out.returncode == 0, out.stderr
    props = dbus_client.mcu_props(path)
    assert (props["State"], props["Firmware"], props["FirmwareVersion"]) == ("application", "Klipper", HOST)


def test_uart_magic_string_to_katapult_and_back(testbed, klipper_checkout, printer_cfg, daemon,
                                                dbus_client, wait_for):
    klipper_checkout(HOST)
    uart = testbed.add_uart("ttyAMA0", klipper={"version": HOST, "mcu": "stm32f103xe"},
                            bootloader="katapult")
    printer_cfg("[mcu]\nserial: /dev/ttyAMA0\n")
    daemon()
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    done = wait_job(dbus_client, wait_for, start(dbus_client, "mcu", "RebootToBootloader"))
    assert done["State"] == "succeeded", done["ErrorMessage"]
    props = props_of(dbus_client, "mcu")
    assert (props["State"], props["Bootloader"], props["DevicePath"]) == ("bootloader", "katapult", "/dev/ttyAMA0")
    done = wait_job(dbus_client, wait_for, start(dbus_client, "mcu", "RebootToApplication"))
    assert done["State"] == "succeeded", done["ErrorMessage"]
    assert props_of(dbus_client, "mcu")["State"] == "application"
    assert uart.history[-3:] == ["klipper", "katapult", "klipper"]


def test_bootloader_never_appears_times_out(usb_printer, daemon, dbus_client, wait_for):
    board = usb_printer(None, bootloader_request=True)
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=2\n")
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    path = dbus_client.get_mcu("mcu")
    done = wait_job(dbus_client, wait_for, start(dbus_client, "mcu", "RebootToBootloader"))
    assert done["State"] == "failed"
    assert done["Error"] == "io.mcuflash1.Error.Timeout"
    assert "did not appear in a bootloader" in done["ErrorMessage"]
    assert "offline" in done["ErrorMessage"] or "not reappeared" in done["ErrorMessage"]
    props = dbus_client.mcu_props(path)
    assert props["State"] == "offline" and props["Job"] == "/"


def test_printing_refuses_and_sends_nothing(usb_printer, klippy, daemon, dbus_client, wait_for,
                                            manager_props, ctl):
    import klippy_api
    board = usb_printer("katapult")
    server = klippy(mcus={"mcu": klippy_api.default_mcu(HOST)}, print_state="printing")
    daemon()
    wait_for(lambda: manager_props()["PrinterState"] == "printing", timeout=10)
    with pytest.raises(Exception) as e:
        start(dbus_client, "mcu", "RebootToBootloader")
    assert "io.mcuflash1.Error.Printing" in str(e.value)
    out = ctl("bootloader", "mcu")
    assert out.returncode == 1 and "print" in out.stderr
    assert board.sim.rx_bytes == 0 and not board.sim.bootloader_requested
    server.set_print_state("paused")
    wait_for(lambda: manager_props()["PrinterState"] == "paused", timeout=10)
    with pytest.raises(Exception) as e:
        start(dbus_client, "mcu", "RebootToBootloader")
    assert "io.mcuflash1.Error.Printing" in str(e.value)
    assert board.mode == "klipper"


def test_two_jobs_on_one_mcu_busy_two_mcus_in_parallel(testbed, klipper_checkout, daemon,
                                                       dbus_client, wait_for):
    klipper_checkout(HOST)
    a = testbed.add_klipper_usb(serial="AAAA0001", version=HOST, bootloader="katapult")
    b = testbed.add_klipper_usb(serial="BBBB0002", version=HOST, bootloader="katapult")
    daemon()
    for s in ("AAAA0001", "BBBB0002"):
        wait_for(lambda: props_of(dbus_client, s)["State"] == "application", timeout=15)
    ja = start(dbus_client, "AAAA0001", "RebootToBootloader")
    with pytest.raises(Exception) as e:
        start(dbus_client, "AAAA0001", "RebootToBootloader")
    assert "io.mcuflash1.Error.Busy" in str(e.value)
    jb = start(dbus_client, "BBBB0002", "RebootToBootloader")
    assert wait_job(dbus_client, wait_for, ja)["State"] == "succeeded"
    assert wait_job(dbus_client, wait_for, jb)["State"] == "succeeded"
    a.wait_mode("katapult", timeout=5)
    b.wait_mode("katapult", timeout=5)
    assert set(dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs")) >= {ja, jb}


def test_cancel_while_waiting(usb_printer, daemon, dbus_client, wait_for):
    usb_printer(None, bootloader_request=True)
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=30\n")
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    job = start(dbus_client, "mcu", "RebootToBootloader")
    wait_for(lambda: job_props(dbus_client, job)["Phase"] == "entering-bootloader", timeout=10)
    # Cancel may hit the moment the request is still being sent: then it says
    # so and the job stops right after.
    for _ in range(50):
        try:
            dbus_client.call(job, JOB_IFACE, "Cancel")
            break
        except Exception as e:
            assert "io.mcuflash1.Error.Busy" in str(e)
            if job_props(dbus_client, job)["State"] != "running":
                break
            time.sleep(0.05)
    done = wait_job(dbus_client, wait_for, job, timeout=10)
    assert done["State"] == "cancelled"
    assert done["Error"] == "io.mcuflash1.Error.Cancelled"
    with pytest.raises(Exception) as e:
        dbus_client.call(job, JOB_IFACE, "Cancel")
    assert "finished already" in str(e.value)


def test_mcu_vanishing_mid_job_is_survived(usb_printer, testbed, daemon, dbus_client, wait_for, ctl):
    board = usb_printer(None, bootloader_request=True)
    daemon(extra_config="\n[Jobs]\nBootloaderTimeoutSec=2\n")
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    job = start(dbus_client, "mcu", "RebootToBootloader")
    testbed.remove(board)
    done = wait_job(dbus_client, wait_for, job)
    assert done["State"] == "failed"
    assert ctl("status").returncode == 0


def test_linux_mcu_has_no_bootloader(tmp_path, klipper_checkout, printer_cfg, daemon, dbus_client,
                                     wait_for):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
    from linux_mcu import LinuxMcuProcess
    klipper_checkout(HOST)
    link = str(tmp_path / "klipper_host_mcu")
    printer_cfg("[mcu rpi]\nserial: %s\n" % link)
    proc = LinuxMcuProcess(link, HOST)
    try:
        daemon()
        wait_for(lambda: props_of(dbus_client, "rpi")["State"] == "application", timeout=15)
        with pytest.raises(Exception) as e:
            start(dbus_client, "rpi", "RebootToBootloader")
        assert "io.mcuflash1.Error.Unsupported" in str(e.value)
        with pytest.raises(Exception) as e:
            start(dbus_client, "rpi", "RebootToBootloader", {"bogus": harness.dbus.Boolean(True)})
        assert "Unknown option" in str(e.value)
    finally:
        proc.stop()


def test_job_objects_match_interface_xml(usb_printer, daemon, dbus_client, wait_for):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import xmlcompare
    usb_printer("katapult")
    daemon()
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    job = start(dbus_client, "mcu", "RebootToBootloader")
    wait_job(dbus_client, wait_for, job)
    texts = [str(dbus_client.call(p, "org.freedesktop.DBus.Introspectable", "Introspect"))
             for p in ("/io/mcuflash1", dbus_client.get_mcu("mcu"), job)]
    xml = os.path.join(os.path.dirname(__file__), "..", "..", "dbus", "io.mcuflash1.xml")
    assert xmlcompare.compare(xml, texts, require_all=True) == []


def test_job_retention(usb_printer, daemon, dbus_client, wait_for):
    usb_printer("katapult")
    daemon(extra_config="\n[Jobs]\nJobRetentionSec=1\n")
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    job = start(dbus_client, "mcu", "RebootToBootloader")
    wait_job(dbus_client, wait_for, job)
    wait_for(lambda: job not in dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "ListJobs"),
             timeout=10, what="job dropped after JobRetentionSec")


def test_device_already_in_its_bootloader_gets_its_own_object(testbed, klipper_checkout, daemon,
                                                              dbus_client, wait_for, ctl):
    """A board plugged in with BOOT held (or an empty chip): no Klipper ever
    ran, the ROM bootloader is all there is."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sim"))
    import usb_boot
    klipper_checkout(HOST)
    daemon()
    values = testbed._usb_values("1-1.6")
    sim = usb_boot.Rp2040BootSim(serial="E0C9125B0D9B")
    sim.plug(testbed.tb, "1-1.6", values["BUSNUM"], values["DEVNUM"])
    try:
        props = wait_for(lambda: (lambda l: dbus_client.mcu_props(l[0]) if l else None)(
            dbus_client.list_mcus()), timeout=10, what="the BOOTSEL device")
        assert (props["State"], props["Bootloader"], props["Transport"]) == ("bootloader", "picoboot", "usb")
        assert props["Id"] == "E0C9125B0D9B" and props["McuType"] == "rp2040"
        assert (props["UsbVendorId"], props["UsbProductId"]) == (0x2e8a, 0x0003)
        assert props["UsbPort"] == "1-1.6"
        status = json.loads(ctl("status", "--json").stdout)
        assert status["mcus"][0]["state"] == "bootloader"
    finally:
        sim.unplug(testbed.tb)
    wait_for(lambda: dbus_client.mcu_props(dbus_client.list_mcus()[0])["State"] == "offline", timeout=10)


def test_monitor_shows_a_job_as_it_happens(usb_printer, daemon, dbus_client, wait_for, bus):
    usb_printer("katapult")
    daemon()
    wait_for(lambda: props_of(dbus_client, "mcu")["State"] == "application", timeout=15)
    mon = subprocess.Popen([harness.ctl_binary(), "monitor", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=harness.clean_env(DBUS_SYSTEM_BUS_ADDRESS=bus))
    try:
        assert "Watching" in mon.stderr.readline()
        job = start(dbus_client, "mcu", "RebootToBootloader")
        wait_job(dbus_client, wait_for, job)
        events = []
        for line in mon.stdout:
            events.append(json.loads(line))
            if any(e.get("event") == "job-finished" for e in events) and any(
                    e.get("properties", {}).get("State") == "bootloader" for e in events):
                break
    finally:
        mon.terminate()
        mon.wait(5)
    kinds = [e["event"] for e in events]
    assert "job-added" in kinds and "job-finished" in kinds and "mcu-changed" in kinds
    assert mon.returncode == 0
