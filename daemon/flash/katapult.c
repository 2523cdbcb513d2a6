/* Flashing through Katapult, the way its flashtool.py does it (protocols.md
 * §5.4): CONNECT (the bootloader must be built for the image's chip and
 * start its application where the image starts), on CAN GET_CANBUS_ID
 * against the expected uuid, SEND_BLOCK for every block_size chunk (the
 * last one padded with 0xFF), SEND_EOF, then REQUEST_BLOCK for every block
 * and a byte-by-byte comparison.  Katapult erases each page itself when its
 * first block arrives, so there is no separate erase phase.
 *
 * COMPLETE is not sent: leaving the bootloader is the reboot step's job,
 * and an MCU whose flash failed stays in Katapult where the next attempt
 * finds it.  Requesting the bootloader and assigning the CAN node id are
 * done before (core/reboot.c, proto/canbus.h). */
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <strings.h>

#include "flash/flasher.h"
#include "proto/katapult.h"
#include "shared/log.h"
#include "transport/can.h"
#include "transport/serial.h"

static int katapult_open_link(struct flash_session *s, struct transport **ret) {
        int r;

        switch (s->link) {
        case FLASH_LINK_SERIAL:
                if (isempty(s->device_path))
                        return flash_session_fail(s, -EINVAL, "No serial device to reach Katapult on");
                r = serial_transport_open(s->device_path, s->baud, ret);
                if (r < 0)
                        return flash_session_fail(s, r, "Cannot open %s: %s", s->device_path,
                                                  strerror(-r));
                return 0;
        case FLASH_LINK_CAN:
                if (isempty(s->can_interface))
                        return flash_session_fail(s, -EINVAL, "No CAN interface to reach Katapult on");
                r = can_stream_transport_open(s->can_interface, s->can_nodeid, ret);
                if (r < 0)
                        return flash_session_fail(s, r, "Cannot open CAN node %u on %s: %s",
                                                  s->can_nodeid, s->can_interface, strerror(-r));
                return 0;
        default:
                return flash_session_fail(s, -EOPNOTSUPP, "Katapult is reached over serial or CAN only");
        }
}

/* What went wrong in the exchange of @what as a sentence, returning the error. */
static int katapult_fail(struct flash_session *s, int r, const char *what, uint32_t address) {
        switch (r) {
        case -ENODEV:
                return flash_session_fail(s, r, "Katapult disconnected during %s at 0x%08" PRIx32,
                                          what, address);
        case -ETIMEDOUT:
                return flash_session_fail(s, r, "Katapult stopped answering during %s at 0x%08" PRIx32,
                                          what, address);
        case -ENOMEM:
                return flash_session_fail(s, r, "Out of memory");
        default:
                return flash_session_fail(s, -EIO, "Katapult failed %s at 0x%08" PRIx32 ": %s", what,
                                          address, strerror(-r));
        }
}

static int katapult_check_target(struct flash_session *s, struct transport *t,
                                 const struct katapult_info *info) {
        uint8_t uuid[KATAPULT_UUID_LEN];
        int r;

        if (!isempty(s->mcu_type) && strcasecmp(s->mcu_type, info->mcu) != 0)
                return flash_session_fail(s, -EMEDIUMTYPE, "The image is built for %s, this MCU is %s",
                                          s->mcu_type, info->mcu);
        if (info->app_start != s->start)
                return flash_session_fail(s, -EMEDIUMTYPE,
                                          "The image starts at 0x%08" PRIx64 ", Katapult starts the "
                                          "application at 0x%08" PRIx32, s->start, info->app_start);
        if (s->app_start != 0 && s->app_start != info->app_start)
                return flash_session_fail(s, -EMEDIUMTYPE,
                                          "Katapult starts the application at 0x%08" PRIx32
                                          ", expected 0x%08" PRIx64, info->app_start, s->app_start);
        if (s->link != FLASH_LINK_CAN || !s->check_can_uuid)
                return 0;

        r = katapult_get_canbus_id(t, uuid);
        if (r < 0)
                return katapult_fail(s, r, "GET_CANBUS_ID", 0);
        if (memcmp(uuid, s->can_uuid, KATAPULT_UUID_LEN) != 0)
                return flash_session_fail(s, -EMEDIUMTYPE,
                                          "CAN node %u is %02x%02x%02x%02x%02x%02x, not the MCU to flash",
                                          s->can_nodeid, uuid[0], uuid[1], uuid[2], uuid[3], uuid[4],
                                          uuid[5]);
        return 0;
}

static int katapult_write(struct flash_session *s) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        struct katapult_info info = {};
        uint8_t block[KATAPULT_BLOCK_SIZE_MAX], readback[KATAPULT_BLOCK_SIZE_MAX];
        uint64_t total;
        int r;

        s->message[0] = '\0';
        if (!s->data || s->size == 0)
                return flash_session_fail(s, -EINVAL, "The image is empty");
        if (s->start > UINT32_MAX || s->size > UINT32_MAX - s->start)
                return flash_session_fail(s, -EINVAL, "The image does not fit in a 32-bit address space");

        r = katapult_open_link(s, &t);
        if (r < 0)
                return r;

        /* flashtool primes USB links of some STM32 parts; the answer is
         * thrown away, so it does no harm elsewhere. */
        if (s->link == FLASH_LINK_SERIAL) {
                r = katapult_prime(t);
                if (r < 0)
                        return katapult_fail(s, r, "the link check", 0);
        }

        r = katapult_connect(t, KATAPULT_TIMEOUT_MS_DEFAULT, &info);
        if (r == -ETIMEDOUT || r == -EBADMSG) {
                /* A broken-off transfer may have left half a frame behind:
                 * Katapult then waits for its rest (timeouts) or, once our
                 * CONNECTs complete it, NACKs the garbled whole. */
                r = katapult_resync(t);
                if (r >= 0)
                        r = katapult_connect(t, KATAPULT_TIMEOUT_MS_DEFAULT, &info);
        }
        if (r < 0)
                return katapult_fail(s, r, "CONNECT", 0);
        r = katapult_check_target(s, t, &info);
        if (r < 0)
                return r;

        total = (s->size + info.block_size - 1) / info.block_size * info.block_size;

        for (uint64_t off = 0; off < total; off += info.block_size) {
                uint32_t address = (uint32_t) (s->start + off);

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled after %" PRIu64 " of %"
                                                  PRIu64 " bytes; Katapult stays in its bootloader",
                                                  off, total);
                flash_session_fill(s, address, block, info.block_size);
                r = katapult_send_block(t, address, block, info.block_size);
                if (r < 0)
                        return katapult_fail(s, r, "SEND_BLOCK", address);
                flash_session_progress(s, FLASH_PHASE_WRITING, off + info.block_size, total);
        }

        r = katapult_send_eof(t, NULL);
        if (r < 0)
                return katapult_fail(s, r, "SEND_EOF", (uint32_t) (s->start + total));

        for (uint64_t off = 0; off < total; off += info.block_size) {
                uint32_t address = (uint32_t) (s->start + off);
                ssize_t at;

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled while verifying");
                r = katapult_request_block(t, address, readback, info.block_size);
                if (r < 0)
                        return katapult_fail(s, r, "REQUEST_BLOCK", address);
                flash_session_fill(s, address, block, info.block_size);
                at = flash_compare(readback, block, info.block_size);
                if (at >= 0)
                        return flash_session_fail(s, -EIO,
                                                  "Verify failed at 0x%08" PRIx64 ": flash has 0x%02x, "
                                                  "the image 0x%02x", (uint64_t) address + (uint64_t) at,
                                                  readback[at], block[at]);
                flash_session_progress(s, FLASH_PHASE_VERIFYING, off + info.block_size, total);
        }

        log_info("%s: wrote and verified %zu bytes at 0x%08" PRIx64 " through Katapult (%s)",
                 t->description ?: "Katapult", s->size, s->start, info.mcu);
        return 0;
}

const struct flasher flasher_katapult = {
        .bootloader = "katapult",
        .write = katapult_write,
};
