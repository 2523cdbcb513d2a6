/* libusb helper: one libusb context per opened device, synchronous
 * transfers, libusb errors as negative errno.  See usb.h for what it does
 * not do.  The port-path lookup reads sysfs first (the same busnum/devnum
 * files flash_usb.py reads) and falls back to comparing libusb's port
 * numbers, which needs the hubs above the device to be enumerable. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libusb.h>

#include "shared/log.h"
#include "transport/usb.h"

#define USB_MAX_PORT_DEPTH 7

struct usb_device {
        libusb_context *ctx;
        libusb_device_handle *handle;
        unsigned busnum;
        unsigned devnum;
        uint32_t claimed;               /* bit n: interface n is claimed */
        char name[40];
};

int usb_error_to_errno(int libusb_error) {
        switch (libusb_error) {
        case LIBUSB_ERROR_IO:
                return -EIO;
        case LIBUSB_ERROR_INVALID_PARAM:
                return -EINVAL;
        case LIBUSB_ERROR_ACCESS:
                return -EACCES;
        case LIBUSB_ERROR_NO_DEVICE:
                return -ENODEV;
        case LIBUSB_ERROR_NOT_FOUND:
                return -ENOENT;
        case LIBUSB_ERROR_BUSY:
                return -EBUSY;
        case LIBUSB_ERROR_TIMEOUT:
                return -ETIMEDOUT;
        case LIBUSB_ERROR_OVERFLOW:
                return -EOVERFLOW;
        case LIBUSB_ERROR_PIPE:
                return -EPIPE;
        case LIBUSB_ERROR_INTERRUPTED:
                return -EINTR;
        case LIBUSB_ERROR_NO_MEM:
                return -ENOMEM;
        case LIBUSB_ERROR_NOT_SUPPORTED:
                return -EOPNOTSUPP;
        default:
                return libusb_error < 0 ? -EIO : libusb_error;
        }
}

struct usb_device *usb_close(struct usb_device *d) {
        if (!d)
                return NULL;
        if (d->handle) {
                for (unsigned i = 0; i < 32; i++)
                        if (d->claimed & (UINT32_C(1) << i))
                                (void) libusb_release_interface(d->handle, (int) i);
                libusb_close(d->handle);
        }
        if (d->ctx)
                libusb_exit(d->ctx);
        free(d);
        return NULL;
}

static int usb_new(struct usb_device **ret) {
        _cleanup_(usb_closep) struct usb_device *d = NULL;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        r = libusb_init(&d->ctx);
        if (r < 0) {
                d->ctx = NULL;
                return log_debug_errno(usb_error_to_errno(r), "libusb_init() failed: %m");
        }
        *ret = TAKE_PTR(d);
        return 0;
}

/* Does @dev sit at bus @busnum behind the ports @ports[0..n_ports)? */
static bool usb_device_at_port(libusb_device *dev, unsigned busnum, const uint8_t *ports,
                               int n_ports) {
        uint8_t numbers[USB_MAX_PORT_DEPTH];
        int n;

        if (libusb_get_bus_number(dev) != busnum)
                return false;
        n = libusb_get_port_numbers(dev, numbers, (int) ELEMENTSOF(numbers));
        return n == n_ports && memcmp(numbers, ports, (size_t) n) == 0;
}

/* Open the device of @d's context that is at bus @busnum and either has
 * address @devnum (@ports NULL) or sits behind @ports. */
static int usb_open_matching(struct usb_device *d, unsigned busnum, unsigned devnum,
                             const uint8_t *ports, int n_ports) {
        libusb_device **list = NULL;
        ssize_t n;
        int r = -ENODEV;

        n = libusb_get_device_list(d->ctx, &list);
        if (n < 0)
                return log_debug_errno(usb_error_to_errno((int) n),
                                       "Failed to list USB devices: %m");
        for (ssize_t i = 0; i < n; i++) {
                libusb_device *dev = list[i];
                bool match;

                if (ports)
                        match = usb_device_at_port(dev, busnum, ports, n_ports);
                else
                        match = libusb_get_bus_number(dev) == busnum &&
                                libusb_get_device_address(dev) == devnum;
                if (!match)
                        continue;
                r = libusb_open(dev, &d->handle);
                if (r < 0) {
                        d->handle = NULL;
                        r = usb_error_to_errno(r);
                        break;
                }
                d->busnum = libusb_get_bus_number(dev);
                d->devnum = libusb_get_device_address(dev);
                snprintf(d->name, sizeof(d->name), "bus %u device %u", d->busnum, d->devnum);
                r = 0;
                break;
        }
        libusb_free_device_list(list, 1);
        return r;
}

int usb_open_busdev(unsigned busnum, unsigned devnum, struct usb_device **ret) {
        _cleanup_(usb_closep) struct usb_device *d = NULL;
        int r;

        if (busnum == 0 || busnum > 255 || devnum == 0 || devnum > 127)
                return -EINVAL;
        r = usb_new(&d);
        if (r < 0)
                return r;
        r = usb_open_matching(d, busnum, devnum, NULL, 0);
        if (r < 0)
                return log_debug_errno(r, "Cannot open USB bus %u device %u: %m", busnum, devnum);
        *ret = TAKE_PTR(d);
        return 0;
}

/* "1-1.3" → bus 1, ports {1, 3}. */
static int parse_port_path(const char *port, unsigned *ret_bus, uint8_t ports[USB_MAX_PORT_DEPTH],
                           int *ret_n) {
        const char *p = port;
        unsigned long value;
        char *end;
        int n = 0;

        if (!port || *port < '0' || *port > '9')
                return -EINVAL;
        value = strtoul(p, &end, 10);
        if (end == p || *end != '-' || value == 0 || value > 255)
                return -EINVAL;
        *ret_bus = (unsigned) value;
        p = end + 1;
        for (;;) {
                if (*p < '0' || *p > '9' || n >= USB_MAX_PORT_DEPTH)
                        return -EINVAL;
                value = strtoul(p, &end, 10);
                if (value == 0 || value > 255)
                        return -EINVAL;
                ports[n++] = (uint8_t) value;
                if (*end == '\0')
                        break;
                if (*end != '.')
                        return -EINVAL;
                p = end + 1;
        }
        *ret_n = n;
        return 0;
}

static int read_sysfs_unsigned(const char *port, const char *attribute, unsigned *ret) {
        _cleanup_fclose_ FILE *f = NULL;
        char path[128];

        snprintf(path, sizeof(path), "/sys/bus/usb/devices/%s/%s", port, attribute);
        f = fopen(path, "re");
        if (!f)
                return -errno;
        if (fscanf(f, "%u", ret) != 1)
                return -EBADMSG;
        return 0;
}

int usb_open_port(const char *port, struct usb_device **ret) {
        _cleanup_(usb_closep) struct usb_device *d = NULL;
        uint8_t ports[USB_MAX_PORT_DEPTH];
        unsigned busnum, sys_bus, sys_dev;
        int n_ports, r;

        r = parse_port_path(port, &busnum, ports, &n_ports);
        if (r < 0)
                return log_debug_errno(r, "Invalid USB port path '%s'.", strempty(port));

        if (read_sysfs_unsigned(port, "busnum", &sys_bus) >= 0 &&
            read_sysfs_unsigned(port, "devnum", &sys_dev) >= 0 && sys_bus == busnum) {
                r = usb_open_busdev(sys_bus, sys_dev, &d);
                if (r != -ENODEV) {
                        if (r < 0)
                                return r;
                        *ret = TAKE_PTR(d);
                        return 0;
                }
        }

        r = usb_new(&d);
        if (r < 0)
                return r;
        r = usb_open_matching(d, busnum, 0, ports, n_ports);
        if (r < 0)
                return log_debug_errno(r, "Cannot open USB device at port %s: %m", port);
        *ret = TAKE_PTR(d);
        return 0;
}

const char *usb_name(const struct usb_device *d) {
        return d->name;
}

unsigned usb_busnum(const struct usb_device *d) {
        return d->busnum;
}

unsigned usb_devnum(const struct usb_device *d) {
        return d->devnum;
}

int usb_get_ids(struct usb_device *d, uint16_t *ret_vendor, uint16_t *ret_product) {
        struct libusb_device_descriptor desc;
        int r;

        r = libusb_get_device_descriptor(libusb_get_device(d->handle), &desc);
        if (r < 0)
                return usb_error_to_errno(r);
        if (ret_vendor)
                *ret_vendor = desc.idVendor;
        if (ret_product)
                *ret_product = desc.idProduct;
        return 0;
}

int usb_get_string(struct usb_device *d, uint8_t index, char *buf, size_t size) {
        int r;

        if (index == 0 || size == 0)
                return -EINVAL;
        r = libusb_get_string_descriptor_ascii(d->handle, index, (unsigned char *) buf,
                                               (int) MIN(size, (size_t) INT_MAX));
        if (r < 0)
                return usb_error_to_errno(r);
        buf[MIN((size_t) r, size - 1)] = '\0';
        return r;
}

int usb_get_active_config(struct usb_device *d, struct libusb_config_descriptor **ret) {
        int r;

        r = libusb_get_active_config_descriptor(libusb_get_device(d->handle), ret);
        return r < 0 ? usb_error_to_errno(r) : 0;
}

void usb_free_config_descriptor(struct libusb_config_descriptor *config) {
        libusb_free_config_descriptor(config);
}

int usb_claim_interface(struct usb_device *d, unsigned interface, int alt) {
        int r;

        if (interface >= 32)
                return -EINVAL;

        r = libusb_kernel_driver_active(d->handle, (int) interface);
        if (r == 1) {
                log_debug("Detaching the kernel driver from %s interface %u.", d->name, interface);
                r = libusb_detach_kernel_driver(d->handle, (int) interface);
                if (r < 0 && r != LIBUSB_ERROR_NOT_FOUND)
                        return log_debug_errno(usb_error_to_errno(r),
                                               "Cannot detach the kernel driver from %s interface %u: %m",
                                               d->name, interface);
        } else if (r < 0 && r != LIBUSB_ERROR_NOT_SUPPORTED)
                log_debug_errno(usb_error_to_errno(r),
                                "Cannot tell whether a kernel driver holds %s interface %u, "
                                "claiming anyway: %m", d->name, interface);

        r = libusb_claim_interface(d->handle, (int) interface);
        if (r < 0)
                return log_debug_errno(usb_error_to_errno(r), "Cannot claim %s interface %u: %m",
                                       d->name, interface);
        d->claimed |= UINT32_C(1) << interface;

        if (alt >= 0) {
                r = libusb_set_interface_alt_setting(d->handle, (int) interface, alt);
                if (r < 0)
                        return log_debug_errno(usb_error_to_errno(r),
                                               "Cannot select alternate setting %d of %s interface %u: %m",
                                               alt, d->name, interface);
        }
        return 0;
}

int usb_release_interface(struct usb_device *d, unsigned interface) {
        int r;

        if (interface >= 32 || !(d->claimed & (UINT32_C(1) << interface)))
                return -EINVAL;
        d->claimed &= ~(UINT32_C(1) << interface);
        r = libusb_release_interface(d->handle, (int) interface);
        return r < 0 ? usb_error_to_errno(r) : 0;
}

int usb_control(struct usb_device *d, uint8_t request_type, uint8_t request, uint16_t value,
                uint16_t index, void *data, uint16_t length, unsigned timeout_ms) {
        int r;

        r = libusb_control_transfer(d->handle, request_type, request, value, index, data, length,
                                    timeout_ms);
        return usb_error_to_errno(r);
}

int usb_bulk(struct usb_device *d, uint8_t endpoint, void *data, size_t length,
             unsigned timeout_ms) {
        int transferred = 0, r;

        if (length > INT_MAX)
                return -EINVAL;
        r = libusb_bulk_transfer(d->handle, endpoint, data, (int) length, &transferred,
                                 timeout_ms);
        if (r < 0)
                return usb_error_to_errno(r);
        return transferred;
}

int usb_clear_halt(struct usb_device *d, uint8_t endpoint) {
        return usb_error_to_errno(libusb_clear_halt(d->handle, endpoint));
}
