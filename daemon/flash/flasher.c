/* The table of flashers (one per bootloader protocol) and the small
 * helpers they share: cancel checks, progress reports, failure messages,
 * padding and comparing.  The flashing itself is in katapult.c, dfu.c,
 * picoboot.c and linux.c next to this file. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "flash/flasher.h"
#include "shared/log.h"

static const struct flasher *const flashers[] = {
        &flasher_katapult,
        &flasher_stm32_dfu,
        &flasher_picoboot,
        &flasher_linux,
};

const struct flasher *flasher_find(const char *bootloader) {
        if (!bootloader)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(flashers); i++)
                if (streq(flashers[i]->bootloader, bootloader))
                        return flashers[i];
        return NULL;
}

const char *flash_phase_to_string(enum flash_phase phase) {
        static const char *const names[_FLASH_PHASE_MAX] = {
                [FLASH_PHASE_ERASING] = "erasing",
                [FLASH_PHASE_WRITING] = "writing",
                [FLASH_PHASE_VERIFYING] = "verifying",
        };

        if ((unsigned) phase >= _FLASH_PHASE_MAX)
                return "unknown";
        return names[phase];
}

bool flash_session_cancelled(const struct flash_session *s) {
        return s->cancel && atomic_load(s->cancel);
}

void flash_session_progress(struct flash_session *s, enum flash_phase phase, uint64_t done,
                            uint64_t total) {
        if (s->progress)
                s->progress(s->userdata, phase, done, total);
}

int flash_session_fail(struct flash_session *s, int error, const char *format, ...) {
        va_list ap;

        if (error > 0)
                error = -error;
        if (s->message[0] == '\0') {
                va_start(ap, format);
                vsnprintf(s->message, sizeof(s->message), format, ap);
                va_end(ap);
        }
        log_warning("Flashing failed: %s", s->message);
        return error;
}

void flash_session_fill(const struct flash_session *s, uint64_t address, uint8_t *buf, size_t size) {
        uint64_t end = address + size, image_end = s->start + s->size;
        uint64_t from, to;

        memset(buf, 0xff, size);
        from = MAX(address, s->start);
        to = MIN(end, image_end);
        if (from < to)
                memcpy(buf + (from - address), s->data + (from - s->start), (size_t) (to - from));
}

ssize_t flash_compare(const uint8_t *got, const uint8_t *want, size_t size) {
        for (size_t i = 0; i < size; i++)
                if (got[i] != want[i])
                        return (ssize_t) i;
        return -1;
}
