/* libFuzzer target: Klipper's printer.cfg as the daemon reads it
 * (core/printercfg.c): sections, options, continuation lines, comments,
 * the SAVE_CONFIG block and [include].  The input becomes a printer.cfg in a
 * scratch directory next to one extra file, so includes ("*", "extra.cfg",
 * the file itself) resolve there; inputs whose [include] lines hold a '/'
 * are skipped, as they could reach the rest of the file system.  The MCU
 * sections found are then matched against serial paths and CAN uuids. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/printercfg.h"
#include "fuzz-util.h"

static char input_path[320];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        static const char extra[] =
                "[mcu extra]\n"
                "serial: /dev/serial/by-id/usb-Klipper_rp2040_E6625C05E7-if00\n"
                "[include input]\n";
        char path[320];

        fuzz_setup_logging();
        fuzz_write_file("extra.cfg", (const uint8_t *) extra, sizeof(extra) - 1, path);
        return 0;
}

/* Does any line that starts an include name a path with a '/'? */
static bool include_leaves_directory(const uint8_t *data, size_t size) {
        size_t line = 0;

        while (line < size) {
                const uint8_t *nl = memchr(data + line, '\n', size - line);
                size_t end = nl ? (size_t) (nl - data) : size;

                if (end - line >= 8 && memcmp(data + line, "[include", 8) == 0 &&
                    memchr(data + line, '/', end - line))
                        return true;
                line = end + 1;
        }
        return false;
}

static void check_mcus(const struct printercfg *cfg) {
        for (size_t i = 0; i < cfg->n_mcus; i++) {
                const struct printercfg_mcu *m = &cfg->mcus[i];

                fuzz_check(m->name && strncmp(m->name, "mcu", 3) == 0);
                /* Section names are unique. */
                for (size_t j = 0; j < i; j++)
                        fuzz_check(strcmp(cfg->mcus[j].name, m->name) != 0);
                /* Values are stripped and never empty. */
                fuzz_check(!m->serial || *m->serial);
                fuzz_check(!m->canbus_uuid || *m->canbus_uuid);
                fuzz_check(!m->canbus_interface || *m->canbus_interface);
                fuzz_touch_string(m->serial);
                fuzz_touch_string(m->canbus_interface);
                if (m->canbus_uuid) {
                        for (const char *c = m->canbus_uuid; *c; c++)
                                fuzz_check(!(*c >= 'A' && *c <= 'Z'));
                        fuzz_check(printercfg_find_canbus(cfg, m->canbus_uuid) != NULL);
                }
                if (m->serial)
                        fuzz_check(printercfg_find_serial(cfg, m->serial, NULL, NULL) != NULL);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_(printercfg_freep) struct printercfg *cfg = NULL;
        int r;

        if (include_leaves_directory(data, size))
                return -1;      /* not added to the corpus */

        fuzz_write_file("input", data, size, input_path);
        r = printercfg_load(input_path, &cfg);
        /* The documented refusals (printercfg.h): an include that is not
         * a regular file ("[include .]"), a bound exceeded. */
        fuzz_check(r == 0 || r == -ENOMEM || r == -EISDIR || r == -EBADFD || r == -EFBIG || r == -E2BIG);
        if (r < 0)
                return 0;

        check_mcus(cfg);
        (void) printercfg_find_serial(cfg, "/dev/ttyACM0",
                                      "/dev/serial/by-id/usb-Klipper_stm32f446xx_2A0039-if00 "
                                      "/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1:1.0",
                                      "2A0039");
        (void) printercfg_find_serial(cfg, "/dev/ttyAMA0", NULL, NULL);
        (void) printercfg_find_canbus(cfg, "0E0D81E4210C");
        return 0;
}
