/* libFuzzer target: the daemon's configuration file (core/config.c) and
 * its time spans (parse_sec).  The input is written as mcuflashd.conf to a
 * scratch directory and read with config_load(): a file is applied whole or
 * not at all, and what it sets must be what mcuflashd.conf(5) allows
 * (absolute paths, a .service unit, absolute serial devices, numeric
 * [Mcu …] FlashStart=/FlashSize=).  The input is also read as one time span,
 * which must re-read the same when printed back in microseconds. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "fuzz-util.h"

static char input_path[320];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static bool str_eq(const char *a, const char *b) {
        return a == b || (a && b && strcmp(a, b) == 0);
}

/* Nothing of @c differs from the defaults in @d. */
static void check_unchanged(const struct config *c, const struct config *d) {
        fuzz_check(str_eq(c->klipper_path, d->klipper_path));
        fuzz_check(str_eq(c->printer_config, d->printer_config));
        fuzz_check(str_eq(c->api_socket, d->api_socket));
        fuzz_check(str_eq(c->klipper_service, d->klipper_service));
        fuzz_check(!c->extra_serial_devices && !c->mcu_settings);
        fuzz_check(c->identify_timeout_usec == d->identify_timeout_usec);
        fuzz_check(c->offline_timeout_usec == d->offline_timeout_usec);
        fuzz_check(c->bootloader_timeout_usec == d->bootloader_timeout_usec);
        fuzz_check(c->job_retention_usec == d->job_retention_usec);
}

static void check_loaded(const struct config *c) {
        size_t len;

        fuzz_check(!c->klipper_path || c->klipper_path[0] == '/');
        fuzz_check(!c->printer_config || c->printer_config[0] == '/');
        fuzz_check(!c->api_socket || c->api_socket[0] == '/');
        fuzz_check(c->klipper_service);
        len = strlen(c->klipper_service);
        fuzz_check(len > 8 && strcmp(c->klipper_service + len - 8, ".service") == 0);
        for (char **s = c->extra_serial_devices; s && *s; s++)
                fuzz_check((*s)[0] == '/');
        fuzz_check(c->identify_timeout_usec > 0 && c->bootloader_timeout_usec > 0);

        /* Every [Mcu ID] entry is "ID\nKey=Value"; the getters find a value
         * for each, and the numbers are decimal. */
        for (char **e = c->mcu_settings; e && *e; e++) {
                _cleanup_free_ char *id = NULL, *key = NULL;
                const char *nl = strchr(*e, '\n'), *eq;
                uint64_t v;

                fuzz_check(nl);
                eq = strchr(nl + 1, '=');
                fuzz_check(eq);
                id = strndup(*e, (size_t) (nl - *e));
                key = strndup(nl + 1, (size_t) (eq - nl - 1));
                if (!id || !key)
                        abort();
                fuzz_check(config_mcu_get(c, id, key) != NULL);
                if (strcmp(key, "FlashSize") == 0) {
                        fuzz_check(config_mcu_flash_size(c, id, &v) == 0);
                        fuzz_check(v > 0);
                }
                if (strcmp(key, "FlashStart") == 0)
                        fuzz_check(config_mcu_flash_start(c, id, &v) == 0);
        }
}

static void check_parse_sec(const uint8_t *data, size_t size) {
        _cleanup_free_ char *s = fuzz_strndup(data, size);
        char again[64];
        uint64_t usec, usec2;

        if (parse_sec(s, &usec) < 0)
                return;
        (void) snprintf(again, sizeof(again), "%" PRIu64 "us", usec);
        fuzz_check(parse_sec(again, &usec2) == 0 && usec2 == usec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_(config_freep) struct config *c = NULL, *defaults = NULL;
        int r;

        fuzz_check(config_new(&c) == 0 && config_new(&defaults) == 0);
        fuzz_write_file("input", data, size, input_path);
        r = config_load(c, input_path, false);
        if (r < 0) {
                fuzz_check(r == -EINVAL || r == -ENOMEM);
                check_unchanged(c, defaults);
        } else
                check_loaded(c);

        check_parse_sec(data, size);
        return 0;
}
