/* Reader for mcuflashd.conf(5), a systemd-style INI file: "[Section]"
 * headers, "Key=Value" assignments, whole-line comments starting with # or ;.
 * It knows the [Klipper] and [Discovery] sections, validates every value and
 * reports problems with file:line.  A file is applied all or nothing: it is
 * parsed into a copy of the configuration which replaces the caller's only
 * when the whole file was valid.  It does not watch the file or reload it;
 * the daemon reads it once at start-up. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "shared/log.h"
#include "shared/macro.h"
#include "shared/strutil.h"

#define USEC_PER_SEC UINT64_C(1000000)
#define DEFAULT_KLIPPER_SERVICE "klipper.service"
#define DEFAULT_IDENTIFY_TIMEOUT_USEC (5 * USEC_PER_SEC)
#define DEFAULT_OFFLINE_TIMEOUT_USEC (600 * USEC_PER_SEC)
#define DEFAULT_BOOTLOADER_TIMEOUT_USEC (15 * USEC_PER_SEC)
#define DEFAULT_JOB_RETENTION_USEC (600 * USEC_PER_SEC)

/* Position in the file being parsed, for messages. */
struct config_location {
        const char *path;
        unsigned line;
};

int config_new(struct config **ret) {
        _cleanup_(config_freep) struct config *c = NULL;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->klipper_service = strdup(DEFAULT_KLIPPER_SERVICE);
        if (!c->klipper_service)
                return -ENOMEM;
        c->identify_timeout_usec = DEFAULT_IDENTIFY_TIMEOUT_USEC;
        c->offline_timeout_usec = DEFAULT_OFFLINE_TIMEOUT_USEC;
        c->bootloader_timeout_usec = DEFAULT_BOOTLOADER_TIMEOUT_USEC;
        c->job_retention_usec = DEFAULT_JOB_RETENTION_USEC;

        *ret = TAKE_PTR(c);
        return 0;
}

struct config *config_free(struct config *c) {
        if (!c)
                return NULL;
        free(c->klipper_path);
        free(c->printer_config);
        free(c->api_socket);
        free(c->klipper_service);
        strv_free(c->extra_serial_devices);
        strv_free(c->mcu_settings);
        free(c);
        return NULL;
}

static int config_copy(const struct config *c, struct config **ret) {
        _cleanup_(config_freep) struct config *copy = NULL;

        copy = calloc(1, sizeof(*copy));
        if (!copy)
                return -ENOMEM;
        if (free_and_strdup(&copy->klipper_path, c->klipper_path) < 0 ||
            free_and_strdup(&copy->printer_config, c->printer_config) < 0 ||
            free_and_strdup(&copy->api_socket, c->api_socket) < 0 ||
            free_and_strdup(&copy->klipper_service, c->klipper_service) < 0 ||
            strv_copy(c->extra_serial_devices, &copy->extra_serial_devices) < 0 ||
            strv_copy(c->mcu_settings, &copy->mcu_settings) < 0)
                return -ENOMEM;
        copy->identify_timeout_usec = c->identify_timeout_usec;
        copy->offline_timeout_usec = c->offline_timeout_usec;
        copy->bootloader_timeout_usec = c->bootloader_timeout_usec;
        copy->job_retention_usec = c->job_retention_usec;

        *ret = TAKE_PTR(copy);
        return 0;
}

/* Move every field of @from into @to (whose old contents are freed). */
static void config_replace(struct config *to, struct config *from) {
        free(to->klipper_path);
        free(to->printer_config);
        free(to->api_socket);
        free(to->klipper_service);
        strv_free(to->extra_serial_devices);
        strv_free(to->mcu_settings);
        *to = *from;
        memset(from, 0, sizeof(*from));
}

/* Time units accepted after a number, in the spirit of systemd.time(7). */
static const struct {
        const char *suffix;
        uint64_t usec;
} time_units[] = {
        { "us",      1 },
        { "usec",    1 },
        { "ms",      1000 },
        { "msec",    1000 },
        { "s",       USEC_PER_SEC },
        { "sec",     USEC_PER_SEC },
        { "second",  USEC_PER_SEC },
        { "seconds", USEC_PER_SEC },
        { "m",       60 * USEC_PER_SEC },
        { "min",     60 * USEC_PER_SEC },
        { "minute",  60 * USEC_PER_SEC },
        { "minutes", 60 * USEC_PER_SEC },
        { "h",       3600 * USEC_PER_SEC },
        { "hr",      3600 * USEC_PER_SEC },
        { "hour",    3600 * USEC_PER_SEC },
        { "hours",   3600 * USEC_PER_SEC },
};

int parse_sec(const char *s, uint64_t *ret_usec) {
        uint64_t whole = 0, frac = 0, frac_scale = 1, unit = USEC_PER_SEC, usec;
        const char *p = s;
        bool have_digits = false;

        if (!s)
                return -EINVAL;

        while (isspace((unsigned char) *p))
                p++;

        for (; isdigit((unsigned char) *p); p++) {
                unsigned digit = (unsigned) (*p - '0');

                if (whole > (UINT64_MAX - digit) / 10)
                        return -ERANGE;
                whole = whole * 10 + digit;
                have_digits = true;
        }
        if (*p == '.') {
                p++;
                for (; isdigit((unsigned char) *p); p++) {
                        /* Digits beyond a nanosecond of a second cannot
                         * change the microsecond result of any unit. */
                        if (frac_scale < UINT64_C(1000000000000)) {
                                frac = frac * 10 + (uint64_t) (*p - '0');
                                frac_scale *= 10;
                        }
                        have_digits = true;
                }
        }
        if (!have_digits)
                return -EINVAL;

        while (isspace((unsigned char) *p))
                p++;

        if (*p) {
                size_t len = strlen(p);
                bool found = false;

                while (len > 0 && isspace((unsigned char) p[len - 1]))
                        len--;
                for (size_t i = 0; i < ELEMENTSOF(time_units); i++)
                        if (strlen(time_units[i].suffix) == len &&
                            strncmp(time_units[i].suffix, p, len) == 0) {
                                unit = time_units[i].usec;
                                found = true;
                                break;
                        }
                if (!found)
                        return -EINVAL;
        }

        if (whole > UINT64_MAX / unit)
                return -ERANGE;
        usec = whole * unit;
        /* frac < frac_scale <= 10^12 and unit <= 3.6e9: the product needs
         * 72 bits at most. */
        frac = (uint64_t) ((unsigned __int128) frac * unit / frac_scale);
        if (usec > UINT64_MAX - frac)
                return -ERANGE;

        *ret_usec = usec + frac;
        return 0;
}

static bool path_is_absolute(const char *p) {
        return p[0] == '/';
}

/* PrinterConfig=, Path=, ApiSocket=: an absolute path, or empty to unset. */
static int assign_path(const struct config_location *loc, const char *key,
                       const char *value, char **field) {
        if (isempty(value))
                return free_and_strdup(field, NULL) < 0 ? -ENOMEM : 0;

        if (!path_is_absolute(value)) {
                log_error("%s:%u: %s= must be an absolute path, got '%s'.",
                          loc->path, loc->line, key, value);
                return -EINVAL;
        }
        return free_and_strdup(field, value) < 0 ? -ENOMEM : 0;
}

static bool unit_name_is_valid(const char *name) {
        const char *suffix = ".service";
        size_t len = strlen(name), suffix_len = strlen(suffix);

        if (len <= suffix_len || len > 255 || !streq(name + len - suffix_len, suffix))
                return false;
        for (const char *p = name; *p; p++)
                if (!isalnum((unsigned char) *p) && !strchr(":-_.\\@", *p))
                        return false;
        return true;
}

static int assign_service(const struct config_location *loc, const char *value,
                          char **field) {
        if (isempty(value))
                return free_and_strdup(field, DEFAULT_KLIPPER_SERVICE) < 0 ? -ENOMEM : 0;

        if (!unit_name_is_valid(value)) {
                log_error("%s:%u: Service= must be a unit name ending in .service, got '%s'.",
                          loc->path, loc->line, value);
                return -EINVAL;
        }
        return free_and_strdup(field, value) < 0 ? -ENOMEM : 0;
}

/* SerialDevices=: a space separated list appended to what is there; an
 * empty value clears the list. */
static int assign_serial_devices(const struct config_location *loc, const char *value,
                                 char ***list) {
        _cleanup_(strv_freep) char **extended = NULL;
        _cleanup_free_ char *copy = NULL;
        char *word, *save = NULL;
        int r;

        if (isempty(value)) {
                *list = strv_free(*list);
                return 0;
        }

        copy = strdup(value);
        if (!copy)
                return -ENOMEM;

        /* Validate all words first so that a bad entry changes nothing. */
        r = strv_copy(*list, &extended);
        if (r < 0)
                return r;
        for (word = strtok_r(copy, " \t", &save); word; word = strtok_r(NULL, " \t", &save)) {
                if (!path_is_absolute(word)) {
                        log_error("%s:%u: SerialDevices= entries must be absolute paths, got '%s'.",
                                  loc->path, loc->line, word);
                        return -EINVAL;
                }
                if (strv_contains(extended, word))
                        continue;
                r = strv_extend(&extended, word);
                if (r < 0)
                        return r;
        }

        strv_free(*list);
        *list = TAKE_PTR(extended);
        return 0;
}

static int assign_timeout(const struct config_location *loc, const char *key,
                          const char *value, uint64_t default_usec, bool zero_ok,
                          uint64_t *field) {
        uint64_t usec;

        if (isempty(value)) {
                *field = default_usec;
                return 0;
        }

        if (parse_sec(value, &usec) < 0) {
                log_error("%s:%u: Invalid time span for %s=: '%s'.",
                          loc->path, loc->line, key, value);
                return -EINVAL;
        }
        if (usec == 0 && !zero_ok) {
                log_error("%s:%u: %s= must be greater than zero.", loc->path, loc->line, key);
                return -EINVAL;
        }
        *field = usec;
        return 0;
}

enum config_section {
        SECTION_NONE,
        SECTION_KLIPPER,
        SECTION_DISCOVERY,
        SECTION_JOBS,
        SECTION_MCU,
        SECTION_UNKNOWN,
};

/* The id of the [Mcu ID] section being read (parser state). */
struct config_mcu_section {
        char id[128];
};

/* [Mcu ID] keys are kept as "ID\nKey=Value" entries (a line of the file
 * cannot hold a newline), looked up by config_mcu_get(); the last one wins. */
static int add_mcu_setting(struct config *c, const char *id, const char *key, const char *value) {
        _cleanup_free_ char *entry = NULL;

        if (asprintf(&entry, "%s\n%s=%s", id, key, value) < 0)
                return -ENOMEM;
        return strv_extend(&c->mcu_settings, entry);
}

/* "524288", "0x80000", "512K", "512KiB", "1M", "1MiB": bytes, not 0. */
static int parse_flash_size(const char *value, uint64_t *ret) {
        unsigned long long v;
        uint64_t unit = 1;
        char *end;

        if (!value || !isxdigit((unsigned char) value[0]))
                return -EINVAL;
        errno = 0;
        v = strtoull(value, &end, 0);
        if (errno || end == value)
                return -EINVAL;
        if (strcaseeq_ptr(end, "K") || strcaseeq_ptr(end, "KiB"))
                unit = 1024;
        else if (strcaseeq_ptr(end, "M") || strcaseeq_ptr(end, "MiB"))
                unit = 1024 * 1024;
        else if (*end)
                return -EINVAL;
        if (v == 0 || v > UINT32_MAX / unit + 1)
                return -EINVAL;
        *ret = (uint64_t) v * unit;
        return 0;
}

static int assign_mcu_setting(struct config *c, const struct config_location *loc,
                              const char *id, const char *key, const char *value) {
        char decimal[32];

        if (streq(key, "FlashStart")) {
                unsigned long long v;
                char *end;

                errno = 0;
                v = strtoull(value, &end, 0);
                if (errno || end == value || *end) {
                        log_error("%s:%u: Invalid address for FlashStart=: '%s' (write it like 0x08008000).",
                                  loc->path, loc->line, value);
                        return -EINVAL;
                }
                (void) snprintf(decimal, sizeof(decimal), "%llu", v);
                return add_mcu_setting(c, id, key, decimal);
        }
        if (streq(key, "FlashSize")) {
                uint64_t bytes;

                if (parse_flash_size(value, &bytes) < 0) {
                        log_error("%s:%u: Invalid size for FlashSize=: '%s' (write it like 512K, 1M or "
                                  "0x80000).", loc->path, loc->line, value);
                        return -EINVAL;
                }
                (void) snprintf(decimal, sizeof(decimal), "%" PRIu64, bytes);
                return add_mcu_setting(c, id, key, decimal);
        }
        if (streq(key, "Program")) {
                if (!path_is_absolute(value)) {
                        log_error("%s:%u: Program= must be an absolute path, got '%s'.",
                                  loc->path, loc->line, value);
                        return -EINVAL;
                }
                return add_mcu_setting(c, id, key, value);
        }
        if (streq(key, "Service")) {
                if (!unit_name_is_valid(value)) {
                        log_error("%s:%u: Service= must be a unit name ending in .service, got '%s'.",
                                  loc->path, loc->line, value);
                        return -EINVAL;
                }
                return add_mcu_setting(c, id, key, value);
        }
        log_warning("%s:%u: Unknown key '%s' in section [Mcu %s], ignoring.", loc->path, loc->line, key, id);
        return 0;
}

const char *config_mcu_get(const struct config *c, const char *id, const char *key) {
        size_t id_len = strlen(id), key_len = strlen(key);
        const char *found = NULL;

        for (char **e = c->mcu_settings; e && *e; e++)
                if (strncmp(*e, id, id_len) == 0 && (*e)[id_len] == '\n' &&
                    strncmp(*e + id_len + 1, key, key_len) == 0 && (*e)[id_len + 1 + key_len] == '=')
                        found = *e + id_len + 1 + key_len + 1;
        return found;
}

/* A number key, stored in decimal by assign_mcu_setting(). */
static int config_mcu_get_number(const struct config *c, const char *id, const char *key, uint64_t *ret) {
        const char *v = config_mcu_get(c, id, key);

        if (!v)
                return -ENOENT;
        *ret = strtoull(v, NULL, 10);
        return 0;
}

int config_mcu_flash_start(const struct config *c, const char *id, uint64_t *ret) {
        return config_mcu_get_number(c, id, "FlashStart", ret);
}

int config_mcu_flash_size(const struct config *c, const char *id, uint64_t *ret) {
        return config_mcu_get_number(c, id, "FlashSize", ret);
}

static int config_assign(struct config *c, const struct config_location *loc,
                         enum config_section section, const char *mcu_id, const char *key,
                         const char *value) {
        switch (section) {
        case SECTION_MCU:
                return assign_mcu_setting(c, loc, mcu_id, key, value);

        case SECTION_KLIPPER:
                if (streq(key, "Path"))
                        return assign_path(loc, key, value, &c->klipper_path);
                if (streq(key, "PrinterConfig"))
                        return assign_path(loc, key, value, &c->printer_config);
                if (streq(key, "ApiSocket"))
                        return assign_path(loc, key, value, &c->api_socket);
                if (streq(key, "Service"))
                        return assign_service(loc, value, &c->klipper_service);
                log_warning("%s:%u: Unknown key '%s' in section [Klipper], ignoring.",
                            loc->path, loc->line, key);
                return 0;

        case SECTION_DISCOVERY:
                if (streq(key, "SerialDevices"))
                        return assign_serial_devices(loc, value, &c->extra_serial_devices);
                if (streq(key, "IdentifyTimeoutSec"))
                        return assign_timeout(loc, key, value, DEFAULT_IDENTIFY_TIMEOUT_USEC,
                                              false, &c->identify_timeout_usec);
                if (streq(key, "OfflineTimeoutSec"))
                        return assign_timeout(loc, key, value, DEFAULT_OFFLINE_TIMEOUT_USEC,
                                              true, &c->offline_timeout_usec);
                log_warning("%s:%u: Unknown key '%s' in section [Discovery], ignoring.",
                            loc->path, loc->line, key);
                return 0;

        case SECTION_JOBS:
                if (streq(key, "BootloaderTimeoutSec"))
                        return assign_timeout(loc, key, value, DEFAULT_BOOTLOADER_TIMEOUT_USEC,
                                              false, &c->bootloader_timeout_usec);
                if (streq(key, "JobRetentionSec"))
                        return assign_timeout(loc, key, value, DEFAULT_JOB_RETENTION_USEC,
                                              true, &c->job_retention_usec);
                log_warning("%s:%u: Unknown key '%s' in section [Jobs], ignoring.",
                            loc->path, loc->line, key);
                return 0;

        case SECTION_NONE:
                log_warning("%s:%u: Assignment outside of any section, ignoring.",
                            loc->path, loc->line);
                return 0;

        case SECTION_UNKNOWN:
                /* The section header was already warned about. */
                return 0;
        }
        return 0;
}

static int config_parse_line(struct config *c, const struct config_location *loc,
                             enum config_section *section, struct config_mcu_section *mcu, char *line) {
        char *l = strstrip(line), *eq, *key, *value;

        if (!*l || *l == '#' || *l == ';')
                return 0;

        if (*l == '[') {
                size_t len = strlen(l);
                char *name;

                if (l[len - 1] != ']') {
                        log_error("%s:%u: Invalid section header '%s'.", loc->path, loc->line, l);
                        return -EINVAL;
                }
                l[len - 1] = '\0';
                name = strstrip(l + 1);
                if (streq(name, "Klipper"))
                        *section = SECTION_KLIPPER;
                else if (streq(name, "Discovery"))
                        *section = SECTION_DISCOVERY;
                else if (streq(name, "Jobs"))
                        *section = SECTION_JOBS;
                else if (startswith(name, "Mcu ") && !isempty(strstrip(name + 4)) &&
                         strlen(strstrip(name + 4)) < sizeof(mcu->id)) {
                        *section = SECTION_MCU;
                        strcpy(mcu->id, strstrip(name + 4));
                } else {
                        log_warning("%s:%u: Unknown section [%s], ignoring its contents.",
                                    loc->path, loc->line, name);
                        *section = SECTION_UNKNOWN;
                }
                return 0;
        }

        eq = strchr(l, '=');
        if (!eq) {
                log_error("%s:%u: Expected 'Key=Value' or '[Section]', got '%s'.",
                          loc->path, loc->line, l);
                return -EINVAL;
        }
        *eq = '\0';
        key = strstrip(l);
        value = strstrip(eq + 1);
        if (!*key) {
                log_error("%s:%u: Missing key name before '='.", loc->path, loc->line);
                return -EINVAL;
        }

        return config_assign(c, loc, *section, mcu->id, key, value);
}

int config_load(struct config *c, const char *path, bool missing_ok) {
        _cleanup_(config_freep) struct config *scratch = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        _cleanup_free_ char *line = NULL;
        enum config_section section = SECTION_NONE;
        struct config_mcu_section mcu = {};
        struct config_location loc = { .path = path };
        size_t allocated = 0;
        int r;

        f = fopen(path, "re");
        if (!f) {
                if (errno == ENOENT && missing_ok) {
                        log_debug("Configuration file %s not found, using defaults.", path);
                        return 0;
                }
                return log_error_errno(errno, "Failed to open configuration file %s: %m", path);
        }

        r = config_copy(c, &scratch);
        if (r < 0)
                return log_oom();

        for (;;) {
                ssize_t n;

                errno = 0;
                n = getline(&line, &allocated, f);
                if (n < 0) {
                        if (errno != 0)
                                return log_error_errno(errno, "Failed to read %s: %m", path);
                        break;
                }
                loc.line++;

                r = config_parse_line(scratch, &loc, &section, &mcu, line);
                if (r == -ENOMEM)
                        return log_oom();
                if (r < 0)
                        return r;
        }

        config_replace(c, scratch);
        return 0;
}
