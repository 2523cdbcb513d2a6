/* Flashing an RP2040 in BOOTSEL mode through the boot ROM's PICOBOOT
 * interface, in the order of Klipper's rp2040_flash (protocols.md §7.3):
 * exclusive access, EXIT_XIP, FLASH_ERASE of every 4 KiB sector the image
 * covers, WRITE of the image in whole 256-byte pages (the last one padded
 * with 0xFF), then READ back and compare.
 *
 * The image must start on a sector boundary at or above the session's
 * app_start inside the flash window, so that erasing never takes bytes
 * that are not the image's.  Rebooting into the application is the reboot
 * step's job (picoboot_reboot_to_application()); UF2 parsing is the image
 * loader's. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "flash/flasher.h"
#include "proto/picoboot.h"
#include "shared/log.h"
#include "transport/usb.h"

/* Bytes per WRITE and READ command: whole pages, one sector. */
#define PICOBOOT_TRANSFER_CHUNK RP2040_FLASH_SECTOR_SIZE

static uint64_t round_up(uint64_t value, uint64_t unit) {
        return (value + unit - 1) / unit * unit;
}

static int picoboot_flash_fail(struct flash_session *s, struct picoboot_device *p, int r,
                               const char *what, uint64_t address) {
        switch (r) {
        case -ENODEV:
                return flash_session_fail(s, r, "The RP2040 disconnected during %s at 0x%08" PRIx64,
                                          what, address);
        case -ETIMEDOUT:
                return flash_session_fail(s, r, "The RP2040 stopped answering during %s at 0x%08" PRIx64,
                                          what, address);
        case -ENOMEM:
                return flash_session_fail(s, r, "Out of memory");
        default:
                if (p->last_status.code != PICOBOOT_OK)
                        return flash_session_fail(s, -EIO, "The RP2040 refused %s at 0x%08" PRIx64 ": %s",
                                                  what, address,
                                                  picoboot_status_to_string(p->last_status.code));
                return flash_session_fail(s, -EIO, "PICOBOOT %s failed at 0x%08" PRIx64 ": %s", what,
                                          address, strerror(-r));
        }
}

static int picoboot_check_range(struct flash_session *s) {
        uint64_t lowest = MAX(s->app_start, (uint64_t) RP2040_FLASH_BASE);
        uint64_t end = s->start + s->size;

        if (!s->data || s->size == 0)
                return flash_session_fail(s, -EINVAL, "The image is empty");
        if (s->start < lowest)
                return flash_session_fail(s, -EINVAL, "The image starts at 0x%08" PRIx64 ", below 0x%08"
                                          PRIx64, s->start, lowest);
        if (s->start % RP2040_FLASH_SECTOR_SIZE != 0)
                return flash_session_fail(s, -EINVAL, "The image starts at 0x%08" PRIx64 ", not on a "
                                          "%u-byte flash sector", s->start, RP2040_FLASH_SECTOR_SIZE);
        if (s->size > RP2040_FLASH_WINDOW || round_up(end, RP2040_FLASH_SECTOR_SIZE) >
            (uint64_t) RP2040_FLASH_BASE + RP2040_FLASH_WINDOW)
                return flash_session_fail(s, -EINVAL, "The image ends at 0x%08" PRIx64 ", beyond the "
                                          "flash", end);
        return 0;
}

static int picoboot_erase(struct flash_session *s, struct picoboot_device *p, uint64_t total) {
        int r;

        for (uint64_t off = 0; off < total; off += RP2040_FLASH_SECTOR_SIZE) {
                uint32_t address = (uint32_t) (s->start + off);

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled while erasing");
                r = picoboot_flash_erase(p, address, RP2040_FLASH_SECTOR_SIZE);
                if (r < 0)
                        return picoboot_flash_fail(s, p, r, "erase", address);
                flash_session_progress(s, FLASH_PHASE_ERASING, off + RP2040_FLASH_SECTOR_SIZE, total);
        }
        return 0;
}

static int picoboot_program(struct flash_session *s, struct picoboot_device *p, uint64_t total,
                            uint8_t *buf) {
        int r;

        for (uint64_t off = 0; off < total; off += PICOBOOT_TRANSFER_CHUNK) {
                uint32_t address = (uint32_t) (s->start + off);
                uint32_t len = (uint32_t) MIN((uint64_t) PICOBOOT_TRANSFER_CHUNK, total - off);

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled after %" PRIu64 " of %" PRIu64
                                                  " bytes; the RP2040 stays in BOOTSEL mode", off, total);
                flash_session_fill(s, address, buf, len);
                r = picoboot_write(p, address, buf, len);
                if (r < 0)
                        return picoboot_flash_fail(s, p, r, "write", address);
                flash_session_progress(s, FLASH_PHASE_WRITING, off + len, total);
        }
        return 0;
}

static int picoboot_verify(struct flash_session *s, struct picoboot_device *p, uint64_t total,
                           uint8_t *buf, uint8_t *want) {
        int r;

        for (uint64_t off = 0; off < total; off += PICOBOOT_TRANSFER_CHUNK) {
                uint32_t address = (uint32_t) (s->start + off);
                uint32_t len = (uint32_t) MIN((uint64_t) PICOBOOT_TRANSFER_CHUNK, total - off);
                ssize_t at;

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled while verifying");
                r = picoboot_read(p, address, buf, len);
                if (r < 0)
                        return picoboot_flash_fail(s, p, r, "read", address);
                flash_session_fill(s, address, want, len);
                at = flash_compare(buf, want, len);
                if (at >= 0)
                        return flash_session_fail(s, -EIO, "Verify failed at 0x%08" PRIx64 ": flash has "
                                                  "0x%02x, the image 0x%02x", (uint64_t) address + (uint64_t) at,
                                                  buf[at], want[at]);
                flash_session_progress(s, FLASH_PHASE_VERIFYING, off + len, total);
        }
        return 0;
}

static int picoboot_flash_write(struct flash_session *s) {
        _cleanup_(usb_closep) struct usb_device *usb = NULL;
        _cleanup_(picoboot_freep) struct picoboot_device *p = NULL;
        _cleanup_free_ uint8_t *buf = NULL, *want = NULL;
        uint64_t erase_total, write_total;
        int r;

        s->message[0] = '\0';
        if (s->link != FLASH_LINK_USB)
                return flash_session_fail(s, -EOPNOTSUPP, "The RP2040 boot ROM is reached over USB only");
        r = picoboot_check_range(s);
        if (r < 0)
                return r;
        erase_total = round_up(s->size, RP2040_FLASH_SECTOR_SIZE);
        write_total = round_up(s->size, RP2040_FLASH_PAGE_SIZE);

        buf = malloc(PICOBOOT_TRANSFER_CHUNK);
        want = malloc(PICOBOOT_TRANSFER_CHUNK);
        if (!buf || !want)
                return flash_session_fail(s, -ENOMEM, "Out of memory");

        r = usb_open_busdev(s->usb_busnum, s->usb_devnum, &usb);
        if (r < 0)
                return flash_session_fail(s, r, "Cannot open USB device %u/%u: %s", s->usb_busnum,
                                          s->usb_devnum, strerror(-r));
        r = picoboot_open(usb, &p);
        if (r < 0)
                return flash_session_fail(s, r, "Cannot use the PICOBOOT interface of USB device %u/%u: %s",
                                          s->usb_busnum, s->usb_devnum, strerror(-r));

        r = picoboot_exclusive_access(p, PICOBOOT_EXCLUSIVE);
        if (r < 0)
                return picoboot_flash_fail(s, p, r, "exclusive access", s->start);
        r = picoboot_exit_xip(p);
        if (r < 0)
                return picoboot_flash_fail(s, p, r, "EXIT_XIP", s->start);

        r = picoboot_erase(s, p, erase_total);
        if (r < 0)
                return r;
        r = picoboot_program(s, p, write_total, buf);
        if (r < 0)
                return r;
        r = picoboot_verify(s, p, write_total, buf, want);
        if (r < 0)
                return r;

        log_info("%s: wrote and verified %zu bytes at 0x%08" PRIx64 " through PICOBOOT", usb_name(usb),
                 s->size, s->start);
        return 0;
}

const struct flasher flasher_picoboot = {
        .bootloader = "picoboot",
        .write = picoboot_flash_write,
};
