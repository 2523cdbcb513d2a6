/* Checking a loaded image against an MCU (protocols.md §15.2–§15.4): the
 * data dictionary's config.MCU must be the MCU's type, the image must start
 * where this MCU's bootloader (or the flash base, without one) puts
 * applications, and it must fit.  A .bin carries no addresses, so its start
 * is derived from the Cortex-M vector table and the family's list of
 * Klipper FLASH_APPLICATION_ADDRESS choices.  Refusals come with a message
 * for a person; nothing here reads files or talks to devices. */
#include <elf.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image/check.h"
#include "image/chips.h"

#define MAX_CANDIDATES 12
#define MAX_RAM_RANGES 2
/* Handlers follow the vector table, which has at least the 16 system entries. */
#define MIN_VECTOR_TABLE_SIZE 0x40
/* Vector words looked at when deriving a .bin's start. */
#define VECTOR_WORDS 16

struct ram_range {
        uint64_t start, size;
};

struct flash_family {
        const char *name;
        const char *prefixes[6];                /* config.MCU prefixes of the family */
        uint64_t flash_base;
        uint64_t no_bootloader_start;           /* application start without a bootloader */
        struct ram_range ram[MAX_RAM_RANGES];
        uint64_t candidates[MAX_CANDIDATES];    /* ascending; 0-terminated after the first */
        uint32_t uf2_family;                    /* 0 = no UF2 family */
};

/* protocols.md §15.3 (RAM) and §15.4 (application addresses). */
static const struct flash_family families[] = {
        { "STM32F1", { "stm32f1" }, 0x08000000, 0x08000000, { { 0x20000000, 0x18000 } },
          { 0x08000000, 0x08000800, 0x08001000, 0x08002000, 0x08004000, 0x08005000, 0x08007000,
            0x08008000, 0x08008800, 0x08009000, 0x08010000 }, 0 },
        { "STM32F0", { "stm32f0" }, 0x08000000, 0x08000000, { { 0x20000000, 0x8000 } },
          { 0x08000000, 0x08001000, 0x08002000, 0x08004000 }, 0 },
        { "STM32F2/F4", { "stm32f2", "stm32f4" }, 0x08000000, 0x08000000, { { 0x20000000, 0x80000 } },
          { 0x08000000, 0x08004000, 0x08008000, 0x0800C000, 0x08010000, 0x08020200 }, 0 },
        { "STM32F7", { "stm32f7" }, 0x08000000, 0x08000000, { { 0x20000000, 0x80000 } },
          { 0x08000000, 0x08008000, 0x08020000 }, 0 },
        { "STM32G0/G4", { "stm32g0", "stm32g4" }, 0x08000000, 0x08000000, { { 0x20000000, 0x24000 } },
          { 0x08000000, 0x08002000 }, 0 },
        { "STM32H7", { "stm32h7" }, 0x08000000, 0x08000000,
          { { 0x20000000, 0x20000 }, { 0x24000000, 0x100000 } },
          { 0x08000000, 0x08008000, 0x08020000 }, 0 },
        { "STM32L4", { "stm32l4" }, 0x08000000, 0x08000000, { { 0x20000000, 0x50000 } },
          { 0x08000000 }, 0 },
        /* A RP2040 .bin is a bootloader build; no-bootloader builds are UF2
         * with boot2 at 0x10000000. */
        { "RP2040", { "rp2040" }, 0x10000000, 0x10000100, { { 0x20000000, 0x42000 } },
          { 0x10004000 }, 0xE48BFF56 },
        { "RP2350", { "rp2350" }, 0x10000000, 0x10000000, { { 0x20000000, 0x82000 } },
          { 0x10000000, 0x10004000 }, 0xE48BFF59 },
        { "SAMD21/SAMC21", { "samd21", "samc21" }, 0x0, 0x0, { { 0x20000000, 0x8000 } },
          { 0x0, 0x2000, 0x4000 }, 0 },
        { "SAMD51/SAME5x", { "samd51", "same51", "same53", "same54" }, 0x0, 0x0,
          { { 0x20000000, 0x40000 } }, { 0x0, 0x4000 }, 0 },
        { "SAM3X", { "sam3" }, 0x80000, 0x80000, { { 0x20070000, 0x18000 } }, { 0x80000 }, 0 },
        { "SAM4", { "sam4" }, 0x400000, 0x400000, { { 0x20000000, 0x30000 } }, { 0x400000 }, 0 },
        { "SAME70", { "same70" }, 0x0, 0x0, { { 0x20400000, 0x60000 } }, { 0x0 }, 0 },
        { "LPC176x", { "lpc176" }, 0x0, 0x0, { { 0x10000000, 0x8000 } }, { 0x0, 0x4000 }, 0 },
        { "HC32F460", { "hc32f460" }, 0x0, UINT64_MAX, { { 0x1FFF8000, 0x30000 } },
          { 0x8000, 0xC000, 0x10000 }, 0 },
};

static const struct flash_family *family_for_mcu(const char *mcu) {
        if (!mcu)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(families); i++)
                for (size_t j = 0; j < ELEMENTSOF(families[i].prefixes) && families[i].prefixes[j]; j++)
                        if (startswith(mcu, families[i].prefixes[j]))
                                return &families[i];
        return NULL;
}

static size_t family_candidates(const struct flash_family *f) {
        size_t n = 1;

        while (n < MAX_CANDIDATES && f->candidates[n] != 0)
                n++;
        return n;
}

static uint32_t read_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static bool sp_in_ram(const struct flash_family *f, uint64_t sp) {
        for (size_t i = 0; i < MAX_RAM_RANGES && f->ram[i].size > 0; i++)
                if (sp > f->ram[i].start && sp <= f->ram[i].start + f->ram[i].size)
                        return true;
        return false;
}

/* protocols.md §15.3.  Every candidate A with A + 0x40 <= the lowest handler
 * and the highest handler inside [A, A + size) can hold the image; since
 * Klipper links the handlers right behind the vector table, the highest
 * such A is the one it was linked at. */
int image_bin_start(const struct image *img, const char *mcu_type, uint64_t *ret_start) {
        const struct flash_family *f = family_for_mcu(mcu_type);
        const uint8_t *p;
        uint64_t size, lowest = UINT64_MAX, highest = 0;
        uint32_t sp, reset;
        bool found = false;
        uint64_t start = 0;
        size_t n_words;

        if (!img || img->n_segments != 1 || !ret_start)
                return -EINVAL;
        if (!f)
                return -EOPNOTSUPP;
        p = img->segments[0].data;
        size = img->segments[0].size;
        if (size < 8)
                return -EBADMSG;

        sp = read_le32(p);
        reset = read_le32(p + 4);
        if (!sp_in_ram(f, sp) || !(reset & 1))
                return -EBADMSG;

        n_words = MIN((size_t) (size / 4), (size_t) VECTOR_WORDS);
        for (size_t i = 1; i < n_words; i++) {
                uint32_t v = read_le32(p + 4 * i);

                if (v == 0)
                        continue;
                if (!(v & 1))           /* handlers are Thumb code */
                        continue;
                v &= ~UINT32_C(1);
                lowest = MIN(lowest, (uint64_t) v);
                highest = MAX(highest, (uint64_t) v);
        }

        for (size_t i = 0; i < family_candidates(f); i++) {
                uint64_t a = f->candidates[i];

                if (a + MIN_VECTOR_TABLE_SIZE <= lowest && highest < a + size) {
                        start = a;
                        found = true;
                }
        }
        if (!found)
                return -EBADMSG;
        *ret_start = start;
        return 0;
}

static int refuse(enum image_check_error kind, enum image_check_error *ret_kind, char **ret_message,
                  const char *fmt, ...) _printf_(4, 5);
static int refuse(enum image_check_error kind, enum image_check_error *ret_kind, char **ret_message,
                  const char *fmt, ...) {
        va_list ap;
        int r;

        if (ret_kind)
                *ret_kind = kind;
        if (ret_message) {
                char *m;

                va_start(ap, fmt);
                r = vasprintf(&m, fmt, ap);
                va_end(ap);
                if (r < 0)
                        return -ENOMEM;
                free(*ret_message);
                *ret_message = m;
        }
        switch (kind) {
        case IMAGE_CHECK_INVALID:
                return -EBADMSG;
        case IMAGE_CHECK_MISMATCH:
                return -EMEDIUMTYPE;
        case IMAGE_CHECK_TOO_BIG:
                return -EFBIG;
        case IMAGE_CHECK_UNKNOWN_TARGET:
                return -EADDRNOTAVAIL;
        case IMAGE_CHECK_OK:
                break;
        }
        return 0;
}

/* "2 MiB", "32 KiB", "128.5 KiB", "512 bytes". */
static void format_size(uint64_t bytes, char *buf, size_t len) {
        if (bytes >= 1024 * 1024 && bytes % (1024 * 1024) == 0)
                snprintf(buf, len, "%" PRIu64 " MiB", bytes / (1024 * 1024));
        else if (bytes >= 1024 && bytes % 1024 == 0)
                snprintf(buf, len, "%" PRIu64 " KiB", bytes / 1024);
        else if (bytes >= 1024)
                snprintf(buf, len, "%.1f KiB", (double) bytes / 1024.0);
        else
                snprintf(buf, len, "%" PRIu64 " bytes", bytes);
}

static bool is_no_bootloader_start(const struct flash_family *f, uint64_t address) {
        return f && (address == f->flash_base || address == f->no_bootloader_start);
}

/* "for a bootloader at 0x08008000 (32 KiB)" / "without a bootloader (for 0x08000000)". */
static void describe_image_start(const struct flash_family *f, uint64_t address, char *buf, size_t len) {
        char size[32];

        if (!f) {
                snprintf(buf, len, "for 0x%08" PRIx64, address);
                return;
        }
        if (is_no_bootloader_start(f, address)) {
                snprintf(buf, len, "without a bootloader (for 0x%08" PRIx64 ")", address);
                return;
        }
        format_size(address - MIN(address, f->flash_base), size, sizeof(size));
        snprintf(buf, len, "for a bootloader at 0x%08" PRIx64 " (%s)", address, size);
}

static void describe_target_start(const struct flash_family *f, uint64_t address, char *buf, size_t len) {
        char size[32];

        if (!f) {
                snprintf(buf, len, "this MCU starts the application at 0x%08" PRIx64, address);
                return;
        }
        if (is_no_bootloader_start(f, address)) {
                snprintf(buf, len, "this MCU has no bootloader (applications start at 0x%08" PRIx64 ")", address);
                return;
        }
        format_size(address - MIN(address, f->flash_base), size, sizeof(size));
        snprintf(buf, len, "this MCU's bootloader starts the application at 0x%08" PRIx64 " (%s)", address, size);
}

/* RP2040 images without a bootloader begin with boot2 at 0x10000000; the
 * application proper (and a target's stated start) is 0x10000100. */
static bool starts_match(const struct flash_family *f, uint64_t image_start, uint64_t target_start) {
        if (image_start == target_start)
                return true;
        return f && f->no_bootloader_start != f->flash_base && image_start == f->flash_base &&
               target_start == f->no_bootloader_start;
}

uint16_t image_host_elf_machine(void) {
#if defined(__x86_64__)
        return EM_X86_64;
#elif defined(__i386__)
        return EM_386;
#elif defined(__aarch64__)
        return EM_AARCH64;
#elif defined(__arm__)
        return EM_ARM;
#elif defined(__riscv)
        return EM_RISCV;
#elif defined(__powerpc64__)
        return EM_PPC64;
#elif defined(__powerpc__)
        return EM_PPC;
#elif defined(__mips__)
        return EM_MIPS;
#elif defined(__loongarch__)
        return 258;
#elif defined(__s390__)
        return EM_S390;
#else
        return EM_NONE;
#endif
}

/* The Linux process MCU runs klipper_mcu: the image must be a program for
 * this host's machine (Klipper's out/klipper.elf of a "linux" build); it is
 * installed whole, so it has no flash start. */
static int check_host_program(const struct image *img, const struct image_target *t, uint64_t *ret_start,
                              enum image_check_error *ret_kind, char **ret_message) {
        uint16_t host = t->host_elf_machine ?: image_host_elf_machine();
        const char *image_machine = image_elf_machine_name(img->elf_machine);
        const char *host_machine = image_elf_machine_name(host);

        if (!img->host_program)
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "a Linux process MCU runs a program: it takes the klipper.elf of Klipper's "
                              "\"linux\" build, not a %s image", image_format_to_string(img->format));
        if (!streq(t->mcu_type, "linux"))
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "image is a program for a Linux host, this MCU is %s", t->mcu_type);
        if (img->elf_machine != host)
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "klipper_mcu image is built for %s, this host runs %s programs; build Klipper's "
                              "\"linux\" target on this host",
                              image_machine ?: "another machine", host_machine ?: "other");
        if (ret_start)
                *ret_start = 0;
        return 0;
}

/* Does the image, from @start, fit the chip's flash?  Its size is as
 * stated (FlashSize=), else that of the largest part of its type. */
static int check_fits(const struct image *img, const struct image_target *t, const struct flash_family *f,
                      uint64_t start, enum image_check_error *ret_kind, char **ret_message) {
        uint64_t flash_size = t->flash_size ?: chip_flash_size(t->mcu_type), limit;
        char have[32], need[32], total[32];

        if (flash_size == 0)
                return 0;
        limit = (f ? f->flash_base : 0) + flash_size;
        if (start + img->total_size <= limit)
                return 0;

        format_size(img->total_size, need, sizeof(need));
        format_size(limit - MIN(limit, start), have, sizeof(have));
        format_size(flash_size, total, sizeof(total));
        if (t->flash_size)
                return refuse(IMAGE_CHECK_TOO_BIG, ret_kind, ret_message,
                              "image is %s, but this MCU has only %s of flash from 0x%08" PRIx64
                              " (FlashSize= says %s in all)", need, have, start, total);
        return refuse(IMAGE_CHECK_TOO_BIG, ret_kind, ret_message,
                      "image is %s, but this MCU has only %s of flash from 0x%08" PRIx64
                      " (%s parts have at most %s; if this one has more, say so with FlashSize= "
                      "in mcuflashd.conf's [Mcu %s] section)", need, have, start, t->mcu_type,
                      total, t->id ?: "SERIAL");
}

int image_check(const struct image *img, const struct image_target *t, uint64_t *ret_start,
                enum image_check_error *ret_kind, char **ret_message) {
        const struct flash_family *f;
        uint64_t start;
        int r;
        char image_desc[96], target_desc[128];

        if (!img || !t)
                return -EINVAL;
        if (ret_kind)
                *ret_kind = IMAGE_CHECK_OK;

        if (!img->dict)
                return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                              "not a Klipper image: no data dictionary found");
        if (isempty(img->dict->mcu))
                return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                              "not a usable Klipper image: its data dictionary does not name the MCU");
        if (isempty(t->mcu_type))
                return refuse(IMAGE_CHECK_UNKNOWN_TARGET, ret_kind, ret_message,
                              "cannot tell which MCU type this is; it has to run Klipper (or be identified) first");
        if (!streq(img->dict->mcu, t->mcu_type))
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "image is for %s, this MCU is %s", img->dict->mcu, t->mcu_type);

        if (img->host_program || streq(t->mcu_type, "linux"))
                return check_host_program(img, t, ret_start, ret_kind, ret_message);

        f = family_for_mcu(t->mcu_type);
        if (img->has_uf2_family && f && f->uf2_family != 0 && img->uf2_family != f->uf2_family)
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "UF2 image is for family 0x%08" PRIx32 ", %s needs family 0x%08" PRIx32,
                              img->uf2_family, t->mcu_type, f->uf2_family);

        if (img->has_addresses)
                start = img->lowest_address;
        else {
                r = image_bin_start(img, t->mcu_type, &start);
                if (r == -EOPNOTSUPP) {
                        if (t->flash_start == 0)
                                return refuse(IMAGE_CHECK_UNKNOWN_TARGET, ret_kind, ret_message,
                                              "cannot tell where this .bin image for %s starts, nor where this "
                                              "MCU's application starts; set FlashStart= for it in "
                                              "mcuflashd.conf's [Mcu %s] section",
                                              t->mcu_type, t->id ?: "SERIAL");
                        /* No family table: trust the MCU's own statement. */
                        start = t->flash_start;
                } else if (r < 0)
                        return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                                      "cannot tell where this .bin image starts: its vector table does not "
                                      "fit any %s application address", f ? f->name : t->mcu_type);
        }

        /* Too big is too big, wherever the application starts. */
        if (t->flash_start == 0) {
                r = check_fits(img, t, f, start, ret_kind, ret_message);
                if (r < 0)
                        return r;
                return refuse(IMAGE_CHECK_UNKNOWN_TARGET, ret_kind, ret_message,
                              "cannot tell where this MCU's application starts; set FlashStart=0x%08" PRIx64
                              " for it in mcuflashd.conf's [Mcu %s] section",
                              start, t->id ?: "SERIAL");
        }

        if (!starts_match(f, start, t->flash_start)) {
                describe_image_start(f, start, image_desc, sizeof(image_desc));
                describe_target_start(f, t->flash_start, target_desc, sizeof(target_desc));
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message, "image is built %s, %s%s",
                              image_desc, target_desc,
                              is_no_bootloader_start(f, start) && t->flash_start > start ?
                              "; flashing it would overwrite the bootloader" : "");
        }

        r = check_fits(img, t, f, start, ret_kind, ret_message);
        if (r < 0)
                return r;

        if (ret_start)
                *ret_start = start;
        return 0;
}
