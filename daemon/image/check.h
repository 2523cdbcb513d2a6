/* Does a loaded image suit a particular MCU (protocols.md §15.2–§15.5)?
 * The image's data dictionary must name the MCU's type, its start address
 * (from its addresses; for a .bin the MCU's stated start is checked against
 * its Cortex-M vector table, .data copy, VTOR literal and build config) must
 * be where this MCU's bootloader starts applications, and it must fit.  Only decides and explains; loading is image.c's job and
 * flashing is the flashers'. */
#pragma once

#include <stdint.h>

#include "image/image.h"

/* A start address nobody stated; 0 is a real one (AVR, SAMD, LPC176x). */
#define IMAGE_START_UNKNOWN UINT64_MAX

struct image_target {
        const char *mcu_type;   /* config.MCU of the running firmware, e.g. "stm32f429xx" */
        uint64_t flash_start;   /* where applications start on this MCU; IMAGE_START_UNKNOWN */
        uint64_t flash_size;    /* the chip's flash from its base, as stated (FlashSize=); 0 = the
                                 * largest part of mcu_type (image/chips.c) */
        const char *bootloader; /* e.g. "katapult", for messages; may be NULL */
        const char *id;         /* the MCU's id for config hints ("[Mcu <id>]"); may be NULL */
        uint16_t host_elf_machine; /* "linux" MCUs: the host's ELF machine; 0 = this build's */
};

enum image_check_error {
        IMAGE_CHECK_OK,
        IMAGE_CHECK_INVALID,            /* not a (usable) Klipper image */
        IMAGE_CHECK_MISMATCH,           /* built for another MCU type or flash start */
        IMAGE_CHECK_TOO_BIG,            /* does not fit into the flash */
        IMAGE_CHECK_UNKNOWN_TARGET,     /* the target's type or flash start is unknown */
};

/* Check @img against @t.  Returns 0 and the address to flash at in
 * *@ret_start; on refusal a negative errno (-EBADMSG for INVALID,
 * -EMEDIUMTYPE for MISMATCH, -EFBIG for TOO_BIG, -EADDRNOTAVAIL for
 * UNKNOWN_TARGET) with *@ret_kind and a message for a person in
 * *@ret_message (to be freed); -ENOMEM.  Output pointers may be NULL. */
int image_check(const struct image *img, const struct image_target *t, uint64_t *ret_start,
                enum image_check_error *ret_kind, char **ret_message);

/* The ELF e_machine of programs this daemon's host runs (its own). */
uint16_t image_host_elf_machine(void);

/* For a .bin: the address it was linked at, where the image says so
 * (protocols.md §15.3, §15.5): its embedded build config, else the one link
 * address its .data copy agrees on, else the one SCB->VTOR literal of the
 * family's options; the vector table must fit it.  Nothing is guessed from
 * the vectors alone.  Returns 0, -ENOENT when the image does not say,
 * -EBADMSG when it is too short, -EOPNOTSUPP for an MCU family without a
 * table. */
int image_bin_start(const struct image *img, const char *mcu_type, uint64_t *ret_start);

/* The flash start a Klipper build config names (§15.5: the family's
 * CONFIG_…_FLASH_START_xxxx=y choice, or CONFIG_FLASH_APPLICATION_ADDRESS=
 * of a full .config) for @mcu_type.  Returns 0, -ENOENT when it names
 * none, -EINVAL. */
int image_kconfig_flash_start(const char *kconfig, const char *mcu_type, uint64_t *ret_start);
