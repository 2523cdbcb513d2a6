/* Unit tests for the UTF-8 gate in daemon/shared/strutil.c: what
 * utf8_is_valid() accepts and what utf8_sanitize() makes of ill-formed
 * input (overlong forms, surrogates, truncated sequences, code points above
 * U+10FFFF, stray continuation bytes, control characters), and that valid
 * multibyte text passes unchanged. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "shared/macro.h"
#include "shared/strutil.h"

#define FFFD "\xEF\xBF\xBD"

static void check(const char *in, bool valid, const char *expected) {
        _cleanup_free_ char *out = utf8_sanitize(in);

        assert_non_null(out);
        assert_int_equal(utf8_is_valid(in), valid);
        assert_string_equal(out, expected);
        assert_true(utf8_is_valid(out));
}

static void test_valid_kept(void **state) {
        check("", true, "");
        check("mcu EBBCan", true, "mcu EBBCan");
        check("tab\tand\nnewline", true, "tab\tand\nnewline");
        /* 2-, 3- and 4-byte forms, the edges of each range. */
        check("\xC2\x80 \xDF\xBF", true, "\xC2\x80 \xDF\xBF");
        check("Düse ✓ 温度", true, "Düse ✓ 温度");
        check("\xE0\xA0\x80 \xED\x9F\xBF \xEE\x80\x80 \xEF\xBF\xBF", true,
              "\xE0\xA0\x80 \xED\x9F\xBF \xEE\x80\x80 \xEF\xBF\xBF");
        check("\xF0\x90\x80\x80 🖨 \xF4\x8F\xBF\xBF", true, "\xF0\x90\x80\x80 🖨 \xF4\x8F\xBF\xBF");
}

static void test_invalid_bytes(void **state) {
        check("mcu \xFF\xFE", false, "mcu " FFFD FFFD);
        /* A continuation byte without a lead. */
        check("a\x80" "b", false, "a" FFFD "b");
        check("\xBF\xBF", false, FFFD FFFD);
}

static void test_overlong(void **state) {
        /* '/' as 2, 3 and 4 bytes; C0/C1 can never start a sequence. */
        check("\xC0\xAF", false, FFFD FFFD);
        check("\xC1\xBF", false, FFFD FFFD);
        check("\xE0\x80\xAF", false, FFFD FFFD FFFD);
        check("\xE0\x9F\xBF", false, FFFD FFFD FFFD);
        check("\xF0\x80\x80\xAF", false, FFFD FFFD FFFD FFFD);
        check("\xF0\x8F\xBF\xBF", false, FFFD FFFD FFFD FFFD);
}

static void test_surrogates(void **state) {
        /* U+D800, U+DBFF, U+DC00, U+DFFF (CESU-style pairs too). */
        check("x\xED\xA0\x80y", false, "x" FFFD FFFD FFFD "y");
        check("\xED\xAF\xBF", false, FFFD FFFD FFFD);
        check("\xED\xB0\x80", false, FFFD FFFD FFFD);
        check("\xED\xBF\xBF", false, FFFD FFFD FFFD);
        check("\xED\xA0\xBD\xED\xB2\xA9", false, FFFD FFFD FFFD FFFD FFFD FFFD);
}

static void test_above_max(void **state) {
        /* U+110000 and lead bytes F5…FF. */
        check("\xF4\x90\x80\x80", false, FFFD FFFD FFFD FFFD);
        check("\xF5\x80\x80\x80", false, FFFD FFFD FFFD FFFD);
        check("\xF8\x88\x80\x80\x80", false, FFFD FFFD FFFD FFFD FFFD);
}

static void test_truncated(void **state) {
        /* One U+FFFD per maximal subpart: the lead byte with the
         * continuation bytes that were still acceptable. */
        check("\xE2\x82", false, FFFD);
        check("\xE2\x82" "A", false, FFFD "A");
        check("\xF0\x9F\x96", false, FFFD);
        check("\xF0\x9F\x96" "\xE2\x9C\x93", false, FFFD "✓");
        check("end \xC3", false, "end " FFFD);
        check("\xC3 ", false, FFFD " ");
}

static void test_controls(void **state) {
        /* Valid UTF-8, but nothing a name or version should carry. */
        check("a\x01\x1b[31mb\x7f" "c\r", true, "a[31mbc");
        check("\xC2\x85", true, "\xC2\x85");     /* C1 controls are left alone */
}

static void test_free_and_strdup_utf8(void **state) {
        _cleanup_free_ char *s = NULL;

        assert_int_equal(free_and_strdup_utf8(&s, "mcu \xFF"), 1);
        assert_string_equal(s, "mcu " FFFD);
        assert_int_equal(free_and_strdup_utf8(&s, "mcu \xFE"), 0);
        assert_int_equal(free_and_strdup_utf8(&s, NULL), 1);
        assert_null(s);
        assert_null(utf8_sanitize(NULL));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_valid_kept),
                cmocka_unit_test(test_invalid_bytes),
                cmocka_unit_test(test_overlong),
                cmocka_unit_test(test_surrogates),
                cmocka_unit_test(test_above_max),
                cmocka_unit_test(test_truncated),
                cmocka_unit_test(test_controls),
                cmocka_unit_test(test_free_and_strdup_utf8),
        };

        return cmocka_run_group_tests_name("strutil", tests, NULL, NULL);
}
