/* Unit tests for image/image.c and image/check.c: loading .bin, ELF, Intel
 * HEX and UF2 images built right here (a Cortex-M vector table, filler and
 * a zlib-compressed JSON data dictionary, plus small encoders for each
 * format), refusing truncated, corrupt and foreign files with a message,
 * and checking images against MCUs (type, start address, size).  The
 * start checks also run on images compiled from real startup code
 * (tests/tools/fwimage, built by meson into MCUFLASHD_FWIMAGE_DIR; skipped
 * without arm-none-eabi-gcc). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <elf.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include "image/check.h"
#include "image/chips.h"
#include "image/image.h"

#define VECTOR_WORDS 64
#define APP_SIZE (12 * 1024)
#define DICT_OFFSET 0x803       /* unaligned, like .rodata */
#define TIMEOUT (10ULL * 1000000ULL)

struct buf {
        uint8_t *data;
        size_t len;
};

static void buf_free(struct buf *b) {
        free(b->data);
        b->data = NULL;
        b->len = 0;
}

static void buf_append(struct buf *b, const void *data, size_t len) {
        b->data = realloc(b->data, b->len + len + 1);
        assert_non_null(b->data);
        memcpy(b->data + b->len, data, len);
        b->len += len;
}

static void put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
        p[2] = (uint8_t) (v >> 16);
        p[3] = (uint8_t) (v >> 24);
}

static void put_le16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
}

/* zlib.compress(json, 9) of a small but real-looking dictionary. */
static uint8_t *make_dict(const char *mcu, bool with_app, size_t *ret_len) {
        char json[1024];
        uLongf n;
        uint8_t *z;

        snprintf(json, sizeof(json),
                 "{%s\"build_versions\":\"gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40\","
                 "\"commands\":{\"identify offset=%%u count=%%c\":1,\"get_uptime\":80},"
                 "\"config\":{\"CLOCK_FREQ\":180000000,\"MCU\":\"%s\",\"RESERVE_PINS_USB\":\"PA11,PA12\"},"
                 "\"license\":\"GNU GPLv3\","
                 "\"responses\":{\"identify_response offset=%%u data=%%.*s\":0},"
                 "\"version\":\"v0.13.0-46-g8c72b4a5\"}",
                 with_app ? "\"app\":\"Klipper\"," : "", mcu);
        n = compressBound(strlen(json));
        z = malloc(n);
        assert_non_null(z);
        assert_int_equal(compress2(z, &n, (const Bytef *) json, strlen(json), 9), Z_OK);
        *ret_len = n;
        return z;
}

/* The application: vector table (SP, reset handler right behind the table,
 * other handlers nearby), filler "code", the dictionary (if @mcu), padding. */
static struct buf make_app(const char *mcu, uint32_t start, uint32_t sp, size_t size) {
        struct buf b = {};
        uint32_t table = VECTOR_WORDS * 4;

        b.data = malloc(size);
        assert_non_null(b.data);
        b.len = size;
        for (size_t i = 0; i < size; i++)
                b.data[i] = (uint8_t) (0x20 + (i * 7) % 0x50);  /* never 0x78 */
        put_le32(b.data, sp);
        put_le32(b.data + 4, start + table + 0x41);
        for (unsigned i = 2; i < VECTOR_WORDS; i++) {
                uint32_t v = (i >= 7 && i <= 10) || i == 13 ? 0 :
                             i < 16 ? start + table + 0x81 + 4 * i : start + table + 0x21;
                put_le32(b.data + 4 * i, v);
        }
        if (mcu) {
                size_t dlen;
                uint8_t *dict = make_dict(mcu, true, &dlen);
                size_t offset = size >= 4096 ? DICT_OFFSET : table + 3;

                assert_true(offset + dlen < size);
                memcpy(b.data + offset, dict, dlen);
                free(dict);
        }
        return b;
}

/* Intel HEX of @len bytes at @address: type 04 records, 16 bytes a line. */
static struct buf make_hex(uint32_t address, const uint8_t *data, size_t len) {
        struct buf b = {};
        int upper = -1;

        for (size_t pos = 0; pos < len;) {
                uint32_t a = address + (uint32_t) pos;
                size_t n = MIN(MIN((size_t) 16, len - pos), (size_t) (0x10000 - (a & 0xffff)));
                uint8_t rec[5 + 16];
                char line[64];
                unsigned sum = 0;
                int k;

                if ((int) (a >> 16) != upper) {
                        upper = (int) (a >> 16);
                        uint8_t ext[] = { 2, 0, 0, 4, (uint8_t) (upper >> 8), (uint8_t) upper };

                        for (size_t i = 0; i < sizeof(ext); i++)
                                sum += ext[i];
                        k = snprintf(line, sizeof(line), ":%02X%02X%02X%02X%02X%02X%02X\n", ext[0], ext[1], ext[2],
                                     ext[3], ext[4], ext[5], (unsigned) (-sum & 0xff));
                        buf_append(&b, line, (size_t) k);
                        sum = 0;
                }
                rec[0] = (uint8_t) n;
                rec[1] = (uint8_t) (a >> 8);
                rec[2] = (uint8_t) a;
                rec[3] = 0;
                memcpy(rec + 4, data + pos, n);
                k = 0;
                line[k++] = ':';
                for (size_t i = 0; i < n + 4; i++) {
                        sum += rec[i];
                        k += snprintf(line + k, sizeof(line) - (size_t) k, "%02X", rec[i]);
                }
                k += snprintf(line + k, sizeof(line) - (size_t) k, "%02X\r\n", (unsigned) (-sum & 0xff));
                buf_append(&b, line, (size_t) k);
                pos += n;
        }
        buf_append(&b, ":0400000508000141AD\n:00000001FF\n", 32);
        return b;
}

static struct buf make_uf2(uint32_t address, const uint8_t *data, size_t len, uint32_t family) {
        struct buf b = {};
        size_t n_blocks = (len + 255) / 256;

        for (size_t i = 0; i < n_blocks; i++) {
                uint8_t block[512] = {};
                size_t n = MIN((size_t) 256, len - i * 256);

                put_le32(block, 0x0A324655);
                put_le32(block + 4, 0x9E5D5157);
                put_le32(block + 8, 0x2000);
                put_le32(block + 12, address + (uint32_t) (i * 256));
                put_le32(block + 16, 256);
                put_le32(block + 20, (uint32_t) i);
                put_le32(block + 24, (uint32_t) n_blocks);
                put_le32(block + 28, family);
                memcpy(block + 32, data + i * 256, n);
                put_le32(block + 508, 0x0AB16F30);
                buf_append(&b, block, sizeof(block));
        }
        return b;
}

/* ELF32 ARM executable: .text at @start, 32 bytes of .data loaded right
 * behind it (VMA in RAM), a .bss without file contents. */
static struct buf make_elf(uint32_t start, const uint8_t *text, size_t len, uint16_t machine) {
        struct buf b = {};
        uint8_t h[52 + 3 * 32] = {}, data_init[32];
        uint32_t text_off = sizeof(h), data_off = text_off + (uint32_t) len;

        memcpy(h, "\177ELF\1\1\1", 7);
        put_le16(h + 16, 2);                    /* ET_EXEC */
        put_le16(h + 18, machine);
        put_le32(h + 20, 1);
        put_le32(h + 24, start + 0x141);
        put_le32(h + 28, 52);                   /* e_phoff */
        put_le16(h + 40, 52);
        put_le16(h + 42, 32);
        put_le16(h + 44, 3);
        put_le16(h + 46, 40);
        /* PT_LOAD .text */
        put_le32(h + 52, 1);
        put_le32(h + 56, text_off);
        put_le32(h + 60, start);
        put_le32(h + 64, start);
        put_le32(h + 68, (uint32_t) len);
        put_le32(h + 72, (uint32_t) len);
        /* PT_LOAD .data: VMA in RAM, LMA behind .text */
        put_le32(h + 84, 1);
        put_le32(h + 88, data_off);
        put_le32(h + 92, 0x20000000);
        put_le32(h + 96, start + (uint32_t) len);
        put_le32(h + 100, sizeof(data_init));
        put_le32(h + 104, sizeof(data_init));
        /* PT_LOAD .bss: nothing in the file */
        put_le32(h + 116, 1);
        put_le32(h + 124, 0x20000020);
        put_le32(h + 128, 0x20000020);
        put_le32(h + 136, 0x400);
        for (size_t i = 0; i < sizeof(data_init); i++)
                data_init[i] = (uint8_t) i;
        buf_append(&b, h, sizeof(h));
        buf_append(&b, text, len);
        buf_append(&b, data_init, sizeof(data_init));
        return b;
}

/* ELF64 little-endian PIE for @machine, like Klipper's "linux" build of
 * klipper_mcu: PT_INTERP, one PT_LOAD holding the whole file, the "linux"
 * dictionary inside its .rodata. */
static struct buf make_host_elf(uint16_t machine) {
        static const char interp[] = "/lib64/ld-linux-x86-64.so.2";
        struct buf b = {};
        uint8_t h[64 + 2 * 56] = {}, filler[512];
        size_t dlen;
        uint8_t *dict = make_dict("linux", true, &dlen);
        uint64_t total = sizeof(h) + sizeof(interp) + sizeof(filler) + dlen;

        memcpy(h, "\177ELF\2\1\1", 7);
        put_le16(h + 16, 3);                    /* ET_DYN */
        put_le16(h + 18, machine);
        put_le32(h + 20, 1);
        put_le32(h + 32, 64);                   /* e_phoff */
        put_le16(h + 52, 64);
        put_le16(h + 54, 56);
        put_le16(h + 56, 2);
        /* PT_INTERP */
        put_le32(h + 64, 3);
        put_le32(h + 64 + 8, sizeof(h));
        put_le32(h + 64 + 32, sizeof(interp));
        /* PT_LOAD: the whole file */
        put_le32(h + 120, 1);
        put_le32(h + 120 + 32, (uint32_t) total);
        put_le32(h + 120 + 40, (uint32_t) total);
        for (size_t i = 0; i < sizeof(filler); i++)
                filler[i] = (uint8_t) (0x20 + i % 0x50);
        buf_append(&b, h, sizeof(h));
        buf_append(&b, interp, sizeof(interp));
        buf_append(&b, filler, sizeof(filler));
        buf_append(&b, dict, dlen);
        free(dict);
        return b;
}

static int load(const struct buf *b, struct image **ret, char **ret_message) {
        return image_load_memory(b->data, b->len, ret, ret_message);
}

static int check(const struct image *img, const char *mcu, uint64_t flash_start, uint64_t flash_size,
                 uint64_t *ret_start, enum image_check_error *ret_kind, char **ret_message) {
        struct image_target t = {
                .mcu_type = mcu,
                .flash_start = flash_start,
                .flash_size = flash_size,
                .bootloader = "katapult",
                .id = "usb-Klipper_stm32f429xx_123",
        };

        return image_check(img, &t, ret_start, ret_kind, ret_message);
}

static void assert_check_ok(const struct image *img, const char *mcu, uint64_t flash_start, uint64_t expected) {
        _cleanup_free_ char *message = NULL;
        enum image_check_error kind = IMAGE_CHECK_INVALID;
        uint64_t start = 0;

        assert_int_equal(check(img, mcu, flash_start, 0, &start, &kind, &message), 0);
        assert_int_equal(kind, IMAGE_CHECK_OK);
        assert_null(message);
        assert_int_equal(start, expected);
}

/* Refused with @kind and a message containing @needle. */
static void assert_check_refused(const struct image *img, const char *mcu, uint64_t flash_start,
                                 uint64_t flash_size, enum image_check_error expected_kind, const char *needle) {
        _cleanup_free_ char *message = NULL;
        enum image_check_error kind = IMAGE_CHECK_OK;

        assert_true(check(img, mcu, flash_start, flash_size, NULL, &kind, &message) < 0);
        assert_int_equal(kind, expected_kind);
        assert_non_null(message);
        if (!strstr(message, needle))
                fail_msg("message '%s' lacks '%s'", message, needle);
}

static void assert_load_fails(const struct buf *b, const char *needle) {
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;

        assert_int_equal(load(b, &img, &message), -EBADMSG);
        assert_null(img);
        assert_non_null(message);
        if (!strstr(message, needle))
                fail_msg("message '%s' lacks '%s'", message, needle);
}

static void test_bin_f4(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, APP_SIZE);
        struct buf app0 = make_app("stm32f429xx", 0x08000000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL, *img0 = NULL;
        uint64_t start;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_int_equal(img->format, IMAGE_FORMAT_BIN);
        assert_false(img->has_addresses);
        assert_int_equal(img->n_segments, 1);
        assert_int_equal(img->total_size, APP_SIZE);
        assert_memory_equal(img->segments[0].data, app.data, APP_SIZE);
        assert_non_null(img->dict);
        assert_string_equal(img->dict->mcu, "stm32f429xx");
        assert_string_equal(img->dict->version, "v0.13.0-46-g8c72b4a5");
        /* Handlers right behind the table and no .data copy or VTOR
         * literal: the image does not say where it is linked. */
        assert_int_equal(image_bin_start(img, "stm32f429xx", &start), -ENOENT);
        assert_check_ok(img, "stm32f429xx", 0x08008000, 0x08008000);
        assert_check_refused(img, "stm32f429xx", 0x08000000, 0, IMAGE_CHECK_MISMATCH,
                             "image is not linked for 0x08000000: its vector 0x08008141 points outside the 12288 "
                             "bytes it would take from there (its vectors would fit 0x08008000); this MCU has "
                             "no bootloader");

        assert_int_equal(load(&app0, &img0, NULL), 0);
        assert_check_ok(img0, "stm32f429xx", 0x08000000, 0x08000000);
        /* A "no bootloader" build must never go above a bootloader. */
        assert_check_refused(img0, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_MISMATCH,
                             "image is not linked for 0x08008000: its vector 0x08000141 points outside");
        buf_free(&app);
        buf_free(&app0);
}

static void test_bin_g0(void **state) {
        struct buf app = make_app("stm32g0b1xx", 0x08002000, 0x20024000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_check_ok(img, "stm32g0b1xx", 0x08002000, 0x08002000);
        /* Its vectors fit 0x08000000 too, and nothing in it says otherwise:
         * the .data copy of a real build does (test_fwimage_*). */
        assert_check_ok(img, "stm32g0b1xx", 0x08000000, 0x08000000);
        buf_free(&app);
}

static void test_bin_f103_offsets(void **state) {
        struct buf app = make_app("stm32f103xe", 0x08008000, 0x20010000, APP_SIZE);
        struct buf app2 = make_app("stm32f103xe", 0x08002000, 0x20010000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL, *img2 = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_int_equal(load(&app2, &img2, NULL), 0);
        assert_check_ok(img, "stm32f103xe", 0x08008000, 0x08008000);
        assert_check_ok(img2, "stm32f103xe", 0x08002000, 0x08002000);
        assert_check_refused(img, "stm32f103xe", 0x08002000, 0, IMAGE_CHECK_MISMATCH,
                             "image is not linked for 0x08002000: its vector 0x08008141 points outside the "
                             "12288 bytes it would take from there (its vectors would fit 0x08007000 or "
                             "0x08008000); this MCU's bootloader starts the application at 0x08002000 (8 KiB)");
        buf_free(&app);
        buf_free(&app2);
}

static void test_bin_bad_vectors(void **state) {
        /* Stack pointer outside the family's RAM: not a bin for this chip. */
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x30000000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_check_refused(img, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_INVALID,
                             "this .bin is no stm32f429xx application: its initial stack pointer 0x30000000 is "
                             "not in the STM32F2/F4's RAM");
        buf_free(&app);
}

static void test_bin_rp2040(void **state) {
        struct buf app = make_app("rp2040", 0x10004000, 0x20042000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_check_ok(img, "rp2040", 0x10004000, 0x10004000);
        assert_check_refused(img, "rp2040", 0x10000100, 0, IMAGE_CHECK_MISMATCH,
                             "this MCU has no bootloader");
        buf_free(&app);
}

static void test_uf2_rp2040(void **state) {
        struct buf app = make_app("rp2040", 0x10000100, 0x20042000, APP_SIZE);
        struct buf flat = {}, uf2;
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ uint8_t *bytes = NULL;
        uint8_t boot2[256];
        size_t len;

        (void) state;
        memset(boot2, 0x5a, sizeof(boot2));
        buf_append(&flat, boot2, sizeof(boot2));
        buf_append(&flat, app.data, app.len);
        uf2 = make_uf2(0x10000000, flat.data, flat.len, 0xE48BFF56);

        assert_int_equal(load(&uf2, &img, NULL), 0);
        assert_int_equal(img->format, IMAGE_FORMAT_UF2);
        assert_true(img->has_addresses);
        assert_true(img->has_uf2_family);
        assert_int_equal(img->uf2_family, 0xE48BFF56);
        assert_int_equal(img->n_segments, 1);
        assert_int_equal(img->lowest_address, 0x10000000);
        assert_int_equal(img->total_size, flat.len);
        assert_non_null(img->dict);
        assert_int_equal(image_flat(img, 0x10000000, &bytes, &len), 0);
        assert_int_equal(len, flat.len);
        assert_memory_equal(bytes, flat.data, flat.len);

        assert_check_ok(img, "rp2040", 0x10000000, 0x10000000);
        assert_check_ok(img, "rp2040", 0x10000100, 0x10000000);
        assert_check_refused(img, "rp2040", 0x10004000, 0, IMAGE_CHECK_MISMATCH,
                             "image is built without a bootloader (for 0x10000000), this MCU's bootloader "
                             "starts the application at 0x10004000 (16 KiB)");
        buf_free(&app);
        buf_free(&flat);
        buf_free(&uf2);
}

static void test_uf2_corrupt(void **state) {
        struct buf app = make_app("rp2040", 0x10004000, 0x20042000, 2048);
        struct buf uf2 = make_uf2(0x10004000, app.data, app.len, 0xE48BFF56);
        struct buf copy = {};

        (void) state;
        /* Wrong end magic in block 3. */
        buf_append(&copy, uf2.data, uf2.len);
        copy.data[3 * 512 + 508] ^= 0xff;
        assert_load_fails(&copy, "block 3 has a wrong magic");
        buf_free(&copy);

        /* Wrong second start magic in block 0. */
        buf_append(&copy, uf2.data, uf2.len);
        copy.data[5] ^= 0x01;
        assert_load_fails(&copy, "wrong magic");
        buf_free(&copy);

        /* Truncated. */
        buf_append(&copy, uf2.data, uf2.len - 100);
        assert_load_fails(&copy, "truncated UF2");
        buf_free(&copy);

        /* Block numbering. */
        buf_append(&copy, uf2.data, uf2.len);
        put_le32(copy.data + 2 * 512 + 20, 7);
        assert_load_fails(&copy, "block 2 says it is block 7");
        buf_free(&copy);

        /* Blocks that are not for main flash are skipped. */
        buf_append(&copy, uf2.data, uf2.len);
        put_le32(copy.data + 8, 0x2001);
        {
                _cleanup_(image_freep) struct image *img = NULL;

                assert_int_equal(load(&copy, &img, NULL), 0);
                assert_int_equal(img->lowest_address, 0x10004100);
        }
        buf_free(&copy);
        buf_free(&uf2);
        buf_free(&app);
}

static void test_elf(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, APP_SIZE);
        struct buf elf = make_elf(0x08008000, app.data, app.len, 40);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&elf, &img, NULL), 0);
        assert_int_equal(img->format, IMAGE_FORMAT_ELF);
        assert_true(img->has_addresses);
        /* .text and .data's load image are contiguous: one segment. */
        assert_int_equal(img->n_segments, 1);
        assert_int_equal(img->lowest_address, 0x08008000);
        assert_int_equal(img->total_size, APP_SIZE + 32);
        assert_memory_equal(img->segments[0].data, app.data, APP_SIZE);
        assert_int_equal(img->segments[0].data[APP_SIZE + 5], 5);
        assert_check_ok(img, "stm32f429xx", 0x08008000, 0x08008000);
        assert_check_refused(img, "stm32f429xx", 0x08004000, 0, IMAGE_CHECK_MISMATCH, "(16 KiB)");
        buf_free(&elf);
        buf_free(&app);
}

static void test_elf_bad(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, 1024);
        struct buf elf = make_elf(0x08008000, app.data, app.len, 40);
        struct buf other = make_elf(0x08008000, app.data, app.len, 62);
        struct buf copy = {};
        uint8_t elf64[64] = { 0x7f, 'E', 'L', 'F', 2, 1, 1 };

        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        /* A 32-bit x86 executable is a program for a Linux host, never
         * firmware for a Cortex-M. */
        assert_int_equal(load(&other, &img, NULL), 0);
        assert_true(img->host_program);
        assert_check_refused(img, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_MISMATCH,
                             "a program for a Linux host");
        buf_append(&copy, elf64, sizeof(elf64));
        put_le16(copy.data + 16, 3);
        put_le16(copy.data + 18, 62);
        assert_load_fails(&copy, "no program headers");
        put_le16(copy.data + 18, 4242);
        assert_load_fails(&copy, "unknown machine (e_machine 4242)");
        buf_free(&copy);

        buf_append(&copy, elf.data, 40);
        assert_load_fails(&copy, "truncated ELF");
        buf_free(&copy);

        buf_append(&copy, elf.data, 52 + 3 * 32 + 100);
        assert_load_fails(&copy, "truncated ELF file: segment 0");
        buf_free(&copy);

        buf_append(&copy, elf.data, elf.len);
        put_le16(copy.data + 16, 1);            /* ET_REL */
        assert_load_fails(&copy, "not an executable");
        buf_free(&copy);

        buf_free(&other);
        buf_free(&elf);
        buf_free(&app);
}

static int check_linux(const struct image *img, uint16_t host_machine, uint64_t *ret_start,
                       enum image_check_error *ret_kind, char **ret_message) {
        struct image_target t = {
                .mcu_type = "linux",
                .bootloader = "linux",
                .id = "linux-klipper_host_mcu",
                .host_elf_machine = host_machine,
        };

        return image_check(img, &t, ret_start, ret_kind, ret_message);
}

static void test_host_elf(void **state) {
        struct buf prog = make_host_elf(EM_X86_64);
        struct buf copy = {};
        struct buf app = make_app("linux", 0x08008000, 0x20020000, 1024);
        _cleanup_(image_freep) struct image *img = NULL, *bin = NULL, *trunc = NULL;
        _cleanup_free_ char *message = NULL, *message2 = NULL, *message3 = NULL;
        enum image_check_error kind = IMAGE_CHECK_OK;
        uint64_t start = 1;
        uint8_t *flat = NULL;
        size_t flat_len = 0;

        (void) state;
        assert_int_equal(load(&prog, &img, NULL), 0);
        assert_int_equal(img->format, IMAGE_FORMAT_ELF);
        assert_true(img->host_program);
        assert_true(img->host_dynamic);
        assert_int_equal(img->elf_machine, EM_X86_64);
        assert_non_null(img->dict);
        assert_string_equal(img->dict->mcu, "linux");
        /* Installed whole: the flat image is the file. */
        assert_int_equal(image_flat(img, 0, &flat, &flat_len), 0);
        assert_int_equal(flat_len, prog.len);
        assert_memory_equal(flat, prog.data, prog.len);
        free(flat);

        assert_int_equal(check_linux(img, EM_X86_64, &start, &kind, &message), 0);
        assert_int_equal(start, 0);
        assert_true(check_linux(img, EM_AARCH64, NULL, &kind, &message) < 0);
        assert_int_equal(kind, IMAGE_CHECK_MISMATCH);
        assert_non_null(strstr(message, "built for x86-64, this host runs AArch64"));
        /* Never onto a microcontroller. */
        assert_check_refused(img, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_MISMATCH, "image is for linux");

        /* A .bin is no program. */
        assert_int_equal(load(&app, &bin, NULL), 0);
        assert_true(check_linux(bin, EM_X86_64, NULL, &kind, &message2) < 0);
        assert_non_null(strstr(message2, "takes the klipper.elf"));

        /* Truncated: the PT_LOAD reaches past the end. */
        buf_append(&copy, prog.data, prog.len - 10);
        assert_int_equal(load(&copy, &trunc, &message3) < 0, 1);
        assert_non_null(strstr(message3, "truncated ELF file: segment 1"));

        buf_free(&copy);
        buf_free(&app);
        buf_free(&prog);
}

static void test_hex(void **state) {
        struct buf app = make_app("stm32f429xx", 0x0800F000, 0x20020000, APP_SIZE);
        struct buf hex = make_hex(0x0800F000, app.data, app.len);
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;

        (void) state;
        /* 0x0800F000 + 12 KiB crosses a 64 KiB boundary: two type 04 records. */
        assert_int_equal(load(&hex, &img, &message), 0);
        assert_null(message);
        assert_int_equal(img->format, IMAGE_FORMAT_HEX);
        assert_int_equal(img->n_segments, 1);
        assert_int_equal(img->lowest_address, 0x0800F000);
        assert_int_equal(img->total_size, APP_SIZE);
        assert_memory_equal(img->segments[0].data, app.data, APP_SIZE);
        assert_non_null(img->dict);
        buf_free(&hex);
        buf_free(&app);
}

static void test_hex_segments_and_gaps(void **state) {
        /* Type 02 addressing (AVR style), two pieces with a gap. */
        static const char text[] =
                ":0400000001020304F2\n"
                ":020000021000EC\n"
                ":02001000AABB89\n"
                ":00000001FF\n";
        struct buf hex = {};
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ uint8_t *flat = NULL;
        size_t len;

        (void) state;
        buf_append(&hex, text, strlen(text));
        assert_int_equal(load(&hex, &img, NULL), 0);
        assert_int_equal(img->n_segments, 2);
        assert_int_equal(img->segments[1].address, 0x10010);
        assert_null(img->dict);
        assert_int_equal(image_flat(img, 0, &flat, &len), 0);
        assert_int_equal(len, 0x10012);
        assert_int_equal(flat[3], 4);
        assert_int_equal(flat[4], 0xff);
        assert_int_equal(flat[0x10011], 0xbb);
        assert_int_equal(image_flat(img, 1, &flat, &len), -ERANGE);
        assert_check_refused(img, "atmega2560", 0x1, 0, IMAGE_CHECK_INVALID,
                             "not a Klipper image: no data dictionary found");
        buf_free(&hex);
}

static void test_hex_corrupt(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, 1024);
        struct buf hex = make_hex(0x08008000, app.data, app.len);
        struct buf copy = {};
        char *p;

        (void) state;
        /* Checksum of line 3 (the second data record). */
        buf_append(&copy, hex.data, hex.len);
        p = (char *) copy.data;
        for (int i = 0; i < 2; i++)
                p = strchr(p, '\n') + 1;
        p[9] = p[9] == '0' ? '1' : '0';
        assert_load_fails(&copy, "corrupt Intel HEX at line 3: checksum mismatch");
        buf_free(&copy);

        /* Cut in the middle of line 12. */
        p = (char *) hex.data;
        for (int i = 0; i < 11; i++)
                p = strchr(p, '\n') + 1;
        buf_append(&copy, hex.data, (size_t) ((uint8_t *) p - hex.data) + 20);
        assert_load_fails(&copy, "truncated Intel HEX at line 12");
        buf_free(&copy);

        /* Cut at a line end: no end-of-file record. */
        buf_append(&copy, hex.data, (size_t) ((uint8_t *) p - hex.data));
        assert_load_fails(&copy, "no end-of-file record");
        buf_free(&copy);

        /* Not hex in the middle. */
        buf_append(&copy, hex.data, hex.len);
        copy.data[30] = 'x';
        assert_load_fails(&copy, "at line 2");
        buf_free(&copy);

        buf_free(&hex);
        buf_free(&app);
}

static void test_garbage_and_no_dictionary(void **state) {
        struct buf garbage = {};
        struct buf app = make_app(NULL, 0x08008000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL, *img2 = NULL, *empty = NULL;
        _cleanup_free_ char *message = NULL;
        uint32_t x = 12345;

        (void) state;
        for (int i = 0; i < 4096; i++) {
                uint8_t c;

                x = x * 1103515245 + 12345;
                c = (uint8_t) (x >> 16);
                buf_append(&garbage, &c, 1);
        }
        /* Garbage is a .bin without a dictionary: loads, but check refuses. */
        assert_int_equal(load(&garbage, &img, NULL), 0);
        assert_null(img->dict);
        assert_check_refused(img, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_INVALID, "not a Klipper image");
        assert_int_equal(load(&app, &img2, NULL), 0);
        assert_null(img2->dict);
        assert_check_refused(img2, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_INVALID,
                             "not a Klipper image: no data dictionary found");

        assert_int_equal(image_load_memory("", 0, &empty, &message), -ENODATA);
        assert_null(empty);
        assert_string_equal(message, "image is empty");
        buf_free(&garbage);
        buf_free(&app);
}

static void test_old_dictionary_without_app(void **state) {
        struct buf app = make_app(NULL, 0x08008000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;
        size_t dlen;
        uint8_t *dict = make_dict("stm32f407xx", false, &dlen);

        (void) state;
        memcpy(app.data + 0x1001, dict, dlen);
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_non_null(img->dict);
        assert_null(img->dict->app);
        assert_string_equal(img->dict->mcu, "stm32f407xx");
        free(dict);
        buf_free(&app);
}

static void test_mcu_mismatch(void **state) {
        struct buf app = make_app("stm32f103xe", 0x08007000, 0x20010000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_check_refused(img, "stm32f429xx", 0x08008000, 0, IMAGE_CHECK_MISMATCH,
                             "image is for stm32f103xe, this MCU is stm32f429xx");
        assert_check_refused(img, "", 0x08008000, 0, IMAGE_CHECK_UNKNOWN_TARGET, "which MCU type");
        buf_free(&app);
}

static void test_unknown_flash_start(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        assert_check_refused(img, "stm32f429xx", IMAGE_START_UNKNOWN, 0, IMAGE_CHECK_UNKNOWN_TARGET,
                             "cannot tell where this MCU's application starts, and this .bin does not say where "
                             "it is linked (its vectors would fit 0x08008000); set FlashStart= for it in "
                             "mcuflashd.conf's [Mcu usb-Klipper_stm32f429xx_123] section");
        buf_free(&app);
}

static void test_too_big(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL;
        uint64_t start = 0;

        (void) state;
        assert_int_equal(load(&app, &img, NULL), 0);
        /* FlashSize= counts from the flash base, the bootloader included. */
        assert_check_refused(img, "stm32f429xx", 0x08008000, 40 * 1024, IMAGE_CHECK_TOO_BIG,
                             "image is 12 KiB, but this MCU has only 8 KiB of flash from 0x08008000 "
                             "(FlashSize= says 40 KiB in all)");
        assert_int_equal(check(img, "stm32f429xx", 0x08008000, 44 * 1024, &start, NULL, NULL), 0);
        assert_int_equal(start, 0x08008000);
        buf_free(&app);
}

/* Without FlashSize=, the largest part of the MCU type bounds the image. */
static void test_too_big_for_the_chip(void **state) {
        struct buf fits = make_app("stm32f446xx", 0x08008000, 0x20020000, 480 * 1024);
        struct buf big = make_app("stm32f446xx", 0x08008000, 0x20020000, 480 * 1024 + 4);
        struct buf f042 = make_app("stm32f042x6", 0x08000000, 0x20001800, 33 * 1024);
        _cleanup_(image_freep) struct image *img_fits = NULL, *img_big = NULL, *img_f042 = NULL;

        (void) state;
        assert_int_equal(load(&fits, &img_fits, NULL), 0);
        assert_int_equal(load(&big, &img_big, NULL), 0);
        assert_int_equal(load(&f042, &img_f042, NULL), 0);
        assert_int_equal(check(img_fits, "stm32f446xx", 0x08008000, 0, NULL, NULL, NULL), 0);
        assert_check_refused(img_big, "stm32f446xx", 0x08008000, 0, IMAGE_CHECK_TOO_BIG,
                             "but this MCU has only 480 KiB of flash from 0x08008000 (stm32f446xx parts have "
                             "at most 512 KiB; if this one has more, say so with FlashSize=");
        /* Where neither the MCU nor the image says where it goes: */
        assert_check_refused(img_big, "stm32f446xx", IMAGE_START_UNKNOWN, 0, IMAGE_CHECK_UNKNOWN_TARGET,
                             "set FlashStart=");
        /* The size letter of the name: x6 = 32 KiB. */
        assert_check_refused(img_f042, "stm32f042x6", 0x08000000, 0, IMAGE_CHECK_TOO_BIG,
                             "only 32 KiB of flash from 0x08000000");
        /* A stated size wins over the table. */
        assert_int_equal(check(img_f042, "stm32f042x6", 0x08000000, 64 * 1024, NULL, NULL, NULL), 0);
        buf_free(&fits);
        buf_free(&big);
        buf_free(&f042);
}

static void test_chip_flash_sizes(void **state) {
        (void) state;
        assert_int_equal(chip_flash_size("stm32f103xe"), 512 * 1024);
        assert_int_equal(chip_flash_size("stm32f070xb"), 128 * 1024);
        assert_int_equal(chip_flash_size("stm32f401xc"), 256 * 1024);
        assert_int_equal(chip_flash_size("stm32f446xx"), 512 * 1024);
        assert_int_equal(chip_flash_size("stm32f429xx"), 2 * 1024 * 1024);
        assert_int_equal(chip_flash_size("stm32g0b1xx"), 512 * 1024);
        assert_int_equal(chip_flash_size("stm32h723xx"), 1024 * 1024);
        assert_int_equal(chip_flash_size("samd21g18a"), 256 * 1024);
        assert_int_equal(chip_flash_size("same70q20b"), 1024 * 1024);
        assert_int_equal(chip_flash_size("rp2040"), 2 * 1024 * 1024);
        assert_int_equal(chip_flash_size("atmega2560"), 256 * 1024);
        assert_int_equal(chip_flash_size("lpc1769"), 512 * 1024);
        assert_int_equal(chip_flash_size("linux"), 0);
        assert_int_equal(chip_flash_size("stm32x"), 0);
        assert_int_equal(chip_flash_size("samd21gxx"), 0);
        assert_int_equal(chip_flash_size(""), 0);
        assert_int_equal(chip_flash_size(NULL), 0);
}

static void test_fd_sealed_and_max_size(void **state) {
        struct buf app = make_app("stm32f429xx", 0x08008000, 0x20020000, APP_SIZE);
        _cleanup_(image_freep) struct image *img = NULL, *big = NULL;
        _cleanup_free_ char *message = NULL;
        char path[] = "/tmp/test-image-XXXXXX";
        int fd, seals;

        (void) state;
        fd = mkstemp(path);
        assert_true(fd >= 0);
        unlink(path);
        assert_int_equal(write(fd, app.data, app.len), (ssize_t) app.len);
        assert_int_equal(lseek(fd, 0, SEEK_SET), 0);
        assert_int_equal(image_load_fd(fd, 1024 * 1024, TIMEOUT, &img, NULL), 0);
        assert_int_not_equal(img->fd, fd);
        seals = fcntl(img->fd, F_GET_SEALS);
        assert_int_equal(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL),
                         F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
        assert_true(write(img->fd, "x", 1) < 0);
        assert_true(ftruncate(img->fd, 1) < 0);
        assert_non_null(img->dict);

        assert_int_equal(lseek(fd, 0, SEEK_SET), 0);
        assert_int_equal(image_load_fd(fd, APP_SIZE - 1, TIMEOUT, &big, &message), -EFBIG);
        assert_null(big);
        assert_non_null(message);
        close(fd);

        /* A memfd is a regular file too. */
        {
                _cleanup_(image_freep) struct image *from_memfd = NULL;
                int mfd = memfd_create("test-image", MFD_CLOEXEC);

                assert_true(mfd >= 0);
                assert_int_equal(write(mfd, app.data, app.len), (ssize_t) app.len);
                assert_int_equal(image_load_fd(mfd, 1024 * 1024, TIMEOUT, &from_memfd, NULL), 0);
                assert_int_equal(from_memfd->file_size, app.len);
                close(mfd);
        }
        buf_free(&app);
}

/* Load @fd expecting -@error and a message containing @words. */
static void assert_fd_refused(int fd, int error, const char *words) {
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;

        assert_true(fd >= 0);
        assert_int_equal(image_load_fd(fd, 16 * 1024 * 1024, TIMEOUT, &img, &message), error);
        assert_null(img);
        assert_non_null(message);
        if (!strstr(message, words))
                fail_msg("'%s' does not say '%s'", message, words);
        close(fd);
}

/* Nothing but a readable regular file is read at all: none of these may
 * block or take long (the pipe's writer stays open, nothing is written). */
static void test_fd_kinds_refused(void **state) {
        char path[] = "/tmp/test-image-XXXXXX";
        int p[2], sv[2], fd;

        (void) state;
        assert_int_equal(pipe2(p, O_CLOEXEC), 0);
        assert_fd_refused(p[0], -EBADF, "pipe");
        close(p[1]);
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        assert_fd_refused(sv[0], -EBADF, "socket");
        close(sv[1]);
        assert_fd_refused(eventfd(0, EFD_CLOEXEC), -EBADF, "not a regular file");
        assert_fd_refused(open("/dev/zero", O_RDONLY | O_CLOEXEC), -EBADF, "character device");
        assert_fd_refused(open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC), -EBADF, "directory");

        fd = mkstemp(path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, ":00000001FF\n", 12), 12);
        close(fd);
        assert_fd_refused(open(path, O_WRONLY | O_CLOEXEC), -EBADF, "not open for reading");
        assert_fd_refused(open(path, O_PATH | O_CLOEXEC), -EBADF, "not open for reading");
        /* A 2 GiB sparse file: refused by its size, nothing read. */
        fd = open(path, O_RDWR | O_CLOEXEC);
        assert_int_equal(ftruncate(fd, (off_t) 2 * 1024 * 1024 * 1024), 0);
        assert_fd_refused(fd, -EFBIG, "at most 16777216 bytes");
        /* A truncated HEX file: a clear message. */
        fd = open(path, O_RDWR | O_TRUNC | O_CLOEXEC);
        assert_int_equal(write(fd, ":100000000102030405", 19), 19);
        assert_fd_refused(fd, -EBADMSG, "truncated Intel HEX");
        unlink(path);
}

/* One Intel HEX record of @n bytes (type @type) at the low 16 bits @a. */
static void hex_record(struct buf *b, uint8_t type, uint16_t a, const uint8_t *data, size_t n) {
        uint8_t rec[5 + 255] = { (uint8_t) n, (uint8_t) (a >> 8), (uint8_t) a, type };
        char line[2 * sizeof(rec) + 4];
        unsigned sum = 0;
        int k = 0;

        memcpy(rec + 4, data, n);
        line[k++] = ':';
        for (size_t i = 0; i < n + 4; i++) {
                sum += rec[i];
                k += snprintf(line + k, sizeof(line) - (size_t) k, "%02X", rec[i]);
        }
        k += snprintf(line + k, sizeof(line) - (size_t) k, "%02X\n", (unsigned) (-sum & 0xff));
        buf_append(b, line, (size_t) k);
}

/* @count one-byte records from @address, each @step bytes after the last. */
static struct buf make_tiny_record_hex(uint32_t address, size_t count, uint32_t step) {
        struct buf b = {};
        int upper = -1;

        for (size_t i = 0; i < count; i++) {
                uint32_t a = address + (uint32_t) i * step;
                uint8_t byte = (uint8_t) (i * 7);

                if ((int) (a >> 16) != upper) {
                        uint8_t ext[2] = { (uint8_t) (a >> 24), (uint8_t) (a >> 16) };

                        upper = (int) (a >> 16);
                        hex_record(&b, 4, 0, ext, 2);
                }
                hex_record(&b, 0, (uint16_t) a, &byte, 1);
        }
        hex_record(&b, 1, 0, NULL, 0);
        return b;
}

/* A HEX file of many 1-byte records costs one segment, not one per record
 * (a 16 MiB file of them once took 120 MB); scattered pieces are capped. */
static void test_hex_caps(void **state) {
        (void) state;
        {
                struct buf hex = make_tiny_record_hex(0x08000000, 200000, 1);
                _cleanup_(image_freep) struct image *img = NULL;
                _cleanup_free_ char *message = NULL;

                assert_int_equal(image_load_memory(hex.data, hex.len, &img, &message), 0);
                assert_int_equal(img->n_segments, 1);
                assert_int_equal(img->data_size, 200000);
                assert_int_equal(img->lowest_address, 0x08000000);
                assert_int_equal(img->segments[0].data[199999], (uint8_t) (199999 * 7));
                buf_free(&hex);
        }
        {
                /* 256 separate ranges are fine, 257 are not. */
                struct buf ok = make_tiny_record_hex(0x08000000, IMAGE_MAX_SEGMENTS, 2);
                struct buf hex = make_tiny_record_hex(0x08000000, IMAGE_MAX_SEGMENTS + 1, 2);
                _cleanup_(image_freep) struct image *img = NULL, *fine = NULL;
                _cleanup_free_ char *message = NULL;

                assert_int_equal(image_load_memory(ok.data, ok.len, &fine, NULL), 0);
                assert_int_equal(fine->n_segments, IMAGE_MAX_SEGMENTS);
                assert_int_equal(image_load_memory(hex.data, hex.len, &img, &message), -EBADMSG);
                assert_null(img);
                assert_non_null(strstr(message, "257 separate address ranges"));
                buf_free(&ok);
                buf_free(&hex);
        }
        {
                struct buf hex = make_tiny_record_hex(0x08000000, IMAGE_MAX_CHUNKS + 1, 2);
                _cleanup_(image_freep) struct image *img = NULL;
                _cleanup_free_ char *message = NULL;

                assert_int_equal(image_load_memory(hex.data, hex.len, &img, &message), -EBADMSG);
                assert_non_null(strstr(message, "more than 65536 separate pieces"));
                buf_free(&hex);
        }
}

/* Truncations and byte flips of every format must fail cleanly or load. */
static void test_fuzz_no_crash(void **state) {
        struct buf app = make_app("rp2040", 0x10004000, 0x20042000, 2048);
        struct buf inputs[3];
        uint32_t x = 99;

        (void) state;
        inputs[0] = make_elf(0x10004000, app.data, app.len, 40);
        inputs[1] = make_hex(0x10004000, app.data, app.len);
        inputs[2] = make_uf2(0x10004000, app.data, app.len, 0xE48BFF56);

        for (size_t k = 0; k < ELEMENTSOF(inputs); k++) {
                for (size_t cut = 0; cut < inputs[k].len; cut += 1 + cut / 8) {
                        _cleanup_(image_freep) struct image *img = NULL;
                        _cleanup_free_ char *message = NULL;
                        struct buf piece = {};
                        int r;

                        buf_append(&piece, inputs[k].data, cut);
                        r = load(&piece, &img, &message);
                        assert_true(r == 0 || ((r == -EBADMSG || r == -ENODATA) && message));
                        buf_free(&piece);
                }
                for (int round = 0; round < 300; round++) {
                        _cleanup_(image_freep) struct image *img = NULL;
                        _cleanup_free_ char *message = NULL;
                        struct buf copy = {};
                        int r;

                        buf_append(&copy, inputs[k].data, inputs[k].len);
                        for (int flips = 0; flips < 4; flips++) {
                                x = x * 1103515245 + 12345;
                                copy.data[(x >> 8) % (k == 1 ? copy.len : MIN(copy.len, (size_t) 256))] ^=
                                        (uint8_t) (1u << ((x >> 4) & 7));
                        }
                        r = load(&copy, &img, &message);
                        assert_true(r == 0 || (r == -EBADMSG && message));
                        if (r == 0) {
                                enum image_check_error kind;
                                _cleanup_free_ char *why = NULL;

                                (void) check(img, "rp2040", 0x10004000, 2 * 1024 * 1024, NULL, &kind, &why);
                        }
                        buf_free(&copy);
                }
                buf_free(&inputs[k]);
        }
        buf_free(&app);
}

/* ---- Start checks on Klipper-like builds (tests/tools/fwimage) ----
 * Images compiled with arm-none-eabi-gcc at build time, laid out like real
 * Klipper builds (protocols.md §15.3): the reset handler ~0x6900 into the
 * image, a .data copy, SCB->VTOR on STM32, RP2040 handlers in RAM.  Each
 * must pass at its link address and be refused, naming both addresses, at
 * every other start its family offers.  Skipped when the cross compiler is
 * missing (MCUFLASHD_FWIMAGE_DIR/SKIPPED says why). */

struct fw_variant {
        const char *mcu;
        uint32_t start;
        bool uf2;                       /* RP2040 no-bootloader build: UF2 and ELF only */
        uint32_t options[12];           /* the family's starts (§15.4); 0-terminated after the first */
};

static const struct fw_variant fw_variants[] = {
        { "stm32f072xb", 0x08000000, false, { 0x08000000, 0x08001000, 0x08002000, 0x08004000 } },
        { "stm32f072xb", 0x08002000, false, { 0x08000000, 0x08001000, 0x08002000, 0x08004000 } },
        { "stm32f103xe", 0x08000000, false, { 0x08000000, 0x08000800, 0x08001000, 0x08002000, 0x08004000,
                                              0x08005000, 0x08007000, 0x08008000, 0x08008800, 0x08009000,
                                              0x08010000 } },
        { "stm32f103xe", 0x08002000, false, { 0x08000000, 0x08000800, 0x08001000, 0x08002000, 0x08004000,
                                              0x08005000, 0x08007000, 0x08008000, 0x08008800, 0x08009000,
                                              0x08010000 } },
        { "stm32f103xe", 0x08000800, false, { 0x08000000, 0x08000800, 0x08001000, 0x08002000, 0x08004000,
                                              0x08005000, 0x08007000, 0x08008000, 0x08008800, 0x08009000,
                                              0x08010000 } },
        { "stm32f429xx", 0x08000000, false, { 0x08000000, 0x08004000, 0x08008000, 0x0800C000, 0x08010000,
                                              0x08020200 } },
        { "stm32f429xx", 0x08008000, false, { 0x08000000, 0x08004000, 0x08008000, 0x0800C000, 0x08010000,
                                              0x08020200 } },
        { "stm32f429xx", 0x08004000, false, { 0x08000000, 0x08004000, 0x08008000, 0x0800C000, 0x08010000,
                                              0x08020200 } },
        { "stm32g0b1xx", 0x08002000, false, { 0x08000000, 0x08002000 } },
        { "stm32h723xx", 0x08020000, false, { 0x08000000, 0x08008000, 0x08020000 } },
        { "samd21g18a", 0x2000, false, { 0x0, 0x2000, 0x4000 } },
        { "samd21g18a", 0x0, false, { 0x0, 0x2000, 0x4000 } },
        { "samd51p20a", 0x4000, false, { 0x0, 0x4000 } },
        { "sam3x8e", 0x80000, false, { 0x80000, 0x84000 } },
        { "lpc1769", 0x4000, false, { 0x0, 0x4000 } },
        { "lpc1769", 0x0, false, { 0x0, 0x4000 } },
        { "rp2040", 0x10004000, false, { 0x10000100, 0x10004000 } },
        { "rp2040", 0x10000000, true, { 0x10000100, 0x10004000 } },
};

static const char *fwimage_dir(void) {
        const char *dir = getenv("MCUFLASHD_FWIMAGE_DIR");
        char path[4096];

        if (!dir)
                return NULL;
        snprintf(path, sizeof(path), "%s/SKIPPED", dir);
        if (access(path, F_OK) == 0)
                return NULL;
        return dir;
}

/* Skips the test (with the reason) when the images were not built. */
static bool fwimage_available(void) {
        if (fwimage_dir())
                return true;
        print_message("# SKIPPED: no Klipper-like test images: %s\n",
                      getenv("MCUFLASHD_FWIMAGE_DIR") ? "arm-none-eabi-gcc is not installed" :
                      "MCUFLASHD_FWIMAGE_DIR is not set (run through meson test)");
        return false;
}

static struct image *load_fwimage(const struct fw_variant *v, const char *ext) {
        char path[4096];
        struct buf b = {};
        struct image *img = NULL;
        _cleanup_free_ char *message = NULL;
        uint8_t chunk[65536];
        ssize_t n;
        int fd;

        snprintf(path, sizeof(path), "%s/%s-%08" PRIx32 ".%s", fwimage_dir(), v->mcu, v->start, ext);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                fail_msg("cannot open %s: %m", path);
        while ((n = read(fd, chunk, sizeof(chunk))) > 0)
                buf_append(&b, chunk, (size_t) n);
        close(fd);
        if (load(&b, &img, &message) < 0)
                fail_msg("%s does not load: %s", path, strempty(message));
        buf_free(&b);
        assert_non_null(img->dict);
        assert_string_equal(img->dict->mcu, v->mcu);
        return img;
}

static void assert_message_names(const char *message, uint64_t a, uint64_t b) {
        char sa[32], sb[32];

        snprintf(sa, sizeof(sa), "0x%08" PRIx64, a);
        snprintf(sb, sizeof(sb), "0x%08" PRIx64, b);
        if (!message || !strstr(message, sa) || !strstr(message, sb))
                fail_msg("message '%s' does not name both %s and %s", strempty(message), sa, sb);
}

/* @img (linked at @link) against every start of its family. */
static void check_every_start(const struct image *img, const struct fw_variant *v, uint64_t link,
                              const char *what) {
        for (size_t i = 0; i < ELEMENTSOF(v->options) && (i == 0 || v->options[i] != 0); i++) {
                uint64_t stated = v->options[i], start = 0;
                enum image_check_error kind = IMAGE_CHECK_OK;
                _cleanup_free_ char *message = NULL;
                /* RP2040: a stated 0x10000100 means boot2 at 0x10000000. */
                bool right = stated == link || (link == 0x10000000 && stated == 0x10000100);
                int r = check(img, v->mcu, stated, 0, &start, &kind, &message);

                if (right) {
                        if (r != 0)
                                fail_msg("%s %s at 0x%08" PRIx64 ": refused: %s", v->mcu, what, stated,
                                         strempty(message));
                        assert_int_equal(start, link);
                        continue;
                }
                if (r >= 0)
                        fail_msg("%s %s linked at 0x%08" PRIx64 " accepted for 0x%08" PRIx64, v->mcu, what,
                                 link, stated);
                assert_int_equal(kind, IMAGE_CHECK_MISMATCH);
                assert_message_names(message, link, stated);
        }
}

static void test_fwimage_bin(void **state) {
        (void) state;
        if (!fwimage_available())
                skip();
        for (size_t k = 0; k < ELEMENTSOF(fw_variants); k++) {
                const struct fw_variant *v = &fw_variants[k];
                _cleanup_(image_freep) struct image *img = NULL;
                _cleanup_free_ char *message = NULL;
                enum image_check_error kind = IMAGE_CHECK_OK;
                uint64_t start = 0;

                if (v->uf2)
                        continue;
                img = load_fwimage(v, "bin");
                assert_int_equal(img->format, IMAGE_FORMAT_BIN);
                /* The image says where it is linked ... */
                assert_int_equal(image_bin_start(img, v->mcu, &start), 0);
                if (start != v->start)
                        fail_msg("%s: derived 0x%08" PRIx64 ", linked at 0x%08" PRIx32, v->mcu, start, v->start);
                /* ... which is what an MCU without a stated start is told to set. */
                assert_true(check(img, v->mcu, IMAGE_START_UNKNOWN, 0, NULL, &kind, &message) < 0);
                assert_int_equal(kind, IMAGE_CHECK_UNKNOWN_TARGET);
                assert_message_names(message, v->start, v->start);
                check_every_start(img, v, v->start, "bin");
        }
}

static void test_fwimage_elf_hex_uf2(void **state) {
        static const char *const exts[] = { "elf", "hex", "uf2" };

        (void) state;
        if (!fwimage_available())
                skip();
        for (size_t k = 0; k < ELEMENTSOF(fw_variants); k++)
                for (size_t e = 0; e < ELEMENTSOF(exts); e++) {
                        const struct fw_variant *v = &fw_variants[k];
                        _cleanup_(image_freep) struct image *img = NULL;

                        if (streq(exts[e], "uf2") != v->uf2 && !streq(exts[e], "elf"))
                                continue;
                        img = load_fwimage(v, exts[e]);
                        assert_true(img->has_addresses);
                        assert_int_equal(img->lowest_address, v->start);
                        check_every_start(img, v, v->start, exts[e]);
                }
}

/* What the build says wins over what the vectors allow. */
static void test_fwimage_kconfig(void **state) {
        const struct fw_variant *f4 = &fw_variants[7];  /* stm32f429xx at 0x08004000 */
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;
        uint64_t start = 0;

        (void) state;
        assert_int_equal(image_kconfig_flash_start("CONFIG_MACH_STM32=y\nCONFIG_STM32_FLASH_START_8000=y\n",
                                                   "stm32f429xx", &start), 0);
        assert_int_equal(start, 0x08008000);
        assert_int_equal(image_kconfig_flash_start("CONFIG_RPXXXX_FLASH_START_4000=y\n", "rp2040", &start), 0);
        assert_int_equal(start, 0x10004000);
        assert_int_equal(image_kconfig_flash_start("CONFIG_SAMD_FLASH_START_2000=y\n", "samd21g18a", &start), 0);
        assert_int_equal(start, 0x2000);
        assert_int_equal(image_kconfig_flash_start("CONFIG_LPC_FLASH_START_4000=y", "lpc1769", &start), 0);
        assert_int_equal(start, 0x4000);
        assert_int_equal(image_kconfig_flash_start("CONFIG_FLASH_APPLICATION_ADDRESS=0x0\n", "lpc1769", &start), 0);
        assert_int_equal(start, 0x0);
        assert_int_equal(image_kconfig_flash_start("# CONFIG_STM32_FLASH_START_2000 is not set\n", "stm32f103xe",
                                                   &start), -ENOENT);
        assert_int_equal(image_kconfig_flash_start("CONFIG_STM32_FLASH_START_2000=y\n", "atmega2560", &start),
                         -ENOENT);

        if (!fwimage_available())
                skip();
        assert_int_equal(f4->start, 0x08004000);
        img = load_fwimage(f4, "bin");
        free(img->dict->kconfig);
        img->dict->kconfig = strdup("CONFIG_MACH_STM32F429=y\nCONFIG_STM32_FLASH_START_8000=y\n");
        assert_non_null(img->dict->kconfig);
        assert_int_equal(image_bin_start(img, "stm32f429xx", &start), 0);
        assert_int_equal(start, 0x08008000);
        assert_check_refused(img, "stm32f429xx", 0x08004000, 0, IMAGE_CHECK_MISMATCH,
                             "image is linked for 0x08008000 (behind a 32 KiB bootloader, as its build config "
                             "shows), this MCU's bootloader starts the application at 0x08004000 (16 KiB)");
        (void) message;
}

/* The measured defect: a 0x08000000 build whose handlers sit tens of KiB
 * in fits an 8 KiB bootloader's range; its .data copy tells the truth. */
static void test_fwimage_no_bootloader_build_above_katapult(void **state) {
        const struct fw_variant *f103 = &fw_variants[2];        /* stm32f103xe at 0x08000000 */
        _cleanup_(image_freep) struct image *img = NULL;

        (void) state;
        if (!fwimage_available())
                skip();
        img = load_fwimage(f103, "bin");
        assert_check_refused(img, "stm32f103xe", 0x08002000, 0, IMAGE_CHECK_MISMATCH,
                             "image is linked for 0x08000000 (no bootloader, as its .data copy shows), this MCU's "
                             "bootloader starts the application at 0x08002000 (8 KiB); flashing it would "
                             "overwrite the bootloader");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_bin_f4),
                cmocka_unit_test(test_bin_g0),
                cmocka_unit_test(test_bin_f103_offsets),
                cmocka_unit_test(test_bin_bad_vectors),
                cmocka_unit_test(test_bin_rp2040),
                cmocka_unit_test(test_uf2_rp2040),
                cmocka_unit_test(test_uf2_corrupt),
                cmocka_unit_test(test_elf),
                cmocka_unit_test(test_elf_bad),
                cmocka_unit_test(test_host_elf),
                cmocka_unit_test(test_hex),
                cmocka_unit_test(test_hex_segments_and_gaps),
                cmocka_unit_test(test_hex_corrupt),
                cmocka_unit_test(test_garbage_and_no_dictionary),
                cmocka_unit_test(test_old_dictionary_without_app),
                cmocka_unit_test(test_mcu_mismatch),
                cmocka_unit_test(test_unknown_flash_start),
                cmocka_unit_test(test_too_big),
                cmocka_unit_test(test_too_big_for_the_chip),
                cmocka_unit_test(test_chip_flash_sizes),
                cmocka_unit_test(test_fd_sealed_and_max_size),
                cmocka_unit_test(test_fd_kinds_refused),
                cmocka_unit_test(test_hex_caps),
                cmocka_unit_test(test_fuzz_no_crash),
                cmocka_unit_test(test_fwimage_bin),
                cmocka_unit_test(test_fwimage_elf_hex_uf2),
                cmocka_unit_test(test_fwimage_kconfig),
                cmocka_unit_test(test_fwimage_no_bootloader_build_above_katapult),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
