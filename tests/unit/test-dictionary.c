/* Unit tests for image/dictionary.c: decompressing (zlib, bzip2) and parsing
 * Klipper and Kalico data dictionaries, the embedded build config, and the
 * malformed and oversized inputs an MCU or a stray image could hand us;
 * finding a bzip2 dictionary in an image.  The identify download that
 * produces these buffers is tested in test-klipper.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <bzlib.h>
#include <cmocka.h>

#include "core/version.h"
#include "image/dictionary.h"
#include "image/image.h"

static const char good_json[] =
        "{\"app\":\"Klipper\",\"build_versions\":\"gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40\","
        "\"commands\":{\"identify offset=%u count=%c\":1},"
        "\"config\":{\"CLOCK_FREQ\":180000000,\"MCU\":\"stm32f429xx\",\"SERIAL_BAUD\":250000,\"RESERVE_PINS_serial\":\"PA10,PA9\"},"
        "\"license\":\"GNU GPLv3\","
        "\"responses\":{\"identify_response offset=%u data=%.*s\":0},"
        "\"version\":\"v0.12.0-123-gabcdef12\"}";

/* zlib.compress(text, 9) as Klipper does; the caller frees. */
static uint8_t *compress_text(const char *text, size_t len, size_t extra, size_t *ret_len) {
        uLongf n = compressBound((uLong) len);
        uint8_t *buf = malloc(n + extra);

        assert_non_null(buf);
        assert_int_equal(compress2(buf, &n, (const Bytef *) text, (uLong) len, 9), Z_OK);
        assert_int_equal(buf[0], 0x78);
        assert_int_equal(buf[1], 0xda);
        *ret_len = n;
        return buf;
}

static int parse_text(const char *text, size_t max_size, struct klipper_dict **ret) {
        size_t len;
        uint8_t *z = compress_text(text, strlen(text), 0, &len);
        int r = klipper_dict_parse_compressed(z, len, max_size, ret);

        free(z);
        return r;
}

static void test_good_dictionary(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        json_object *v;

        (void) state;
        assert_int_equal(parse_text(good_json, 0, &d), 0);
        assert_non_null(d);
        assert_string_equal(d->app, "Klipper");
        assert_string_equal(d->version, "v0.12.0-123-gabcdef12");
        assert_string_equal(d->build_versions,
                            "gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: (2.40-2+18+b1) 2.40");
        assert_string_equal(d->mcu, "stm32f429xx");
        assert_int_equal(d->clock_freq, 180000000);
        assert_non_null(d->config);
        assert_true(json_object_object_get_ex(d->config, "SERIAL_BAUD", &v));
        assert_int_equal(json_object_get_int(v), 250000);
        assert_true(json_object_object_get_ex(d->config, "RESERVE_PINS_serial", &v));
        assert_string_equal(json_object_get_string(v), "PA10,PA9");
}

static void test_trailing_bytes(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        size_t len;
        uint8_t *z;

        (void) state;
        /* As found in an image: the stream is followed by unrelated flash. */
        z = compress_text(good_json, strlen(good_json), 64, &len);
        memset(z + len, 0xa5, 64);
        assert_int_equal(klipper_dict_parse_compressed(z, len + 64, 0, &d), 0);
        assert_string_equal(d->version, "v0.12.0-123-gabcdef12");
        free(z);
}

static void test_not_zlib(void **state) {
        struct klipper_dict *d = NULL;
        static const uint8_t junk[] = "this is certainly not a zlib stream";

        (void) state;
        assert_int_equal(klipper_dict_parse_compressed(junk, sizeof(junk), 0, &d), -EBADMSG);
        assert_null(d);
        assert_int_equal(klipper_dict_parse_compressed(junk, 0, 0, &d), -EBADMSG);
        assert_null(d);
}

static void test_truncated_zlib(void **state) {
        struct klipper_dict *d = NULL;
        size_t len;
        uint8_t *z;

        (void) state;
        z = compress_text(good_json, strlen(good_json), 0, &len);
        assert_int_equal(klipper_dict_parse_compressed(z, len / 2, 0, &d), -EBADMSG);
        /* Corrupt the stream in the middle: Adler-32 or the deflate data break. */
        z[len / 2] ^= 0xff;
        assert_int_equal(klipper_dict_parse_compressed(z, len, 0, &d), -EBADMSG);
        assert_null(d);
        free(z);
}

static void test_zlib_of_non_json(void **state) {
        struct klipper_dict *d = NULL;

        (void) state;
        assert_int_equal(parse_text("Hello, I am not JSON at all", 0, &d), -EBADMSG);
        assert_int_equal(parse_text("{\"version\":\"v0.12.0\"", 0, &d), -EBADMSG);
        assert_int_equal(parse_text("[\"version\"]", 0, &d), -EBADMSG);
        assert_int_equal(parse_text("{\"version\":\"v0.12.0\"} trailing", 0, &d), -EBADMSG);
        assert_null(d);
}

static void test_missing_version(void **state) {
        struct klipper_dict *d = NULL;

        (void) state;
        assert_int_equal(parse_text("{\"app\":\"Klipper\",\"config\":{\"MCU\":\"rp2040\"}}", 0, &d), -EBADMSG);
        assert_int_equal(parse_text("{\"app\":\"Klipper\",\"version\":12}", 0, &d), -EBADMSG);
        assert_null(d);
}

static void test_clock_freq_variants(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *a = NULL, *b = NULL, *c = NULL, *e = NULL;

        (void) state;
        assert_int_equal(parse_text("{\"version\":\"v1\",\"config\":{\"CLOCK_FREQ\":\"48000000\",\"MCU\":\"rp2040\"}}",
                                    0, &a), 0);
        assert_int_equal(a->clock_freq, 48000000);
        assert_string_equal(a->mcu, "rp2040");

        assert_int_equal(parse_text("{\"version\":\"v1\",\"config\":{\"CLOCK_FREQ\":5e7}}", 0, &b), 0);
        assert_int_equal(b->clock_freq, 50000000);
        assert_null(b->mcu);

        assert_int_equal(parse_text("{\"version\":\"v1\",\"config\":{\"CLOCK_FREQ\":\"fast\"}}", 0, &c), 0);
        assert_int_equal(c->clock_freq, 0);

        /* Old builds: no "app", no config at all. */
        assert_int_equal(parse_text("{\"version\":\"v0.9.1-1-g1234567\"}", 0, &e), 0);
        assert_null(e->app);
        assert_null(e->build_versions);
        assert_null(e->config);
        assert_int_equal(e->clock_freq, 0);
        assert_string_equal(e->version, "v0.9.1-1-g1234567");
}

static void test_oversize(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        size_t len = strlen(good_json);

        (void) state;
        assert_int_equal(parse_text(good_json, 100, &d), -E2BIG);
        assert_null(d);
        assert_int_equal(parse_text(good_json, len - 1, &d), -E2BIG);
        assert_null(d);
        /* Exactly at the limit is fine. */
        assert_int_equal(parse_text(good_json, len, &d), 0);
        assert_non_null(d);
}

static void test_large_dictionary(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        size_t cap = 200000, n = 0;
        char *json = malloc(cap);

        (void) state;
        assert_non_null(json);
        /* Well beyond the inflate buffer's first allocation. */
        n += (size_t) snprintf(json + n, cap - n, "{\"commands\":{");
        for (unsigned i = 0; i < 3000; i++)
                n += (size_t) snprintf(json + n, cap - n, "%s\"command_%u value=%%u\":%u",
                                       i ? "," : "", i * 7919u, i);
        n += (size_t) snprintf(json + n, cap - n, "},\"version\":\"v0.12.0-1-g0000000\"}");
        assert_true(n < cap);

        assert_int_equal(parse_text(json, 0, &d), 0);
        assert_string_equal(d->version, "v0.12.0-1-g0000000");
        klipper_dict_free(TAKE_PTR(d));
        assert_int_equal(parse_text(json, n / 2, &d), -E2BIG);
        free(json);
}

static void test_parse_json(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *a = NULL, *b = NULL;
        struct klipper_dict *c = NULL;
        static const char padded[] = "  {\"version\":\"v2\"}\n\n";

        (void) state;
        assert_int_equal(klipper_dict_parse_json(good_json, strlen(good_json), &a), 0);
        assert_string_equal(a->mcu, "stm32f429xx");
        /* out/klipper.dict style: whitespace around, NUL included in len. */
        assert_int_equal(klipper_dict_parse_json(padded, sizeof(padded), &b), 0);
        assert_string_equal(b->version, "v2");
        assert_int_equal(klipper_dict_parse_json("{\"version\":\"v2\"}x", 17, &c), -EBADMSG);
        assert_int_equal(klipper_dict_parse_json("", 0, &c), -EBADMSG);
        assert_null(c);
        assert_null(klipper_dict_free(NULL));
}

/* The config of an EBB36 build, as Klipper ≥ v0.13.0-753 embeds it. */
static const char ebb36_kconfig[] =
        "CONFIG_MACH_STM32=y\n"
        "CONFIG_MACH_STM32G0B1=y\n"
        "CONFIG_STM32_FLASH_START_2000=y\n"
        "CONFIG_STM32_CLOCK_REF_8M=y\n"
        "CONFIG_STM32_CANBUS_PB0_PB1=y\n"
        "CONFIG_CANBUS_FREQUENCY=1000000\n";

/* The JSON of a newer build: @app, and "kconfig" in the @shape given
 * ("string", "object", or NULL for none). */
static char *newer_json(const char *app, const char *shape) {
        char *json = NULL, kconfig[512] = "";
        int n;

        if (streq_ptr(shape, "string"))
                snprintf(kconfig, sizeof(kconfig), "\"kconfig\":\"%s\",", "CONFIG_MACH_STM32=y\\n"
                         "CONFIG_MACH_STM32G0B1=y\\nCONFIG_STM32_FLASH_START_2000=y\\nCONFIG_STM32_CLOCK_REF_8M=y\\n"
                         "CONFIG_STM32_CANBUS_PB0_PB1=y\\nCONFIG_CANBUS_FREQUENCY=1000000\\n");
        else if (streq_ptr(shape, "object"))
                snprintf(kconfig, sizeof(kconfig), "\"kconfig\":{\"defconfig\":\"CONFIG_MACH_STM32=y\\n\"},");
        else if (shape)
                snprintf(kconfig, sizeof(kconfig), "\"kconfig\":%s,", shape);
        n = asprintf(&json,
                     "{\"app\":\"%s\",\"build_versions\":\"gcc: (15:12.2.rel1-1) 12.2.1 20221205 binutils: 2.40\","
                     "\"commands\":{\"identify offset=%%u count=%%c\":1},"
                     "\"config\":{\"CANBUS_FREQUENCY\":1000000,\"CLOCK_FREQ\":64000000,\"MCU\":\"stm32g0b1xx\"},"
                     "%s\"license\":\"GNU GPLv3\","
                     "\"responses\":{\"identify_response offset=%%u data=%%.*s\":0},"
                     "\"version\":\"v2026.09.00-3-g1a2b3c4d\"}", app, kconfig);
        assert_true(n > 0);
        return json;
}

/* bz2.compress(text, 9) as Kalico does; the caller frees. */
static uint8_t *bzip2_text(const char *text, size_t len, size_t extra, size_t *ret_len) {
        unsigned n = (unsigned) (len + len / 100 + 600);
        uint8_t *buf = malloc(n + extra);

        assert_non_null(buf);
        assert_int_equal(BZ2_bzBuffToBuffCompress((char *) buf, &n, (char *) text, (unsigned) len, 9, 0, 0), BZ_OK);
        assert_memory_equal(buf, "BZh91AY&SY", 10);
        *ret_len = n;
        return buf;
}

static int parse_bzip2(const char *text, size_t max_size, struct klipper_dict **ret) {
        size_t len;
        uint8_t *b = bzip2_text(text, strlen(text), 0, &len);
        int r = klipper_dict_parse_compressed(b, len, max_size, ret);

        free(b);
        return r;
}

static void test_bzip2_dictionary(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL, *e = NULL;
        _cleanup_free_ char *json = newer_json("Kalico", "string");
        size_t len;
        uint8_t *b;

        (void) state;
        assert_int_equal(parse_bzip2(json, 0, &d), 0);
        assert_string_equal(d->app, "Kalico");
        assert_true(klipper_dict_app_is_klipper(d->app));
        assert_string_equal(d->version, "v2026.09.00-3-g1a2b3c4d");
        assert_string_equal(d->mcu, "stm32g0b1xx");
        assert_int_equal(d->clock_freq, 64000000);
        assert_true(d->has_commands);
        assert_string_equal(d->kconfig, ebb36_kconfig);

        /* As found in an image: unrelated flash follows the stream. */
        b = bzip2_text(json, strlen(json), 100, &len);
        memset(b + len, 0x42, 100);
        assert_int_equal(klipper_dict_parse_compressed(b, len + 100, 0, &e), 0);
        assert_string_equal(e->kconfig, ebb36_kconfig);
        free(b);
}

static void test_kconfig_shapes(void **state) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *a = NULL, *b = NULL, *c = NULL, *e = NULL, *f = NULL;
        _cleanup_free_ char *string = newer_json("Klipper", "string"), *object = newer_json("Klipper", "object"),
                            *none = newer_json("Klipper", NULL), *number = newer_json("Klipper", "42"),
                            *empty_object = newer_json("Klipper", "{\"other\":1}");

        (void) state;
        /* Klipper's own compression (zlib) with the config in both shapes. */
        assert_int_equal(parse_text(string, 0, &a), 0);
        assert_string_equal(a->kconfig, ebb36_kconfig);
        assert_int_equal(parse_text(object, 0, &b), 0);
        assert_string_equal(b->kconfig, "CONFIG_MACH_STM32=y\n");
        /* Older firmware, and shapes nobody uses: no config, still a dictionary. */
        assert_int_equal(parse_text(none, 0, &c), 0);
        assert_null(c->kconfig);
        assert_int_equal(parse_bzip2(number, 0, &e), 0);
        assert_null(e->kconfig);
        assert_int_equal(parse_bzip2(empty_object, 0, &f), 0);
        assert_null(f->kconfig);
        assert_string_equal(f->version, "v2026.09.00-3-g1a2b3c4d");
}

/* A few bytes that expand to megabytes must be refused, not swallowed. */
static void test_bombs(void **state) {
        struct klipper_dict *d = NULL;
        size_t big = 64 * 1024 * 1024, len;
        char *text = malloc(big + 1);
        uint8_t *z;
        uLongf zn = compressBound((uLong) big);

        (void) state;
        assert_non_null(text);
        text[0] = '{';
        memset(text + 1, ' ', big - 1);
        text[big] = '\0';

        z = malloc(zn);
        assert_non_null(z);
        assert_int_equal(compress2(z, &zn, (const Bytef *) text, (uLong) big, 9), Z_OK);
        assert_true(zn < 100 * 1024);
        assert_int_equal(klipper_dict_parse_compressed(z, zn, 1024 * 1024, &d), -E2BIG);
        assert_int_equal(klipper_dict_parse_compressed(z, zn, 0, &d), -E2BIG);
        free(z);

        z = bzip2_text(text, big, 0, &len);
        assert_true(len < 1024);
        assert_int_equal(klipper_dict_parse_compressed(z, len, 1024 * 1024, &d), -E2BIG);
        assert_int_equal(klipper_dict_parse_compressed(z, len, 0, &d), -E2BIG);
        assert_null(d);
        free(z);
        free(text);
}

static void test_garbage_after_magic(void **state) {
        struct klipper_dict *d = NULL;
        uint8_t junk[256];
        _cleanup_free_ char *out = NULL;
        size_t n;

        (void) state;
        for (size_t i = 0; i < sizeof(junk); i++)
                junk[i] = (uint8_t) (i * 37 + 11);
        memcpy(junk, "BZh9", 4);
        assert_int_equal(klipper_dict_parse_compressed(junk, sizeof(junk), 0, &d), -EBADMSG);
        memcpy(junk, "BZh91AY&SY", 10);
        assert_int_equal(klipper_dict_parse_compressed(junk, sizeof(junk), 0, &d), -EBADMSG);
        memcpy(junk, "BZh0", 4);        /* no such block size */
        assert_int_equal(klipper_dict_parse_compressed(junk, sizeof(junk), 0, &d), -EBADMSG);
        junk[0] = 0x78;
        junk[1] = 0xda;
        assert_int_equal(klipper_dict_parse_compressed(junk, sizeof(junk), 0, &d), -EBADMSG);
        junk[1] = 0xdb;                 /* FCHECK wrong */
        assert_int_equal(klipper_dict_decompress(junk, sizeof(junk), 4096, &out, &n), -EBADMSG);
        /* Just the magic, nothing more. */
        assert_int_equal(klipper_dict_parse_compressed("BZh9", 4, 0, &d), -EBADMSG);
        assert_int_equal(klipper_dict_parse_compressed("BZ", 2, 0, &d), -EBADMSG);
        assert_int_equal(klipper_dict_parse_compressed("\x78\xda", 2, 0, &d), -EBADMSG);
        assert_null(d);
        assert_null(out);
}

static void test_truncated_bzip2(void **state) {
        _cleanup_free_ char *json = newer_json("Kalico", "string");
        struct klipper_dict *d = NULL;
        size_t len;
        uint8_t *b;

        (void) state;
        b = bzip2_text(json, strlen(json), 0, &len);
        assert_int_equal(klipper_dict_parse_compressed(b, len / 2, 0, &d), -EBADMSG);
        assert_int_equal(klipper_dict_parse_compressed(b, len - 1, 0, &d), -EBADMSG);
        assert_int_equal(klipper_dict_parse_compressed(b, 10, 0, &d), -EBADMSG);
        /* A flipped bit in the middle: the block CRC catches it. */
        b[len / 2] ^= 0x10;
        assert_int_equal(klipper_dict_parse_compressed(b, len, 0, &d), -EBADMSG);
        assert_null(d);
        free(b);
}

static void test_find_stream(void **state) {
        uint8_t flash[4096];
        size_t zlen, blen;
        uint8_t *z = compress_text(good_json, strlen(good_json), 0, &zlen);
        _cleanup_free_ char *json = newer_json("Kalico", "string");
        uint8_t *b = bzip2_text(json, strlen(json), 0, &blen);

        (void) state;
        memset(flash, 0, sizeof(flash));
        memcpy(flash + 100, "BZh9 but no block", 17);     /* not a stream */
        memcpy(flash + 300, "\x78\x9c", 2);                 /* zlib, but not level 9 */
        memcpy(flash + 1000, b, blen);
        memcpy(flash + 3000, z, zlen);
        assert_int_equal(klipper_dict_find_stream(flash, sizeof(flash), 0), 1000);
        assert_int_equal(klipper_dict_find_stream(flash, sizeof(flash), 1001), 3000);
        assert_int_equal(klipper_dict_find_stream(flash, sizeof(flash), 3001), sizeof(flash));
        /* A bzip2 magic cut by the end of the data is not a candidate. */
        assert_int_equal(klipper_dict_find_stream(flash, 1005, 0), 1005);
        assert_int_equal(klipper_dict_find_stream(flash, 0, 0), 0);
        free(z);
        free(b);
}

/* The image loader finds a bzip2 (Kalico, or a Klipper build with config)
 * dictionary in a flat image, and not a foreign app's. */
static void test_image_with_bzip2_dictionary(void **state) {
        _cleanup_free_ char *kalico = newer_json("Kalico", "string"), *foreign = newer_json("Marlin", "string");
        _cleanup_(image_freep) struct image *img = NULL, *other = NULL;
        _cleanup_free_ char *message = NULL;
        size_t size = 48 * 1024, blen, flen;
        uint8_t *flash = malloc(size);
        uint8_t *b = bzip2_text(kalico, strlen(kalico), 0, &blen), *f = bzip2_text(foreign, strlen(foreign), 0, &flen);

        (void) state;
        assert_non_null(flash);
        for (size_t i = 0; i < size; i++)
                flash[i] = (uint8_t) (i * 2654435761u >> 13);
        memcpy(flash + 0x6003, f, flen);             /* unaligned, like rodata */
        memcpy(flash + 0x7001, b, blen);
        assert_int_equal(image_load_memory(flash, size, &img, &message), 0);
        assert_non_null(img->dict);
        assert_string_equal(img->dict->app, "Kalico");
        assert_string_equal(img->dict->kconfig, ebb36_kconfig);
        assert_string_equal(img->dict->mcu, "stm32g0b1xx");

        /* Only the foreign one: no Klipper dictionary in there. */
        memset(flash + 0x7001, 0, blen);
        assert_int_equal(image_load_memory(flash, size, &other, &message), 0);
        assert_null(other->dict);
        free(flash);
        free(b);
        free(f);
}

/* Kalico's versions (v2026.09.00-3-gabc) go through the same rule (§16). */
static void test_kalico_versions(void **state) {
        (void) state;
        assert_int_equal(version_compare("v2026.09.00-3-g1a2b3c4d", "v2026.09.00-3-g1a2b3c4d"), VERSION_MATCH_YES);
        assert_int_equal(version_compare("v2026.09.00-3-g1a2b3c4d-dirty-20261201_101010-pi",
                                         "v2026.09.00-3-g1a2b3c4d"), VERSION_MATCH_YES);
        assert_int_equal(version_compare("v2026.09.00-3-g1a2b3c4d", "v2026.09.00-4-g5e6f7a8b"), VERSION_MATCH_NO);
        assert_int_equal(version_compare("v2026.09.00-3-g1a2b3c4d", "v0.13.0-753-g1a2b3c4d"), VERSION_MATCH_NO);
        assert_int_equal(version_compare("v2026.09.00-3-g1a2b3c4d", "?"), VERSION_MATCH_UNKNOWN);
        assert_false(klipper_dict_app_is_klipper("Katapult"));
        assert_false(klipper_dict_app_is_klipper(NULL));
        assert_true(klipper_dict_app_is_klipper("Klipper"));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_good_dictionary),
                cmocka_unit_test(test_trailing_bytes),
                cmocka_unit_test(test_not_zlib),
                cmocka_unit_test(test_truncated_zlib),
                cmocka_unit_test(test_zlib_of_non_json),
                cmocka_unit_test(test_missing_version),
                cmocka_unit_test(test_clock_freq_variants),
                cmocka_unit_test(test_oversize),
                cmocka_unit_test(test_large_dictionary),
                cmocka_unit_test(test_parse_json),
                cmocka_unit_test(test_bzip2_dictionary),
                cmocka_unit_test(test_kconfig_shapes),
                cmocka_unit_test(test_bombs),
                cmocka_unit_test(test_garbage_after_magic),
                cmocka_unit_test(test_truncated_bzip2),
                cmocka_unit_test(test_find_stream),
                cmocka_unit_test(test_image_with_bzip2_dictionary),
                cmocka_unit_test(test_kalico_versions),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
