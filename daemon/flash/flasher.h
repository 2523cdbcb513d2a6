/* The one flasher interface every bootloader protocol implements: a
 * struct flasher names a bootloader ("katapult", "stm32-dfu", "picoboot",
 * "linux" for the Linux process MCU's program)
 * and writes an image through it, described by a struct flash_session
 * (how to reach the bootloader, the bytes and where they go, a progress
 * callback and a cancel flag).  A flasher erases what the image needs,
 * writes it and reads it back to compare; it never touches memory below
 * the session's app_start (the bootloader) and never leaves the
 * bootloader: starting the application is the reboot step's job
 * (core/reboot.c), as is getting the MCU into its bootloader.
 *
 * write() is plain blocking code for a worker thread.  It returns 0, or a
 * negative errno with a sentence in session->message:
 *   -EMEDIUMTYPE   the bootloader is not what the image is built for (chip,
 *                  application start)
 *   -EINVAL        the image does not fit the bootloader's memory, or would
 *                  touch the bootloader region
 *   -ECANCELED     *cancel became true (checked between blocks)
 *   -ENODEV        the device went away
 *   -ETIMEDOUT     the bootloader stopped answering
 *   -EIO           the bootloader refused a step, or the read back differs
 *   other -errno   opening the link (-ENOENT, -EBUSY, -EACCES, …)
 * Adding a bootloader = one file in daemon/flash/ + one entry in
 * flasher.c's table. */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "shared/macro.h"

enum flash_link {
        FLASH_LINK_SERIAL,      /* a tty: USB CDC ACM or UART */
        FLASH_LINK_CAN,         /* a CAN node with an assigned node id */
        FLASH_LINK_USB,         /* a USB device by bus and device number */
        FLASH_LINK_FILE,        /* a program file on this host (the Linux process MCU) */
};

enum flash_phase {
        FLASH_PHASE_ERASING,
        FLASH_PHASE_WRITING,
        FLASH_PHASE_VERIFYING,
        _FLASH_PHASE_MAX,
};

#define FLASH_MESSAGE_MAX 256
#define FLASH_CAN_UUID_LEN 6

struct flash_session {
        /* ---- input: the link ---- */
        enum flash_link link;
        const char *device_path;        /* FLASH_LINK_SERIAL */
        unsigned baud;                  /* FLASH_LINK_SERIAL; 0: leave the speed alone (USB CDC) */
        const char *can_interface;      /* FLASH_LINK_CAN */
        unsigned can_nodeid;            /* FLASH_LINK_CAN: assigned already */
        bool check_can_uuid;            /* FLASH_LINK_CAN: compare GET_CANBUS_ID with can_uuid */
        uint8_t can_uuid[FLASH_CAN_UUID_LEN];   /* wire order */
        unsigned usb_busnum;            /* FLASH_LINK_USB */
        unsigned usb_devnum;
        const char *install_path;       /* FLASH_LINK_FILE: e.g. /usr/local/bin/klipper_mcu */

        /* ---- input: the image ---- */
        const uint8_t *data;            /* borrowed, one contiguous run of bytes */
        size_t size;
        uint64_t start;                 /* where data[0] goes */
        uint64_t app_start;             /* the bootloader's application start: nothing
                                         * below it is ever erased or written */
        const char *mcu_type;           /* chip the image is built for ("stm32f446xx");
                                         * NULL or "": not checked */

        /* ---- callbacks ---- */
        /* Called from the flasher's thread after each block/sector, with
         * bytes done and total of that phase. May be NULL. */
        void (*progress)(void *userdata, enum flash_phase phase, uint64_t done, uint64_t total);
        void *userdata;
        const atomic_bool *cancel;      /* may be NULL */

        /* ---- output ---- */
        char message[FLASH_MESSAGE_MAX];        /* why write() failed, "" on success */
};

struct flasher {
        const char *bootloader;         /* the Mcu.Bootloader value it serves */
        int (*write)(struct flash_session *s);
};

/* The implementations (flash/katapult.c, dfu.c, picoboot.c, linux.c). */
extern const struct flasher flasher_katapult;
extern const struct flasher flasher_stm32_dfu;
extern const struct flasher flasher_picoboot;
extern const struct flasher flasher_linux;

/* The Linux process MCU's roll-back (flash/linux.c): put @path.old, kept by
 * the last install, back at @path.  0, or a negative errno with the reason
 * in @message. */
int flasher_linux_restore(const char *path, char *message, size_t message_size);

/* The flasher for @bootloader, or NULL when none is implemented. */
const struct flasher *flasher_find(const char *bootloader);

/* "erasing", "writing", "verifying" (the Job.Phase names). */
const char *flash_phase_to_string(enum flash_phase phase);

/* ---- helpers for flasher implementations ---- */

/* Has the caller asked to stop? */
bool flash_session_cancelled(const struct flash_session *s);

/* Report progress if the session has a callback. */
void flash_session_progress(struct flash_session *s, enum flash_phase phase, uint64_t done,
                            uint64_t total);

/* Record a message for failure @error (negative errno) in s->message,
 * log it, and return @error.  An existing message is kept (the first
 * reason wins). */
int flash_session_fail(struct flash_session *s, int error, const char *format, ...) _printf_(3, 4);

/* Fill @buf (@size bytes) with the image bytes at @address: image bytes
 * where the image has them, 0xFF (erased flash) elsewhere. */
void flash_session_fill(const struct flash_session *s, uint64_t address, uint8_t *buf, size_t size);

/* Find the first byte where @got and @want differ: its index, or -1. */
ssize_t flash_compare(const uint8_t *got, const uint8_t *want, size_t size);
