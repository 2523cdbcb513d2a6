/* Does a loaded image suit a particular MCU (protocols.md §15.2–§15.4)?
 * The image's data dictionary must name the MCU's type, its start address
 * (from its addresses, or derived from the Cortex-M vector table of a
 * .bin) must be where this MCU's bootloader starts applications, and it
 * must fit.  Only decides and explains; loading is image.c's job and
 * flashing is the flashers'. */
#pragma once

#include <stdint.h>

#include "image/image.h"

struct image_target {
        const char *mcu_type;   /* config.MCU of the running firmware, e.g. "stm32f429xx" */
        uint64_t flash_start;   /* where applications start on this MCU; 0 = unknown */
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

/* For a .bin: the address it was linked at, derived from its vector table
 * and the candidate application addresses of @mcu_type's family.  Returns
 * 0, -EBADMSG when the vector table does not fit the family or no single
 * candidate fits, -EOPNOTSUPP for an MCU family without a table. */
int image_bin_start(const struct image *img, const char *mcu_type, uint64_t *ret_start);
