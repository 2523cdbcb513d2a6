/* udev discovery: cold-plug enumeration and a hotplug monitor of tty
 * devices and of whole USB devices.  It only translates udev devices into struct udev_tty_info and
 * hands them to callbacks; deciding which ttys are MCUs is the daemon's
 * job.  Cold- and hot-plug share one code path. */
#pragma once

#include <event2/event.h>
#include <stdint.h>

#include "shared/macro.h"

struct udev_tty_info {
        const char *syspath;
        const char *devnode;            /* as udev gives it; never canonicalised */
        const char *devlinks;           /* space separated, may be "" */
        uint16_t usb_vendor_id;         /* 0 when not on USB */
        uint16_t usb_product_id;
        const char *usb_serial;         /* "" when none */
        const char *usb_port;           /* "1-1.3", "" when not on USB */
        const char *usb_manufacturer;
        const char *usb_product;
};

/* A whole USB device (DEVTYPE=usb_device): how bootloaders without a tty
 * (ST ROM DFU, RP2040 BOOTSEL, …) appear. */
struct udev_usb_info {
        const char *syspath;
        const char *devnode;            /* /dev/bus/usb/BBB/DDD */
        uint16_t vendor_id;
        uint16_t product_id;
        const char *serial;             /* "" when none */
        const char *port;               /* "1-1.3" */
        const char *manufacturer;
        const char *product;
        unsigned busnum;
        unsigned devnum;
};

struct udev_discovery_callbacks {
        void (*tty_added)(void *userdata, const struct udev_tty_info *info);
        void (*tty_removed)(void *userdata, const char *syspath);
        void (*usb_added)(void *userdata, const struct udev_usb_info *info);
        void (*usb_removed)(void *userdata, const char *syspath);
        void *userdata;
};

struct udev_discovery;

int udev_discovery_new(struct event_base *base, const struct udev_discovery_callbacks *cb,
                       struct udev_discovery **ret);
struct udev_discovery *udev_discovery_free(struct udev_discovery *u);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct udev_discovery *, udev_discovery_free);

/* Report every tty and USB device present now through tty_added and
 * usb_added. */
int udev_discovery_enumerate(struct udev_discovery *u);
