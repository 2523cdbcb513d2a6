/* Checking a loaded image against an MCU (protocols.md §15.2–§15.5): the
 * data dictionary's config.MCU must be the MCU's type, the image must start
 * where this MCU's bootloader (or the flash base, without one) puts
 * applications, and it must fit.  A .bin carries no addresses, so the
 * start the MCU states is checked against it instead of guessed: every
 * vector into flash must land inside the image placed there, the initial SP
 * in the family's RAM, and what the image itself says about its link address
 * (the embedded build config, the literal of its .data copy, its SCB->VTOR
 * literal) must agree.  "Unknown" is IMAGE_START_UNKNOWN, never 0, which
 * is a real start.  Refusals come with a message for a person naming both
 * addresses; nothing here reads files or talks to devices. */
#include <elf.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image/check.h"
#include "image/chips.h"

#define MAX_CANDIDATES 12
#define MAX_RAM_RANGES 2
/* A Cortex-M vector table: 16 system entries and at most 240 interrupts. */
#define SYSTEM_VECTORS 16
#define MAX_VECTORS (16 + 240)
/* Words either side of a .data-copy literal that are looked at for the
 * RAM addresses of .data's start and end (one literal pool). */
#define LITERAL_WINDOW 4
/* Link addresses are at least 256-byte aligned (the vector table's VTOR
 * alignment). */
#define LINK_ALIGNMENT 0x100
/* Images larger than this are not searched for link-address literals (real
 * Klipper builds are tens of KiB; the search must stay cheap on the loop). */
#define EVIDENCE_MAX_SIZE (2 * 1024 * 1024)

struct ram_range {
        uint64_t start, size;
};

struct flash_family {
        const char *name;
        const char *prefixes[6];                /* config.MCU prefixes of the family */
        uint64_t flash_base;
        uint64_t flash_span;                    /* bytes from flash_base vectors may point into */
        uint64_t no_bootloader_start;           /* application start without a bootloader */
        struct ram_range ram[MAX_RAM_RANGES];
        uint64_t candidates[MAX_CANDIDATES];    /* ascending; 0-terminated after the first */
        uint32_t uf2_family;                    /* 0 = no UF2 family */
        const char *kconfig_prefix;             /* "CONFIG_STM32_FLASH_START_" */
};

#define KiB(n) ((uint64_t) (n) * 1024)
#define MiB(n) ((uint64_t) (n) * 1024 * 1024)

/* protocols.md §15.3 (RAM) and §15.4 (application addresses).  RAM ranges
 * are generous: the initial SP is the top of the part's RAM, which is below
 * the family's largest. */
static const struct flash_family families[] = {
        { "STM32F1", { "stm32f1" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x18000 } },
          { 0x08000000, 0x08000800, 0x08001000, 0x08002000, 0x08004000, 0x08005000, 0x08007000,
            0x08008000, 0x08008800, 0x08009000, 0x08010000 }, 0, "CONFIG_STM32_FLASH_START_" },
        { "STM32F0", { "stm32f0" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x8000 } },
          { 0x08000000, 0x08001000, 0x08002000, 0x08004000 }, 0, "CONFIG_STM32_FLASH_START_" },
        { "STM32F2/F4", { "stm32f2", "stm32f4" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x80000 } },
          { 0x08000000, 0x08004000, 0x08008000, 0x0800C000, 0x08010000, 0x08020200 }, 0,
          "CONFIG_STM32_FLASH_START_" },
        { "STM32F7", { "stm32f7" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x80000 } },
          { 0x08000000, 0x08008000, 0x08020000 }, 0, "CONFIG_STM32_FLASH_START_" },
        { "STM32G0/G4", { "stm32g0", "stm32g4" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x24000 } },
          { 0x08000000, 0x08002000 }, 0, "CONFIG_STM32_FLASH_START_" },
        { "STM32H7", { "stm32h7" }, 0x08000000, MiB(2), 0x08000000,
          { { 0x20000000, 0x20000 }, { 0x24000000, 0x100000 } },
          { 0x08000000, 0x08008000, 0x08020000 }, 0, "CONFIG_STM32_FLASH_START_" },
        { "STM32L4", { "stm32l4" }, 0x08000000, MiB(2), 0x08000000, { { 0x20000000, 0x50000 } },
          { 0x08000000 }, 0, "CONFIG_STM32_FLASH_START_" },
        /* A RP2040 .bin is a bootloader build; no-bootloader builds are UF2
         * with boot2 at 0x10000000.  Its handlers other than reset run
         * from RAM. */
        { "RP2040", { "rp2040" }, 0x10000000, MiB(16), 0x10000100, { { 0x20000000, 0x42000 } },
          { 0x10004000 }, 0xE48BFF56, "CONFIG_RPXXXX_FLASH_START_" },
        { "RP2350", { "rp2350" }, 0x10000000, MiB(16), 0x10000000, { { 0x20000000, 0x82000 } },
          { 0x10000000, 0x10004000 }, 0xE48BFF59, "CONFIG_RPXXXX_FLASH_START_" },
        { "SAMD21/SAMC21", { "samd21", "samc21" }, 0x0, KiB(256), 0x0, { { 0x20000000, 0x8000 } },
          { 0x0, 0x2000, 0x4000 }, 0, "CONFIG_SAMD_FLASH_START_" },
        { "SAMD51/SAME5x", { "samd51", "same51", "same53", "same54" }, 0x0, MiB(1), 0x0,
          { { 0x20000000, 0x40000 } }, { 0x0, 0x4000 }, 0, "CONFIG_SAMD_FLASH_START_" },
        /* SAM3X: SRAM0 at 0x20000000 and SRAM1 right behind it (the whole
         * 96 KiB also appears at 0x20070000); Klipper's SP is 0x20018000. */
        { "SAM3X", { "sam3" }, 0x80000, KiB(512), 0x80000,
          { { 0x20000000, 0x18000 }, { 0x20070000, 0x18000 } }, { 0x80000 }, 0, NULL },
        { "SAM4", { "sam4" }, 0x400000, MiB(2), 0x400000, { { 0x20000000, 0x30000 } }, { 0x400000 }, 0, NULL },
        { "SAME70", { "same70" }, 0x0, MiB(2), 0x0, { { 0x20400000, 0x60000 } }, { 0x0 }, 0, NULL },
        { "LPC176x", { "lpc176" }, 0x0, KiB(512), 0x0, { { 0x10000000, 0x8000 } }, { 0x0, 0x4000 }, 0,
          "CONFIG_LPC_FLASH_START_" },
        { "HC32F460", { "hc32f460" }, 0x0, KiB(512), UINT64_MAX, { { 0x1FFF8000, 0x30000 } },
          { 0x8000, 0xC000, 0x10000 }, 0, "CONFIG_HC32F460_FLASH_APPLICATION_ADDRESS_" },
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

static bool family_has_candidate(const struct flash_family *f, uint64_t address) {
        for (size_t i = 0; i < family_candidates(f); i++)
                if (f->candidates[i] == address)
                        return true;
        return false;
}

static uint32_t read_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

/* The initial SP is the top of a RAM: above its start, at most its end. */
static bool sp_in_ram(const struct flash_family *f, uint64_t sp) {
        for (size_t i = 0; i < MAX_RAM_RANGES && f->ram[i].size > 0; i++)
                if (sp > f->ram[i].start && sp <= f->ram[i].start + f->ram[i].size)
                        return true;
        return false;
}

static bool in_ram(const struct flash_family *f, uint64_t address) {
        for (size_t i = 0; i < MAX_RAM_RANGES && f->ram[i].size > 0; i++)
                if (address >= f->ram[i].start && address <= f->ram[i].start + f->ram[i].size)
                        return true;
        return false;
}

static bool in_flash(const struct flash_family *f, uint64_t address) {
        return address >= f->flash_base && address < f->flash_base + f->flash_span;
}

/* The vector table of a .bin: initial SP, reset handler and the other
 * handlers, as far as the words look like handlers (0 for a reserved
 * entry, else an odd Thumb address in flash or RAM); the table of a
 * Cortex-M part has at least the 16 system entries. */
struct vectors {
        uint32_t sp, reset;
        uint32_t words[MAX_VECTORS];
        size_t n;
};

static void read_vectors(const uint8_t *p, size_t size, const struct flash_family *f, struct vectors *v) {
        size_t max = MIN(size / 4, (size_t) MAX_VECTORS);

        *v = (struct vectors) {};
        if (max < 2)
                return;
        v->sp = read_le32(p);
        v->reset = read_le32(p + 4);
        for (size_t i = 2; i < max; i++) {
                uint32_t w = read_le32(p + 4 * i);

                if (i >= SYSTEM_VECTORS && w != 0 && (!(w & 1) || (!in_flash(f, w & ~1u) && !in_ram(f, w))))
                        break;
                v->words[v->n++] = w;
        }
}

/* Does the vector table fit an image of @size bytes at @start: every
 * vector into flash inside [start, start + size), the reset handler among
 * them?  Vectors into RAM (RP2040) or elsewhere are ignored.  On a misfit,
 * *@ret_vector is the first vector outside. */
static bool vectors_fit(const struct flash_family *f, const struct vectors *v, uint64_t start, uint64_t size,
                        uint32_t *ret_vector) {
        uint64_t reset = v->reset & ~1u;

        if (reset < start || reset >= start + size) {
                *ret_vector = v->reset;
                return false;
        }
        for (size_t i = 0; i < v->n; i++) {
                uint64_t w = v->words[i] & ~1u;

                if (v->words[i] == 0 || !in_flash(f, w))
                        continue;
                if (w < start || w >= start + size) {
                        *ret_vector = v->words[i];
                        return false;
                }
        }
        return true;
}

/* protocols.md §15.3: the reset handler's copy of .data leaves the flash
 * address L of .data's initial values in a literal pool next to .data's RAM
 * start S and end E; objcopy puts those values last, so (L − A) + (E − S)
 * is the image's size for the link address A.  Returns the one A that
 * every such triple agrees on (aligned, in flash, the vectors fit it), or
 * UINT64_MAX when there is none or they disagree. */
static uint64_t data_copy_link_address(const struct flash_family *f, const uint8_t *p, size_t size,
                                       const struct vectors *v) {
        size_t n_words = size / 4;
        uint64_t found = UINT64_MAX;

        for (size_t i = 0; i < n_words; i++) {
                uint64_t l = read_le32(p + 4 * i);

                if (!in_flash(f, l))
                        continue;
                for (size_t j = i > LITERAL_WINDOW ? i - LITERAL_WINDOW : 0; j <= i + LITERAL_WINDOW && j < n_words; j++) {
                        uint64_t s = read_le32(p + 4 * j);

                        if (j == i || !in_ram(f, s))
                                continue;
                        for (size_t k = i > LITERAL_WINDOW ? i - LITERAL_WINDOW : 0;
                             k <= i + LITERAL_WINDOW && k < n_words; k++) {
                                uint64_t e = read_le32(p + 4 * k), a;
                                uint32_t outside;

                                if (k == i || k == j || !in_ram(f, e) || e <= s || e - s > size ||
                                    l + (e - s) < size)
                                        continue;
                                a = l + (e - s) - size;
                                if (a % LINK_ALIGNMENT != 0 || !in_flash(f, a) || !vectors_fit(f, v, a, size, &outside))
                                        continue;
                                if (found != UINT64_MAX && found != a)
                                        return UINT64_MAX;
                                found = a;
                        }
                }
        }
        return found;
}

/* protocols.md §15.3: STM32 startup code sets SCB->VTOR to the vector
 * table, so the link address is an aligned literal in the image.  The one
 * family option (other than 0) found so, if the vectors fit it; UINT64_MAX
 * when none or several appear (RP2040 has both of its options). */
static uint64_t vtor_link_address(const struct flash_family *f, const uint8_t *p, size_t size,
                                  const struct vectors *v) {
        uint64_t found = UINT64_MAX;
        uint32_t outside;

        for (size_t i = 2 + v->n; i < size / 4; i++) {
                uint64_t w = read_le32(p + 4 * i);

                if (w == 0 || !family_has_candidate(f, w))
                        continue;
                if (found != UINT64_MAX && found != w)
                        return UINT64_MAX;
                found = w;
        }
        if (found != UINT64_MAX && !vectors_fit(f, v, found, size, &outside))
                return UINT64_MAX;
        return found;
}

int image_kconfig_flash_start(const char *kconfig, const char *mcu_type, uint64_t *ret_start) {
        const struct flash_family *f = family_for_mcu(mcu_type);
        const char *line;

        if (!kconfig || !ret_start)
                return -EINVAL;
        if (!f || !f->kconfig_prefix)
                return -ENOENT;
        for (line = kconfig; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
                const char *rest = startswith(line, f->kconfig_prefix), *address;
                char *end;
                unsigned long long v;

                /* A full .config also says it outright. */
                address = startswith(line, "CONFIG_FLASH_APPLICATION_ADDRESS=");
                if (address) {
                        errno = 0;
                        v = strtoull(address, &end, 0);
                        if (errno == 0 && end != address && (*end == '\n' || *end == '\0')) {
                                *ret_start = v;
                                return 0;
                        }
                        continue;
                }
                if (!rest)
                        continue;
                errno = 0;
                v = strtoull(rest, &end, 16);
                if (errno != 0 || end == rest || !startswith(end, "=y"))
                        continue;
                /* Offsets from the flash base (STM32 "8000"), or addresses. */
                *ret_start = v < f->flash_base ? f->flash_base + v : v;
                return 0;
        }
        return -ENOENT;
}

/* Everything a .bin says about where it is linked. */
struct bin_evidence {
        const struct flash_family *family;
        struct vectors vectors;
        uint64_t link_address;          /* UINT64_MAX: the image does not say */
        const char *source;             /* where link_address comes from, for messages */
};

static void bin_evidence(const struct image *img, const struct flash_family *f, const char *mcu_type,
                         struct bin_evidence *ret) {
        const uint8_t *p = img->segments[0].data;
        size_t size = img->segments[0].size;
        uint64_t a;
        uint32_t outside;

        *ret = (struct bin_evidence) { .family = f, .link_address = UINT64_MAX };
        read_vectors(p, size, f, &ret->vectors);
        /* The embedded build config (§15.5) names the start outright. */
        if (img->dict && img->dict->kconfig && image_kconfig_flash_start(img->dict->kconfig, mcu_type, &a) >= 0) {
                ret->link_address = a;
                ret->source = "its build config";
                return;
        }
        if (!sp_in_ram(f, ret->vectors.sp) || size > EVIDENCE_MAX_SIZE)
                return;
        a = data_copy_link_address(f, p, size, &ret->vectors);
        if (a != UINT64_MAX) {
                ret->link_address = a;
                ret->source = "its .data copy";
                return;
        }
        a = vtor_link_address(f, p, size, &ret->vectors);
        if (a != UINT64_MAX && vectors_fit(f, &ret->vectors, a, size, &outside)) {
                ret->link_address = a;
                ret->source = "its vector table address";
        }
}

int image_bin_start(const struct image *img, const char *mcu_type, uint64_t *ret_start) {
        const struct flash_family *f = family_for_mcu(mcu_type);
        struct bin_evidence e;

        if (!img || img->n_segments != 1 || img->has_addresses || !ret_start)
                return -EINVAL;
        if (!f)
                return -EOPNOTSUPP;
        if (img->segments[0].size < 8)
                return -EBADMSG;
        bin_evidence(img, f, mcu_type, &e);
        if (e.link_address == UINT64_MAX)
                return -ENOENT;
        *ret_start = e.link_address;
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

/* Name the family's options a .bin's vectors would fit, for a message:
 * " (its vectors would fit 0x08004000 or 0x08008000)", or "". */
static void describe_fitting_options(const struct bin_evidence *e, uint64_t size, char *buf, size_t len) {
        size_t n = 0, used = 0;
        uint32_t outside;

        buf[0] = '\0';
        for (size_t i = 0; i < family_candidates(e->family); i++) {
                uint64_t a = e->family->candidates[i];
                int k;

                if (!vectors_fit(e->family, &e->vectors, a, size, &outside))
                        continue;
                k = snprintf(buf + used, len - used, "%s0x%08" PRIx64, n == 0 ? " (its vectors would fit " : " or ", a);
                if (k < 0 || (size_t) k >= len - used - 2) {
                        buf[0] = '\0';
                        return;
                }
                used += (size_t) k;
                n++;
        }
        if (n > 0)
                snprintf(buf + used, len - used, ")");
}

/* A .bin against a stated start: the vectors must fit it, and what the
 * image says about its link address (build config, .data copy, VTOR
 * literal) must agree.  Without a stated start only that evidence counts. */
static int check_bin_start(const struct image *img, const struct image_target *t, const struct flash_family *f,
                           uint64_t *ret_start, enum image_check_error *ret_kind, char **ret_message) {
        uint64_t size = img->segments[0].size;
        struct bin_evidence e;
        char image_desc[96], target_desc[128], options[128];
        uint32_t outside;

        if (size < 8)
                return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                              "a %" PRIu64 "-byte .bin is no Cortex-M image", size);
        bin_evidence(img, f, t->mcu_type, &e);
        if (!sp_in_ram(f, e.vectors.sp))
                return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                              "this .bin is no %s application: its initial stack pointer 0x%08" PRIx32
                              " is not in the %s's RAM", t->mcu_type, e.vectors.sp, f->name);
        if (!(e.vectors.reset & 1) || !in_flash(f, e.vectors.reset & ~1u))
                return refuse(IMAGE_CHECK_INVALID, ret_kind, ret_message,
                              "this .bin is no %s application: its reset handler 0x%08" PRIx32
                              " is not Thumb code in the %s's flash", t->mcu_type, e.vectors.reset, f->name);

        if (t->flash_start == IMAGE_START_UNKNOWN) {
                if (e.link_address == IMAGE_START_UNKNOWN) {
                        describe_fitting_options(&e, size, options, sizeof(options));
                        return refuse(IMAGE_CHECK_UNKNOWN_TARGET, ret_kind, ret_message,
                                      "cannot tell where this MCU's application starts, and this .bin does not say "
                                      "where it is linked%s; set FlashStart= for it in mcuflashd.conf's [Mcu %s] "
                                      "section", options, t->id ?: "SERIAL");
                }
                *ret_start = e.link_address;
                return 0;
        }

        if (e.link_address != IMAGE_START_UNKNOWN && !starts_match(f, e.link_address, t->flash_start)) {
                format_size(e.link_address - MIN(e.link_address, f->flash_base), image_desc, sizeof(image_desc));
                describe_target_start(f, t->flash_start, target_desc, sizeof(target_desc));
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "image is linked for 0x%08" PRIx64 " (%s%s%s, as %s shows), %s%s", e.link_address,
                              is_no_bootloader_start(f, e.link_address) ? "no bootloader" : "behind a ",
                              is_no_bootloader_start(f, e.link_address) ? "" : image_desc,
                              is_no_bootloader_start(f, e.link_address) ? "" : " bootloader", e.source, target_desc,
                              is_no_bootloader_start(f, e.link_address) && t->flash_start > e.link_address ?
                              "; flashing it would overwrite the bootloader" : "");
        }
        if (!vectors_fit(f, &e.vectors, t->flash_start, size, &outside)) {
                describe_target_start(f, t->flash_start, target_desc, sizeof(target_desc));
                describe_fitting_options(&e, size, options, sizeof(options));
                return refuse(IMAGE_CHECK_MISMATCH, ret_kind, ret_message,
                              "image is not linked for 0x%08" PRIx64 ": its vector 0x%08" PRIx32 " points outside "
                              "the %" PRIu64 " bytes it would take from there%s; %s", t->flash_start, outside,
                              size, options, target_desc);
        }
        *ret_start = t->flash_start;
        return 0;
}

int image_check(const struct image *img, const struct image_target *t, uint64_t *ret_start,
                enum image_check_error *ret_kind, char **ret_message) {
        const struct flash_family *f;
        uint64_t start = 0;
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
        else if (!f) {
                /* No family table: trust the MCU's own statement. */
                if (t->flash_start == IMAGE_START_UNKNOWN)
                        return refuse(IMAGE_CHECK_UNKNOWN_TARGET, ret_kind, ret_message,
                                      "cannot tell where this .bin image for %s starts, nor where this "
                                      "MCU's application starts; set FlashStart= for it in "
                                      "mcuflashd.conf's [Mcu %s] section",
                                      t->mcu_type, t->id ?: "SERIAL");
                start = t->flash_start;
        } else {
                r = check_bin_start(img, t, f, &start, ret_kind, ret_message);
                if (r < 0)
                        return r;
        }

        /* Too big is too big, wherever the application starts. */
        if (t->flash_start == IMAGE_START_UNKNOWN) {
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
