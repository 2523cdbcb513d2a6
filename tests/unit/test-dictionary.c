/* Unit tests for image/dictionary.c: inflating and parsing Klipper data
 * dictionaries, including the malformed and oversized inputs an MCU or a
 * stray image could hand us.  The identify download that produces these
 * buffers is tested in test-klipper.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <cmocka.h>

#include "image/dictionary.h"

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
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
