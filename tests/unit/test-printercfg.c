/* Unit tests for daemon/core/printercfg.c: [mcu] sections, includes (glob,
 * nested, loops, missing files), klippy's comment and continuation rules,
 * the SAVE_CONFIG block, recovery from malformed lines, and
 * printercfg_find_serial(); and what keeps an untrusted printer.cfg harmless:
 * only regular files (FIFOs and devices never opened), only files the owner
 * of printer.cfg could read (as root only), the size/count/depth bounds, no
 * file content in messages, cancellation, and UTF-8 names.  Every test writes
 * its printer.cfg tree into a fresh mkdtemp() directory. */
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
#include <time.h>
#include <unistd.h>

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

        p = load(f,
                 "[include nothere.cfg]\n"
                 "[include nothing-*.cfg]\n"
                 "[mcu]\n"
                 "serial: /dev/ttyACM0\n");

        /* The missing plain file is a warning; a wildcard without a match
         * is not. */
        assert_int_equal(p->n_warnings, 1);
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

static double now_sec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* printercfg_load() of @name in the fixture; the error it gives. */
static int load_error(struct fixture *f, const char *name) {
        _cleanup_free_ char *path = NULL;
        struct printercfg *p = NULL;
        int r;

        assert_true(asprintf(&path, "%s/%s", f->dir, name) > 0);
        r = printercfg_load(path, &p);
        if (r < 0)
                assert_null(p);
        printercfg_free(p);
        return r;
}

static void test_not_regular(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *fifo = NULL, *dir = NULL, *link = NULL;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        double start;

        assert_true(asprintf(&fifo, "%s/fifo.cfg", f->dir) > 0);
        assert_int_equal(mkfifo(fifo, 0644), 0);
        assert_true(asprintf(&dir, "%s/dir.cfg", f->dir) > 0);
        assert_int_equal(mkdir(dir, 0755), 0);

        /* A FIFO nobody writes to would block open() and read() forever. */
        start = now_sec();
        free(write_file(f, "a.cfg", "[mcu]\nserial: /dev/ttyACM0\n[include fifo.cfg]\n"));
        assert_int_equal(load_error(f, "a.cfg"), -EBADFD);
        assert_int_equal(load_error(f, "fifo.cfg"), -EBADFD);
        assert_true(now_sec() - start < 5);

        /* A device: never opened at all. */
        free(write_file(f, "b.cfg", "[include /dev/null]\n"));
        assert_int_equal(load_error(f, "b.cfg"), -EBADFD);
        free(write_file(f, "c.cfg", "[include di*.cfg]\n"));  /* a directory matched by a glob */
        assert_int_equal(load_error(f, "c.cfg"), -EISDIR);
        assert_int_equal(load_error(f, "dir.cfg"), -EISDIR);

        /* Symlinks to regular files are normal in Klipper installs. */
        /* (Includes are relative to printer.cfg as klippy was given it, the link.) */
        free(write_file(f, "real/printer.cfg", "[mcu]\nserial: /dev/ttyACM0\n[include real/linked.cfg]\n"));
        free(write_file(f, "real/target.cfg", "[mcu two]\nserial: /dev/ttyACM1\n"));
        free(link);
        assert_true(asprintf(&link, "%s/real/linked.cfg", f->dir) > 0);
        assert_int_equal(symlink("target.cfg", link), 0);
        free(link);
        assert_true(asprintf(&link, "%s/printer.cfg", f->dir) > 0);
        assert_int_equal(symlink("real/printer.cfg", link), 0);
        assert_int_equal(printercfg_load(link, &p), 0);
        assert_int_equal(p->n_mcus, 2);
        assert_int_equal(p->n_warnings, 0);
}

static void test_bound_file_size(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *big = write_file(f, "big.cfg", "[mcu]\nserial: /dev/ttyACM0\n");

        assert_int_equal(truncate(big, PRINTERCFG_MAX_FILE_SIZE + 1), 0);
        assert_int_equal(load_error(f, "big.cfg"), -EFBIG);
        free(write_file(f, "top.cfg", "[include big.cfg]\n"));
        assert_int_equal(load_error(f, "top.cfg"), -EFBIG);
        /* Exactly the bound is fine (NUL bytes: empty lines to the parser). */
        assert_int_equal(truncate(big, PRINTERCFG_MAX_FILE_SIZE), 0);
        assert_int_equal(load_error(f, "big.cfg"), 0);
}

static void test_bound_total_size(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *top = NULL;
        FILE *file;

        /* Five includes of a 3.5 MiB file: each one fine, together too much. */
        free(write_file(f, "part.cfg", ""));
        top = write_file(f, "top.cfg", "");
        file = fopen(top, "we");
        assert_non_null(file);
        for (int i = 0; i < 5; i++)
                fputs("[include part.cfg]\n", file);
        fclose(file);
        free(top);
        assert_true(asprintf(&top, "%s/part.cfg", f->dir) > 0);
        assert_int_equal(truncate(top, PRINTERCFG_MAX_FILE_SIZE - 512 * 1024), 0);
        assert_int_equal(load_error(f, "top.cfg"), -EFBIG);
}

static void test_bound_lines_and_options(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *path = write_file(f, "many.cfg", "");
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        FILE *file;
        double start;

        /* 100k options in an [mcu] section: refused, and quickly (this
         * took klippy-like parsing 21 s when every option was kept). */
        file = fopen(path, "we");
        assert_non_null(file);
        fputs("[mcu]\nserial: /dev/ttyACM0\n", file);
        for (unsigned i = 0; i < PRINTERCFG_MAX_LINES; i++)
                fprintf(file, "option_%u: %u\n", i, i);
        fclose(file);
        start = now_sec();
        assert_int_equal(load_error(f, "many.cfg"), -E2BIG);
        assert_true(now_sec() - start < 5);

        /* Just under the bound: read, and still quickly. */
        file = fopen(path, "we");
        assert_non_null(file);
        fputs("[mcu]\nserial: /dev/ttyACM0\n", file);
        for (unsigned i = 0; i < PRINTERCFG_MAX_LINES - 10; i++)
                fprintf(file, "option_%u: %u\n", i, i);
        fclose(file);
        start = now_sec();
        assert_int_equal(printercfg_load(path, &p), 0);
        assert_true(now_sec() - start < 5);
        assert_int_equal(p->n_mcus, 1);
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
}

static void test_bound_sections(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *path = write_file(f, "sections.cfg", "");
        FILE *file = fopen(path, "we");

        assert_non_null(file);
        for (unsigned i = 0; i <= PRINTERCFG_MAX_SECTIONS; i++)
                fprintf(file, "[mcu n%u]\n", i);
        fclose(file);
        assert_int_equal(load_error(f, "sections.cfg"), -E2BIG);
}

static void test_bound_value(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *text = NULL, *cont = NULL;
        char *long_value = calloc(1, PRINTERCFG_MAX_VALUE + 2);

        assert_non_null(long_value);
        memset(long_value, 'x', PRINTERCFG_MAX_VALUE + 1);
        assert_true(asprintf(&text, "[mcu]\nserial: %s\n", long_value) > 0);
        free(write_file(f, "one.cfg", text));
        assert_int_equal(load_error(f, "one.cfg"), -E2BIG);

        /* The same through continuation lines, which used to grow without end. */
        long_value[PRINTERCFG_MAX_VALUE / 2] = '\0';
        assert_true(asprintf(&cont, "[mcu]\nserial: /dev/x\n  %s\n  %s\n  %s\n", long_value, long_value,
                             long_value) > 0);
        free(write_file(f, "two.cfg", cont));
        assert_int_equal(load_error(f, "two.cfg"), -E2BIG);
        free(long_value);
}

static void test_bound_depth(void **state) {
        struct fixture *f = *state;
        char name[32], text[64];

        /* printer.cfg → d1.cfg → … → d8.cfg is fine, d9.cfg is one too deep. */
        for (unsigned i = 1; i <= PRINTERCFG_MAX_DEPTH + 1; i++) {
                snprintf(name, sizeof(name), "d%u.cfg", i);
                snprintf(text, sizeof(text), "[mcu d%u]\nserial: /dev/d%u\n[include d%u.cfg]\n", i, i, i + 1);
                free(write_file(f, name, text));
        }
        free(write_file(f, "printer.cfg", "[include d1.cfg]\n"));
        assert_int_equal(load_error(f, "printer.cfg"), -E2BIG);

        snprintf(name, sizeof(name), "d%u.cfg", PRINTERCFG_MAX_DEPTH);
        free(write_file(f, name, "[mcu last]\nserial: /dev/last\n"));
        assert_int_equal(load_error(f, "printer.cfg"), 0);
}

static void test_bound_files_exponential(void **state) {
        struct fixture *f = *state;
        char name[32], text[64];
        double start = now_sec();

        /* Each file includes the next one twice, 30 levels: 2^30 reads
         * without a bound on the number of files. */
        for (unsigned i = 0; i < 30; i++) {
                snprintf(name, sizeof(name), "x%u.cfg", i);
                snprintf(text, sizeof(text), "[include x%u.cfg]\n[include x%u.cfg]\n", i + 1, i + 1);
                free(write_file(f, name, text));
        }
        free(write_file(f, "x30.cfg", "[mcu]\nserial: /dev/ttyACM0\n"));
        assert_int_equal(load_error(f, "x0.cfg"), -E2BIG);
        assert_true(now_sec() - start < 5);
}

static void test_bound_glob(void **state) {
        struct fixture *f = *state;
        char name[32];

        for (unsigned i = 0; i <= PRINTERCFG_MAX_FILES; i++) {
                snprintf(name, sizeof(name), "many/%03u.cfg", i);
                free(write_file(f, name, "\n"));
        }
        free(write_file(f, "printer.cfg", "[include many/*.cfg]\n"));
        assert_int_equal(load_error(f, "printer.cfg"), -E2BIG);
}

static void test_no_content_in_messages(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        _cleanup_free_ char *log = NULL;

        capture_begin(f);
        p = load(f,
                 "root:$6$SECRET1$hash:19000:0:99999:7:::\n"
                 "[mcu]\n"
                 "SECRET2 without separator\n"
                 "baud: SECRET3\n");
        log = capture_end(f);
        assert_int_equal(p->n_warnings, 3);
        assert_null(strstr(log, "SECRET"));
        assert_non_null(strstr(log, "printer.cfg:1:"));
        assert_non_null(strstr(log, "printer.cfg:3:"));
        assert_non_null(strstr(log, "printer.cfg:4:"));
}

/* As root: printer.cfg belongs to uid 65534, who cannot read a root-only
 * include or a file in a root-only directory; those are skipped unread. */
static void test_only_what_the_owner_may_read(void **state) {
        struct fixture *f = *state;
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;
        _cleanup_free_ char *top = NULL, *secret = NULL, *hidden = NULL, *dir = NULL, *ok = NULL,
                            *log = NULL;

        if (geteuid() != 0)
                skip();
        assert_int_equal(chmod(f->dir, 0755), 0);
        secret = write_file(f, "secret.cfg", "[mcu secret]\nserial: /dev/SECRET\n");
        assert_int_equal(chmod(secret, 0600), 0);
        hidden = write_file(f, "private/hidden.cfg", "[mcu hidden]\nserial: /dev/HIDDEN\n");
        assert_int_equal(chmod(hidden, 0644), 0);
        assert_true(asprintf(&dir, "%s/private", f->dir) > 0);
        assert_int_equal(chmod(dir, 0700), 0);
        ok = write_file(f, "ok.cfg", "[mcu ok]\nserial: /dev/ok\n");
        assert_int_equal(chmod(ok, 0644), 0);
        top = write_file(f, "printer.cfg",
                         "[mcu]\nserial: /dev/ttyACM0\n"
                         "[include secret.cfg]\n"
                         "[include private/hidden.cfg]\n"
                         "[include ok.cfg]\n");
        assert_int_equal(chown(top, 65534, 65534), 0);

        capture_begin(f);
        assert_int_equal(printercfg_load(top, &p), 0);
        log = capture_end(f);
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(p->mcus[0].name, "mcu");
        assert_string_equal(p->mcus[1].name, "mcu ok");
        assert_int_equal(p->n_warnings, 2);
        assert_null(strstr(log, "SECRET"));
        assert_null(strstr(log, "HIDDEN"));
        assert_non_null(strstr(log, "uid 65534"));

        /* Owned by root, printer.cfg may include whatever root reads. */
        printercfg_free(p);
        p = NULL;
        assert_int_equal(chown(top, 0, 0), 0);
        assert_int_equal(printercfg_load(top, &p), 0);
        assert_int_equal(p->n_mcus, 4);
}

/* As root: the printer.cfg klippy reports is read with klippy's uid, and
 * must be readable for it itself. */
static void test_reader_uid_given(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *top = NULL, *secret = NULL;
        struct printercfg *p = NULL;

        if (geteuid() != 0)
                skip();
        assert_int_equal(chmod(f->dir, 0755), 0);
        secret = write_file(f, "secret.cfg", "[mcu secret]\nserial: /dev/SECRET\n");
        assert_int_equal(chmod(secret, 0600), 0);
        top = write_file(f, "printer.cfg", "[mcu]\nserial: /dev/ttyACM0\n[include secret.cfg]\n");
        assert_int_equal(chmod(top, 0644), 0);

        /* Root's printer.cfg, but klippy runs as 65534: its rights count. */
        assert_int_equal(printercfg_load_cancellable(top, 65534, NULL, &p), 0);
        assert_int_equal(p->n_mcus, 1);
        assert_int_equal(p->n_warnings, 1);
        p = printercfg_free(p);

        /* A top file that klippy's user cannot read is not used at all. */
        assert_int_equal(printercfg_load_cancellable(secret, 65534, NULL, &p), -EACCES);
        assert_null(p);
        assert_int_equal(printercfg_load_cancellable(secret, 0, NULL, &p), 0);
        assert_int_equal(p->n_mcus, 1);
        printercfg_free(p);
}

static void test_cancel(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *path = write_file(f, "printer.cfg", "[mcu]\nserial: /dev/ttyACM0\n");
        atomic_bool cancel = true;
        struct printercfg *p = NULL;

        assert_int_equal(printercfg_load_cancellable(path, PRINTERCFG_OWNER, &cancel, &p), -ECANCELED);
        assert_null(p);
        atomic_store(&cancel, false);
        assert_int_equal(printercfg_load_cancellable(path, PRINTERCFG_OWNER, &cancel, &p), 0);
        printercfg_free(p);
}

static void test_utf8_names(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state, "[mcu \xff\xfe]\nserial: /dev/ttyACM0\n[mcu Düse]\nserial: /dev/ttyACM1\n");
        assert_int_equal(p->n_mcus, 2);
        assert_string_equal(p->mcus[0].name, "mcu \xEF\xBF\xBD\xEF\xBF\xBD");
        assert_string_equal(p->mcus[1].name, "mcu Düse");
}

/* Headers that differ only in invalid bytes name one section on the bus,
 * so they are one section (found by the printer.cfg fuzzer). */
static void test_utf8_names_merge(void **state) {
        _cleanup_(printercfg_freep) struct printercfg *p = NULL;

        p = load(*state, "[mcu \xff]\nserial: /dev/ttyACM0\n[mcu \xfe]\nbaud: 115200\n");
        assert_int_equal(p->n_mcus, 1);
        assert_string_equal(p->mcus[0].name, "mcu \xEF\xBF\xBD");
        assert_string_equal(p->mcus[0].serial, "/dev/ttyACM0");
        assert_int_equal(p->mcus[0].baud, 115200);
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
                unit_test_in_tmpdir(test_not_regular),
                unit_test_in_tmpdir(test_bound_file_size),
                unit_test_in_tmpdir(test_bound_total_size),
                unit_test_in_tmpdir(test_bound_lines_and_options),
                unit_test_in_tmpdir(test_bound_sections),
                unit_test_in_tmpdir(test_bound_value),
                unit_test_in_tmpdir(test_bound_depth),
                unit_test_in_tmpdir(test_bound_files_exponential),
                unit_test_in_tmpdir(test_bound_glob),
                unit_test_in_tmpdir(test_no_content_in_messages),
                unit_test_in_tmpdir(test_only_what_the_owner_may_read),
                unit_test_in_tmpdir(test_reader_uid_given),
                unit_test_in_tmpdir(test_cancel),
                unit_test_in_tmpdir(test_utf8_names),
                unit_test_in_tmpdir(test_utf8_names_merge),
        };

        return cmocka_run_group_tests_name("printercfg", tests, NULL, NULL);
}
