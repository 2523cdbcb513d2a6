#!/usr/bin/python3
"""Simulated USB bootloaders on umockdev's emulated usbfs: the STM32 ROM DFU
device (0483:df11, DFU 1.1 + DfuSe, protocols.md §6) and the RP2040 BOOTSEL
device (2e8a:0003, PICOBOOT, protocols.md §7).

A simulator describes its device to udev and libusb with record(): the
umockdev-record text of the usb_device (N: bus/usb/BBB/DDD, udev's ID_*
properties, sysfs attributes and the H: descriptors blob libusb reads
instead of asking the device).  attach() then installs a usbfs ioctl
handler (UMockdev.IoctlBase subclass) on the /dev/bus/usb node, which plays
the kernel's part for what libusb 1.0.26 and dfu-util send:
SUBMITURB/REAPURB/REAPURBNDELAY/DISCARDURB (control and bulk URBs,
completed in submission order), CLAIMINTERFACE/RELEASEINTERFACE,
SETINTERFACE, SETCONFIGURATION, GETDRIVER, DISCONNECT_CLAIM, USBDEVFS_IOCTL
(driver disconnect), CLEAR_HALT, RESET, GET_CAPABILITIES, CONNECTINFO,
GET_SPEED and the synchronous USBDEVFS_CONTROL/USBDEVFS_BULK.  String
descriptors are served through GET_DESCRIPTOR control transfers, as libusb
reads them from the device.  Anything else gets ENOTTY, as from a driver
that does not know the ioctl.

The handler runs in umockdev's ioctl thread.  Callbacks (on_leave,
on_reboot, on_disconnect) are called from that thread after the reply that
caused them has been queued; they must not block for long.  Tests read the
recorded state (flash contents, requests, erases, writes, violations)
under .lock, or with wait_for().

Faults (constructor `fault=` or set_fault()), one-shot unless noted:
  "stall:PHASE"       the request of PHASE stalls (EPIPE for the host)
  "disconnect:PHASE"  the device vanishes at PHASE: that URB fails with
                      -ESHUTDOWN (libusb: NO_DEVICE), every later ioctl with
                      ENODEV, on_disconnect(PHASE) is called
  "busy"              (persistent) DFU: GETSTATUS reports dfuDNBUSY forever
                      after a download; PICOBOOT: commands are never acked
PHASE for DFU: erase, write, setaddress, getstatus (the first GETSTATUS of
an operation), leave (the GETSTATUS after the leave request); for
PICOBOOT: exclusive, exitxip, erase, write, read, reboot.

Timing is off by default: the DFU poll timeout is reported and checked,
never waited for.  link_rate= (bytes/s, for scripts/bench) puts the device
behind a rate-limited link (linkmodel.py): the data of every transfer
(control data stages and bulk) costs its bytes at that rate and is
completed no sooner than the link allows; a DFU device's bwPollTimeout
after a download counts as busy time the host has to wait for; .link
adds it up in link_seconds.

What this is not: no isochronous or interrupt transfers, no emulation of the
RP2040's mass-storage interface (its descriptor is present, requests to it
stall), no USB frame or packet overhead, x86-64 struct layouts only.
"""

import errno
import re
import struct
import threading
import time
import traceback

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

import cortexm_boot  # noqa: E402
import katapult_core  # noqa: E402
from linkmodel import LinkModel  # noqa: E402

# usbfs ioctls (x86-64, checked against linux/usbdevice_fs.h)
USBDEVFS_CONTROL = 0xc0185500
USBDEVFS_BULK = 0xc0185502
USBDEVFS_SETINTERFACE = 0x80085504
USBDEVFS_SETCONFIGURATION = 0x80045505
USBDEVFS_GETDRIVER = 0x41045508
USBDEVFS_SUBMITURB = 0x8038550a
USBDEVFS_DISCARDURB = 0x0000550b
USBDEVFS_REAPURB = 0x4008550c
USBDEVFS_REAPURBNDELAY = 0x4008550d
USBDEVFS_CLAIMINTERFACE = 0x8004550f
USBDEVFS_RELEASEINTERFACE = 0x80045510
USBDEVFS_CONNECTINFO = 0x40085511
USBDEVFS_IOCTL = 0xc0105512
USBDEVFS_RESET = 0x00005514
USBDEVFS_CLEAR_HALT = 0x80045515
USBDEVFS_DISCONNECT = 0x00005516
USBDEVFS_CONNECT = 0x00005517
USBDEVFS_GET_CAPABILITIES = 0x8004551a
USBDEVFS_DISCONNECT_CLAIM = 0x8108551b
USBDEVFS_GET_SPEED = 0x0000551f

IOCTL_NAMES = {v: k for k, v in list(globals().items()) if k.startswith("USBDEVFS_")}

URB_SIZE = 56                   # sizeof(struct usbdevfs_urb)
URB_TYPE_CONTROL = 2
URB_TYPE_BULK = 3
# GET_CAPABILITIES: ZERO_PACKET | BULK_CONTINUATION | NO_PACKET_SIZE_LIM,
# so that libusb sends every transfer as one URB.
USBFS_CAPS = 0x01 | 0x02 | 0x04
USB_SPEED_FULL = 2              # enum usb_device_speed


class Stall(Exception):
    """The device answers the request with a STALL handshake."""


class Disconnect(Exception):
    """The device vanishes while handling the request."""

    def __init__(self, phase):
        super().__init__(phase)
        self.phase = phase


class _Urb:
    """One submitted URB and what the device answered."""

    def __init__(self, client, addr, data, buf, urb_type, endpoint, length, payload):
        self.client = client
        self.addr = addr            # the URB's address in the client
        self.data = data            # IoctlData of struct usbdevfs_urb
        self.buf = buf              # IoctlData of the buffer (None when empty)
        self.type = urb_type
        self.endpoint = endpoint
        self.length = length        # buffer_length
        self.payload = payload      # OUT data (control: without the setup packet)
        self.status = 0
        self.reply = b""            # IN data
        self.actual = 0
        self.submitted = time.monotonic()


class _ClientState:
    def __init__(self):
        self.completed = []         # _Urb, in completion order
        self.waiting_reaper = None  # an IoctlClient blocked in REAPURB
        self.claimed = set()


def _usb_string(text):
    data = text.encode("utf-16-le")
    return bytes([len(data) + 2, 3]) + data


def _ioctl_name(request):
    return IOCTL_NAMES.get(request, "0x%x" % request)


class UsbDeviceSim:
    """What every simulated device shares: descriptors, strings, the
    umockdev record and the usbfs emulation.  Subclasses set the class
    attributes below, build self.strings and self.config_descriptor, and
    implement class_request(), bulk_out() and (optionally) usb_reset()."""

    vendor_id = 0
    product_id = 0
    bcd_device = 0x0100
    bcd_usb = 0x0200
    max_packet0 = 64
    manufacturer = ""
    product = ""
    kind = "usb"

    def __init__(self, serial, on_disconnect=None, fault=None, log=None, link_rate=None):
        self.serial = serial
        self.on_disconnect = on_disconnect
        self.lock = threading.Condition(threading.RLock())
        self.log_fn = log
        self.events = []            # text of everything that happened, for failure reports
        self.ioctls = {}            # ioctl name -> count
        self.strings = {1: self.manufacturer, 2: self.product, 3: serial}
        self.config_descriptor = b""
        self.interface_drivers = {}  # interface -> kernel driver name
        self.alt_settings = {}      # interface -> current alt setting
        self.halted = set()         # endpoints that stall until cleared
        self.in_queues = {}         # IN endpoint -> list of bytes (b"" = ZLP)
        self.pending_in = []        # bulk IN _Urb waiting for data
        self.disconnected = False
        self.disconnect_phase = None
        self.fault = None
        self.fault_hits = []
        self.set_fault(fault)
        self.link_rate = link_rate
        self.link = LinkModel() if link_rate else None
        self._busy_after = 0.0       # seconds the device is busy after the transfer at hand
        self._clients = {}
        self._handling = threading.local()  # .after: callbacks of the ioctl this thread handles
        self._handler = None
        self._testbed = None
        self.devnode = None
        self.syspath = None

    # -- faults and logging ----------------------------------------------

    FAULT_PHASES = ()

    def set_fault(self, fault):
        """Arm @fault ("stall:PHASE", "disconnect:PHASE", "busy" or None)."""
        if fault is not None:
            kind, _, phase = fault.partition(":")
            if kind == "busy" and not phase:
                pass
            elif kind not in ("stall", "disconnect") or phase not in self.FAULT_PHASES:
                raise ValueError("unknown fault %r for %s (phases: %s)"
                                 % (fault, type(self).__name__, ", ".join(self.FAULT_PHASES)))
        with self.lock:
            self.fault = fault

    def _fault_at(self, phase, raise_disconnect=True):
        """'stall' (or 'disconnect' with raise_disconnect=False) when the
        armed fault fires at @phase (and disarm it), else None; raises
        Disconnect for a disconnect fault."""
        if self.fault is None or self.fault == "busy":
            return None
        kind, _, fault_phase = self.fault.partition(":")
        if fault_phase != phase:
            return None
        self.fault = None
        self.fault_hits.append(kind + ":" + phase)
        self._log("fault %s:%s fires" % (kind, phase))
        if kind == "disconnect" and raise_disconnect:
            raise Disconnect(phase)
        return kind

    def _callback(self, fn, *args):
        """Call a test's callback; inside umockdev's ioctl thread only once
        the ioctl at hand is handled (and the lock released)."""
        if fn is None:
            return
        after = getattr(self._handling, "after", None)
        if after is not None:
            after.append((fn, args))
        else:
            fn(*args)

    def _log(self, text):
        line = "%s %s: %s" % (self.kind, self.serial, text)
        self.events.append(line)
        if self.log_fn:
            self.log_fn(line)

    def wait_for(self, predicate, timeout=5.0):
        """Wait until predicate() (called under .lock) is true; returns its value."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%s: timed out waiting for %s"
                                       % (self.kind, getattr(predicate, "__name__", "condition")))
                self.lock.wait(min(left, 0.1))

    # -- descriptors -------------------------------------------------------

    def device_descriptor(self):
        return struct.pack("<BBHBBBBHHHBBBB", 18, 1, self.bcd_usb, 0, 0, 0, self.max_packet0,
                           self.vendor_id, self.product_id, self.bcd_device, 1, 2, 3, 1)

    def interfaces(self):
        """[[number, alt, class, subclass, protocol, [endpoint addresses]], …] of the config."""
        result = []
        desc = self.config_descriptor
        i = 0
        while i + 1 < len(desc) and desc[i] > 0:
            if desc[i + 1] == 4:
                result.append([desc[i + 2], desc[i + 3], desc[i + 5], desc[i + 6], desc[i + 7], []])
            elif desc[i + 1] == 5 and result:
                result[-1][5].append(desc[i + 2])
            i += desc[i]
        return result

    def string_descriptor(self, index, langid):
        if index == 0:
            return bytes([4, 3, 0x09, 0x04])
        if index not in self.strings or langid != 0x0409:
            raise Stall()
        return _usb_string(self.strings[index])

    def get_descriptor(self, value, index, length):
        dtype, dindex = value >> 8, value & 0xff
        if dtype == 1:
            data = self.device_descriptor()
        elif dtype == 2 and dindex == 0:
            data = self.config_descriptor
        elif dtype == 3:
            data = self.string_descriptor(dindex, index)
        else:
            raise Stall()
        return data[:length]

    # -- umockdev record ----------------------------------------------------

    def usb_interfaces_property(self):
        seen = []
        for number, alt, cls, sub, proto, _ in self.interfaces():
            entry = "%02x%02x%02x" % (cls, sub, proto)
            if entry not in seen:
                seen.append(entry)
        return ":" + ":".join(seen) + ":"

    def record(self, port, busnum, devnum, interfaces=False):
        """umockdev-record text of the usb_device at USB port @port ("1-1.5")
        with bus and device numbers @busnum/@devnum; interfaces=True appends
        the usb_interface children (parents come first in the text)."""
        m = re.fullmatch(r"(\d+)-(\d+(?:\.\d+)*)", port)
        if not m or int(m.group(1)) != busnum:
            raise ValueError("bad USB port %r for bus %d" % (port, busnum))
        hops = m.group(2).split(".")
        chain = ["%d-%s" % (busnum, ".".join(hops[:i + 1])) for i in range(len(hops))]
        devpath = "/devices/pci0000:00/0000:00:14.0/usb%d/%s" % (busnum, "/".join(chain))
        usbpath = m.group(2)
        tag = usbpath.replace(".", "_")
        minor = (busnum - 1) * 128 + devnum - 1
        # udev: blanks escaped in *_ENC, runs of blanks become one '_' otherwise
        vendor_enc = self.manufacturer.replace(" ", "\\x20")
        model_enc = self.product.replace(" ", "\\x20")
        vendor = re.sub(r"\s+", "_", self.manufacturer.strip())
        model = re.sub(r"\s+", "_", self.product.strip())
        descriptors = (self.device_descriptor() + self.config_descriptor).hex().upper()
        n_ifaces = self.config_descriptor[4]
        lines = [
            "P: " + devpath,
            "N: bus/usb/%03d/%03d" % (busnum, devnum),
            "E: DEVPATH=" + devpath,
            "E: DEVNAME=/dev/bus/usb/%03d/%03d" % (busnum, devnum),
            "E: DEVTYPE=usb_device",
            "E: DRIVER=usb",
            "E: PRODUCT=%x/%x/%x" % (self.vendor_id, self.product_id, self.bcd_device),
            "E: TYPE=0/0/0",
            "E: BUSNUM=%03d" % busnum,
            "E: DEVNUM=%03d" % devnum,
            "E: MAJOR=189",
            "E: MINOR=%d" % minor,
            "E: SUBSYSTEM=usb",
            "E: ID_BUS=usb",
            "E: ID_VENDOR=" + vendor,
            "E: ID_VENDOR_ENC=" + vendor_enc,
            "E: ID_VENDOR_ID=%04x" % self.vendor_id,
            "E: ID_MODEL=" + model,
            "E: ID_MODEL_ENC=" + model_enc,
            "E: ID_MODEL_ID=%04x" % self.product_id,
            "E: ID_REVISION=%04x" % self.bcd_device,
            "E: ID_SERIAL=%s_%s_%s" % (vendor, model, self.serial),
            "E: ID_SERIAL_SHORT=" + self.serial,
            "E: ID_USB_INTERFACES=" + self.usb_interfaces_property(),
            "E: ID_PATH=pci-0000:00:14.0-usb-0:" + usbpath,
            "E: ID_PATH_TAG=pci-0000_00_14_0-usb-0_" + tag,
            "E: ID_FOR_SEAT=usb-pci-0000_00_14_0-usb-0_" + tag,
            "E: TAGS=:seat:",
            "E: CURRENT_TAGS=:seat:",
            "A: authorized=1\\n",
            "A: bConfigurationValue=1\\n",
            "A: bDeviceClass=00\\n",
            "A: bDeviceProtocol=00\\n",
            "A: bDeviceSubClass=00\\n",
            "A: bMaxPacketSize0=%d\\n" % self.max_packet0,
            "A: bNumConfigurations=1\\n",
            "A: bNumInterfaces=%2d\\n" % n_ifaces,
            "A: bcdDevice=%04x\\n" % self.bcd_device,
            "A: bmAttributes=%02x\\n" % self.config_descriptor[7],
            "A: busnum=%d\\n" % busnum,
            "H: descriptors=" + descriptors,
            "A: dev=189:%d\\n" % minor,
            "A: devnum=%d\\n" % devnum,
            "A: devpath=%s\\n" % usbpath,
            "A: idProduct=%04x\\n" % self.product_id,
            "A: idVendor=%04x\\n" % self.vendor_id,
            "A: manufacturer=%s\\n" % self.manufacturer,
            "A: maxchild=0\\n",
            "A: product=%s\\n" % self.product,
            "A: removable=removable\\n",
            "A: serial=%s\\n" % self.serial,
            "A: speed=12\\n",
            "A: version=%2x.%02x\\n" % (self.bcd_usb >> 8, self.bcd_usb & 0xff),
        ]
        text = "\n".join(lines) + "\n"
        if interfaces:
            done = set()
            for number, alt, cls, sub, proto, eps in self.interfaces():
                if number in done:
                    continue
                done.add(number)
                ipath = "%s/%s:1.%d" % (devpath, port, number)
                modalias = ("usb:v%04Xp%04Xd%04Xdc00dsc00dp00ic%02Xisc%02Xip%02Xin%02X"
                            % (self.vendor_id, self.product_id, self.bcd_device, cls, sub, proto,
                               number))
                ilines = [
                    "P: " + ipath,
                    "E: DEVPATH=" + ipath,
                    "E: DEVTYPE=usb_interface",
                    "E: PRODUCT=%x/%x/%x" % (self.vendor_id, self.product_id, self.bcd_device),
                    "E: TYPE=0/0/0",
                    "E: INTERFACE=%d/%d/%d" % (cls, sub, proto),
                    "E: MODALIAS=" + modalias,
                    "E: SUBSYSTEM=usb",
                    "A: bAlternateSetting= 0\\n",
                    "A: bInterfaceClass=%02x\\n" % cls,
                    "A: bInterfaceNumber=%02x\\n" % number,
                    "A: bInterfaceProtocol=%02x\\n" % proto,
                    "A: bInterfaceSubClass=%02x\\n" % sub,
                    "A: bNumEndpoints=%02x\\n" % len(eps),
                    "A: modalias=%s\\n" % modalias,
                ]
                if self.interface_drivers.get(number):
                    ilines.insert(4, "E: DRIVER=" + self.interface_drivers[number])
                text += "\n" + "\n".join(ilines) + "\n"
        with self.lock:
            self.syspath = "/sys" + devpath
            self.devnode = "/dev/bus/usb/%03d/%03d" % (busnum, devnum)
        return text

    # -- testbed ------------------------------------------------------------

    def attach(self, testbed, devnode=None):
        """Serve usbfs ioctls on @devnode (default: the node of the last
        record()) of @testbed (a UMockdev.Testbed or anything with .tb)."""
        tb = getattr(testbed, "tb", testbed)
        devnode = devnode or self.devnode
        if devnode is None:
            raise ValueError("no devnode: call record() first or pass devnode")
        self._handler = _UsbfsHandler(self)
        tb.attach_ioctl(devnode, self._handler)
        self._testbed = tb
        self.devnode = devnode
        return self

    def detach(self):
        """Remove the ioctl handler again (the testbed node stays)."""
        if self._testbed is not None and self._handler is not None:
            try:
                self._testbed.detach_ioctl(self.devnode)
            except Exception:   # the testbed may be gone already
                pass
        self._testbed = None
        self._handler = None

    def plug(self, testbed, port, busnum, devnum):
        """record() + attach() + add_from_string() (which sends the "add"
        uevent); returns the syspath.  The ioctl handler is in place before
        the event, as a real device answers once udev announces it."""
        tb = getattr(testbed, "tb", testbed)
        record = self.record(port, busnum, devnum)
        self.attach(tb)
        if not tb.add_from_string(record):
            raise RuntimeError("umockdev did not add the device")
        return self.syspath

    def unplug(self, testbed, uevent=True):
        """Detach, send "remove" and delete the device from @testbed."""
        tb = getattr(testbed, "tb", testbed)
        self.detach()
        if self.syspath:
            if uevent:
                tb.uevent(self.syspath, "remove")
            tb.remove_device(self.syspath)

    # -- device behaviour hooks (subclasses) -------------------------------

    def class_request(self, rtype, request, value, index, data, length):
        """A class or vendor control request: return the IN data (bytes) or
        None for OUT; raise Stall to stall it."""
        raise Stall()

    def bulk_out(self, endpoint, data):
        """Data the host sent on bulk OUT @endpoint; raise Stall to stall."""
        raise Stall()

    def usb_reset(self):
        """USBDEVFS_RESET: a bus reset of the device."""

    def set_interface(self, interface, alt):
        """SETINTERFACE; raise ValueError for an alt setting that does not exist."""
        alts = [a for n, a, *_ in self.interfaces() if n == interface]
        if alt not in alts:
            raise ValueError("no alt setting %d on interface %d" % (alt, interface))
        self.alt_settings[interface] = alt

    def queue_in(self, endpoint, data):
        """Queue @data for the host on bulk IN @endpoint (b"" = ZLP)."""
        self.in_queues.setdefault(endpoint, []).append(bytes(data))

    def stall_endpoint(self, *endpoints):
        self.halted.update(endpoints)

    def disconnect(self, phase="unplug"):
        """The device vanishes: pending URBs fail, later ioctls get ENODEV,
        on_disconnect(phase) is called."""
        with self.lock:
            if self.disconnected:
                return
            self.disconnected = True
            self.disconnect_phase = phase
            self._log("disconnected (%s)" % phase)
            for urb in self.pending_in:
                urb.status = -errno.ESHUTDOWN
                self._complete(urb)
            self.pending_in = []
            for state in self._clients.values():
                if state.waiting_reaper is not None and not state.completed:
                    client, state.waiting_reaper = state.waiting_reaper, None
                    client.complete(-1, errno.ENODEV)
            self.lock.notify_all()
        self._callback(self.on_disconnect, phase)

    # -- usbfs emulation ----------------------------------------------------

    def _state(self, client):
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _ClientState()
        return state

    def _client_vanished(self, client):
        """The host closed the device node: forget its claims and URBs, as
        the kernel does on close."""
        with self.lock:
            state = self._clients.pop(client, None)
            if state is not None and state.claimed:
                self._log("closed with interfaces %s claimed" % sorted(state.claimed))
            if state is not None:
                self.pending_in = [u for u in self.pending_in if u.client is not client]

    def _prune_clients(self):
        # umockdev 0.17 does not report vanished clients (client-vanished
        # never comes), but a closed one reads as not connected.
        for client in [c for c in self._clients if not c.get_connected()]:
            self._client_vanished(client)

    def _pace(self, nbytes, since=None):
        """The link carries a transfer with @nbytes of data that the host
        started at @since (lock held): return when it has; then the device
        may stay busy (busy_after)."""
        if self.link is None:
            return
        self.link.occupy(nbytes / self.link_rate, lock=self.lock, since=since)
        if self._busy_after:
            self.link.occupy(self._busy_after, wait=False)
            self._busy_after = 0.0

    def _complete(self, urb):
        """Hand @urb to its client's reap queue (or its blocked REAPURB)."""
        state = self._state(urb.client)
        if urb.status == 0:
            if urb.endpoint & 0x80:
                room = urb.length - (8 if urb.type == URB_TYPE_CONTROL else 0)
                urb.reply = urb.reply[:room]
                urb.actual = len(urb.reply)
            else:
                urb.actual = len(urb.payload)
            self._pace(urb.actual, urb.submitted)
        if state.waiting_reaper is not None:
            reaper, state.waiting_reaper = state.waiting_reaper, None
            self._deliver(reaper, urb)
        else:
            state.completed.append(urb)
        self.lock.notify_all()

    def _deliver(self, client, urb):
        """Complete a REAPURB(NDELAY) of @client with @urb."""
        offset = 8 if urb.type == URB_TYPE_CONTROL else 0
        if urb.reply and urb.buf is not None and urb.endpoint & 0x80:
            urb.buf.update(offset, urb.reply)
        urb.data.update(4, struct.pack("<i", urb.status))
        urb.data.update(28, struct.pack("<i", urb.actual))
        client.get_arg().resolve(0, 8).set_ptr(0, urb.data)
        client.complete(0, 0)

    def handle_ioctl(self, client):
        request = client.get_request()
        name = _ioctl_name(request)
        after = self._handling.after = []
        try:
            with self.lock:
                self.ioctls[name] = self.ioctls.get(name, 0) + 1
                handled = self._ioctl(client, request)
        finally:
            self._handling.after = None
        for fn, args in after:
            fn(*args)
        return handled

    def _ioctl(self, client, request):
        arg = client.get_arg()
        state = self._state(client)

        if request in (USBDEVFS_REAPURB, USBDEVFS_REAPURBNDELAY):
            if state.completed:
                self._deliver(client, state.completed.pop(0))
            elif self.disconnected:
                client.complete(-1, errno.ENODEV)
            elif request == USBDEVFS_REAPURBNDELAY:
                client.complete(-1, errno.EAGAIN)
            else:
                state.waiting_reaper = client
            return True

        if self.disconnected:
            client.complete(-1, errno.ENODEV)
            return True

        if request == USBDEVFS_SUBMITURB:
            return self._submit(client, arg)
        if request == USBDEVFS_DISCARDURB:
            addr = struct.unpack("<Q", bytes(arg.retrieve())[:8])[0]
            for urb in self.pending_in:
                if urb.addr == addr and urb.client is client:
                    self.pending_in.remove(urb)
                    urb.status = -errno.ENOENT
                    urb.reply = b""
                    self._complete(urb)
                    client.complete(0, 0)
                    return True
            client.complete(-1, errno.EINVAL)
            return True
        if request == USBDEVFS_CONTROL:
            return self._sync_control(client, arg)
        if request == USBDEVFS_BULK:
            return self._sync_bulk(client, arg)
        if request in (USBDEVFS_CLAIMINTERFACE, USBDEVFS_RELEASEINTERFACE):
            interface = struct.unpack("<I", bytes(arg.resolve(0, 4).retrieve()))[0]
            return self._claim(client, state, interface, request == USBDEVFS_CLAIMINTERFACE)
        if request == USBDEVFS_DISCONNECT_CLAIM:
            data = bytes(arg.resolve(0, 264).retrieve())
            interface = struct.unpack_from("<I", data)[0]
            if interface in self.interface_drivers:
                self._log("kernel driver %s detached from interface %d"
                          % (self.interface_drivers.pop(interface), interface))
            return self._claim(client, state, interface, True)
        if request == USBDEVFS_SETINTERFACE:
            interface, alt = struct.unpack("<II", bytes(arg.resolve(0, 8).retrieve()))
            if interface not in state.claimed:
                # the kernel claims the interface for the caller (checkintf)
                self._prune_clients()
                if any(interface in other.claimed for other in self._clients.values()):
                    client.complete(-1, errno.EBUSY)
                    return True
                state.claimed.add(interface)
            try:
                self.set_interface(interface, alt)
            except ValueError as e:
                self._log(str(e))
                client.complete(-1, errno.EINVAL)
                return True
            self._log("SETINTERFACE %d alt %d" % (interface, alt))
            client.complete(0, 0)
            return True
        if request == USBDEVFS_SETCONFIGURATION:
            value = struct.unpack("<i", bytes(arg.resolve(0, 4).retrieve()))[0]
            client.complete(0 if value == 1 else -1, 0 if value == 1 else errno.EINVAL)
            return True
        if request == USBDEVFS_GETDRIVER:
            data = arg.resolve(0, 260)
            interface = struct.unpack_from("<I", bytes(data.retrieve()))[0]
            driver = self.interface_drivers.get(interface)
            if driver is None:
                client.complete(-1, errno.ENODATA)
            else:
                data.update(4, driver.encode() + b"\0")
                client.complete(0, 0)
            return True
        if request == USBDEVFS_IOCTL:
            data = bytes(arg.resolve(0, 16).retrieve())
            interface, code = struct.unpack_from("<iI", data)
            if code == USBDEVFS_DISCONNECT:
                if interface in self.interface_drivers:
                    self._log("kernel driver %s detached from interface %d"
                              % (self.interface_drivers.pop(interface), interface))
                    client.complete(0, 0)
                else:
                    client.complete(-1, errno.ENODATA)
                return True
            return False
        if request == USBDEVFS_CLEAR_HALT:
            endpoint = struct.unpack("<I", bytes(arg.resolve(0, 4).retrieve()))[0]
            self.halted.discard(endpoint & 0xff)
            self._log("CLEAR_HALT 0x%02x" % endpoint)
            client.complete(0, 0)
            return True
        if request == USBDEVFS_RESET:
            self._log("USB reset")
            self.usb_reset()
            client.complete(0, 0)
            return True
        if request == USBDEVFS_GET_CAPABILITIES:
            arg.resolve(0, 4).update(0, struct.pack("<I", USBFS_CAPS))
            client.complete(0, 0)
            return True
        if request == USBDEVFS_GET_SPEED:
            client.complete(USB_SPEED_FULL, 0)
            return True
        if request == USBDEVFS_CONNECTINFO:
            devnum = int(self.devnode.rsplit("/", 1)[1]) if self.devnode else 0
            arg.resolve(0, 8).update(0, struct.pack("<IBxxx", devnum, 0))
            client.complete(0, 0)
            return True
        self._log("ioctl %s not emulated" % _ioctl_name(request))
        return False

    def _claim(self, client, state, interface, claim):
        self._prune_clients()
        numbers = {n for n, *_ in self.interfaces()}
        if interface not in numbers:
            client.complete(-1, errno.ENOENT)
            return True
        if claim:
            for other, other_state in self._clients.items():
                if other is not client and interface in other_state.claimed:
                    client.complete(-1, errno.EBUSY)
                    return True
            if interface in self.interface_drivers:
                client.complete(-1, errno.EBUSY)
                return True
            state.claimed.add(interface)
        else:
            if interface not in state.claimed:
                client.complete(-1, errno.EINVAL)
                return True
            state.claimed.discard(interface)
        self._log("%s interface %d" % ("claimed" if claim else "released", interface))
        client.complete(0, 0)
        return True

    def _submit(self, client, arg):
        addr = struct.unpack("<Q", bytes(arg.retrieve())[:8])[0]
        data = arg.resolve(0, URB_SIZE)
        raw = bytes(data.retrieve())
        urb_type, endpoint = raw[0], raw[1]
        length = struct.unpack_from("<i", raw, 24)[0]
        buf = data.resolve(16, length) if length > 0 else None
        content = bytes(buf.retrieve()) if buf is not None else b""
        if urb_type == URB_TYPE_CONTROL:
            if length < 8:
                client.complete(-1, errno.EINVAL)
                return True
            urb = _Urb(client, addr, data, buf, urb_type, endpoint, length, b"")
            rtype, request, value, index, wlength = struct.unpack_from("<BBHHH", content)
            urb.endpoint = rtype & 0x80
            urb.payload = content[8:8 + wlength] if not rtype & 0x80 else b""
            client.complete(0, 0)
            try:
                reply = self._control(rtype, request, value, index, urb.payload, wlength)
                urb.reply = reply or b""
            except Stall:
                urb.status = -errno.EPIPE
            except Disconnect as e:
                urb.status = -errno.ESHUTDOWN
                self._complete(urb)
                self.disconnect(e.phase)
                return True
            except Exception:
                self._log("simulator error in a control request:\n" + traceback.format_exc())
                urb.status = -errno.EPROTO
            self._complete(urb)
            return True
        if urb_type != URB_TYPE_BULK:
            client.complete(-1, errno.EINVAL)
            return True
        urb = _Urb(client, addr, data, buf, urb_type, endpoint, length, b"")
        client.complete(0, 0)
        if endpoint & 0x80:
            if endpoint in self.halted:
                urb.status = -errno.EPIPE
                self._complete(urb)
            else:
                self.pending_in.append(urb)
                self._service_in()
            return True
        urb.payload = content
        if endpoint in self.halted:
            urb.status = -errno.EPIPE
            self._complete(urb)
            return True
        try:
            self.bulk_out(endpoint, content)
        except Stall:
            urb.status = -errno.EPIPE
        except Disconnect as e:
            urb.status = -errno.ESHUTDOWN
            self._complete(urb)
            self.disconnect(e.phase)
            return True
        except Exception:
            self._log("simulator error in bulk OUT:\n" + traceback.format_exc())
            urb.status = -errno.EPROTO
        self._complete(urb)
        self._service_in()
        return True

    def _service_in(self):
        """Match pending bulk IN URBs with queued data, oldest first."""
        for urb in list(self.pending_in):
            if urb.endpoint in self.halted:
                self.pending_in.remove(urb)
                urb.status = -errno.EPIPE
                self._complete(urb)
                continue
            queue = self.in_queues.get(urb.endpoint)
            if not queue:
                continue
            message = queue[0]
            if len(message) > urb.length:
                urb.reply, queue[0] = message[:urb.length], message[urb.length:]
            else:
                urb.reply = queue.pop(0)
            self.pending_in.remove(urb)
            self._complete(urb)

    def flush_in(self):
        """Drop the data queued for IN endpoints (an interface reset)."""
        self.in_queues = {}

    def _control(self, rtype, request, value, index, data, length):
        if rtype & 0x60 == 0:           # standard request
            if rtype == 0x80 and request == 6:
                return self.get_descriptor(value, index, length)
            if rtype == 0x80 and request == 0:
                return b"\x00\x00"[:length]
            if rtype == 0x80 and request == 8:
                return b"\x01"[:length]
            raise Stall()
        return self.class_request(rtype, request, value, index, data, length)

    def _sync_control(self, client, arg):
        data = arg.resolve(0, 24)
        raw = bytes(data.retrieve())
        rtype, request, value, index, length = struct.unpack_from("<BBHHH", raw)
        buf = data.resolve(16, length) if length else None
        payload = bytes(buf.retrieve()) if (buf is not None and not rtype & 0x80) else b""
        try:
            reply = self._control(rtype, request, value, index, payload, length) or b""
        except Stall:
            client.complete(-1, errno.EPIPE)
            return True
        except Disconnect as e:
            client.complete(-1, errno.ENODEV)
            self.disconnect(e.phase)
            return True
        if rtype & 0x80:
            if reply and buf is not None:
                buf.update(0, reply[:length])
            self._pace(len(reply[:length]))
            client.complete(len(reply[:length]), 0)
        else:
            self._pace(len(payload))
            client.complete(len(payload), 0)
        return True

    def _sync_bulk(self, client, arg):
        data = arg.resolve(0, 24)
        raw = bytes(data.retrieve())
        endpoint, length = struct.unpack_from("<II", raw)
        buf = data.resolve(16, length) if length else None
        if endpoint in self.halted:
            client.complete(-1, errno.EPIPE)
            return True
        if endpoint & 0x80:
            queue = self.in_queues.get(endpoint)
            if not queue:
                client.complete(-1, errno.ETIMEDOUT)
                return True
            message = queue[0]
            if len(message) > length:
                reply, queue[0] = message[:length], message[length:]
            else:
                reply = queue.pop(0)
            if reply and buf is not None:
                buf.update(0, reply)
            self._pace(len(reply))
            client.complete(len(reply), 0)
            return True
        payload = bytes(buf.retrieve()) if buf is not None else b""
        try:
            self.bulk_out(endpoint, payload)
        except Stall:
            client.complete(-1, errno.EPIPE)
            return True
        except Disconnect as e:
            client.complete(-1, errno.ENODEV)
            self.disconnect(e.phase)
            return True
        self._pace(len(payload))
        client.complete(len(payload), 0)
        self._service_in()
        return True


class _UsbfsHandler(UMockdev.IoctlBase):
    """The umockdev side: forwards every ioctl on the node to the simulator."""

    def __init__(self, sim):
        super().__init__()
        self.sim = sim

    def do_handle_ioctl(self, client):
        request = client.get_request()
        try:
            return self.sim.handle_ioctl(client)
        except Exception:           # never let an exception kill umockdev's thread
            self.sim._log("simulator error in ioctl %s:\n%s"
                          % (_ioctl_name(request), traceback.format_exc()))
            if client.get_request() != 0:   # complete() resets the request
                client.complete(-1, errno.EIO)
            return True

    def do_client_vanished(self, client):
        self.sim._client_vanished(client)


# ---------------------------------------------------------------------------
# STM32 ROM DFU (DFU 1.1 + DfuSe)

DFU_DETACH, DFU_DNLOAD, DFU_UPLOAD, DFU_GETSTATUS, DFU_CLRSTATUS, DFU_GETSTATE, DFU_ABORT = range(7)

APP_IDLE, APP_DETACH, DFU_IDLE, DFU_DNLOAD_SYNC, DFU_DNBUSY, DFU_DNLOAD_IDLE, \
    DFU_MANIFEST_SYNC, DFU_MANIFEST, DFU_MANIFEST_WAIT_RESET, DFU_UPLOAD_IDLE, DFU_ERROR = range(11)

OK, ERR_TARGET, ERR_FILE, ERR_WRITE, ERR_ERASE, ERR_CHECK_ERASED, ERR_PROG, ERR_VERIFY, \
    ERR_ADDRESS, ERR_NOTDONE, ERR_FIRMWARE, ERR_VENDOR, ERR_USBR, ERR_POR, ERR_UNKNOWN, \
    ERR_STALLEDPKT = range(16)

DFUSE_SET_ADDRESS = 0x21
DFUSE_ERASE = 0x41
DFUSE_READ_UNPROTECT = 0x92

F4_LAYOUT = "@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg"
F4_EXTRA_ALTS = ("@Option Bytes  /0x1FFFC000/01*016 e",
                 "@OTP Memory /0x1FFF7800/01*512 e,01*016 e",
                 "@Device Feature/0xFFFF0000/01*004 e")


def parse_dfuse_layout(text):
    """'@name/0xADDR/NN*SSSu t,…[/0xADDR/…]' -> (name, [(start, count, size, flags)])."""
    if not text.startswith("@"):
        raise ValueError("not a DfuSe layout: %r" % text)
    parts = text[1:].split("/")
    name = parts[0].strip()
    segments = []
    if len(parts) < 3 or len(parts) % 2 == 0:
        raise ValueError("bad DfuSe layout %r" % text)
    for i in range(1, len(parts), 2):
        address = int(parts[i], 16)
        for item in parts[i + 1].split(","):
            if not item.strip() and i + 2 < len(parts):
                continue                # "…Kg,/0x08100000/…": a stray comma
            m = re.fullmatch(r"\s*(\d+)\*\s*(\d+)\s*([ KMB]?)([a-g])\s*", item)
            if not m:
                raise ValueError("bad sector group %r in %r" % (item, text))
            count, size = int(m.group(1), 10), int(m.group(2), 10)
            size *= {"K": 1024, "M": 1024 * 1024}.get(m.group(3), 1)
            flags = ord(m.group(4)) - ord("a") + 1
            segments.append((address, count, size, flags))
            address += count * size
    return name, segments


def application_after(flash, base, address, app_dictionary, mcu=None):
    """(mode, dictionary, failure) a ROM bootloader leads to when it starts
    what @flash (bytes from @base, 0xFF = erased) holds at @address:
    ("klipper", dictionary JSON, None) for a Klipper image, ("foreign",
    None, None) for an image without a dictionary, the previous application
    (@app_dictionary; "foreign" when None) when nothing was ever written, and
    ("bootloader", None, why) when the vector table at @address would not
    start (cortexm_boot.py): the MCU stays in its ROM bootloader."""
    if not bytes(flash).strip(b"\xff"):
        if app_dictionary is None:
            return "foreign", None, None
        return "klipper", app_dictionary, None
    failure = cortexm_boot.check(cortexm_boot.written(flash, base, address), address, mcu)
    if failure:
        return "bootloader", None, failure
    dictionary = katapult_core.find_klipper_dictionary(bytes(flash))
    if dictionary is None:
        return "foreign", None, None
    return "klipper", dictionary, None


class Stm32DfuSim(UsbDeviceSim):
    """The STM32 system-memory DFU bootloader (0483:df11) with one flash.

    serial           USB serial string
    flash_base       start of the flash (must be where the layout starts)
    layout           memory layout string of alt 0 (its iInterface string)
    bootloader_size  bytes at flash_base that hold a bootloader the host
                     must never erase or write (0: none); a violation is
                     recorded and refused with errTARGET
    poll_timeout_ms  bwPollTimeout reported while busy (erase: 4x that); with
                     link_rate it counts as link time (the host must wait)
    on_leave         on_leave(address) when the host leaves DFU mode
    on_disconnect    on_disconnect(phase) when the device vanishes
    fault            see the module docstring
    extra_alts       layout strings of the alt settings after alt 0
    transfer_size    wTransferSize of the functional descriptor
    log              function that gets every event as a text line
    link_rate        bytes/s of the link model (None: no rate limit), see
                     the module docstring; .link is its LinkModel

    Recorded: flash (bytearray, 0xFF = erased), state, status,
    address_pointer, requests [(name, wValue, length)], erased (sector start
    addresses), writes [(address, length)], reads [(address, length)],
    early_getstatus [(elapsed_ms, poll_timeout_ms)], violations (text),
    unprotect_requests, left (the leave address or None), usb_resets."""

    vendor_id = 0x0483
    product_id = 0xdf11
    bcd_device = 0x2200
    manufacturer = "STMicroelectronics"
    product = "STM32  BOOTLOADER"
    kind = "stm32-dfu"
    FAULT_PHASES = ("erase", "write", "setaddress", "getstatus", "leave")

    def __init__(self, serial="2E0036000851363131363530", flash_base=0x08000000, layout=F4_LAYOUT,
                 bootloader_size=0x8000, poll_timeout_ms=10, on_leave=None, on_disconnect=None,
                 fault=None, extra_alts=F4_EXTRA_ALTS, transfer_size=2048, log=None,
                 link_rate=None):
        super().__init__(serial, on_disconnect=on_disconnect, fault=fault, log=log,
                         link_rate=link_rate)
        self.layout = layout
        self.layout_name, self.segments = parse_dfuse_layout(layout)
        if self.segments[0][0] != flash_base:
            raise ValueError("layout starts at 0x%08x, not at flash_base 0x%08x"
                             % (self.segments[0][0], flash_base))
        self.flash_base = flash_base
        end = max(start + count * size for start, count, size, _ in self.segments)
        self.flash = bytearray(b"\xff" * (end - flash_base))
        self.bootloader_size = bootloader_size
        self.poll_timeout_ms = poll_timeout_ms
        self.transfer_size = transfer_size
        self.on_leave = on_leave
        self.alt_strings = [layout] + list(extra_alts)
        for n, text in enumerate(self.alt_strings):
            self.strings[4 + n] = text
        self.config_descriptor = self._build_config()
        self.state = DFU_IDLE
        self.status = OK
        self.address_pointer = flash_base
        self.requests = []
        self.erased = []
        self.writes = []
        self.reads = []
        self.early_getstatus = []
        self.violations = []
        self.unprotect_requests = 0
        self.left = None
        self.boot_failure = None
        self.usb_resets = 0
        self._pending = None         # (kind, wValue, data) of the download in progress
        self._busy_since = None      # (monotonic time, poll timeout) of the last dfuDNBUSY
        self._op_status = OK

    def _build_config(self):
        alts = b"".join(struct.pack("<BBBBBBBBB", 9, 4, 0, n, 0, 0xfe, 0x01, 0x02, 4 + n)
                        for n in range(len(self.alt_strings)))
        functional = struct.pack("<BBBHHH", 9, 0x21, 0x0b, 255, self.transfer_size, 0x011a)
        total = 9 + len(alts) + len(functional)
        return struct.pack("<BBHBBBBB", 9, 2, total, 1, 1, 0, 0xc0, 0x32) + alts + functional

    # -- helpers ---------------------------------------------------------

    def read_flash(self, address, length):
        """Flash contents at @address (tests)."""
        with self.lock:
            off = address - self.flash_base
            return bytes(self.flash[off:off + length])

    def _segment(self, address):
        for start, count, size, flags in self.segments:
            if start <= address < start + count * size:
                return start, count, size, flags
        return None

    def _sector(self, address):
        seg = self._segment(address)
        if seg is None:
            return None
        start, count, size, flags = seg
        return start + (address - start) // size * size, size, flags

    def _in_bootloader(self, address, length):
        return (self.bootloader_size > 0 and address < self.flash_base + self.bootloader_size
                and address + length > self.flash_base)

    def _error(self, status):
        self.state = DFU_ERROR
        self.status = status

    def _stall(self):
        """A request the device does not accept: stall, dfuERROR errSTALLEDPKT."""
        self._error(ERR_STALLEDPKT)
        raise Stall()

    def _status_reply(self, poll_timeout_ms=0):
        return struct.pack("<B", self.status) + poll_timeout_ms.to_bytes(3, "little") + \
            bytes([self.state, 0])

    # -- requests ----------------------------------------------------------

    def class_request(self, rtype, request, value, index, data, length):
        if rtype & 0x7f != 0x21 or index != 0:
            raise Stall()
        names = {DFU_DETACH: "DETACH", DFU_DNLOAD: "DNLOAD", DFU_UPLOAD: "UPLOAD",
                 DFU_GETSTATUS: "GETSTATUS", DFU_CLRSTATUS: "CLRSTATUS",
                 DFU_GETSTATE: "GETSTATE", DFU_ABORT: "ABORT"}
        name = names.get(request, "0x%02x" % request)
        self.requests.append((name, value, len(data) if not rtype & 0x80 else length))
        self._log("%s wValue=%d len=%d state=%d" % (name, value, len(data) if not rtype & 0x80
                                                     else length, self.state))
        try:
            if rtype == 0x21 and request == DFU_DNLOAD:
                return self._dnload(value, data)
            if rtype == 0xa1 and request == DFU_UPLOAD:
                return self._upload(value, length)
            if rtype == 0xa1 and request == DFU_GETSTATUS and length >= 6:
                return self._getstatus()[:length]
            if rtype == 0x21 and request == DFU_CLRSTATUS:
                if self.state == DFU_ERROR:
                    self.state, self.status = DFU_IDLE, OK
                else:
                    self._error(ERR_UNKNOWN)
                return None
            if rtype == 0xa1 and request == DFU_GETSTATE and length >= 1:
                return bytes([self.state])
            if rtype == 0x21 and request == DFU_ABORT:
                if self.state in (DFU_IDLE, DFU_DNLOAD_SYNC, DFU_DNLOAD_IDLE, DFU_MANIFEST_SYNC,
                                  DFU_UPLOAD_IDLE):
                    self.state, self.status = DFU_IDLE, OK
                    self._pending = None
                return None
            self._stall()
        finally:
            self.lock.notify_all()

    def _dnload(self, value, data):
        if self.state not in (DFU_IDLE, DFU_DNLOAD_IDLE) or self.alt_settings.get(0, 0) != 0:
            self._stall()
        if not data:
            self._pending = ("leave", value, b"")
            self.state = DFU_MANIFEST_SYNC
            return None
        if value == 0:
            command = data[0]
            phase = {DFUSE_SET_ADDRESS: "setaddress", DFUSE_ERASE: "erase"}.get(command)
            if command == DFUSE_READ_UNPROTECT:
                self.unprotect_requests += 1
                self.violations.append("read unprotect requested (would mass-erase the chip)")
                self._stall()
            if phase is None or len(data) not in ((1, 5) if command == DFUSE_ERASE else (5,)):
                self._stall()
            if self._fault_at(phase) == "stall":
                self._stall()
            self._pending = (phase, value, bytes(data))
        elif value == 1:
            self._stall()
        else:
            if len(data) > self.transfer_size:
                self._stall()
            if self._fault_at("write") == "stall":
                self._stall()
            self._pending = ("write", value, bytes(data))
        self.state = DFU_DNLOAD_SYNC
        return None

    def _getstatus(self):
        now = time.monotonic()
        if self.state in (DFU_DNLOAD_SYNC, DFU_DNBUSY) and self._fault_at("getstatus") == "stall":
            self._stall()
        if self.state == DFU_MANIFEST_SYNC:
            return self._leave()
        if self.state == DFU_DNLOAD_SYNC:
            kind = self._pending[0]
            self._op_status = self._execute(*self._pending)
            self._pending = None
            timeout = self.poll_timeout_ms * (4 if kind == "erase" else 1)
            self.state = DFU_DNBUSY
            self._busy_since = (now, timeout)
            self._busy_after = timeout / 1000.0
            return self._status_reply(timeout)
        if self.state == DFU_DNBUSY:
            since, timeout = self._busy_since
            elapsed = (now - since) * 1000.0
            if elapsed < timeout:
                self.early_getstatus.append((round(elapsed, 3), timeout))
                self._log("GETSTATUS %.1f ms after dfuDNBUSY, poll timeout %d ms"
                          % (elapsed, timeout))
            if self.fault == "busy":
                self._busy_since = (now, timeout)
                return self._status_reply(timeout)
            if self._op_status == OK:
                self.state = DFU_DNLOAD_IDLE
            else:
                self._error(self._op_status)
            return self._status_reply()
        return self._status_reply()

    def boot_target(self, app_dictionary):
        """What runs after the leave (see application_after): the image
        at the leave address; boot_failure says why it did not start.
        Call with .lock held."""
        address = self.left if self.left is not None else self.flash_base
        mode, dictionary, self.boot_failure = application_after(self.flash, self.flash_base, address,
                                                                app_dictionary)
        if self.boot_failure:
            self._log("the application does not start (%s): the ROM bootloader stays" % self.boot_failure)
        return mode, dictionary

    def _leave(self):
        """GETSTATUS after the leave request: the ROM answers dfuMANIFEST
        (unless a fault says otherwise) and jumps to the address pointer;
        the device is gone for the host after this reply."""
        address = self.address_pointer
        self.state = DFU_MANIFEST
        self.left = address
        self._log("leaving DFU, jumping to 0x%08x" % address)
        self._callback(self.on_leave, address)
        fault = self._fault_at("leave", raise_disconnect=False)
        if fault == "disconnect":
            raise Disconnect("leave")
        self.disconnect("leave")
        if fault == "stall":
            raise Stall()
        return self._status_reply()

    def _execute(self, kind, value, data):
        """Run a download; returns the bStatus it ends with."""
        if kind == "setaddress":
            address = struct.unpack_from("<I", data, 1)[0]
            if self._segment(address) is None:
                return ERR_TARGET
            self.address_pointer = address
            return OK
        if kind == "erase":
            if len(data) == 1:
                if self.bootloader_size:
                    self.violations.append("mass erase would erase the bootloader")
                    return ERR_TARGET
                self.flash[:] = b"\xff" * len(self.flash)
                self.erased.append("mass")
                return OK
            address = struct.unpack_from("<I", data, 1)[0]
            sector = self._sector(address)
            if sector is None or not sector[2] & 2:
                return ERR_TARGET
            start, size, _ = sector
            if self._in_bootloader(start, size):
                self.violations.append("erase of sector 0x%08x inside the bootloader" % start)
                return ERR_TARGET
            off = start - self.flash_base
            self.flash[off:off + size] = b"\xff" * size
            self.erased.append(start)
            return OK
        # data block: wBlockNum >= 2
        address = self.address_pointer + (value - 2) * self.transfer_size
        seg = self._segment(address)
        if seg is None or not seg[3] & 4 or self._segment(address + len(data) - 1) is None:
            return ERR_ADDRESS
        if self._in_bootloader(address, len(data)):
            self.violations.append("write of %d bytes at 0x%08x inside the bootloader"
                                   % (len(data), address))
            return ERR_TARGET
        off = address - self.flash_base
        if any(b != 0xff for b in self.flash[off:off + len(data)]):
            self.violations.append("write of %d bytes at 0x%08x to flash that is not erased"
                                   % (len(data), address))
            return ERR_PROG
        self.flash[off:off + len(data)] = data
        self.writes.append((address, len(data)))
        return OK

    def _upload(self, value, length):
        if self.state not in (DFU_IDLE, DFU_UPLOAD_IDLE) or self.alt_settings.get(0, 0) != 0:
            self._stall()
        if value == 0:
            self.state = DFU_UPLOAD_IDLE
            return bytes([0x00, DFUSE_SET_ADDRESS, DFUSE_ERASE, DFUSE_READ_UNPROTECT])[:length]
        if value == 1 or length > self.transfer_size:
            self._stall()
        address = self.address_pointer + (value - 2) * self.transfer_size
        seg = self._segment(address)
        if seg is None or not seg[3] & 1:
            self._stall()
        end = min(address + length, self.flash_base + len(self.flash))
        self.state = DFU_UPLOAD_IDLE
        self.reads.append((address, end - address))
        return bytes(self.flash[address - self.flash_base:end - self.flash_base])

    def usb_reset(self):
        self.usb_resets += 1
        if self.left is None:
            self.state, self.status = DFU_IDLE, OK
            self._pending = None


# ---------------------------------------------------------------------------
# RP2040 BOOTSEL (PICOBOOT)

PICOBOOT_MAGIC = 0x431fd10b
PC_EXCLUSIVE_ACCESS = 0x01
PC_REBOOT = 0x02
PC_FLASH_ERASE = 0x03
PC_READ = 0x84
PC_WRITE = 0x05
PC_EXIT_XIP = 0x06
PC_ENTER_CMD_XIP = 0x07
PC_EXEC = 0x08
PC_VECTORIZE_FLASH = 0x09

PICOBOOT_OK = 0
PICOBOOT_UNKNOWN_CMD = 1
PICOBOOT_INVALID_CMD_LENGTH = 2
PICOBOOT_INVALID_TRANSFER_LENGTH = 3
PICOBOOT_INVALID_ADDRESS = 4
PICOBOOT_BAD_ALIGNMENT = 5
PICOBOOT_INTERLEAVED_WRITE = 6
PICOBOOT_REBOOTING = 7
PICOBOOT_UNKNOWN_ERROR = 8
PICOBOOT_INVALID_STATE = 9
PICOBOOT_NOT_PERMITTED = 10
PICOBOOT_INVALID_ARG = 11

PICOBOOT_IF_RESET = 0x41
PICOBOOT_IF_CMD_STATUS = 0x42

FLASH_BASE = 0x10000000
SRAM_BASE = 0x20000000
SRAM_SIZE = 264 * 1024

# cmd id -> (name, bCmdSize, data phase: None | "in" | "out")
_PICOBOOT_COMMANDS = {
    PC_EXCLUSIVE_ACCESS: ("exclusive", 1, None),
    PC_REBOOT: ("reboot", 12, None),
    PC_FLASH_ERASE: ("erase", 8, None),
    PC_READ: ("read", 8, "in"),
    PC_WRITE: ("write", 8, "out"),
    PC_EXIT_XIP: ("exitxip", 0, None),
    PC_ENTER_CMD_XIP: ("entercmdxip", 0, None),
    PC_EXEC: ("exec", 4, None),
    PC_VECTORIZE_FLASH: ("vectorize", 4, None),
}


class _PicobootError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class Rp2040BootSim(UsbDeviceSim):
    """The RP2040 boot ROM in BOOTSEL mode (2e8a:0003): interface 0 mass
    storage (descriptor only, usb-storage bound), interface 1 PICOBOOT.

    serial         USB serial string
    flash_size     bytes of flash at 0x10000000 (0xFF = erased)
    on_reboot      on_reboot(pc, sp, delay_ms) when a REBOOT takes effect
                   (delay_ms after the command was acked; the device is gone then)
    on_disconnect  on_disconnect(phase)
    fault, log, link_rate   see the module docstring / Stm32DfuSim

    Recorded: flash, ram, commands [(name, token, args tuple)], exclusive
    (last EXCLUSIVE_ACCESS mode or None), xip_exited, erased [(addr, size)],
    writes [(addr, size)], reads [(addr, size)], reboots [(pc, sp, delay)],
    violations (text), last_status (token, code, cmd id, in progress),
    interface_resets."""

    vendor_id = 0x2e8a
    product_id = 0x0003
    bcd_device = 0x0100
    bcd_usb = 0x0110
    manufacturer = "Raspberry Pi"
    product = "RP2 Boot"
    kind = "rp2040-boot"
    FAULT_PHASES = ("exclusive", "exitxip", "erase", "write", "read", "reboot")

    INTERFACE = 1
    EP_OUT = 0x03
    EP_IN = 0x84

    def __init__(self, serial="E0C9125B0D9B", flash_size=2 * 1024 * 1024, on_reboot=None,
                 on_disconnect=None, fault=None, log=None, link_rate=None):
        super().__init__(serial, on_disconnect=on_disconnect, fault=fault, log=log,
                         link_rate=link_rate)
        self.flash_size = flash_size
        self.flash = bytearray(b"\xff" * flash_size)
        self.ram = bytearray(SRAM_SIZE)
        self.on_reboot = on_reboot
        self.config_descriptor = self._build_config()
        self.interface_drivers = {0: "usb-storage"}
        self.commands = []
        self.exclusive = None
        self.xip_exited = False
        self.erased = []
        self.writes = []
        self.reads = []
        self.reboots = []
        self.boot_failure = None
        self.violations = []
        self.interface_resets = 0
        self.last_status = (0, PICOBOOT_OK, 0, 0)
        self._phase = "cmd"          # cmd | data-out | ack-out | ack-in
        self._current = None         # (token, cmd id, name, args, transfer length)
        self._data = bytearray()

    def _build_config(self):
        msc = struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 2, 0x08, 0x06, 0x50, 0) + \
            struct.pack("<BBBBHB", 7, 5, 0x01, 2, 64, 0) + \
            struct.pack("<BBBBHB", 7, 5, 0x82, 2, 64, 0)
        picoboot = struct.pack("<BBBBBBBBB", 9, 4, 1, 0, 2, 0xff, 0x00, 0x00, 0) + \
            struct.pack("<BBBBHB", 7, 5, self.EP_OUT, 2, 64, 0) + \
            struct.pack("<BBBBHB", 7, 5, self.EP_IN, 2, 64, 0)
        total = 9 + len(msc) + len(picoboot)
        return struct.pack("<BBHBBBBB", 9, 2, total, 2, 1, 0, 0x80, 0xfa) + msc + picoboot

    def read_flash(self, address, length):
        with self.lock:
            off = address - FLASH_BASE
            return bytes(self.flash[off:off + length])

    # -- control requests --------------------------------------------------

    def class_request(self, rtype, request, value, index, data, length):
        if index != self.INTERFACE:
            raise Stall()
        if rtype == 0x41 and request == PICOBOOT_IF_RESET:
            self.interface_resets += 1
            self._log("interface reset")
            self.halted.discard(self.EP_IN)
            self.halted.discard(self.EP_OUT)
            self.flush_in()
            self._phase, self._current, self._data = "cmd", None, bytearray()
            self.last_status = (self.last_status[0], PICOBOOT_OK, 0, 0)
            return None
        if rtype == 0xc1 and request == PICOBOOT_IF_CMD_STATUS:
            token, code, cmd, busy = self.last_status
            return struct.pack("<IIBB6x", token, code, cmd, busy)[:length]
        raise Stall()

    # -- bulk ----------------------------------------------------------------

    def _fail(self, code):
        """A command failed: record the status and halt both endpoints, as
        the boot ROM does; the transfer that carried the command or its
        data still completes, the host sees the stall on the next one."""
        token = self._current[0] if self._current else self.last_status[0]
        cmd = self._current[1] if self._current else 0
        self.last_status = (token, code, cmd, 0)
        self._log("command fails with status %d, stalling" % code)
        self._phase, self._current, self._data = "cmd", None, bytearray()
        self.stall_endpoint(self.EP_IN, self.EP_OUT)

    def _ack_in(self):
        """The command is done: a ZLP on IN (unless stuck busy)."""
        token, cmd = self._current[0], self._current[1]
        if self.fault == "busy":
            self.last_status = (token, PICOBOOT_OK, cmd, 1)
            self._phase = "busy"
            return
        self.last_status = (token, PICOBOOT_OK, cmd, 0)
        self.queue_in(self.EP_IN, b"")
        self._phase, self._current = "cmd", None

    def bulk_out(self, endpoint, data):
        if endpoint != self.EP_OUT:
            raise Stall()
        try:
            if self._phase == "data-out":
                self._data += data
                if len(self._data) >= self._current[4]:
                    self._finish_write()
                return
            if self._phase == "ack-out":
                if data:
                    self.violations.append("READ not acknowledged with a ZLP on OUT")
                    self._phase = "cmd"
                    self._command(data)
                    return
                self.last_status = (self._current[0], PICOBOOT_OK, self._current[1], 0)
                self._phase, self._current = "cmd", None
                return
            if self._phase == "busy":
                raise _PicobootError(PICOBOOT_INTERLEAVED_WRITE)
            self._command(data)
        except _PicobootError as e:
            self._fail(e.code)

    def _command(self, data):
        if len(data) != 32:
            self._current = None
            raise _PicobootError(PICOBOOT_INVALID_CMD_LENGTH)
        magic, token, cmd, size, _, transfer = struct.unpack_from("<IIBBHI", data)
        args = data[16:32]
        self._current = (token, cmd, "0x%02x" % cmd, args, transfer)
        if magic != PICOBOOT_MAGIC:
            self.violations.append("command with bad magic 0x%08x" % magic)
            raise _PicobootError(PICOBOOT_UNKNOWN_CMD)
        if cmd not in _PICOBOOT_COMMANDS:
            raise _PicobootError(PICOBOOT_UNKNOWN_CMD)
        name, expected_size, direction = _PICOBOOT_COMMANDS[cmd]
        self._current = (token, cmd, name, args, transfer)
        if size != expected_size:
            raise _PicobootError(PICOBOOT_INVALID_CMD_LENGTH)
        if (direction is None and transfer != 0) or \
                (direction is not None and transfer != struct.unpack_from("<I", args, 4)[0]):
            raise _PicobootError(PICOBOOT_INVALID_TRANSFER_LENGTH)
        if size >= 4:
            values = struct.unpack_from("<" + "I" * (size // 4), args)
        else:
            values = (args[0],) if size else ()
        self.commands.append((name, token, values))
        self._log("command %s token %d args %s" % (name, token,
                                                    ", ".join("0x%x" % v for v in values)))
        self.last_status = (token, PICOBOOT_OK, cmd, 1)
        if name != "write" and self._fault_at(name) == "stall":
            raise _PicobootError(PICOBOOT_UNKNOWN_ERROR)
        getattr(self, "_cmd_" + name)(*values)

    def _region(self, address, size):
        """('flash'|'ram', offset) for [address, address + size), else error."""
        if FLASH_BASE <= address and address + size <= FLASH_BASE + self.flash_size:
            return self.flash, address - FLASH_BASE
        if SRAM_BASE <= address and address + size <= SRAM_BASE + SRAM_SIZE:
            return self.ram, address - SRAM_BASE
        raise _PicobootError(PICOBOOT_INVALID_ADDRESS)

    def _cmd_exclusive(self, mode):
        if mode > 2:
            raise _PicobootError(PICOBOOT_INVALID_ARG)
        self.exclusive = mode
        self._ack_in()

    def _cmd_exitxip(self):
        self.xip_exited = True
        self._ack_in()

    def _cmd_entercmdxip(self):
        self.xip_exited = False
        self._ack_in()

    def _cmd_exec(self, address):
        self._region(address, 4)
        self._ack_in()

    def _cmd_vectorize(self, address):
        self._region(address, 4)
        self._ack_in()

    def _cmd_erase(self, address, size):
        if address % 4096 or size % 4096:
            raise _PicobootError(PICOBOOT_BAD_ALIGNMENT)
        if not (FLASH_BASE <= address and address + size <= FLASH_BASE + self.flash_size):
            raise _PicobootError(PICOBOOT_INVALID_ADDRESS)
        if not self.xip_exited:
            self.violations.append("FLASH_ERASE without EXIT_XIP")
            raise _PicobootError(PICOBOOT_INVALID_STATE)
        off = address - FLASH_BASE
        self.flash[off:off + size] = b"\xff" * size
        self.erased.append((address, size))
        self._ack_in()

    def _cmd_write(self, address, size):
        memory, _ = self._region(address, size)
        if memory is self.flash:
            if address % 256 or size % 256:
                raise _PicobootError(PICOBOOT_BAD_ALIGNMENT)
            if not self.xip_exited:
                self.violations.append("WRITE to flash without EXIT_XIP")
                raise _PicobootError(PICOBOOT_INVALID_STATE)
        self._data = bytearray()
        self._phase = "data-out"
        if size == 0:
            self._finish_write()

    def _finish_write(self):
        token, cmd, name, args, transfer = self._current
        address = struct.unpack_from("<I", args)[0]
        data = bytes(self._data[:transfer])
        self._data = bytearray()
        if self._fault_at("write") == "stall":
            raise _PicobootError(PICOBOOT_UNKNOWN_ERROR)
        memory, off = self._region(address, len(data))
        if memory is self.flash:
            old = self.flash[off:off + len(data)]
            if any(b != 0xff for b in old):
                self.violations.append("write of %d bytes at 0x%08x to flash that is not erased"
                                       % (len(data), address))
            # NOR flash programming can only clear bits.
            self.flash[off:off + len(data)] = bytes(a & b for a, b in zip(old, data))
        else:
            memory[off:off + len(data)] = data
        self.writes.append((address, len(data)))
        self._ack_in()

    def _cmd_read(self, address, size):
        memory, off = self._region(address, size)
        self.reads.append((address, size))
        self.queue_in(self.EP_IN, bytes(memory[off:off + size]))
        self._phase = "ack-out"

    def _cmd_reboot(self, pc, sp, delay_ms):
        self.reboots.append((pc, sp, delay_ms))
        self._ack_in()
        timer = threading.Timer(delay_ms / 1000.0, self._reboot_now, args=(pc, sp, delay_ms))
        timer.daemon = True
        timer.start()

    def boot_target(self, app_dictionary):
        """What runs after a REBOOT (see application_after): the boot ROM
        runs boot2 at 0x10000000, which starts the vector table at
        0x10000100; without boot2 (erased) the ROM stays in BOOTSEL.  Call
        with .lock held."""
        self.boot_failure = None
        if bytes(self.flash).strip(b"\xff") and not bytes(self.flash[:256]).strip(b"\xff"):
            self.boot_failure = "no boot2 at 0x%08x" % FLASH_BASE
            mode, dictionary = "bootloader", None
        else:
            mode, dictionary, self.boot_failure = application_after(self.flash, FLASH_BASE, FLASH_BASE + 0x100,
                                                                    app_dictionary, mcu="rp2040")
        if self.boot_failure:
            self._log("the application does not start (%s): BOOTSEL stays" % self.boot_failure)
        return mode, dictionary

    def _reboot_now(self, pc, sp, delay_ms):
        self._log("rebooting (pc 0x%x sp 0x%x)" % (pc, sp))
        self.disconnect("reboot")
        if self.on_reboot:
            self.on_reboot(pc, sp, delay_ms)
