/* Unit tests for daemon/core/printercfg.c: [mcu] sections, includes (glob,
 * nested, loops, missing files), klippy's comment and continuation rules,
 * the SAVE_CONFIG block, recovery from malformed lines, and
 * printercfg_find_serial().  Every test writes its printer.cfg tree into a
 * fresh mkdtemp() directory. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/printercfg.h"
#include "shared/macro.h"
#include "test-util.h"

#define BY_ID_OCTOPUS "/dev/serial/by-id/usb-Klipper_stm32f446xx_3A0035000851313433343333-if00"

static struct printercfg *load(struct fixture *f, const char *content) {
        _cleanup_free_ char *path = write_file(f, "printer.cfg", content);
        struct printercfg *p = NULL;

        assert_int_equal(printercfg_load(path, &p), 0);
        assert_non_null(p);
        return p;
}

static const struct printercfg_mcu *find_mcu(const struct printercfg *p, const char *name) {
        for (size_t i = 0; i < p->n_mcus; i++)
                if (streq(p->mcus[i].name, name))
                        return &p->mcus[i];
        fail_msg("no section [%s]", name);
        return NULL;
}

static void test_mcu_sections(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        const struct printercfg_mcu *m;

        p = load(*state,
                 "[printer]\n"
                 "kinematics: corexy\n"
                 "\n"
                 "[mcu]\n"
                 "serial: " BY_ID_OCTOPUS "\n"
                 "restart_method: command\n"
                 "\n"
                 "[stepper_x]\n"
                 "step_pin: PF13\n"
                 "\n"
                 "[mcu eddy]\n"
                 "serial = /dev/serial/by-id/usb-Klipper_rp2040_E6625C05E7502C2B-if00\n"
                 "[mcu EBBCan]\n"
                 "canbus_uuid: 0E0D81E4210C\n"
                 "canbus_interface: can1\n"
                 "[MCU   host ]\n"
                 "serial: /tmp/klipper_host_mcu\n"
                 "baud: 250000\n"
                 "[mcuextra]\n"
                 "serial: /dev/not-an-mcu\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 4);
        assert_string_equal(p->mcus[0].name, "mcu");
        assert_string_equal(p->mcus[1].name, "mcu eddy");
        assert_string_equal(p->mcus[2].name, "mcu EBBCan");
        assert_string_equal(p->mcus[3].name, "mcu host");

        m = &p->mcus[0];
        assert_string_equal(m->serial, BY_ID_OCTOPUS);
        assert_int_equal(m->baud, 0);
        assert_null(m->canbus_uuid);
        assert_null(m->canbus_interface);

        m = &p->mcus[1];
        assert_string_equal(m->serial, "/dev/serial/by-id/usb-Klipper_rp2040_E6625C05E7502C2B-if00");

        m = &p->mcus[2];
        assert_null(m->serial);
        assert_string_equal(m->canbus_uuid, "0e0d81e4210c");
        assert_string_equal(m->canbus_interface, "can1");

        m = &p->mcus[3];
        assert_string_equal(m->serial, "/tmp/klipper_host_mcu");
        assert_int_equal(m->baud, 250000);
}

static void test_missing_file(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *path = NULL;
        struct printercfg *p = NULL;

        assert_true(asprintf(&path, "%s/nope.cfg", f->dir) > 0);
        assert_int_equal(printercfg_load(path, &p), -ENOENT);
        assert_null(p);
        assert_int_equal(printercfg_load(f->dir, &p), -EISDIR);
}

static void test_include_glob(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        free(write_file(f, "conf.d/20-toolhead.cfg", "[mcu toolhead]\nserial: /dev/ttyACM1\n"));
        free(write_file(f, "conf.d/10-main.cfg", "[mcu]\nserial: /dev/ttyACM0\n"));
        free(write_file(f, "conf.d/.hidden.cfg", "[mcu hidden]\nserial: /dev/ttyACM9\n"));
        free(write_file(f, "conf.d/notes.txt", "[mcu txt]\nserial: /dev/ttyACM8\n"));
        p = load(f, "[include conf.d/*.cfg]\n[printer]\nkinematics: none\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 2);
        /* Sorted by file name, not by creation order. */
        assert_string_equal(p->mcus[0].name, "mcu");
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
        assert_string_equal(p->mcus[1].name, "mcu toolhead");
        assert_string_equal(p->mcus[1].serial, "/dev/ttyACM1");
}

static void test_include_nested(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        /* two.cfg is found relative to sub/, the directory of one.cfg. */
        free(write_file(f, "sub/one.cfg", "[mcu one]\nserial: /dev/one\n[include two.cfg]\n"));
        free(write_file(f, "sub/two.cfg", "[mcu two]\nserial: /dev/two\n"));
        free(write_file(f, "two.cfg", "[mcu wrong]\nserial: /dev/wrong\n"));
        p = load(f, "[mcu]\nserial: /dev/main\n[include sub/one.cfg]\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 3);
        assert_string_equal(find_mcu(p, "mcu one")->serial, "/dev/one");
        assert_string_equal(find_mcu(p, "mcu two")->serial, "/dev/two");
        for (size_t i = 0; i < p->n_mcus; i++)
                assert_string_not_equal(p->mcus[i].name, "mcu wrong");
}

static void test_include_loop(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        free(write_file(f, "a.cfg", "[mcu a]\nserial: /dev/a\n[include b.cfg]\n"));
        free(write_file(f, "b.cfg", "[mcu b]\nserial: /dev/b\n[include a.cfg]\n[include printer.cfg]\n"));
        p = load(f, "[mcu]\nserial: /dev/main\n[include a.cfg]\n[mcu c]\nserial: /dev/c\n");

        /* b.cfg → a.cfg and b.cfg → printer.cfg are both loops. */
        assert_int_equal(p->n_warnings, 2);
        assert_int_equal(p->n_mcus, 4);
        assert_string_equal(find_mcu(p, "mcu a")->serial, "/dev/a");
        assert_string_equal(find_mcu(p, "mcu b")->serial, "/dev/b");
        assert_string_equal(find_mcu(p, "mcu c")->serial, "/dev/c");
}

static void test_include_same_file_twice(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        /* Not a loop: klippy reads the file again, so a later include
         * overrides what came in between. */
        free(write_file(f, "common.cfg", "[mcu]\nbaud: 115200\n"));
        p = load(f, "[include common.cfg]\n[mcu]\nbaud: 9600\n[include common.cfg]\n");
        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 1);
        assert_int_equal(p->mcus[0].baud, 115200);
}

static void test_include_missing(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        _cleanup_free_ char *dir = NULL;

        assert_true(asprintf(&dir, "%s/unreadable", f->dir) > 0);
        assert_int_equal(mkdir(dir, 0755), 0);
        free(dir);
        assert_true(asprintf(&dir, "%s/unreadable/dir.cfg", f->dir) > 0);
        assert_int_equal(mkdir(dir, 0755), 0);
        p = load(f,
                 "[include nothere.cfg]\n"
                 "[include nothing-*.cfg]\n"
                 "[include unreadable/*.cfg]\n"
                 "[mcu]\n"
                 "serial: /dev/ttyACM0\n");

        /* The missing plain file and the directory that matched are
         * warnings; a wildcard without a match is not. */
        assert_int_equal(p->n_warnings, 2);
        assert_int_equal(p->n_mcus, 1);
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
}

static void test_continuation_lines(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state,
                 "[gcode_macro START]\n"
                 "gcode:\n"
                 "    M117 [mcu fake]\n"
                 "  [mcu fake2]\n"
                 "    serial: /dev/bogus\n"
                 "\n"
                 "    G28\n"
                 "[mcu]\n"
                 "serial:\n"
                 "    /dev/serial/by-id/usb-x-if00\n"
                 "  baud: 1\n"
                 "canbus_interface: can0\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 1);
        /* Lines indented deeper than their option continue it. */
        assert_string_equal(p->mcus[0].serial, "/dev/serial/by-id/usb-x-if00\nbaud: 1");
        assert_int_equal(p->mcus[0].baud, 0);
        assert_string_equal(p->mcus[0].canbus_interface, "can0");
}

static void test_comments(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state,
                 "# leading comment\n"
                 "; another\n"
                 "[mcu] # the main board\n"
                 "serial: /dev/ttyACM0   # USB\n"
                 "baud: 250000 ; not used over USB\n"
                 "  ; indented comment does not continue anything\n"
                 "canbus_interface: can;0\n"
                 "[mcu b]\n"
                 "serial: /dev/tty#b\n"
                 "#[mcu commented]\n"
                 "#serial: /dev/ttyS0\n"
                 ";[mcu commented2]\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
        assert_int_equal(p->mcus[0].baud, 250000);
        assert_string_equal(p->mcus[0].canbus_interface, "can;0");
        /* klippy cuts every line at '#', even without whitespace before it. */
        assert_string_equal(p->mcus[1].serial, "/dev/tty");
}

static void test_save_config(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        const struct printercfg_mcu *m;

        p = load(*state,
                 "[mcu]\n"
                 "serial: /dev/ttyACM0\n"
                 "\n"
                 "#*# <---------------------- SAVE_CONFIG ---------------------->\n"
                 "#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.\n"
                 "#*#\n"
                 "#*# [mcu]\n"
                 "#*# serial = /dev/from-autosave\n"
                 "#*# baud = 115200\n"
                 "#*#\n"
                 "#*# [mcu probe]\n"
                 "#*# canbus_uuid = AABBCCDDEEFF\n"
                 "#*#\n"
                 "#*# [bed_mesh default]\n"
                 "#*# points =\n"
                 "#*# \t0.1, 0.2\n"
                 "#*# \t0.3, 0.4\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 2);
        m = find_mcu(p, "mcu");
        /* The regular configuration wins over SAVE_CONFIG duplicates. */
        assert_string_equal(m->serial, "/dev/ttyACM0");
        assert_int_equal(m->baud, 115200);
        m = find_mcu(p, "mcu probe");
        assert_string_equal(m->canbus_uuid, "aabbccddeeff");
}

static void test_save_config_corrupted(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        /* A foreign line after the header makes klippy ignore the block
         * (and read that line as regular configuration). */
        p = load(*state,
                 "[mcu]\n"
                 "serial: /dev/ttyACM0\n"
                 "\n"
                 "#*# <---------------------- SAVE_CONFIG ---------------------->\n"
                 "#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.\n"
                 "#*#\n"
                 "#*# [mcu probe]\n"
                 "#*# canbus_uuid = aabbccddeeff\n"
                 "[mcu late]\n"
                 "serial: /dev/late\n");

        assert_int_equal(p->n_warnings, 1);
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(find_mcu(p, "mcu late")->serial, "/dev/late");
}

static void test_malformed_lines(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state,
                 "serial: /dev/before-any-section\n"
                 "[mcu]\n"
                 "this line has no separator\n"
                 ": no key\n"
                 "serial: /dev/ttyACM0\n"
                 "baud: fast\n"
                 "[]\n"
                 "[mcu second]\n"
                 "serial: /dev/ttyACM1\r\n"
                 "baud: +57600\r\n");

        /* before-any-section, no separator, no key, [], baud: fast */
        assert_int_equal(p->n_warnings, 5);
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
        assert_int_equal(p->mcus[0].baud, 0);
        assert_string_equal(p->mcus[1].serial, "/dev/ttyACM1");
        assert_int_equal(p->mcus[1].baud, 57600);
}

static void test_section_merge(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state,
                 "[mcu]\n"
                 "serial: /dev/first\n"
                 "baud: 250000\n"
                 "[mcu other]\n"
                 "serial: /dev/other\n"
                 "[mcu]\n"
                 "Serial: /dev/second\n");

        assert_int_equal(p->n_warnings, 0);
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(p->mcus[0].name, "mcu");
        assert_string_equal(p->mcus[0].serial, "/dev/second");
        assert_int_equal(p->mcus[0].baud, 250000);
}

static void test_find_serial(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        const struct printercfg_mcu *m;

        p = load(*state,
                 "[mcu]\n"
                 "serial: " BY_ID_OCTOPUS "\n"
                 "[mcu uart]\n"
                 "serial: /dev//ttyAMA0\n"
                 "[mcu bypath]\n"
                 "serial: /dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.3:1.0\n"
                 "[mcu can]\n"
                 "canbus_uuid: 0e0d81e4210c\n");

        /* By-id link as serial: matched by the USB serial number. */
        m = printercfg_find_serial(p, "/dev/ttyACM0", NULL, "3A0035000851313433343333");
        assert_non_null(m);
        assert_string_equal(m->name, "mcu");
        /* … and by the devlink itself. */
        m = printercfg_find_serial(p, "/dev/ttyACM0",
                                   "/dev/serial/by-path/other " BY_ID_OCTOPUS, NULL);
        assert_non_null(m);
        assert_string_equal(m->name, "mcu");
        /* Klipper's serial numbers are upper case: no case folding. */
        assert_null(printercfg_find_serial(p, "/dev/ttyACM0", NULL, "3a0035000851313433343333"));
        /* A prefix of the serial number is not enough. */
        assert_null(printercfg_find_serial(p, "/dev/ttyACM0", NULL, "3A00350008513134"));

        /* Exact device node, "//" ignored. */
        m = printercfg_find_serial(p, "/dev/ttyAMA0", NULL, NULL);
        assert_non_null(m);
        assert_string_equal(m->name, "mcu uart");

        /* A devlink among several, separated by spaces. */
        m = printercfg_find_serial(p, "/dev/ttyACM3",
                                   "/dev/serial/by-id/usb-foo-if00 "
                                   "/dev/serial/by-path/platform-xhci-hcd.0-usb-0:1.3:1.0",
                                   "FOO");
        assert_non_null(m);
        assert_string_equal(m->name, "mcu bypath");

        assert_null(printercfg_find_serial(p, "/dev/ttyACM7", "/dev/serial/by-id/usb-x-if00", "123"));
        assert_null(printercfg_find_serial(p, "/dev/ttyAMA", NULL, ""));
        assert_null(printercfg_find_serial(p, NULL, NULL, NULL));
        assert_null(printercfg_find_serial(NULL, "/dev/ttyAMA0", NULL, NULL));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                unit_test_in_tmpdir(test_mcu_sections),
                unit_test_in_tmpdir(test_missing_file),
                unit_test_in_tmpdir(test_include_glob),
                unit_test_in_tmpdir(test_include_nested),
                unit_test_in_tmpdir(test_include_loop),
                unit_test_in_tmpdir(test_include_same_file_twice),
                unit_test_in_tmpdir(test_include_missing),
                unit_test_in_tmpdir(test_continuation_lines),
                unit_test_in_tmpdir(test_comments),
                unit_test_in_tmpdir(test_save_config),
                unit_test_in_tmpdir(test_save_config_corrupted),
                unit_test_in_tmpdir(test_malformed_lines),
                unit_test_in_tmpdir(test_section_merge),
                unit_test_in_tmpdir(test_find_serial),
        };

        return cmocka_run_group_tests_name("printercfg", tests, NULL, NULL);
}
