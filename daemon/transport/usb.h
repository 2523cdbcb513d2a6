/* A thin, blocking libusb helper for bootloader protocols (proto/dfu.c,
 * proto/picoboot.c): every opened device gets its own libusb context, so
 * that worker threads never share libusb state and nothing of libusb ever
 * reaches the daemon's event loop (libusb's fds are not pollable under the
 * test harness, testing.md §4).  Devices are found by bus and device number
 * or by USB port path ("1-1.3"), interfaces are claimed after detaching a
 * kernel driver, and control and bulk transfers run synchronously with a
 * time limit.
 *
 * Errors are negative errno values; libusb's codes are translated by
 * usb_error_to_errno() (NO_DEVICE → -ENODEV, TIMEOUT → -ETIMEDOUT, PIPE →
 * -EPIPE, ACCESS → -EACCES, BUSY → -EBUSY, …).  Hotplug, asynchronous
 * transfers and device discovery are not handled here (discovery is udev's
 * job in discover/udev.c). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "shared/macro.h"

struct libusb_config_descriptor;
struct usb_device;

/* A libusb error code (LIBUSB_ERROR_*, negative) as -errno; 0 and positive
 * values are returned unchanged. */
int usb_error_to_errno(int libusb_error);

/* Open the device with bus number @busnum and device address @devnum.
 * -ENODEV when there is no such device, -EACCES without permission. */
int usb_open_busdev(unsigned busnum, unsigned devnum, struct usb_device **ret);

/* Open the device at USB port path @port ("<bus>-<port>[.<port>…]", e.g.
 * "1-1.3", as in sysfs and udev's ID_PATH).  -EINVAL for a malformed path,
 * -ENODEV when nothing is plugged there. */
int usb_open_port(const char *port, struct usb_device **ret);

/* Release the claimed interfaces, close the device and its context.
 * Returns NULL. */
struct usb_device *usb_close(struct usb_device *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct usb_device *, usb_close);

/* "bus 1 device 7", for log messages. */
const char *usb_name(const struct usb_device *d);
unsigned usb_busnum(const struct usb_device *d);
unsigned usb_devnum(const struct usb_device *d);

/* idVendor and idProduct from the device descriptor. */
int usb_get_ids(struct usb_device *d, uint16_t *ret_vendor, uint16_t *ret_product);

/* String descriptor @index (first language) as ASCII, non-ASCII characters
 * replaced by '?', NUL-terminated in @buf.  Returns its length. */
int usb_get_string(struct usb_device *d, uint8_t index, char *buf, size_t size);

/* The active configuration's descriptor, to be freed with
 * usb_free_config_descriptor(). */
int usb_get_active_config(struct usb_device *d, struct libusb_config_descriptor **ret);
void usb_free_config_descriptor(struct libusb_config_descriptor *config);

/* Claim @interface (0..31), detaching a kernel driver bound to it first,
 * and select alternate setting @alt unless @alt is negative.  -EBUSY when
 * another program holds the interface. */
int usb_claim_interface(struct usb_device *d, unsigned interface, int alt);
int usb_release_interface(struct usb_device *d, unsigned interface);

/* A control transfer: @request_type with LIBUSB_ENDPOINT_IN (0x80) set
 * reads up to @length bytes into @data, else sends them.  Returns the
 * number of bytes transferred; -EPIPE when the device stalls the request. */
int usb_control(struct usb_device *d, uint8_t request_type, uint8_t request, uint16_t value,
                uint16_t index, void *data, uint16_t length, unsigned timeout_ms);

/* A bulk transfer on @endpoint (bit 7 set: IN, reads up to @length bytes;
 * else OUT, sends @length bytes; 0 sends a zero-length packet).  Returns
 * the number of bytes transferred; -ETIMEDOUT also when only part of the
 * data moved in time, -EPIPE for a stalled endpoint. */
int usb_bulk(struct usb_device *d, uint8_t endpoint, void *data, size_t length,
             unsigned timeout_ms);

/* Clear a halt (stall) on @endpoint. */
int usb_clear_halt(struct usb_device *d, uint8_t endpoint);
