/* Reads Klipper's printer.cfg the way klippy does as far as MCUs go:
 * sections, "key: value" / "key = value" lines, continuation lines,
 * comments, and [include glob] (relative to the including file, sorted,
 * recursive, loops detected).  It extracts every [mcu] / [mcu NAME] section
 * with its serial, baud, canbus_uuid and canbus_interface.  Errors in one
 * file are warnings: what could be read is still returned.
 *
 * The files are untrusted (the daemon is root, they are the Klipper
 * user's): only regular files the owner of the top file could read are
 * used, within the bounds below, and no message quotes their content —
 * printercfg.c's head comment has the rules.  Reading blocks on the
 * filesystem: the daemon calls it from a worker thread. */
#pragma once

#include <stdatomic.h>
#include <stddef.h>
#include <sys/types.h>

#include "shared/macro.h"

/* Bounds; exceeding one makes the whole printer.cfg unusable. */
#define PRINTERCFG_MAX_FILE_SIZE (4u * 1024 * 1024)     /* one file */
#define PRINTERCFG_MAX_TOTAL_SIZE (16u * 1024 * 1024)   /* all files together */
#define PRINTERCFG_MAX_FILES 100u       /* files read, an include read twice counting twice */
#define PRINTERCFG_MAX_DEPTH 8u         /* includes within includes below printer.cfg */
#define PRINTERCFG_MAX_LINES 100000u    /* lines of all files together */
#define PRINTERCFG_MAX_SECTIONS 10000u  /* section headers of all files together */
#define PRINTERCFG_MAX_VALUE 4096u      /* one kept value ([mcu] serial: …) */

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
 * @path itself is missing, another -errno if it cannot be opened (-EACCES),
 * -EISDIR / -EBADFD if it or an included file is not a regular file, -EFBIG
 * or -E2BIG when a bound is exceeded, -ECANCELED when *@cancel became true
 * (checked between files and includes), -ENOMEM.  open()/stat() errors of
 * @path itself are left to the caller to log; everything else is logged
 * here, naming file and line but never their content. */
#define PRINTERCFG_OWNER ((uid_t) -1)
/* @reader: whose read rights count.  PRINTERCFG_OWNER: the owner of @path
 * (PrinterConfig=, chosen by root); a uid (klippy's, for the path klippy
 * reports): then @path itself must be readable for that uid, too. */
int printercfg_load_cancellable(const char *path, uid_t reader, const atomic_bool *cancel,
                                struct printercfg **ret);
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
