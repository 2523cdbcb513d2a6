/* Unit tests for daemon/core/config.c: defaults, every key, value
 * validation with file:line in the messages, warnings for unknown keys and
 * sections, SerialDevices= list semantics and parse_sec().  Each test writes
 * its files into a fresh mkdtemp() directory; stderr is captured where the
 * log message itself is checked. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "shared/macro.h"
#include "test-util.h"

#define USEC_PER_SEC UINT64_C(1000000)

static void test_defaults(void **state) {
        _cleanup_(config_freep) struct config *c = NULL;

        assert_int_equal(config_new(&c), 0);
        assert_null(c->klipper_path);
        assert_null(c->printer_config);
        assert_null(c->api_socket);
        assert_string_equal(c->klipper_service, "klipper.service");
        assert_null(c->extra_serial_devices);
        assert_int_equal(c->identify_timeout_usec, 5 * USEC_PER_SEC);
        assert_int_equal(c->offline_timeout_usec, 600 * USEC_PER_SEC);
}

static void test_all_keys(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *path = NULL;

        path = write_file(f, "all.conf",
                          "# mcuflashd configuration\n"
                          "; another comment style\n"
                          "\n"
                          "[Klipper]\n"
                          "Path = /home/pi/klipper\n"
                          "  PrinterConfig=/home/pi/printer_data/config/printer.cfg  \n"
                          "ApiSocket=/home/pi/printer_data/comms/klippy.sock\n"
                          "Service=klipper-2.service\n"
                          "\t# indented comment\n"
                          "[ Discovery ]\n"
                          "SerialDevices=/dev/ttyAMA0 /dev/ttyS1\n"
                          "IdentifyTimeoutSec=250ms\n"
                          "OfflineTimeoutSec=2min\r\n");

        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, path, false), 0);
        assert_string_equal(c->klipper_path, "/home/pi/klipper");
        assert_string_equal(c->printer_config, "/home/pi/printer_data/config/printer.cfg");
        assert_string_equal(c->api_socket, "/home/pi/printer_data/comms/klippy.sock");
        assert_string_equal(c->klipper_service, "klipper-2.service");
        assert_non_null(c->extra_serial_devices);
        assert_string_equal(c->extra_serial_devices[0], "/dev/ttyAMA0");
        assert_string_equal(c->extra_serial_devices[1], "/dev/ttyS1");
        assert_null(c->extra_serial_devices[2]);
        assert_int_equal(c->identify_timeout_usec, 250000);
        assert_int_equal(c->offline_timeout_usec, 120 * USEC_PER_SEC);
}

static void test_empty_values_reset(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *path = NULL;

        path = write_file(f, "reset.conf",
                          "[Klipper]\n"
                          "Path=/opt/klipper\n"
                          "Path=\n"
                          "Service=other.service\n"
                          "Service=\n"
                          "[Discovery]\n"
                          "IdentifyTimeoutSec=1\n"
                          "IdentifyTimeoutSec=\n"
                          "OfflineTimeoutSec=0\n");

        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, path, false), 0);
        assert_null(c->klipper_path);
        assert_string_equal(c->klipper_service, "klipper.service");
        assert_int_equal(c->identify_timeout_usec, 5 * USEC_PER_SEC);
        assert_int_equal(c->offline_timeout_usec, 0);
}

static void test_missing_file(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *path = NULL;

        assert_true(asprintf(&path, "%s/nonexistent.conf", f->dir) > 0);
        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, path, true), 0);
        assert_string_equal(c->klipper_service, "klipper.service");
        assert_int_equal(config_load(c, path, false), -ENOENT);
}

static void test_bad_values(void **state) {
        static const struct {
                const char *content;
                unsigned line;
        } cases[] = {
                { "[Klipper]\nPath=relative/path\n", 2 },
                { "[Klipper]\nPrinterConfig=printer.cfg\n", 2 },
                { "[Klipper]\n\n\nApiSocket=~/klippy.sock\n", 4 },
                { "[Klipper]\nService=klipper\n", 2 },
                { "[Klipper]\nService=klipper .service\n", 2 },
                { "[Klipper]\nService=a/b.service\n", 2 },
                { "[Discovery]\nIdentifyTimeoutSec=-5\n", 2 },
                { "[Discovery]\nIdentifyTimeoutSec=0\n", 2 },
                { "[Discovery]\n# comment\nOfflineTimeoutSec=soon\n", 3 },
                { "[Discovery]\nOfflineTimeoutSec=5 parsecs\n", 2 },
                { "[Discovery]\nSerialDevices=/dev/ttyS0 ttyS1\n", 2 },
                { "[Klipper]\nPath /home/pi/klipper\n", 2 },
                { "[Klipper\nPath=/home/pi/klipper\n", 1 },
                { "[Klipper]\n=/home/pi/klipper\n", 2 },
                { "[Mcu 2E00]\nFlashStart=32k\n", 2 },
                { "[Mcu 2E00]\nFlashSize=512 parsecs\n", 2 },
                { "[Mcu 2E00]\nFlashSize=0\n", 2 },
                { "[Mcu 2E00]\nFlashSize=-1M\n", 2 },
                { "[Mcu 2E00]\nFlashSize=K\n", 2 },
                { "[Mcu linux-klipper_host_mcu]\nProgram=klipper_mcu\n", 2 },
                { "[Mcu linux-klipper_host_mcu]\nService=klipper-mcu\n", 2 },
        };
        struct fixture *f = *state;

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                _cleanup_(config_freep) struct config *c = NULL;
                _cleanup_free_ char *path = NULL, *log = NULL, *expected = NULL;
                char name[32];

                snprintf(name, sizeof(name), "bad%zu.conf", i);
                path = write_file(f, name, cases[i].content);
                assert_int_equal(config_new(&c), 0);

                capture_begin(f);
                assert_int_equal(config_load(c, path, false), -EINVAL);
                log = capture_end(f);

                assert_true(asprintf(&expected, "%s:%u: ", path, cases[i].line) > 0);
                if (!strstr(log, expected))
                        fail_msg("case %zu: expected '%s' in log '%s'", i, expected, log);

                /* Nothing of a rejected file is applied. */
                assert_null(c->klipper_path);
                assert_string_equal(c->klipper_service, "klipper.service");
                assert_null(c->extra_serial_devices);
                assert_int_equal(c->identify_timeout_usec, 5 * USEC_PER_SEC);
        }
}

static void test_bad_value_keeps_previous_config(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *good = NULL, *bad = NULL;

        good = write_file(f, "good.conf", "[Klipper]\nPath=/opt/klipper\n[Discovery]\nSerialDevices=/dev/ttyS0\n");
        bad = write_file(f, "bad.conf",
                         "[Klipper]\nPath=/elsewhere\n[Discovery]\nSerialDevices=\nIdentifyTimeoutSec=x\n");
        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, good, false), 0);
        assert_int_equal(config_load(c, bad, false), -EINVAL);
        assert_string_equal(c->klipper_path, "/opt/klipper");
        assert_string_equal(c->extra_serial_devices[0], "/dev/ttyS0");
        assert_null(c->extra_serial_devices[1]);
}

static void test_unknown_keys_warn(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *path = NULL, *log = NULL, *expected = NULL;

        path = write_file(f, "unknown.conf",
                          "Orphan=1\n"
                          "[Klipper]\n"
                          "Colour=blue\n"
                          "Path=/home/pi/klipper\n"
                          "[Flashing]\n"
                          "AutoFlash=yes\n"
                          "[Discovery]\n"
                          "path=/lowercase/is/another/key\n"
                          "IdentifyTimeoutSec=3\n");
        assert_int_equal(config_new(&c), 0);

        capture_begin(f);
        assert_int_equal(config_load(c, path, false), 0);
        log = capture_end(f);

        assert_string_equal(c->klipper_path, "/home/pi/klipper");
        assert_int_equal(c->identify_timeout_usec, 3 * USEC_PER_SEC);

        assert_true(asprintf(&expected, "%s:1: ", path) > 0);
        assert_non_null(strstr(log, expected));
        free(expected);
        assert_true(asprintf(&expected, "%s:3: Unknown key 'Colour'", path) > 0);
        assert_non_null(strstr(log, expected));
        free(expected);
        assert_true(asprintf(&expected, "%s:5: Unknown section [Flashing]", path) > 0);
        assert_non_null(strstr(log, expected));
        free(expected);
        assert_true(asprintf(&expected, "%s:8: Unknown key 'path'", path) > 0);
        assert_non_null(strstr(log, expected));
        /* Keys inside an unknown section are not warned about one by one. */
        assert_null(strstr(log, "AutoFlash"));
}

static void test_serial_devices(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *first = NULL, *second = NULL;
        char **l;

        first = write_file(f, "first.conf",
                           "[Discovery]\n"
                           "SerialDevices=/dev/ttyAMA0   /dev/ttyS1\n"
                           "SerialDevices=/dev/ttyS2\t/dev/ttyAMA0\n");
        second = write_file(f, "second.conf",
                            "[Discovery]\n"
                            "SerialDevices=/dev/ttyS9\n"
                            "SerialDevices=\n"
                            "SerialDevices=/dev/ttyUSB3\n");

        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, first, false), 0);
        l = c->extra_serial_devices;
        assert_non_null(l);
        assert_string_equal(l[0], "/dev/ttyAMA0");
        assert_string_equal(l[1], "/dev/ttyS1");
        assert_string_equal(l[2], "/dev/ttyS2");
        assert_null(l[3]);      /* the duplicate was dropped */

        /* A second file appends as well: here it resets first. */
        assert_int_equal(config_load(c, second, false), 0);
        l = c->extra_serial_devices;
        assert_non_null(l);
        assert_string_equal(l[0], "/dev/ttyUSB3");
        assert_null(l[1]);
}

static void test_serial_devices_across_files(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *first = NULL, *second = NULL;

        first = write_file(f, "a.conf", "[Discovery]\nSerialDevices=/dev/ttyS0\n");
        second = write_file(f, "b.conf", "[Discovery]\nSerialDevices=/dev/ttyS1\n");
        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, first, false), 0);
        assert_int_equal(config_load(c, second, false), 0);
        assert_string_equal(c->extra_serial_devices[0], "/dev/ttyS0");
        assert_string_equal(c->extra_serial_devices[1], "/dev/ttyS1");
        assert_null(c->extra_serial_devices[2]);
}

static void test_mcu_sections(void **state) {
        struct fixture *f = *state;
        _cleanup_(config_freep) struct config *c = NULL;
        _cleanup_free_ char *path = NULL;
        uint64_t start = 0;

        path = write_file(f, "mcu.conf",
                          "[Mcu 2E0036000851363131363530]\n"
                          "FlashStart=0x08008000\n"
                          "[Mcu linux-klipper_host_mcu]\n"
                          "Program=/opt/klipper/klipper_mcu\n"
                          "Service=klipper-host-mcu.service\n"
                          "[Mcu 2E0036000851363131363530]\n"
                          "FlashStart=0x08010000\n"
                          "FlashSize=256K\n"
                          "[Mcu E0C9125B0D9B]\nFlashSize=16MiB\n"
                          "[Mcu 0e0d81e4210c]\nFlashSize=0x20000\n");
        assert_int_equal(config_new(&c), 0);
        assert_int_equal(config_load(c, path, false), 0);
        /* The last one wins; sections do not leak into each other. */
        assert_int_equal(config_mcu_flash_start(c, "2E0036000851363131363530", &start), 0);
        assert_int_equal(start, 0x08010000);
        assert_int_equal(config_mcu_flash_start(c, "linux-klipper_host_mcu", &start), -ENOENT);
        assert_int_equal(config_mcu_flash_size(c, "2E0036000851363131363530", &start), 0);
        assert_int_equal(start, 256 * 1024);
        assert_int_equal(config_mcu_flash_size(c, "E0C9125B0D9B", &start), 0);
        assert_int_equal(start, 16 * 1024 * 1024);
        assert_int_equal(config_mcu_flash_size(c, "0e0d81e4210c", &start), 0);
        assert_int_equal(start, 0x20000);
        assert_int_equal(config_mcu_flash_size(c, "linux-klipper_host_mcu", &start), -ENOENT);
        assert_int_equal(config_mcu_flash_start(c, "2E00", &start), -ENOENT);
        assert_string_equal(config_mcu_get(c, "linux-klipper_host_mcu", "Program"), "/opt/klipper/klipper_mcu");
        assert_string_equal(config_mcu_get(c, "linux-klipper_host_mcu", "Service"), "klipper-host-mcu.service");
        assert_null(config_mcu_get(c, "linux-klipper_host_mcu", "Prog"));
        assert_null(config_mcu_get(c, "2E0036000851363131363530", "Program"));
        assert_null(config_mcu_get(c, "linux", "Program"));
}

static void test_parse_sec(void **state) {
        static const struct {
                const char *input;
                int ret;
                uint64_t usec;
        } cases[] = {
                { "5",            0, 5 * USEC_PER_SEC },
                { "0",            0, 0 },
                { "1.5",          0, 1500000 },
                { ".5",           0, 500000 },
                { "2.",           0, 2 * USEC_PER_SEC },
                { "250ms",        0, 250000 },
                { "250 ms",       0, 250000 },
                { "0.0015s",      0, 1500 },
                { "1.5ms",        0, 1500 },
                { "7us",          0, 7 },
                { "7usec",        0, 7 },
                { "3msec",        0, 3000 },
                { "10s",          0, 10 * USEC_PER_SEC },
                { "10sec",        0, 10 * USEC_PER_SEC },
                { "1second",      0, USEC_PER_SEC },
                { "2 seconds",    0, 2 * USEC_PER_SEC },
                { "2min",         0, 120 * USEC_PER_SEC },
                { "2m",           0, 120 * USEC_PER_SEC },
                { "1.5min",       0, 90 * USEC_PER_SEC },
                { "3minutes",     0, 180 * USEC_PER_SEC },
                { "1h",           0, 3600 * USEC_PER_SEC },
                { "0.25h",        0, 900 * USEC_PER_SEC },
                { "2hr",          0, 7200 * USEC_PER_SEC },
                { "1hour",        0, 3600 * USEC_PER_SEC },
                { "  42  ",       0, 42 * USEC_PER_SEC },
                { "0.000001",     0, 1 },
                { "0.0000001",    0, 0 },
                { "18446744073709", 0, UINT64_C(18446744073709) * USEC_PER_SEC },
                { "",             -EINVAL, 0 },
                { "   ",          -EINVAL, 0 },
                { "-5",           -EINVAL, 0 },
                { "+5",           -EINVAL, 0 },
                { "ms",           -EINVAL, 0 },
                { ".",            -EINVAL, 0 },
                { "1.2.3",        -EINVAL, 0 },
                { "5x",           -EINVAL, 0 },
                { "5 min 3",      -EINVAL, 0 },
                { "1e3",          -EINVAL, 0 },
                { "0x10",         -EINVAL, 0 },
                { "five",         -EINVAL, 0 },
                { "5MS",          -EINVAL, 0 },
                { "99999999999999999999", -ERANGE, 0 },
                { "18446744073710", -ERANGE, 0 },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                uint64_t usec = UINT64_C(0xdeadbeef);
                int r = parse_sec(cases[i].input, &usec);

                if (r != cases[i].ret)
                        fail_msg("parse_sec(\"%s\") returned %d, expected %d", cases[i].input, r,
                                 cases[i].ret);
                if (r == 0 && usec != cases[i].usec)
                        fail_msg("parse_sec(\"%s\") = %llu, expected %llu", cases[i].input,
                                 (unsigned long long) usec, (unsigned long long) cases[i].usec);
                if (r < 0)
                        assert_int_equal(usec, UINT64_C(0xdeadbeef));
        }
        assert_int_equal(parse_sec(NULL, &(uint64_t) {0}), -EINVAL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_defaults),
                unit_test_in_tmpdir(test_all_keys),
                unit_test_in_tmpdir(test_empty_values_reset),
                unit_test_in_tmpdir(test_missing_file),
                unit_test_in_tmpdir(test_bad_values),
                unit_test_in_tmpdir(test_bad_value_keeps_previous_config),
                unit_test_in_tmpdir(test_unknown_keys_warn),
                unit_test_in_tmpdir(test_serial_devices),
                unit_test_in_tmpdir(test_serial_devices_across_files),
                unit_test_in_tmpdir(test_mcu_sections),
                cmocka_unit_test(test_parse_sec),
        };

        return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
