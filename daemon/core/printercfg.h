/* Reads Klipper's printer.cfg the way klippy does as far as MCUs go:
 * sections, "key: value" / "key = value" lines, continuation lines,
 * comments, and [include glob] (relative to the including file, sorted,
 * recursive, loops detected).  It extracts every [mcu] / [mcu NAME] section
 * with its serial, baud, canbus_uuid and canbus_interface.  Errors in one
 * file are warnings: what could be read is still returned. */
#pragma once

#include <stddef.h>

#include "shared/macro.h"

struct printercfg_mcu {
        char *name;             /* "mcu" or "mcu NAME" (section name as written, lower-cased "mcu" prefix) */
        char *serial;           /* serial: (NULL if absent) */
        unsigned baud;          /* baud: (0 if absent) */
        char *canbus_uuid;      /* canbus_uuid: lower-case hex (NULL if absent) */
        char *canbus_interface; /* canbus_interface: (NULL if absent; klippy defaults to can0) */
};

struct printercfg {
        struct printercfg_mcu *mcus;
        size_t n_mcus;
        unsigned n_warnings;    /* problems logged while reading */
};

/* Returns 0 (possibly with warnings, counted in n_warnings), -ENOENT if
 * @path itself is missing, another -errno if it cannot be read (-EACCES,
 * -EISDIR, -EFBIG above 16 MiB), -ENOMEM.  Problems with @path itself are
 * left to the caller to log; everything else is logged as a warning. */
int printercfg_load(const char *path, struct printercfg **ret);

struct printercfg *printercfg_free(struct printercfg *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct printercfg *, printercfg_free);

/* Find the [mcu …] section whose serial: names the tty with the given
 * identity.  @devnode is the udev device node (/dev/ttyACM0), @devlinks the
 * udev DEVLINKS (space separated, may be NULL), @usb_serial the USB serial
 * number (may be NULL).  Matches an exact path, a devlink, or a
 * /dev/serial/by-id/…_<usb_serial>-ifNN name.  Returns the section or NULL. */
const struct printercfg_mcu *printercfg_find_serial(const struct printercfg *p,
                                                    const char *devnode,
                                                    const char *devlinks,
                                                    const char *usb_serial);

/* Find the [mcu …] section whose canbus_uuid: is @uuid (12 hex digits,
 * compared case-insensitively).  Returns the section or NULL. */
const struct printercfg_mcu *printercfg_find_canbus(const struct printercfg *p, const char *uuid);
