/* RP2040 boot ROM PICOBOOT protocol (protocols.md §7): the vendor interface
 * of the BOOTSEL device (2e8a:0003) with one bulk OUT and one bulk IN
 * endpoint, 32-byte command packets (magic 0x431fd10b, a token per
 * command), an optional data phase and a zero-length acknowledgement in the
 * direction opposite to the data phase.
 *
 * Pure parts, unit-tested: command packet encoding, the 16-byte command
 * status, status names and errno mapping.  Device parts (blocking, for
 * worker threads): interface reset, command status, EXCLUSIVE_ACCESS,
 * EXIT_XIP, ENTER_CMD_XIP, FLASH_ERASE, WRITE, READ and REBOOT, and
 * picoboot_reboot_to_application() from bus and device numbers.  When the
 * device stalls a command, the status is read, the interface is reset and
 * the status code becomes the error.  UF2 parsing, EXEC and the RP2350's
 * REBOOT2/GET_INFO are not here.
 *
 * Errors: -errno from transport/usb.h (-ENODEV, -ETIMEDOUT, -EPIPE), or
 * from picoboot_status_to_errno() for a status the device reported
 * (last_status keeps it); -EINVAL for misaligned flash ranges, without
 * sending anything. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shared/macro.h"

struct usb_device;

#define PICOBOOT_MAGIC 0x431fd10bu
#define PICOBOOT_COMMAND_SIZE 32
#define PICOBOOT_STATUS_SIZE 16
#define PICOBOOT_MAX_ARGS 16

/* Control requests on the PICOBOOT interface. */
#define PICOBOOT_IF_RESET 0x41
#define PICOBOOT_IF_CMD_STATUS 0x42

enum picoboot_command {
        PICOBOOT_EXCLUSIVE_ACCESS = 0x01,
        PICOBOOT_REBOOT = 0x02,
        PICOBOOT_FLASH_ERASE = 0x03,
        PICOBOOT_READ = 0x84,           /* bit 7: data phase IN */
        PICOBOOT_WRITE = 0x05,
        PICOBOOT_EXIT_XIP = 0x06,
        PICOBOOT_ENTER_CMD_XIP = 0x07,
        PICOBOOT_EXEC = 0x08,
        PICOBOOT_VECTORIZE_FLASH = 0x09,
};

enum picoboot_exclusive {
        PICOBOOT_NOT_EXCLUSIVE = 0,
        PICOBOOT_EXCLUSIVE = 1,
        PICOBOOT_EXCLUSIVE_AND_EJECT = 2,
};

enum picoboot_status_code {
        PICOBOOT_OK = 0,
        PICOBOOT_UNKNOWN_CMD = 1,
        PICOBOOT_INVALID_CMD_LENGTH = 2,
        PICOBOOT_INVALID_TRANSFER_LENGTH = 3,
        PICOBOOT_INVALID_ADDRESS = 4,
        PICOBOOT_BAD_ALIGNMENT = 5,
        PICOBOOT_INTERLEAVED_WRITE = 6,
        PICOBOOT_REBOOTING = 7,
        PICOBOOT_UNKNOWN_ERROR = 8,
        PICOBOOT_INVALID_STATE = 9,
        PICOBOOT_NOT_PERMITTED = 10,
        PICOBOOT_INVALID_ARG = 11,
        PICOBOOT_BUFFER_TOO_SMALL = 12,
};

/* RP2040 memory map and flash geometry. */
#define RP2040_FLASH_BASE 0x10000000u
#define RP2040_FLASH_WINDOW 0x01000000u /* XIP window: up to 16 MiB of flash */
#define RP2040_FLASH_SECTOR_SIZE 4096u  /* erase unit */
#define RP2040_FLASH_PAGE_SIZE 256u     /* program unit */

/* ---- pure parts ---- */

/* Fill @out with a command packet: @args_len (<= 16) bytes of @args
 * become the arguments and bCmdSize.  Returns PICOBOOT_COMMAND_SIZE, or 0
 * for too many argument bytes. */
size_t picoboot_encode_command(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint8_t command,
                               const void *args, size_t args_len, uint32_t transfer_length);
/* FLASH_ERASE, READ, WRITE: args dAddr, dSize; transfer length = dSize for
 * READ and WRITE, 0 for FLASH_ERASE. */
size_t picoboot_encode_range(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint8_t command,
                             uint32_t address, uint32_t size);
size_t picoboot_encode_reboot(uint8_t out[PICOBOOT_COMMAND_SIZE], uint32_t token, uint32_t pc,
                              uint32_t sp, uint32_t delay_ms);

struct picoboot_status {
        uint32_t token;
        uint32_t code;                  /* enum picoboot_status_code */
        uint8_t command;
        bool in_progress;
};

/* Parse the reply of PICOBOOT_IF_CMD_STATUS; -EBADMSG when too short. */
int picoboot_parse_status(const uint8_t *buf, size_t len, struct picoboot_status *ret);
const char *picoboot_status_to_string(uint32_t code);
/* OK → 0; bad arguments, address or alignment → -EINVAL; unknown command →
 * -EOPNOTSUPP; not permitted → -EPERM; rebooting → -ENODEV; interleaved
 * write, invalid state → -EBUSY; others → -EIO. */
int picoboot_status_to_errno(uint32_t code);

/* ---- device ---- */

#define PICOBOOT_COMMAND_TIMEOUT_MS 3000
#define PICOBOOT_DATA_TIMEOUT_MS 10000

struct picoboot_device {
        struct usb_device *usb;         /* borrowed; must outlive this */
        uint8_t interface;
        uint8_t ep_out;
        uint8_t ep_in;
        uint32_t next_token;            /* counts up from 1, like rp2040_flash */
        unsigned command_timeout_ms;    /* the command packet; PICOBOOT_COMMAND_TIMEOUT_MS */
        unsigned data_timeout_ms;       /* data phase and ack; PICOBOOT_DATA_TIMEOUT_MS */
        struct picoboot_status last_status;     /* read after the last failure */
};

/* Find the PICOBOOT interface of @usb (vendor class 0xff with one bulk OUT
 * and one bulk IN endpoint, like rp2040_flash: interface 1 when there are
 * more), claim it and reset it.  -ENXIO when there is none. */
int picoboot_open(struct usb_device *usb, struct picoboot_device **ret);
struct picoboot_device *picoboot_free(struct picoboot_device *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct picoboot_device *, picoboot_free);

/* PICOBOOT_IF_RESET: clears a stalled command on the device. */
int picoboot_reset_interface(struct picoboot_device *p);
int picoboot_get_status(struct picoboot_device *p, struct picoboot_status *ret);

int picoboot_exclusive_access(struct picoboot_device *p, enum picoboot_exclusive mode);
int picoboot_exit_xip(struct picoboot_device *p);
int picoboot_enter_cmd_xip(struct picoboot_device *p);
/* @address and @size multiples of RP2040_FLASH_SECTOR_SIZE. */
int picoboot_flash_erase(struct picoboot_device *p, uint32_t address, uint32_t size);
/* Writes to flash need @address and @size multiples of
 * RP2040_FLASH_PAGE_SIZE and erased flash; RAM takes any range. */
int picoboot_write(struct picoboot_device *p, uint32_t address, const void *data, uint32_t size);
int picoboot_read(struct picoboot_device *p, uint32_t address, void *buf, uint32_t size);
/* Reboot @delay_ms after the acknowledgement; pc = sp = 0: normal boot from
 * flash.  The device disconnects, so losing it at the acknowledgement
 * (-ENODEV, -EIO) counts as success. */
int picoboot_reboot(struct picoboot_device *p, uint32_t pc, uint32_t sp, uint32_t delay_ms);

/* ---- whole operations ---- */

#define PICOBOOT_REBOOT_DELAY_MS 500    /* what rp2040_flash uses */

/* Open the USB device @busnum/@devnum's PICOBOOT interface and reboot it
 * into its flash (pc = sp = 0) after PICOBOOT_REBOOT_DELAY_MS. */
int picoboot_reboot_to_application(unsigned busnum, unsigned devnum);
