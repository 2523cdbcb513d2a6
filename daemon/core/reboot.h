/* Reboot jobs (reboot.c): into the bootloader and back to the application. */
#pragma once

#include <stdbool.h>

#include "bus/errors.h"

struct daemon;
struct job;
struct mcu;

/* May @m be rebooted now?  0, or -EPERM with the D-Bus error and a message
 * for a person (malloc()ed) — printing, busy, offline, unsupported, held by
 * Klipper without permission to stop it — or -ENOMEM. */
int reboot_check(struct daemon *d, struct mcu *m, bool to_bootloader, bool stop_klipper,
                 enum mcuflash_error *ret_error, char **ret_message);

/* Start the job (reboot_check() passed). */
int reboot_start(struct daemon *d, struct mcu *m, bool to_bootloader, struct job **ret);
