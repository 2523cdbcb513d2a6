/* Firmware images as a user hands them to mcuflashd (protocols.md §15, §7.4):
 * the bytes are copied once into a sealed memfd so that nobody can change
 * them between checking and flashing, the format is recognised by content
 * (ELF, UF2, Intel HEX, else raw .bin), the loadable bytes are laid out as
 * sorted, non-overlapping segments and the embedded Klipper data dictionary
 * is located.  Whether an image suits a particular MCU is decided by
 * image/check.c; writing it anywhere is the flashers' business. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "image/dictionary.h"
#include "shared/macro.h"

enum image_format {
        IMAGE_FORMAT_BIN,       /* raw bytes, address unknown */
        IMAGE_FORMAT_ELF,
        IMAGE_FORMAT_HEX,       /* Intel HEX */
        IMAGE_FORMAT_UF2,
};

struct image_segment {
        uint64_t address;       /* 0 for a .bin (see has_addresses) */
        size_t size;            /* > 0 */
        const uint8_t *data;    /* into the mapping or into @allocated */
        uint8_t *allocated;     /* owned copy for HEX/UF2/ELF, NULL for .bin */
};

struct image {
        enum image_format format;
        int fd;                         /* the sealed memfd holding the file as received */
        const uint8_t *map;             /* read-only mapping of @fd */
        size_t file_size;
        struct image_segment *segments; /* sorted by address, not overlapping, not adjacent */
        size_t n_segments;
        bool has_addresses;             /* false for .bin */
        uint64_t lowest_address;        /* first segment's address (0 for .bin) */
        uint64_t total_size;            /* bytes from lowest_address to the end of the last segment */
        uint64_t data_size;             /* bytes actually present (sum of segment sizes) */
        struct klipper_dict *dict;      /* embedded data dictionary, NULL if none was found */
        /* ELF only: e_machine (EM_ARM, EM_X86_64, …) and class. */
        uint16_t elf_machine;
        bool elf_64;
        /* An ELF program for a Linux host (Klipper's "linux" build): one
         * segment, the whole file, at address 0; host_dynamic when it names
         * an interpreter (dynamically linked). */
        bool host_program;
        bool host_dynamic;
        bool has_uf2_family;
        uint32_t uf2_family;            /* UF2 familyID (0xE48BFF56 = RP2040) */
};

/* Largest inflated dictionary looked at when searching an image. */
#define IMAGE_DICT_MAX_SIZE (1024 * 1024)

/* Read @fd until EOF (waiting on non-blocking fds), refusing more than
 * @max_size bytes, and load it.  Returns 0; -EBADMSG when the bytes are not
 * a usable image, -EFBIG beyond @max_size, -ENODATA for an empty file (all
 * three with a message for a person in *@ret_message when that is not
 * NULL, to be freed); -ENOMEM, other -errno from reading or memfd.
 * An image without a data dictionary loads fine (dict == NULL). */
int image_load_fd(int fd, size_t max_size, struct image **ret, char **ret_message);

/* The same from memory (tests, tools): the bytes are copied as well. */
int image_load_memory(const void *data, size_t len, struct image **ret, char **ret_message);

struct image *image_free(struct image *img);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct image *, image_free);

/* Contiguous bytes from @base to the end of the last segment, gaps filled
 * with 0xFF (erased flash).  For a .bin @base is 0.  Returns 0, -ERANGE when
 * @base lies above the lowest segment, -EFBIG when the span exceeds 256 MiB,
 * -ENOMEM. */
int image_flat(const struct image *img, uint64_t base, uint8_t **ret, size_t *ret_len);

/* A name for an ELF e_machine ("x86-64", "AArch64", "ARM", …), or NULL. */
const char *image_elf_machine_name(uint16_t machine);

/* "bin", "ELF", "Intel HEX", "UF2". */
const char *image_format_to_string(enum image_format format);
