/* Unit tests of the test hub's WATCH messages as discover/can.c parses
 * them (the rtnetlink side needs a kernel with CAN and is not covered
 * here). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "discover/can.h"

static int parse(const char *text, struct can_iface_info *info, char *buf, size_t size) {
        strncpy(buf, text, size - 1);
        buf[size - 1] = 0;
        return can_watch_parse_hub_message(buf, info);
}

static void test_up_down_gone(void **state) {
        struct can_iface_info info;
        char buf[64];

        assert_int_equal(parse("IFACE can0 up 1000000", &info, buf, sizeof(buf)), 1);
        assert_string_equal(info.name, "can0");
        assert_true(info.up);
        assert_int_equal(info.bitrate, 1000000);

        assert_int_equal(parse("IFACE can1 down", &info, buf, sizeof(buf)), 1);
        assert_string_equal(info.name, "can1");
        assert_false(info.up);

        assert_int_equal(parse("IFACE can1 gone", &info, buf, sizeof(buf)), 2);
        assert_string_equal(info.name, "can1");

        assert_int_equal(parse("IFACE can0 up", &info, buf, sizeof(buf)), 1);
        assert_int_equal(info.bitrate, 0);
        assert_int_equal(parse("SYNC", &info, buf, sizeof(buf)), 0);
}

static void test_garbage(void **state) {
        struct can_iface_info info;
        char buf[64];

        assert_int_equal(parse("", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE can0", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE can0 sideways", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE can0 up fast", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE can0 up 99999999999", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("IFACE averyveryverylongname0 up", &info, buf, sizeof(buf)), -EBADMSG);
        assert_int_equal(parse("HELLO can0 up", &info, buf, sizeof(buf)), -EBADMSG);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_up_down_gone),
                cmocka_unit_test(test_garbage),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
