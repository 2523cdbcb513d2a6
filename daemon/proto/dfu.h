/* USB DFU 1.1 with ST's DfuSe extensions (protocols.md §6), as the STM32
 * system-memory bootloader (0483:df11) speaks it.
 *
 * Pure parts, unit-tested without a device: the GETSTATUS reply, the DFU
 * functional descriptor, the DfuSe memory layout string of an alternate
 * setting ("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg") and
 * the DfuSe command encoding.
 *
 * Device parts (blocking, for worker threads) work on a struct dfu_device
 * opened on a transport/usb.h device: class requests, the dfuDNBUSY
 * polling that honours bwPollTimeout, DfuSe commands (set address, erase,
 * mass erase), block download/upload and leaving DFU mode, plus
 * dfu_leave_to_application() that does the whole "start the application"
 * from bus and device numbers.  Read
 * unprotect is deliberately absent: it mass-erases the chip.  Choosing
 * what to erase and splitting an image into blocks is the caller's
 * business; run-time DFU (DETACH from an application) is not supported.
 *
 * Errors: -errno from transport/usb.h (-ENODEV unplugged, -EPIPE request
 * stalled, -ETIMEDOUT); -EREMOTEIO when the device reports an error status
 * (dfuERROR: last_status has bStatus); -ETIMEDOUT also when an operation
 * stays busy longer than operation_timeout_ms; -EPROTO for a state the
 * protocol does not allow at that point. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shared/macro.h"

struct usb_device;

#define DFU_INTERFACE_CLASS 0xfe
#define DFU_INTERFACE_SUBCLASS 0x01
#define DFU_PROTOCOL_RUNTIME 0x01
#define DFU_PROTOCOL_DFU_MODE 0x02
#define DFU_DESCRIPTOR_FUNCTIONAL 0x21
#define DFUSE_VERSION 0x011a            /* bcdDFUVersion of DfuSe devices */

enum {
        DFU_REQUEST_DETACH = 0,
        DFU_REQUEST_DNLOAD = 1,
        DFU_REQUEST_UPLOAD = 2,
        DFU_REQUEST_GETSTATUS = 3,
        DFU_REQUEST_CLRSTATUS = 4,
        DFU_REQUEST_GETSTATE = 5,
        DFU_REQUEST_ABORT = 6,
};

enum dfu_state {
        DFU_STATE_APP_IDLE = 0,
        DFU_STATE_APP_DETACH = 1,
        DFU_STATE_IDLE = 2,
        DFU_STATE_DNLOAD_SYNC = 3,
        DFU_STATE_DNBUSY = 4,
        DFU_STATE_DNLOAD_IDLE = 5,
        DFU_STATE_MANIFEST_SYNC = 6,
        DFU_STATE_MANIFEST = 7,
        DFU_STATE_MANIFEST_WAIT_RESET = 8,
        DFU_STATE_UPLOAD_IDLE = 9,
        DFU_STATE_ERROR = 10,
};

enum dfu_status_code {
        DFU_STATUS_OK = 0x00,
        DFU_STATUS_ERR_TARGET = 0x01,
        DFU_STATUS_ERR_FILE = 0x02,
        DFU_STATUS_ERR_WRITE = 0x03,
        DFU_STATUS_ERR_ERASE = 0x04,
        DFU_STATUS_ERR_CHECK_ERASED = 0x05,
        DFU_STATUS_ERR_PROG = 0x06,
        DFU_STATUS_ERR_VERIFY = 0x07,
        DFU_STATUS_ERR_ADDRESS = 0x08,
        DFU_STATUS_ERR_NOTDONE = 0x09,
        DFU_STATUS_ERR_FIRMWARE = 0x0a,
        DFU_STATUS_ERR_VENDOR = 0x0b,
        DFU_STATUS_ERR_USBR = 0x0c,
        DFU_STATUS_ERR_POR = 0x0d,
        DFU_STATUS_ERR_UNKNOWN = 0x0e,
        DFU_STATUS_ERR_STALLEDPKT = 0x0f,
};

/* DfuSe special commands (DNLOAD with wBlockNum 0). */
#define DFUSE_CMD_SET_ADDRESS 0x21
#define DFUSE_CMD_ERASE 0x41
#define DFUSE_CMD_READ_UNPROTECT 0x92

/* ---- pure parsers and encoders ---- */

struct dfu_status {
        uint8_t status;                 /* enum dfu_status_code */
        uint32_t poll_timeout_ms;       /* bwPollTimeout */
        uint8_t state;                  /* enum dfu_state */
        uint8_t string_index;           /* iString */
};

/* Parse a 6-byte GETSTATUS reply; -EBADMSG when shorter. */
int dfu_parse_status(const uint8_t *buf, size_t len, struct dfu_status *ret);
const char *dfu_state_to_string(unsigned state);
const char *dfu_status_to_string(unsigned status);

#define DFU_ATTR_CAN_DNLOAD 0x01
#define DFU_ATTR_CAN_UPLOAD 0x02
#define DFU_ATTR_MANIFESTATION_TOLERANT 0x04
#define DFU_ATTR_WILL_DETACH 0x08

struct dfu_functional {
        uint8_t attributes;             /* DFU_ATTR_* */
        uint16_t detach_timeout_ms;
        uint16_t transfer_size;         /* wTransferSize */
        uint16_t dfu_version;           /* bcdDFUVersion; DFU 1.0 descriptors (7 bytes) report 0x0100 */
};

/* Find the DFU functional descriptor (type 0x21) in @len bytes of
 * descriptors (what follows an interface descriptor in the configuration).
 * -ENOENT when there is none, -EBADMSG for a malformed descriptor list. */
int dfu_find_functional(const uint8_t *descriptors, size_t len, struct dfu_functional *ret);

#define DFU_SEGMENT_READABLE 0x01
#define DFU_SEGMENT_ERASABLE 0x02
#define DFU_SEGMENT_WRITABLE 0x04

/* A run of equal sectors: [start, start + sector_count × sector_size). */
struct dfu_segment {
        uint32_t start;
        uint32_t sector_count;
        uint32_t sector_size;
        uint8_t flags;                  /* DFU_SEGMENT_* */
};

struct dfu_layout {
        char *name;                     /* "Internal Flash" (trailing blanks removed) */
        size_t n_segments;
        struct dfu_segment *segments;   /* in the order of the string */
};

/* Parse a DfuSe memory layout string:
 * "@<name>/0x<addr>/<count>*<size><unit><type>[,…][/0x<addr>/…]",
 * unit ' ' or 'B' (bytes), 'K' (KiB), 'M' (MiB), type 'a'..'g' (bit 0
 * readable, bit 1 erasable, bit 2 writable).  Blanks around the numbers
 * are tolerated.  -EINVAL for anything else, -ERANGE for a segment that
 * does not fit below 4 GiB. */
int dfu_layout_parse(const char *text, struct dfu_layout **ret);
struct dfu_layout *dfu_layout_free(struct dfu_layout *layout);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct dfu_layout *, dfu_layout_free);

static inline uint64_t dfu_segment_end(const struct dfu_segment *s) {
        return (uint64_t) s->start + (uint64_t) s->sector_count * s->sector_size;
}

/* The segment that holds @address, or NULL. */
const struct dfu_segment *dfu_layout_find(const struct dfu_layout *layout, uint32_t address);

/* The sector that holds @address: its start, size and flags.  -ENOENT
 * outside every segment. */
int dfu_layout_sector(const struct dfu_layout *layout, uint32_t address, uint32_t *ret_start,
                      uint32_t *ret_size, uint8_t *ret_flags);

/* Encode a DfuSe command with an address (set address, erase page) into
 * @out; returns its length (5). */
size_t dfuse_encode_command(uint8_t command, uint32_t address, uint8_t out[5]);

/* ---- device ---- */

#define DFU_REQUEST_TIMEOUT_MS 5000
#define DFU_OPERATION_TIMEOUT_MS 30000

struct dfu_device {
        struct usb_device *usb;         /* borrowed; must outlive this */
        uint8_t interface;
        uint8_t alt;
        uint8_t protocol;               /* DFU_PROTOCOL_* */
        bool dfuse;                     /* bcdDFUVersion 0x011a */
        struct dfu_functional functional;
        char alt_name[256];             /* the alt setting's iInterface string, "" if none */
        struct dfu_layout *layout;      /* alt_name parsed; NULL if it is no DfuSe layout */
        struct dfu_status last_status;  /* of the last GETSTATUS */
        unsigned request_timeout_ms;    /* each control transfer; DFU_REQUEST_TIMEOUT_MS */
        unsigned operation_timeout_ms;  /* how long a download may stay busy; DFU_OPERATION_TIMEOUT_MS */
        uint64_t quiet_until_usec;      /* CLOCK_MONOTONIC end of the last bwPollTimeout */
};

/* Find the DFU interface (class 0xfe, subclass 0x01) with alternate setting
 * @alt on @usb, claim it, select the alt setting, read its functional
 * descriptor and layout string.  -ENXIO when the device has no such DFU
 * interface, -EBADMSG without a usable functional descriptor. */
int dfu_open(struct usb_device *usb, unsigned alt, struct dfu_device **ret);
struct dfu_device *dfu_free(struct dfu_device *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct dfu_device *, dfu_free);

/* GETSTATUS.  Waits first until the bwPollTimeout of the previous reply has
 * passed (every request does), remembers the reply in last_status. */
int dfu_get_status(struct dfu_device *d, struct dfu_status *ret);
/* GETSTATE: the state (>= 0). */
int dfu_get_state(struct dfu_device *d);
int dfu_clear_status(struct dfu_device *d);
int dfu_abort(struct dfu_device *d);

/* Bring the device to dfuIDLE: CLRSTATUS from dfuERROR, ABORT from the
 * download/upload idle states.  -EPROTO when it ends up elsewhere. */
int dfu_ensure_idle(struct dfu_device *d);

/* DNLOAD block @block (DfuSe: >= 2, written at the address pointer +
 * (block − 2) × wTransferSize) of 1..wTransferSize bytes, then poll until
 * the device has written it (dfuDNLOAD-IDLE). */
int dfu_download_block(struct dfu_device *d, uint16_t block, const void *data, size_t len);

/* UPLOAD block @block (DfuSe: >= 2, like downloads) of up to @len
 * (<= wTransferSize) bytes; returns the number of bytes read.  From
 * dfuDNLOAD-IDLE it sends ABORT first, as uploads need dfuIDLE. */
int dfu_upload_block(struct dfu_device *d, uint16_t block, void *buf, size_t len);

/* DfuSe commands, each run to completion (device back in dfuDNLOAD-IDLE). */
int dfuse_set_address(struct dfu_device *d, uint32_t address);
/* Erase the page or sector that holds @address. */
int dfuse_erase_page(struct dfu_device *d, uint32_t address);
static inline int dfuse_erase_sector(struct dfu_device *d, uint32_t address) {
        return dfuse_erase_page(d, address);
}
int dfuse_mass_erase(struct dfu_device *d);

/* Leave DFU mode and start the application at @app_address: set the
 * address pointer, zero-length DNLOAD, GETSTATUS.  The device resets
 * meanwhile, so -ENODEV, -EPIPE or -EIO from that last GETSTATUS count as
 * success. */
int dfuse_leave(struct dfu_device *d, uint32_t app_address);

/* ---- whole operations ---- */

#define DFU_STM32_FLASH_BASE 0x08000000u

/* Open the USB device @busnum/@devnum, its DfuSe interface (alt 0), bring
 * it to dfuIDLE and leave DFU mode starting the application at
 * @app_address.  -EOPNOTSUPP for a DFU device without DfuSe. */
int dfu_leave_to_application(unsigned busnum, unsigned devnum, uint32_t app_address);
