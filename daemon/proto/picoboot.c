/* PICOBOOT: command packet encoding, status parsing and the blocking
 * command transactions on the RP2040 boot ROM's vendor interface.  See
 * picoboot.h for the scope; protocols.md §7 for the wire format. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <libusb.h>

#include "proto/picoboot.h"
#include "shared/log.h"
#include "transport/usb.h"

static void put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
        p[2] = (uint8_t) (v >> 16);
        p[3] = (uint8_t) (v >> 24);
}

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

size_t picoboot_encode_command(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint8_t command,
                               const void *args, size_t args_len, uint32_t transfer_length) {
        if (args_len > PICOBOOT_MAX_ARGS)
                return 0;
        memset(out, 0, PICOBOOT_COMMAND_SIZE);
        put_le32(out, PICOBOOT_MAGIC);
        put_le32(out + 4, token);
        out[8] = command;
        out[9] = (uint8_t) args_len;
        put_le32(out + 12, transfer_length);
        if (args_len > 0)
                memcpy(out + 16, args, args_len);
        return PICOBOOT_COMMAND_SIZE;
}

size_t picoboot_encode_range(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint8_t command,
                             uint32_t address, uint32_t size) {
        uint8_t args[8];

        put_le32(args, address);
        put_le32(args + 4, size);
        return picoboot_encode_command(out, token, command, args, sizeof(args),
                                       command == PICOBOOT_FLASH_ERASE ? 0 : size);
}

size_t picoboot_encode_reboot(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint32_t pc,
                              uint32_t sp, uint32_t delay_ms) {
        uint8_t args[12];

        put_le32(args, pc);
        put_le32(args + 4, sp);
        put_le32(args + 8, delay_ms);
        return picoboot_encode_command(out, token, PICOBOOT_REBOOT, args, sizeof(args), 0);
}

int picoboot_parse_status(const uint8_t *buf, size_t len, struct picoboot_status *ret) {
        if (len < 10)
                return -EBADMSG;
        *ret = (struct picoboot_status) {
                .token = get_le32(buf),
                .code = get_le32(buf + 4),
                .command = buf[8],
                .in_progress = buf[9] != 0,
        };
        return 0;
}

const char *picoboot_status_to_string(uint32_t code) {
        static const char *const names[] = {
                [PICOBOOT_OK] = "ok",
                [PICOBOOT_UNKNOWN_CMD] = "unknown command",
                [PICOBOOT_INVALID_CMD_LENGTH] = "invalid command length",
                [PICOBOOT_INVALID_TRANSFER_LENGTH] = "invalid transfer length",
                [PICOBOOT_INVALID_ADDRESS] = "invalid address",
                [PICOBOOT_BAD_ALIGNMENT] = "bad alignment",
                [PICOBOOT_INTERLEAVED_WRITE] = "interleaved write",
                [PICOBOOT_REBOOTING] = "rebooting",
                [PICOBOOT_UNKNOWN_ERROR] = "unknown error",
                [PICOBOOT_INVALID_STATE] = "invalid state",
                [PICOBOOT_NOT_PERMITTED] = "not permitted",
                [PICOBOOT_INVALID_ARG] = "invalid argument",
                [PICOBOOT_BUFFER_TOO_SMALL] = "buffer too small",
        };

        return code < ELEMENTSOF(names) ? names[code] : "unknown status";
}

int picoboot_status_to_errno(uint32_t code) {
        switch (code) {
        case PICOBOOT_OK:
                return 0;
        case PICOBOOT_UNKNOWN_CMD:
                return -EOPNOTSUPP;
        case PICOBOOT_INVALID_CMD_LENGTH:
        case PICOBOOT_INVALID_TRANSFER_LENGTH:
        case PICOBOOT_INVALID_ADDRESS:
        case PICOBOOT_BAD_ALIGNMENT:
        case PICOBOOT_INVALID_ARG:
        case PICOBOOT_BUFFER_TOO_SMALL:
                return -EINVAL;
        case PICOBOOT_NOT_PERMITTED:
                return -EPERM;
        case PICOBOOT_REBOOTING:
                return -ENODEV;
        case PICOBOOT_INTERLEAVED_WRITE:
        case PICOBOOT_INVALID_STATE:
                return -EBUSY;
        default:
                return -EIO;
        }
}

/* ---- device ---- */

struct picoboot_device *picoboot_free(struct picoboot_device *p) {
        if (!p)
                return NULL;
        (void) usb_release_interface(p->usb, p->interface);
        free(p);
        return NULL;
}

/* A vendor interface with exactly one bulk OUT and one bulk IN endpoint. */
static bool picoboot_interface_fits(const struct libusb_interface_descriptor *desc, uint8_t *ret_out,
                                    uint8_t *ret_in) {
        uint8_t out = 0, in = 0;

        if (desc->bInterfaceClass != LIBUSB_CLASS_VENDOR_SPEC || desc->bNumEndpoints != 2)
                return false;
        for (int e = 0; e < desc->bNumEndpoints; e++) {
                const struct libusb_endpoint_descriptor *ep = &desc->endpoint[e];

                if ((ep->bmAttributes & LIBUSB_TRANSFER_TYPE_MASK) != LIBUSB_TRANSFER_TYPE_BULK)
                        return false;
                if (ep->bEndpointAddress & LIBUSB_ENDPOINT_IN)
                        in = ep->bEndpointAddress;
                else
                        out = ep->bEndpointAddress;
        }
        if (!in || !out)
                return false;
        *ret_out = out;
        *ret_in = in;
        return true;
}

int picoboot_open(struct usb_device *usb, struct picoboot_device **ret) {
        _cleanup_(picoboot_freep) struct picoboot_device *p = NULL;
        struct libusb_config_descriptor *config = NULL;
        int r, found = -1, first, last;
        uint8_t ep_out = 0, ep_in = 0;

        r = usb_get_active_config(usb, &config);
        if (r < 0)
                return log_debug_errno(r, "Cannot read the configuration of %s: %m", usb_name(usb));

        /* rp2040_flash: interface 0 when it is the only one, else 1. */
        first = config->bNumInterfaces == 1 ? 0 : 1;
        last = config->bNumInterfaces - 1;
        for (int i = first; i <= last && found < 0; i++) {
                const struct libusb_interface *iface = &config->interface[i];

                if (iface->num_altsetting > 0 &&
                    picoboot_interface_fits(&iface->altsetting[0], &ep_out, &ep_in))
                        found = iface->altsetting[0].bInterfaceNumber;
        }
        usb_free_config_descriptor(config);
        if (found < 0)
                return log_debug_errno(ENXIO, "%s has no PICOBOOT interface.", usb_name(usb));

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->usb = usb;
        p->interface = (uint8_t) found;
        p->ep_out = ep_out;
        p->ep_in = ep_in;
        p->next_token = 1;
        p->command_timeout_ms = PICOBOOT_COMMAND_TIMEOUT_MS;
        p->data_timeout_ms = PICOBOOT_DATA_TIMEOUT_MS;

        r = usb_claim_interface(usb, p->interface, -1);
        if (r < 0)
                return r;
        r = picoboot_reset_interface(p);
        if (r < 0)
                return log_debug_errno(r, "%s: PICOBOOT interface reset failed: %m", usb_name(usb));

        log_debug("%s: PICOBOOT interface %u, endpoints 0x%02x/0x%02x.", usb_name(usb),
                  p->interface, p->ep_out, p->ep_in);
        *ret = TAKE_PTR(p);
        return 0;
}

int picoboot_reset_interface(struct picoboot_device *p) {
        return usb_control(p->usb,
                           LIBUSB_ENDPOINT_OUT | LIBUSB_REQUEST_TYPE_VENDOR | LIBUSB_RECIPIENT_INTERFACE,
                           PICOBOOT_IF_RESET, 0, p->interface, NULL, 0, p->command_timeout_ms);
}

int picoboot_get_status(struct picoboot_device *p, struct picoboot_status *ret) {
        uint8_t buf[PICOBOOT_STATUS_SIZE];
        int r;

        r = usb_control(p->usb,
                        LIBUSB_ENDPOINT_IN | LIBUSB_REQUEST_TYPE_VENDOR | LIBUSB_RECIPIENT_INTERFACE,
                        PICOBOOT_IF_CMD_STATUS, 0, p->interface, buf, sizeof(buf),
                        p->command_timeout_ms);
        if (r < 0)
                return r;
        return picoboot_parse_status(buf, (size_t) r, ret);
}

/* After a failed transfer: ask the device why, reset the interface (which
 * clears its stall) and clear our side's halts.  Returns the error for the
 * caller: the device's status if it names one for @token, else @error. */
static int picoboot_recover(struct picoboot_device *p, uint32_t token, const char *what, int error) {
        struct picoboot_status st;
        int r;

        if (error == -ENODEV)
                return error;

        r = picoboot_get_status(p, &st);
        if (r >= 0) {
                p->last_status = st;
                log_debug("%s: %s (token %u) failed: %s; device status: token %u, %s%s.",
                          usb_name(p->usb), what, token, strerror(-error), st.token,
                          picoboot_status_to_string(st.code), st.in_progress ? ", in progress" : "");
        } else
                log_debug_errno(r, "%s: %s failed and its status cannot be read: %m",
                                usb_name(p->usb), what);

        if (picoboot_reset_interface(p) < 0)
                log_debug("%s: PICOBOOT interface reset failed.", usb_name(p->usb));
        (void) usb_clear_halt(p->usb, p->ep_in);
        (void) usb_clear_halt(p->usb, p->ep_out);

        if (r >= 0 && st.token == token && st.code != PICOBOOT_OK)
                return picoboot_status_to_errno(st.code);
        return error;
}

/* One command: packet on OUT, optional data phase, zero-length ack in the
 * opposite direction. */
static int picoboot_transact(struct picoboot_device *p, const char *what, uint8_t command,
                             const void *args, size_t args_len, void *data, uint32_t length,
                             bool gone_at_ack_is_ok) {
        uint8_t packet[PICOBOOT_COMMAND_SIZE], ack[64];
        bool data_in = command & 0x80;
        uint32_t token = p->next_token++;
        int r;

        if (picoboot_encode_command(packet, token, command, args, args_len, length) == 0)
                return -EINVAL;

        r = usb_bulk(p->usb, p->ep_out, packet, sizeof(packet), p->command_timeout_ms);
        if (r >= 0 && r != (int) sizeof(packet))
                r = -EIO;
        if (r < 0)
                return picoboot_recover(p, token, what, r);

        if (length > 0) {
                r = usb_bulk(p->usb, data_in ? p->ep_in : p->ep_out, data, length, p->data_timeout_ms);
                if (r >= 0 && (uint32_t) r != length)
                        r = -EIO;
                if (r < 0)
                        return picoboot_recover(p, token, what, r);
        }

        if (data_in)
                r = usb_bulk(p->usb, p->ep_out, NULL, 0, p->data_timeout_ms);
        else {
                r = usb_bulk(p->usb, p->ep_in, ack, sizeof(ack), p->data_timeout_ms);
                if (r > 0)
                        r = -EPROTO;    /* the ack carries no data */
        }
        if (r < 0 && gone_at_ack_is_ok && (r == -ENODEV || r == -EIO)) {
                log_debug("%s: device gone after %s, as expected.", usb_name(p->usb), what);
                return 0;
        }
        if (r < 0)
                return picoboot_recover(p, token, what, r);
        return 0;
}

int picoboot_exclusive_access(struct picoboot_device *p, enum picoboot_exclusive mode) {
        uint8_t arg = (uint8_t) mode;

        return picoboot_transact(p, "EXCLUSIVE_ACCESS", PICOBOOT_EXCLUSIVE_ACCESS, &arg, 1, NULL, 0,
                                 false);
}

int picoboot_exit_xip(struct picoboot_device *p) {
        return picoboot_transact(p, "EXIT_XIP", PICOBOOT_EXIT_XIP, NULL, 0, NULL, 0, false);
}

int picoboot_enter_cmd_xip(struct picoboot_device *p) {
        return picoboot_transact(p, "ENTER_CMD_XIP", PICOBOOT_ENTER_CMD_XIP, NULL, 0, NULL, 0, false);
}

static void range_args(uint8_t args[8], uint32_t address, uint32_t size) {
        put_le32(args, address);
        put_le32(args + 4, size);
}

static bool in_flash(uint32_t address) {
        return address >= RP2040_FLASH_BASE && address - RP2040_FLASH_BASE < RP2040_FLASH_WINDOW;
}

int picoboot_flash_erase(struct picoboot_device *p, uint32_t address, uint32_t size) {
        uint8_t args[8];

        if (size == 0 || address % RP2040_FLASH_SECTOR_SIZE || size % RP2040_FLASH_SECTOR_SIZE ||
            !in_flash(address))
                return -EINVAL;
        range_args(args, address, size);
        return picoboot_transact(p, "FLASH_ERASE", PICOBOOT_FLASH_ERASE, args, sizeof(args), NULL, 0,
                                 false);
}

int picoboot_write(struct picoboot_device *p, uint32_t address, const void *data, uint32_t size) {
        uint8_t args[8];

        if (size == 0)
                return -EINVAL;
        if (in_flash(address) && (address % RP2040_FLASH_PAGE_SIZE || size % RP2040_FLASH_PAGE_SIZE))
                return -EINVAL;
        range_args(args, address, size);
        /* OUT data is only read; usb_bulk() takes a plain pointer for both directions. */
        return picoboot_transact(p, "WRITE", PICOBOOT_WRITE, args, sizeof(args), (void *) data, size,
                                 false);
}

int picoboot_read(struct picoboot_device *p, uint32_t address, void *buf, uint32_t size) {
        uint8_t args[8];

        if (size == 0)
                return -EINVAL;
        range_args(args, address, size);
        return picoboot_transact(p, "READ", PICOBOOT_READ, args, sizeof(args), buf, size, false);
}

int picoboot_reboot(struct picoboot_device *p, uint32_t pc, uint32_t sp, uint32_t delay_ms) {
        uint8_t args[12];

        put_le32(args, pc);
        put_le32(args + 4, sp);
        put_le32(args + 8, delay_ms);
        return picoboot_transact(p, "REBOOT", PICOBOOT_REBOOT, args, sizeof(args), NULL, 0, true);
}

int picoboot_reboot_to_application(unsigned busnum, unsigned devnum) {
        _cleanup_(usb_closep) struct usb_device *usb = NULL;
        _cleanup_(picoboot_freep) struct picoboot_device *p = NULL;
        int r;

        r = usb_open_busdev(busnum, devnum, &usb);
        if (r < 0)
                return r;
        r = picoboot_open(usb, &p);
        if (r < 0)
                return r;
        return picoboot_reboot(p, 0, 0, PICOBOOT_REBOOT_DELAY_MS);
}
