/* Implementation of udev.h with libudev: a "udev" netlink monitor filtered
 * on the tty subsystem and USB devices, watched by the libevent loop, plus an enumeration
 * for cold plug.  USB facts (ids, serial, port) come from udev properties
 * when present, else from the parent usb_device's sysfs attributes. */
#include <errno.h>
#include <libudev.h>
#include <stdlib.h>
#include <string.h>

#include "discover/udev.h"
#include "shared/log.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(struct udev_device *, udev_device_unref);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct udev_enumerate *, udev_enumerate_unref);

struct udev_discovery {
        struct udev *udev;
        struct udev_monitor *monitor;
        struct event *monitor_event;
        struct udev_discovery_callbacks cb;
};

static uint16_t parse_hex16(const char *s) {
        char *end;
        unsigned long v;

        if (isempty(s))
                return 0;
        errno = 0;
        v = strtoul(s, &end, 16);
        if (errno || *end || v > 0xffff)
                return 0;
        return (uint16_t) v;
}

static const char *prop_or_attr(struct udev_device *dev, struct udev_device *usb,
                                const char *prop, const char *attr) {
        const char *v = udev_device_get_property_value(dev, prop);

        if (isempty(v) && usb)
                v = udev_device_get_sysattr_value(usb, attr);
        return v ?: "";
}

static unsigned parse_unsigned(const char *s) {
        char *end;
        unsigned long v;

        if (isempty(s))
                return 0;
        errno = 0;
        v = strtoul(s, &end, 10);
        return errno || (*end && *end != '\n') || v > UINT32_MAX ? 0 : (unsigned) v;
}

static void report_usb_device(struct udev_discovery *u, struct udev_device *dev, const char *action) {
        struct udev_usb_info info;

        if (streq(action, "remove")) {
                u->cb.usb_removed(u->cb.userdata, udev_device_get_syspath(dev));
                return;
        }
        if (!streq(action, "add") && !streq(action, "change") && !streq(action, "bind"))
                return;
        info = (struct udev_usb_info) {
                .syspath = udev_device_get_syspath(dev),
                .devnode = udev_device_get_devnode(dev) ?: "",
                .vendor_id = parse_hex16(prop_or_attr(dev, dev, "ID_VENDOR_ID", "idVendor")),
                .product_id = parse_hex16(prop_or_attr(dev, dev, "ID_MODEL_ID", "idProduct")),
                .serial = prop_or_attr(dev, dev, "ID_SERIAL_SHORT", "serial"),
                .port = udev_device_get_sysname(dev) ?: "",
                .manufacturer = prop_or_attr(dev, dev, "ID_VENDOR", "manufacturer"),
                .product = prop_or_attr(dev, dev, "ID_MODEL", "product"),
                .busnum = parse_unsigned(udev_device_get_sysattr_value(dev, "busnum")),
                .devnum = parse_unsigned(udev_device_get_sysattr_value(dev, "devnum")),
        };
        u->cb.usb_added(u->cb.userdata, &info);
}

static void report_device(struct udev_discovery *u, struct udev_device *dev, const char *action) {
        struct udev_device *usb;
        struct udev_tty_info info;
        const char *devnode;

        if (streq_ptr(udev_device_get_subsystem(dev), "usb")) {
                if (streq_ptr(udev_device_get_devtype(dev), "usb_device"))
                        report_usb_device(u, dev, action);
                return;
        }
        if (streq(action, "remove")) {
                u->cb.tty_removed(u->cb.userdata, udev_device_get_syspath(dev));
                return;
        }
        if (!streq(action, "add") && !streq(action, "change"))
                return;

        devnode = udev_device_get_devnode(dev);
        if (isempty(devnode))
                return;

        /* Borrowed reference, owned by @dev. */
        usb = udev_device_get_parent_with_subsystem_devtype(dev, "usb", "usb_device");

        info = (struct udev_tty_info) {
                .syspath = udev_device_get_syspath(dev),
                .devnode = devnode,
                .devlinks = udev_device_get_property_value(dev, "DEVLINKS") ?: "",
                .usb_vendor_id = parse_hex16(prop_or_attr(dev, usb, "ID_VENDOR_ID", "idVendor")),
                .usb_product_id = parse_hex16(prop_or_attr(dev, usb, "ID_MODEL_ID", "idProduct")),
                .usb_serial = prop_or_attr(dev, usb, "ID_SERIAL_SHORT", "serial"),
                .usb_port = usb ? udev_device_get_sysname(usb) : "",
                .usb_manufacturer = prop_or_attr(dev, usb, "ID_VENDOR", "manufacturer"),
                .usb_product = prop_or_attr(dev, usb, "ID_MODEL", "product"),
        };
        if (isempty(info.usb_port))
                info.usb_port = "";
        u->cb.tty_added(u->cb.userdata, &info);
}

static void on_monitor(evutil_socket_t fd, short what, void *userdata) {
        struct udev_discovery *u = userdata;

        /* Drain: real udev can batch several events behind one wakeup. */
        for (;;) {
                _cleanup_(udev_device_unrefp) struct udev_device *dev = NULL;
                const char *action;

                dev = udev_monitor_receive_device(u->monitor);
                if (!dev)
                        return;
                action = udev_device_get_action(dev);
                log_debug("udev: %s %s", strempty(action), udev_device_get_syspath(dev));
                report_device(u, dev, action ?: "add");
        }
}

int udev_discovery_new(struct event_base *base, const struct udev_discovery_callbacks *cb,
                       struct udev_discovery **ret) {
        _cleanup_(udev_discovery_freep) struct udev_discovery *u = NULL;
        int r;

        u = calloc(1, sizeof(*u));
        if (!u)
                return -ENOMEM;
        u->cb = *cb;
        u->udev = udev_new();
        if (!u->udev)
                return -ENOMEM;
        u->monitor = udev_monitor_new_from_netlink(u->udev, "udev");
        if (!u->monitor)
                return log_error_errno(errno ?: EIO, "Cannot create udev monitor: %m");
        r = udev_monitor_filter_add_match_subsystem_devtype(u->monitor, "tty", NULL);
        if (r < 0)
                return r;
        r = udev_monitor_filter_add_match_subsystem_devtype(u->monitor, "usb", "usb_device");
        if (r < 0)
                return r;
        r = udev_monitor_enable_receiving(u->monitor);
        if (r < 0)
                return log_error_errno(r, "Cannot listen to udev events: %m");
        u->monitor_event = event_new(base, udev_monitor_get_fd(u->monitor), EV_READ | EV_PERSIST,
                                     on_monitor, u);
        if (!u->monitor_event || event_add(u->monitor_event, NULL) < 0)
                return -ENOMEM;
        *ret = TAKE_PTR(u);
        return 0;
}

struct udev_discovery *udev_discovery_free(struct udev_discovery *u) {
        if (!u)
                return NULL;
        if (u->monitor_event)
                event_free(u->monitor_event);
        udev_monitor_unref(u->monitor);
        udev_unref(u->udev);
        free(u);
        return NULL;
}

int udev_discovery_enumerate(struct udev_discovery *u) {
        _cleanup_(udev_enumerate_unrefp) struct udev_enumerate *e = NULL;
        struct udev_list_entry *entry;
        int r;

        e = udev_enumerate_new(u->udev);
        if (!e)
                return -ENOMEM;
        r = udev_enumerate_add_match_subsystem(e, "tty");
        if (r < 0)
                return r;
        r = udev_enumerate_add_match_subsystem(e, "usb");
        if (r < 0)
                return r;
        r = udev_enumerate_scan_devices(e);
        if (r < 0)
                return log_error_errno(r, "Cannot enumerate tty devices: %m");
        udev_list_entry_foreach(entry, udev_enumerate_get_list_entry(e)) {
                _cleanup_(udev_device_unrefp) struct udev_device *dev = NULL;

                dev = udev_device_new_from_syspath(u->udev, udev_list_entry_get_name(entry));
                if (dev)
                        report_device(u, dev, "add");
        }
        return 0;
}
