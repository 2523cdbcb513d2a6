/* Flashing an STM32 through its ROM's USB DFU bootloader with ST's DfuSe
 * extensions (protocols.md §6), as dfu-util does it: open the device by bus
 * and device number, alt setting 0, bring it to dfuIDLE, check that every
 * sector the image covers is an erasable and writable sector of the memory
 * layout and lies at or above the session's app_start (the bootloader
 * Klipper may sit behind is never touched), erase those sectors, download
 * the image in wTransferSize chunks (set address + DNLOAD block 2, polling
 * GETSTATUS as bwPollTimeout demands), and upload it again to compare.
 *
 * The device is left in dfuIDLE: leaving DFU mode for the application is
 * the reboot step's job (dfu_leave_to_application()).  Mass erase and read
 * unprotect are never used. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "flash/flasher.h"
#include "proto/dfu.h"
#include "shared/log.h"
#include "transport/usb.h"

/* Uploads use block numbers 2, 3, … from one address; set the address
 * again after this many blocks so that wBlockNum never overflows. */
#define DFU_UPLOAD_BLOCKS_PER_ADDRESS 1024u

static int dfu_flash_fail(struct flash_session *s, struct dfu_device *d, int r, const char *what,
                          uint64_t address) {
        switch (r) {
        case -ENODEV:
                return flash_session_fail(s, r, "The DFU device disconnected during %s at 0x%08" PRIx64,
                                          what, address);
        case -ETIMEDOUT:
                return flash_session_fail(s, r, "The DFU device stopped answering during %s at 0x%08"
                                          PRIx64, what, address);
        case -ECANCELED:
        case -ENOMEM:
                return flash_session_fail(s, r, "%s failed: %s", what, strerror(-r));
        case -EREMOTEIO:
                return flash_session_fail(s, -EIO, "The DFU device reported %s during %s at 0x%08" PRIx64,
                                          dfu_status_to_string(d->last_status.status), what, address);
        case -EPIPE:
                return flash_session_fail(s, -EIO, "The DFU device refused (stalled) %s at 0x%08" PRIx64,
                                          what, address);
        default:
                return flash_session_fail(s, -EIO, "DFU %s failed at 0x%08" PRIx64 ": %s", what, address,
                                          strerror(-r));
        }
}

/* Check that [start, end) is covered by erasable, writable, readable
 * sectors at or above the allowed start; return the bytes of the sectors
 * to erase. */
static int dfu_check_range(struct flash_session *s, const struct dfu_device *d, uint64_t *ret_erase_total) {
        uint64_t end = s->start + s->size, address = s->start, total = 0;
        uint32_t sector_start, sector_size;
        uint8_t flags;
        int r;

        while (address < end) {
                r = dfu_layout_sector(d->layout, (uint32_t) address, &sector_start, &sector_size, &flags);
                if (r < 0)
                        return flash_session_fail(s, -EINVAL,
                                                  "0x%08" PRIx64 " is outside the memory of the DFU device "
                                                  "(layout \"%s\")", address, d->alt_name);
                if ((flags & (DFU_SEGMENT_ERASABLE | DFU_SEGMENT_WRITABLE | DFU_SEGMENT_READABLE)) !=
                    (DFU_SEGMENT_ERASABLE | DFU_SEGMENT_WRITABLE | DFU_SEGMENT_READABLE))
                        return flash_session_fail(s, -EINVAL,
                                                  "The sector at 0x%08" PRIx32 " is not erasable, writable "
                                                  "and readable", sector_start);
                if (sector_start < s->app_start)
                        return flash_session_fail(s, -EINVAL,
                                                  "Writing 0x%08" PRIx64 " would erase the sector at 0x%08"
                                                  PRIx32 ", below the application start 0x%08" PRIx64
                                                  " (the bootloader)", address, sector_start, s->app_start);
                total += sector_size;
                address = (uint64_t) sector_start + sector_size;
        }
        *ret_erase_total = total;
        return 0;
}

static int dfu_erase(struct flash_session *s, struct dfu_device *d, uint64_t erase_total) {
        uint64_t end = s->start + s->size, address = s->start, done = 0;
        uint32_t sector_start, sector_size;
        int r;

        while (address < end) {
                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled while erasing");
                r = dfu_layout_sector(d->layout, (uint32_t) address, &sector_start, &sector_size, NULL);
                if (r < 0)
                        return dfu_flash_fail(s, d, r, "erase", address);
                r = dfuse_erase_sector(d, sector_start);
                if (r < 0)
                        return dfu_flash_fail(s, d, r, "erase", sector_start);
                done += sector_size;
                flash_session_progress(s, FLASH_PHASE_ERASING, done, erase_total);
                address = (uint64_t) sector_start + sector_size;
        }
        return 0;
}

static int dfu_download(struct flash_session *s, struct dfu_device *d) {
        size_t chunk = d->functional.transfer_size;
        int r;

        for (size_t off = 0; off < s->size; off += chunk) {
                uint32_t address = (uint32_t) (s->start + off);
                size_t len = MIN(chunk, s->size - off);

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled after %zu of %zu bytes; the "
                                                  "MCU stays in its DFU bootloader", off, s->size);
                r = dfuse_set_address(d, address);
                if (r < 0)
                        return dfu_flash_fail(s, d, r, "set address", address);
                r = dfu_download_block(d, 2, s->data + off, len);
                if (r < 0)
                        return dfu_flash_fail(s, d, r, "download", address);
                flash_session_progress(s, FLASH_PHASE_WRITING, off + len, s->size);
        }
        return 0;
}

static int dfu_verify(struct flash_session *s, struct dfu_device *d) {
        size_t chunk = d->functional.transfer_size;
        _cleanup_free_ uint8_t *buf = NULL;
        int r;

        buf = malloc(chunk);
        if (!buf)
                return flash_session_fail(s, -ENOMEM, "Out of memory");

        for (size_t off = 0, n = 0; off < s->size; off += chunk, n++) {
                uint32_t address = (uint32_t) (s->start + off);
                size_t len = MIN(chunk, s->size - off);
                ssize_t at;

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled while verifying");
                if (n % DFU_UPLOAD_BLOCKS_PER_ADDRESS == 0) {
                        r = dfu_ensure_idle(d);
                        if (r < 0)
                                return dfu_flash_fail(s, d, r, "verify", address);
                        r = dfuse_set_address(d, address);
                        if (r < 0)
                                return dfu_flash_fail(s, d, r, "set address", address);
                }
                r = dfu_upload_block(d, (uint16_t) (2 + n % DFU_UPLOAD_BLOCKS_PER_ADDRESS), buf, len);
                if (r < 0)
                        return dfu_flash_fail(s, d, r, "upload", address);
                if ((size_t) r != len)
                        return flash_session_fail(s, -EIO, "The DFU device returned %d of %zu bytes at "
                                                  "0x%08" PRIx32, r, len, address);
                at = flash_compare(buf, s->data + off, len);
                if (at >= 0)
                        return flash_session_fail(s, -EIO, "Verify failed at 0x%08" PRIx64 ": flash has "
                                                  "0x%02x, the image 0x%02x", (uint64_t) address + (uint64_t) at,
                                                  buf[at], s->data[off + at]);
                flash_session_progress(s, FLASH_PHASE_VERIFYING, off + len, s->size);
        }
        return 0;
}

static int dfu_write(struct flash_session *s) {
        _cleanup_(usb_closep) struct usb_device *usb = NULL;
        _cleanup_(dfu_freep) struct dfu_device *d = NULL;
        uint64_t erase_total = 0;
        int r;

        s->message[0] = '\0';
        if (s->link != FLASH_LINK_USB)
                return flash_session_fail(s, -EOPNOTSUPP, "The STM32 DFU bootloader is reached over USB only");
        if (!s->data || s->size == 0)
                return flash_session_fail(s, -EINVAL, "The image is empty");
        if (s->start > UINT32_MAX || s->size > UINT32_MAX - s->start + 1)
                return flash_session_fail(s, -EINVAL, "The image does not fit in a 32-bit address space");

        r = usb_open_busdev(s->usb_busnum, s->usb_devnum, &usb);
        if (r < 0)
                return flash_session_fail(s, r, "Cannot open USB device %u/%u: %s", s->usb_busnum,
                                          s->usb_devnum, strerror(-r));
        r = dfu_open(usb, 0, &d);
        if (r < 0)
                return flash_session_fail(s, r == -EBADMSG ? -EIO : r,
                                          "Cannot use the DFU interface of USB device %u/%u: %s",
                                          s->usb_busnum, s->usb_devnum, strerror(-r));
        if (!d->dfuse || !d->layout)
                return flash_session_fail(s, -EMEDIUMTYPE,
                                          "USB device %u/%u is a DFU device without ST's DfuSe memory layout",
                                          s->usb_busnum, s->usb_devnum);

        r = dfu_check_range(s, d, &erase_total);
        if (r < 0)
                return r;

        r = dfu_ensure_idle(d);
        if (r < 0)
                return dfu_flash_fail(s, d, r, "reset to dfuIDLE", s->start);

        r = dfu_erase(s, d, erase_total);
        if (r < 0)
                return r;
        r = dfu_download(s, d);
        if (r < 0)
                return r;
        r = dfu_verify(s, d);
        if (r < 0)
                return r;

        r = dfu_ensure_idle(d);
        if (r < 0)
                return dfu_flash_fail(s, d, r, "reset to dfuIDLE", s->start + s->size);

        log_info("%s: wrote and verified %zu bytes at 0x%08" PRIx64 " through DFU", usb_name(usb),
                 s->size, s->start);
        return 0;
}

const struct flasher flasher_stm32_dfu = {
        .bootloader = "stm32-dfu",
        .write = dfu_write,
};
