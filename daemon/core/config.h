/* The daemon's configuration file, /etc/mcuflashd/mcuflashd.conf
 * (mcuflashd.conf(5)): an INI file in systemd's style ([Section] and
 * Key=Value lines, # and ; comments).  Unknown sections and keys are warned
 * about and ignored; a malformed value is an error naming file and line. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "shared/macro.h"

/* Klipper's own names for the Linux process MCU (scripts/flash-linux.sh,
 * scripts/klipper-mcu.service), used without [Mcu ID] Program=/Service=. */
#define DEFAULT_LINUX_MCU_PROGRAM "/usr/local/bin/klipper_mcu"
#define DEFAULT_LINUX_MCU_SERVICE "klipper-mcu.service"

struct config {
        /* [Klipper] */
        char *klipper_path;             /* Path=: the Klipper checkout (for HostVersion) */
        char *printer_config;           /* PrinterConfig=: printer.cfg */
        char *api_socket;               /* ApiSocket=: klippy's API socket (unused so far) */
        char *klipper_service;          /* Service=: systemd unit of klippy */

        /* [Discovery] */
        char **extra_serial_devices;    /* SerialDevices=: NULL-terminated, space separated in the file */
        uint64_t identify_timeout_usec; /* IdentifyTimeoutSec= (default 5) */
        uint64_t offline_timeout_usec;  /* OfflineTimeoutSec= (default 600; 0 = keep until Rescan) */

        /* [Mcu ID] sections, read with config_mcu_get(): FlashStart= (where
         * the application starts, for bootloaders that cannot tell),
         * FlashSize= (the chip's flash, where its type leaves it open),
         * Program= and Service= (a Linux process MCU's klipper_mcu and the
         * unit that runs it). */
        char **mcu_settings;

        /* [Jobs] */
        uint64_t bootloader_timeout_usec; /* BootloaderTimeoutSec= (default 15) */
        uint64_t job_retention_usec;    /* JobRetentionSec= (default 600) */
};

/* Defaults, before any file is read. */
int config_new(struct config **ret);

/* Read @path into @c, overriding what it sets.  A missing file is not an
 * error when @missing_ok (the packaged default path); otherwise -ENOENT.
 * Returns -EINVAL (already logged with file:line) for bad syntax/values. */
int config_load(struct config *c, const char *path, bool missing_ok);

struct config *config_free(struct config *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct config *, config_free);

/* The value of @key in the [Mcu @id] sections (the last one), or NULL. */
const char *config_mcu_get(const struct config *c, const char *id, const char *key);

/* FlashStart= of the [Mcu @id] section: 0 and *ret, or -ENOENT. */
int config_mcu_flash_start(const struct config *c, const char *id, uint64_t *ret);

/* FlashSize= of the [Mcu @id] section in bytes: 0 and *ret, or -ENOENT. */
int config_mcu_flash_size(const struct config *c, const char *id, uint64_t *ret);

/* Parse "5", "1.5", "250ms", "2min", "1h" into microseconds: a decimal
 * number (seconds without a unit) optionally followed by one of us, usec,
 * ms, msec, s, sec, second(s), m, min, minute(s), h, hr, hour(s).  Returns
 * -EINVAL for anything else (signs, garbage, several numbers), -ERANGE if
 * the result does not fit in 64 bits. */
int parse_sec(const char *s, uint64_t *ret_usec);
