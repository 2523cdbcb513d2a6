/* Flash jobs (flash.c): Mcu.Flash end to end. */
#pragma once

#include <stdbool.h>

#include "bus/errors.h"
#include "image/image.h"

struct daemon;
struct job;
struct mcu;

/* May @img go onto @m now?  0; -EPERM with the D-Bus error and a message
 * for a person (malloc()ed): printing, busy, offline, not a Klipper image,
 * another MCU type, another flash start, too big, unknown flash start;
 * -ENOMEM. */
int flash_check(struct daemon *d, struct mcu *m, struct image *img, bool stop_klipper,
                enum mcuflash_error *ret_error,
                char **ret_message);

/* Start the job; on success it owns @img, on failure the caller keeps it.
 * Without @force an MCU that runs the image's version already is left
 * alone (the job succeeds at once). */
int flash_start(struct daemon *d, struct mcu *m, struct image *img, bool force, struct job **ret);
