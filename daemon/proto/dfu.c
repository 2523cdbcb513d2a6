/* DFU 1.1 + DfuSe: parsers (status, functional descriptor, memory layout),
 * command encoding and the blocking device operations.  See dfu.h for the
 * scope; protocols.md §6 for the wire format.  Only this file and
 * transport/usb.c know libusb's types. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libusb.h>

#include "proto/dfu.h"
#include "shared/interrupt.h"
#include "shared/log.h"
#include "shared/time-util.h"
#include "transport/usb.h"

#define DFU_OUT (LIBUSB_ENDPOINT_OUT | LIBUSB_REQUEST_TYPE_CLASS | LIBUSB_RECIPIENT_INTERFACE)
#define DFU_IN (LIBUSB_ENDPOINT_IN | LIBUSB_REQUEST_TYPE_CLASS | LIBUSB_RECIPIENT_INTERFACE)
#define DFU_STATE_UNKNOWN 0xff

/* ---- status ---- */

int dfu_parse_status(const uint8_t *buf, size_t len, struct dfu_status *ret) {
        if (len < 6)
                return -EBADMSG;
        *ret = (struct dfu_status) {
                .status = buf[0],
                .poll_timeout_ms = (uint32_t) buf[1] | (uint32_t) buf[2] << 8 | (uint32_t) buf[3] << 16,
                .state = buf[4],
                .string_index = buf[5],
        };
        return 0;
}

const char *dfu_state_to_string(unsigned state) {
        static const char *const names[] = {
                [DFU_STATE_APP_IDLE] = "appIDLE",
                [DFU_STATE_APP_DETACH] = "appDETACH",
                [DFU_STATE_IDLE] = "dfuIDLE",
                [DFU_STATE_DNLOAD_SYNC] = "dfuDNLOAD-SYNC",
                [DFU_STATE_DNBUSY] = "dfuDNBUSY",
                [DFU_STATE_DNLOAD_IDLE] = "dfuDNLOAD-IDLE",
                [DFU_STATE_MANIFEST_SYNC] = "dfuMANIFEST-SYNC",
                [DFU_STATE_MANIFEST] = "dfuMANIFEST",
                [DFU_STATE_MANIFEST_WAIT_RESET] = "dfuMANIFEST-WAIT-RESET",
                [DFU_STATE_UPLOAD_IDLE] = "dfuUPLOAD-IDLE",
                [DFU_STATE_ERROR] = "dfuERROR",
        };

        return state < ELEMENTSOF(names) ? names[state] : "unknown state";
}

const char *dfu_status_to_string(unsigned status) {
        static const char *const names[] = {
                [DFU_STATUS_OK] = "no error",
                [DFU_STATUS_ERR_TARGET] = "file is not targeted for this device (errTARGET)",
                [DFU_STATUS_ERR_FILE] = "file fails a vendor check (errFILE)",
                [DFU_STATUS_ERR_WRITE] = "cannot write memory (errWRITE)",
                [DFU_STATUS_ERR_ERASE] = "memory erase failed (errERASE)",
                [DFU_STATUS_ERR_CHECK_ERASED] = "memory erase check failed (errCHECK_ERASED)",
                [DFU_STATUS_ERR_PROG] = "program memory function failed (errPROG)",
                [DFU_STATUS_ERR_VERIFY] = "programmed memory failed verification (errVERIFY)",
                [DFU_STATUS_ERR_ADDRESS] = "address out of range (errADDRESS)",
                [DFU_STATUS_ERR_NOTDONE] = "download ended before all data arrived (errNOTDONE)",
                [DFU_STATUS_ERR_FIRMWARE] = "device firmware is corrupt (errFIRMWARE)",
                [DFU_STATUS_ERR_VENDOR] = "vendor-specific error (errVENDOR)",
                [DFU_STATUS_ERR_USBR] = "unexpected USB reset (errUSBR)",
                [DFU_STATUS_ERR_POR] = "unexpected power-on reset (errPOR)",
                [DFU_STATUS_ERR_UNKNOWN] = "unknown error (errUNKNOWN)",
                [DFU_STATUS_ERR_STALLEDPKT] = "unexpected request (errSTALLEDPKT)",
        };

        return status < ELEMENTSOF(names) ? names[status] : "unknown status";
}

/* ---- functional descriptor ---- */

int dfu_find_functional(const uint8_t *descriptors, size_t len, struct dfu_functional *ret) {
        size_t i = 0;

        while (i < len) {
                const uint8_t *desc = descriptors + i;
                size_t length = desc[0];

                if (length < 2 || length > len - i)
                        return -EBADMSG;
                if (desc[1] == DFU_DESCRIPTOR_FUNCTIONAL) {
                        if (length < 7)
                                return -EBADMSG;
                        *ret = (struct dfu_functional) {
                                .attributes = desc[2],
                                .detach_timeout_ms = (uint16_t) (desc[3] | desc[4] << 8),
                                .transfer_size = (uint16_t) (desc[5] | desc[6] << 8),
                                .dfu_version = length >= 9 ? (uint16_t) (desc[7] | desc[8] << 8) : 0x0100,
                        };
                        return 0;
                }
                i += length;
        }
        return -ENOENT;
}

/* ---- memory layout ---- */

struct dfu_layout *dfu_layout_free(struct dfu_layout *layout) {
        if (!layout)
                return NULL;
        free(layout->name);
        free(layout->segments);
        free(layout);
        return NULL;
}

static const char *skip_blanks(const char *p) {
        while (*p == ' ' || *p == '\t')
                p++;
        return p;
}

/* A number in @base at *p (no sign, no leading blanks); advances *p. */
static int parse_number(const char **p, int base, uint64_t *ret) {
        const char *s = *p;
        unsigned long long value;
        char *end;

        if (base == 16 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
                s += 2;
        if (!(base == 16 ? (*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f') ||
                           (*s >= 'A' && *s <= 'F')
                         : *s >= '0' && *s <= '9'))
                return -EINVAL;
        errno = 0;
        value = strtoull(s, &end, base);
        if (errno != 0 || value > UINT32_MAX)
                return -ERANGE;
        *ret = value;
        *p = end;
        return 0;
}

static int layout_add(struct dfu_layout *layout, size_t *allocated, const struct dfu_segment *s) {
        if (layout->n_segments == *allocated) {
                size_t n = *allocated ? *allocated * 2 : 4;
                struct dfu_segment *segments = reallocarray(layout->segments, n, sizeof(*segments));

                if (!segments)
                        return -ENOMEM;
                layout->segments = segments;
                *allocated = n;
        }
        layout->segments[layout->n_segments++] = *s;
        return 0;
}

/* One "<count>*<size><unit><type>" item at *p for a segment at @start. */
static int parse_sector_group(const char **p, uint32_t start, struct dfu_segment *ret) {
        const char *s = skip_blanks(*p);
        uint64_t count, size, multiplier = 1, end;
        int r;

        r = parse_number(&s, 10, &count);
        if (r < 0)
                return r;
        s = skip_blanks(s);
        if (*s != '*')
                return -EINVAL;
        s = skip_blanks(s + 1);
        r = parse_number(&s, 10, &size);
        if (r < 0)
                return r;
        switch (*s) {
        case 'K':
                multiplier = 1024;
                s++;
                break;
        case 'M':
                multiplier = 1024 * 1024;
                s++;
                break;
        case 'B':
                s++;
                break;
        default:
                s = skip_blanks(s);     /* ' ': bytes */
        }
        if (*s < 'a' || *s > 'g')
                return -EINVAL;
        if (count == 0 || size == 0)
                return -EINVAL;
        size *= multiplier;
        end = (uint64_t) start + count * size;
        if (size > UINT32_MAX || end > (uint64_t) UINT32_MAX + 1)
                return -ERANGE;
        *ret = (struct dfu_segment) {
                .start = start,
                .sector_count = (uint32_t) count,
                .sector_size = (uint32_t) size,
                .flags = (uint8_t) (*s - 'a' + 1),
        };
        *p = skip_blanks(s + 1);
        return 0;
}

int dfu_layout_parse(const char *text, struct dfu_layout **ret) {
        _cleanup_(dfu_layout_freep) struct dfu_layout *layout = NULL;
        const char *p, *slash, *name_start, *name_end;
        size_t allocated = 0;
        int r;

        if (!text || text[0] != '@')
                return -EINVAL;
        slash = strchr(text, '/');
        if (!slash)
                return -EINVAL;

        layout = calloc(1, sizeof(*layout));
        if (!layout)
                return -ENOMEM;
        name_start = skip_blanks(text + 1);
        name_end = slash;
        while (name_end > name_start && (name_end[-1] == ' ' || name_end[-1] == '\t'))
                name_end--;
        layout->name = strndup(name_start, (size_t) (name_end - name_start));
        if (!layout->name)
                return -ENOMEM;

        p = slash;
        while (*p == '/') {
                uint64_t address;

                p = skip_blanks(p + 1);
                r = parse_number(&p, 16, &address);
                if (r < 0)
                        return r;
                p = skip_blanks(p);
                if (*p != '/')
                        return -EINVAL;
                p++;
                for (;;) {
                        struct dfu_segment segment;

                        r = parse_sector_group(&p, (uint32_t) address, &segment);
                        if (r < 0)
                                return r;
                        r = layout_add(layout, &allocated, &segment);
                        if (r < 0)
                                return r;
                        address = dfu_segment_end(&segment);
                        if (*p != ',')
                                break;
                        p = skip_blanks(p + 1);
                        if (*p == '/' || *p == '\0')     /* "…Kg,/0x08100000/…": a stray comma */
                                break;
                        if (address > UINT32_MAX)
                                return -ERANGE;
                }
        }
        if (*p != '\0' || layout->n_segments == 0)
                return -EINVAL;

        *ret = TAKE_PTR(layout);
        return 0;
}

const struct dfu_segment *dfu_layout_find(const struct dfu_layout *layout, uint32_t address) {
        for (size_t i = 0; i < layout->n_segments; i++) {
                const struct dfu_segment *s = &layout->segments[i];

                if (address >= s->start && address < dfu_segment_end(s))
                        return s;
        }
        return NULL;
}

int dfu_layout_sector(const struct dfu_layout *layout, uint32_t address, uint32_t *ret_start,
                      uint32_t *ret_size, uint8_t *ret_flags) {
        const struct dfu_segment *s = dfu_layout_find(layout, address);

        if (!s)
                return -ENOENT;
        if (ret_start)
                *ret_start = s->start + (address - s->start) / s->sector_size * s->sector_size;
        if (ret_size)
                *ret_size = s->sector_size;
        if (ret_flags)
                *ret_flags = s->flags;
        return 0;
}

size_t dfuse_encode_command(uint8_t command, uint32_t address, uint8_t out[5]) {
        out[0] = command;
        out[1] = (uint8_t) address;
        out[2] = (uint8_t) (address >> 8);
        out[3] = (uint8_t) (address >> 16);
        out[4] = (uint8_t) (address >> 24);
        return 5;
}

/* ---- device ---- */

static void config_freep(struct libusb_config_descriptor **config) {
        if (*config)
                usb_free_config_descriptor(*config);
}

struct dfu_device *dfu_free(struct dfu_device *d) {
        if (!d)
                return NULL;
        (void) usb_release_interface(d->usb, d->interface);
        dfu_layout_free(d->layout);
        free(d);
        return NULL;
}

/* The functional descriptor of DFU interface @iface: after any of its alt
 * settings, after the configuration, or (some devices only) on request. */
static int dfu_read_functional(struct usb_device *usb, const struct libusb_config_descriptor *config,
                               const struct libusb_interface *iface, struct dfu_functional *ret) {
        uint8_t buf[9];
        int r;

        for (int a = 0; a < iface->num_altsetting; a++) {
                const struct libusb_interface_descriptor *alt = &iface->altsetting[a];

                r = dfu_find_functional(alt->extra, (size_t) MAX(alt->extra_length, 0), ret);
                if (r != -ENOENT)
                        return r;
        }
        r = dfu_find_functional(config->extra, (size_t) MAX(config->extra_length, 0), ret);
        if (r != -ENOENT)
                return r;

        r = usb_control(usb, LIBUSB_ENDPOINT_IN | LIBUSB_REQUEST_TYPE_STANDARD | LIBUSB_RECIPIENT_DEVICE,
                        LIBUSB_REQUEST_GET_DESCRIPTOR, DFU_DESCRIPTOR_FUNCTIONAL << 8, 0, buf,
                        sizeof(buf), DFU_REQUEST_TIMEOUT_MS);
        if (r < 0)
                return -ENOENT;
        return dfu_find_functional(buf, (size_t) r, ret);
}

int dfu_open(struct usb_device *usb, unsigned alt, struct dfu_device **ret) {
        _cleanup_(config_freep) struct libusb_config_descriptor *config = NULL;
        _cleanup_(dfu_freep) struct dfu_device *d = NULL;
        const struct libusb_interface_descriptor *found = NULL;
        const struct libusb_interface *found_iface = NULL;
        uint8_t string_index;
        int r;

        r = usb_get_active_config(usb, &config);
        if (r < 0)
                return log_debug_errno(r, "Cannot read the configuration of %s: %m", usb_name(usb));

        for (int i = 0; i < config->bNumInterfaces && !found; i++)
                for (int a = 0; a < config->interface[i].num_altsetting; a++) {
                        const struct libusb_interface_descriptor *desc = &config->interface[i].altsetting[a];

                        if (desc->bInterfaceClass == DFU_INTERFACE_CLASS &&
                            desc->bInterfaceSubClass == DFU_INTERFACE_SUBCLASS &&
                            desc->bAlternateSetting == alt) {
                                found = desc;
                                found_iface = &config->interface[i];
                                break;
                        }
                }
        if (!found)
                return log_debug_errno(ENXIO, "%s has no DFU interface with alt setting %u.",
                                       usb_name(usb), alt);

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        d->usb = usb;
        d->interface = found->bInterfaceNumber;
        d->alt = (uint8_t) alt;
        d->protocol = found->bInterfaceProtocol;
        d->request_timeout_ms = DFU_REQUEST_TIMEOUT_MS;
        d->operation_timeout_ms = DFU_OPERATION_TIMEOUT_MS;
        d->last_status.state = DFU_STATE_UNKNOWN;
        string_index = found->iInterface;

        r = dfu_read_functional(usb, config, found_iface, &d->functional);
        if (r < 0 || d->functional.transfer_size == 0)
                return log_debug_errno(EBADMSG, "%s: no usable DFU functional descriptor.",
                                       usb_name(usb));
        d->dfuse = d->functional.dfu_version == DFUSE_VERSION;

        r = usb_claim_interface(usb, d->interface, (int) alt);
        if (r < 0)
                return r;

        if (string_index > 0) {
                r = usb_get_string(usb, string_index, d->alt_name, sizeof(d->alt_name));
                if (r < 0) {
                        log_debug_errno(r, "%s: cannot read the name of DFU alt setting %u: %m",
                                        usb_name(usb), alt);
                        d->alt_name[0] = '\0';
                }
        }
        if (d->alt_name[0] == '@') {
                r = dfu_layout_parse(d->alt_name, &d->layout);
                if (r < 0)
                        log_warning_errno(r, "%s: cannot parse the DfuSe memory layout \"%s\": %m",
                                          usb_name(usb), d->alt_name);
        }

        log_debug("%s: DFU interface %u alt %u, protocol %u, DFU version %04x, transfer size %u, \"%s\".",
                  usb_name(usb), d->interface, alt, d->protocol, d->functional.dfu_version,
                  d->functional.transfer_size, d->alt_name);
        *ret = TAKE_PTR(d);
        return 0;
}

/* Sleep until the last bwPollTimeout has passed, or a cancel. */
static int dfu_wait_quiet(struct dfu_device *d) {
        uint64_t now = now_usec();

        if (now >= d->quiet_until_usec)
                return 0;
        return interruptible_sleep_msec((unsigned) ((d->quiet_until_usec - now + 999) / 1000));
}

static int dfu_request(struct dfu_device *d, uint8_t type, uint8_t request, uint16_t value,
                       void *data, uint16_t length) {
        int r;

        r = dfu_wait_quiet(d);
        if (r < 0)
                return r;
        return usb_control(d->usb, type, request, value, d->interface, data, length,
                           d->request_timeout_ms);
}

int dfu_get_status(struct dfu_device *d, struct dfu_status *ret) {
        struct dfu_status status;
        uint8_t buf[6];
        uint32_t quiet_ms;
        int r;

        r = dfu_request(d, DFU_IN, DFU_REQUEST_GETSTATUS, 0, buf, sizeof(buf));
        if (r < 0)
                return r;
        r = dfu_parse_status(buf, (size_t) r, &status);
        if (r < 0)
                return r;

        /* A busy device that asks for no pause still gets a millisecond. */
        quiet_ms = MIN(status.poll_timeout_ms, d->operation_timeout_ms);
        if (quiet_ms == 0 && status.state == DFU_STATE_DNBUSY)
                quiet_ms = 1;
        d->quiet_until_usec = now_usec() + (uint64_t) quiet_ms * 1000;
        d->last_status = status;
        if (ret)
                *ret = status;
        return 0;
}

int dfu_get_state(struct dfu_device *d) {
        uint8_t state;
        int r;

        r = dfu_request(d, DFU_IN, DFU_REQUEST_GETSTATE, 0, &state, 1);
        if (r < 0)
                return r;
        if (r < 1)
                return -EBADMSG;
        return state;
}

int dfu_clear_status(struct dfu_device *d) {
        int r;

        r = dfu_request(d, DFU_OUT, DFU_REQUEST_CLRSTATUS, 0, NULL, 0);
        if (r < 0)
                return r;
        d->last_status.state = DFU_STATE_IDLE;
        d->last_status.status = DFU_STATUS_OK;
        return 0;
}

int dfu_abort(struct dfu_device *d) {
        int r;

        r = dfu_request(d, DFU_OUT, DFU_REQUEST_ABORT, 0, NULL, 0);
        if (r < 0)
                return r;
        d->last_status.state = DFU_STATE_IDLE;
        return 0;
}

int dfu_ensure_idle(struct dfu_device *d) {
        uint64_t deadline = now_usec() + (uint64_t) d->operation_timeout_ms * 1000;
        unsigned actions = 0;
        struct dfu_status st;
        int r;

        for (;;) {
                r = dfu_get_status(d, &st);
                if (r < 0)
                        return r;
                switch (st.state) {
                case DFU_STATE_IDLE:
                        return 0;
                case DFU_STATE_ERROR:
                        log_debug("%s: device in dfuERROR (%s), clearing the status.",
                                  usb_name(d->usb), dfu_status_to_string(st.status));
                        r = dfu_clear_status(d);
                        break;
                case DFU_STATE_DNLOAD_SYNC:
                case DFU_STATE_DNLOAD_IDLE:
                case DFU_STATE_MANIFEST_SYNC:
                case DFU_STATE_UPLOAD_IDLE:
                        r = dfu_abort(d);
                        break;
                case DFU_STATE_DNBUSY:
                        if (now_usec() >= deadline)
                                return -ETIMEDOUT;
                        continue;
                default:
                        return log_debug_errno(EPROTO, "%s: device is in state %s, not in DFU mode.",
                                               usb_name(d->usb), dfu_state_to_string(st.state));
                }
                if (r < 0)
                        return r;
                if (++actions > 3)
                        return log_debug_errno(EPROTO, "%s: device does not return to dfuIDLE.",
                                               usb_name(d->usb));
        }
}

/* After a DNLOAD: poll GETSTATUS through dfuDNBUSY until the device is done
 * with it (dfuDNLOAD-IDLE). */
static int dfu_wait_download(struct dfu_device *d, const char *what) {
        uint64_t deadline = now_usec() + (uint64_t) d->operation_timeout_ms * 1000;
        struct dfu_status st;
        int r;

        for (;;) {
                r = dfu_get_status(d, &st);
                if (r < 0)
                        return r;
                if (st.state == DFU_STATE_DNBUSY || st.state == DFU_STATE_DNLOAD_SYNC) {
                        if (now_usec() >= deadline)
                                return log_debug_errno(ETIMEDOUT, "%s: %s still busy after %u ms.",
                                                       usb_name(d->usb), what, d->operation_timeout_ms);
                        continue;
                }
                if (st.state == DFU_STATE_ERROR || st.status != DFU_STATUS_OK)
                        return log_debug_errno(EREMOTEIO, "%s: %s failed: %s (state %s).",
                                               usb_name(d->usb), what,
                                               dfu_status_to_string(st.status),
                                               dfu_state_to_string(st.state));
                if (st.state == DFU_STATE_DNLOAD_IDLE)
                        return 0;
                return log_debug_errno(EPROTO, "%s: %s ended in state %s.", usb_name(d->usb), what,
                                       dfu_state_to_string(st.state));
        }
}

/* DNLOAD (@length bytes at @data, never modified) and wait for it. */
static int dfu_download(struct dfu_device *d, uint16_t block, const void *data, uint16_t length,
                        const char *what) {
        int r;

        if (d->last_status.state == DFU_STATE_UPLOAD_IDLE) {
                r = dfu_abort(d);
                if (r < 0)
                        return r;
        }
        r = dfu_request(d, DFU_OUT, DFU_REQUEST_DNLOAD, block, (void *) data, length);
        if (r < 0)
                return log_debug_errno(r, "%s: %s: DNLOAD failed: %m", usb_name(d->usb), what);
        if (r != length)
                return log_debug_errno(EIO, "%s: %s: short DNLOAD (%d of %u bytes).",
                                       usb_name(d->usb), what, r, length);
        d->last_status.state = DFU_STATE_DNLOAD_SYNC;
        return dfu_wait_download(d, what);
}

int dfu_download_block(struct dfu_device *d, uint16_t block, const void *data, size_t len) {
        if (len == 0 || len > d->functional.transfer_size || (d->dfuse && block < 2))
                return -EINVAL;
        return dfu_download(d, block, data, (uint16_t) len, "download");
}

int dfu_upload_block(struct dfu_device *d, uint16_t block, void *buf, size_t len) {
        int r;

        if (len == 0 || len > d->functional.transfer_size || (d->dfuse && block < 2))
                return -EINVAL;
        if (d->last_status.state == DFU_STATE_DNLOAD_IDLE) {
                r = dfu_abort(d);
                if (r < 0)
                        return r;
        }
        r = dfu_request(d, DFU_IN, DFU_REQUEST_UPLOAD, block, buf, (uint16_t) len);
        if (r < 0)
                return log_debug_errno(r, "%s: UPLOAD of block %u failed: %m", usb_name(d->usb), block);
        d->last_status.state = DFU_STATE_UPLOAD_IDLE;
        return r;
}

static int dfuse_command(struct dfu_device *d, uint8_t command, uint32_t address, size_t length,
                         const char *what) {
        uint8_t buf[5];

        if (!d->dfuse)
                return -EOPNOTSUPP;
        dfuse_encode_command(command, address, buf);
        return dfu_download(d, 0, buf, (uint16_t) length, what);
}

int dfuse_set_address(struct dfu_device *d, uint32_t address) {
        return dfuse_command(d, DFUSE_CMD_SET_ADDRESS, address, 5, "set address");
}

int dfuse_erase_page(struct dfu_device *d, uint32_t address) {
        return dfuse_command(d, DFUSE_CMD_ERASE, address, 5, "erase");
}

int dfuse_mass_erase(struct dfu_device *d) {
        return dfuse_command(d, DFUSE_CMD_ERASE, 0, 1, "mass erase");
}

int dfuse_leave(struct dfu_device *d, uint32_t app_address) {
        struct dfu_status st;
        int r;

        r = dfuse_set_address(d, app_address);
        if (r < 0)
                return r;
        r = dfu_request(d, DFU_OUT, DFU_REQUEST_DNLOAD, 2, NULL, 0);
        if (r < 0)
                return log_debug_errno(r, "%s: leave request failed: %m", usb_name(d->usb));
        d->last_status.state = DFU_STATE_MANIFEST_SYNC;

        r = dfu_get_status(d, &st);
        if (r == -ENODEV || r == -EPIPE || r == -EIO) {
                log_debug_errno(r, "%s: device reset on leaving DFU mode (%m).", usb_name(d->usb));
                return 0;
        }
        if (r < 0)
                return r;
        if (st.status != DFU_STATUS_OK)
                return log_debug_errno(EREMOTEIO, "%s: leaving DFU mode failed: %s.",
                                       usb_name(d->usb), dfu_status_to_string(st.status));
        switch (st.state) {
        case DFU_STATE_MANIFEST_SYNC:
        case DFU_STATE_MANIFEST:
        case DFU_STATE_MANIFEST_WAIT_RESET:
        case DFU_STATE_DNBUSY:
                log_debug("%s: leaving DFU mode, starting 0x%08x.", usb_name(d->usb), app_address);
                return 0;
        default:
                return log_debug_errno(EPROTO, "%s: device stays in %s after the leave request.",
                                       usb_name(d->usb), dfu_state_to_string(st.state));
        }
}

int dfu_leave_to_application(unsigned busnum, unsigned devnum, uint32_t app_address) {
        _cleanup_(usb_closep) struct usb_device *usb = NULL;
        _cleanup_(dfu_freep) struct dfu_device *d = NULL;
        int r;

        r = usb_open_busdev(busnum, devnum, &usb);
        if (r < 0)
                return r;
        r = dfu_open(usb, 0, &d);
        if (r < 0)
                return r;
        if (!d->dfuse)
                return log_debug_errno(EOPNOTSUPP, "%s: DFU without DfuSe cannot start an application.",
                                       usb_name(usb));
        r = dfu_ensure_idle(d);
        if (r < 0)
                return r;
        return dfuse_leave(d, app_address);
}
