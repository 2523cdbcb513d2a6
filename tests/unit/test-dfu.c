/* Unit tests for the pure parts of proto/dfu.c and proto/picoboot.c: DFU
 * GETSTATUS replies, the functional descriptor, DfuSe memory layout strings
 * (as STM32 ROM bootloaders of the F0/F1, F4, F7, G0 and H7 families and
 * their option-byte/OTP alt settings report them), DfuSe command encoding,
 * and PICOBOOT command packets and status replies.  The device operations
 * run against simulated USB devices in tests/integration/test_usb_boot.py. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/dfu.h"
#include "proto/picoboot.h"
#include "shared/log.h"

/* ---- DFU status and functional descriptor ---- */

static void test_parse_status(void **state) {
        static const uint8_t busy[6] = { 0x00, 0x64, 0x00, 0x00, DFU_STATE_DNBUSY, 0x00 };
        static const uint8_t error[6] = { 0x0e, 0x01, 0x02, 0x03, DFU_STATE_ERROR, 0x07 };
        struct dfu_status st;

        (void) state;
        assert_int_equal(dfu_parse_status(busy, sizeof(busy), &st), 0);
        assert_int_equal(st.status, DFU_STATUS_OK);
        assert_int_equal(st.poll_timeout_ms, 100);
        assert_int_equal(st.state, DFU_STATE_DNBUSY);
        assert_int_equal(st.string_index, 0);

        /* bwPollTimeout is three bytes, little-endian. */
        assert_int_equal(dfu_parse_status(error, sizeof(error), &st), 0);
        assert_int_equal(st.status, DFU_STATUS_ERR_UNKNOWN);
        assert_int_equal(st.poll_timeout_ms, 0x030201);
        assert_int_equal(st.state, DFU_STATE_ERROR);
        assert_int_equal(st.string_index, 7);

        assert_int_equal(dfu_parse_status(busy, 5, &st), -EBADMSG);
        assert_int_equal(dfu_parse_status(busy, 0, &st), -EBADMSG);
}

static void test_state_status_names(void **state) {
        (void) state;
        assert_string_equal(dfu_state_to_string(DFU_STATE_IDLE), "dfuIDLE");
        assert_string_equal(dfu_state_to_string(DFU_STATE_DNBUSY), "dfuDNBUSY");
        assert_string_equal(dfu_state_to_string(DFU_STATE_ERROR), "dfuERROR");
        assert_string_equal(dfu_state_to_string(11), "unknown state");
        assert_string_equal(dfu_status_to_string(DFU_STATUS_OK), "no error");
        assert_non_null(strstr(dfu_status_to_string(DFU_STATUS_ERR_TARGET), "errTARGET"));
        assert_non_null(strstr(dfu_status_to_string(DFU_STATUS_ERR_STALLEDPKT), "errSTALLEDPKT"));
        assert_string_equal(dfu_status_to_string(0x10), "unknown status");
}

static void test_find_functional(void **state) {
        /* What the STM32 ROM puts after its last alt setting. */
        static const uint8_t st_rom[] = { 0x09, 0x21, 0x0b, 0xff, 0x00, 0x00, 0x08, 0x1a, 0x01 };
        /* Another class descriptor first, then a DFU 1.0 (7-byte) one. */
        static const uint8_t dfu10[] = { 0x05, 0x24, 0x00, 0x10, 0x01,
                                         0x07, 0x21, 0x05, 0x64, 0x00, 0x00, 0x04 };
        static const uint8_t other[] = { 0x05, 0x24, 0x00, 0x10, 0x01 };
        static const uint8_t zero_length[] = { 0x00, 0x21, 0x0b };
        static const uint8_t overrun[] = { 0x09, 0x21, 0x0b, 0xff };
        static const uint8_t too_short[] = { 0x05, 0x21, 0x0b, 0xff, 0x00 };
        struct dfu_functional f;

        (void) state;
        assert_int_equal(dfu_find_functional(st_rom, sizeof(st_rom), &f), 0);
        assert_int_equal(f.attributes, DFU_ATTR_CAN_DNLOAD | DFU_ATTR_CAN_UPLOAD | DFU_ATTR_WILL_DETACH);
        assert_int_equal(f.detach_timeout_ms, 255);
        assert_int_equal(f.transfer_size, 2048);
        assert_int_equal(f.dfu_version, DFUSE_VERSION);

        assert_int_equal(dfu_find_functional(dfu10, sizeof(dfu10), &f), 0);
        assert_int_equal(f.attributes, 0x05);
        assert_int_equal(f.detach_timeout_ms, 100);
        assert_int_equal(f.transfer_size, 1024);
        assert_int_equal(f.dfu_version, 0x0100);

        assert_int_equal(dfu_find_functional(other, sizeof(other), &f), -ENOENT);
        assert_int_equal(dfu_find_functional(NULL, 0, &f), -ENOENT);
        assert_int_equal(dfu_find_functional(zero_length, sizeof(zero_length), &f), -EBADMSG);
        assert_int_equal(dfu_find_functional(overrun, sizeof(overrun), &f), -EBADMSG);
        assert_int_equal(dfu_find_functional(too_short, sizeof(too_short), &f), -EBADMSG);
}

/* ---- DfuSe memory layouts ---- */

struct expected_segment {
        uint32_t start, count, size;
        uint8_t flags;
};

static void check_layout(const char *text, const char *name, const struct expected_segment *segments,
                         size_t n) {
        _cleanup_(dfu_layout_freep) struct dfu_layout *layout = NULL;

        assert_int_equal(dfu_layout_parse(text, &layout), 0);
        assert_string_equal(layout->name, name);
        assert_int_equal(layout->n_segments, n);
        for (size_t i = 0; i < n; i++) {
                assert_int_equal(layout->segments[i].start, segments[i].start);
                assert_int_equal(layout->segments[i].sector_count, segments[i].count);
                assert_int_equal(layout->segments[i].sector_size, segments[i].size);
                assert_int_equal(layout->segments[i].flags, segments[i].flags);
        }
}

#define CHECK_LAYOUT(text, name, ...)                                                   \
        do {                                                                            \
                static const struct expected_segment expected[] = { __VA_ARGS__ };      \
                check_layout(text, name, expected, ELEMENTSOF(expected));               \
        } while (0)

static void test_layout_f4(void **state) {
        (void) state;
        /* STM32F4 1 MiB (protocols.md §6.3). */
        CHECK_LAYOUT("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg", "Internal Flash",
                     { 0x08000000, 4, 16384, 7 }, { 0x08010000, 1, 65536, 7 },
                     { 0x08020000, 7, 131072, 7 });
        /* Its other alt settings: sizes in bytes (unit ' '), read/write only. */
        CHECK_LAYOUT("@Option Bytes  /0x1FFFC000/01*016 e", "Option Bytes", { 0x1FFFC000, 1, 16, 5 });
        CHECK_LAYOUT("@OTP Memory /0x1FFF7800/01*512 e,01*016 e", "OTP Memory",
                     { 0x1FFF7800, 1, 512, 5 }, { 0x1FFF7A00, 1, 16, 5 });
        CHECK_LAYOUT("@Device Feature/0xFFFF0000/01*004 e", "Device Feature", { 0xFFFF0000, 1, 4, 5 });
        /* STM32F7 2 MiB. */
        CHECK_LAYOUT("@Internal Flash  /0x08000000/04*032Kg,01*128Kg,07*256Kg", "Internal Flash",
                     { 0x08000000, 4, 32768, 7 }, { 0x08020000, 1, 131072, 7 },
                     { 0x08040000, 7, 262144, 7 });
}

static void test_layout_f1_g0_h7(void **state) {
        (void) state;
        /* STM32F0/F1 class, 2 KiB pages (dfu-util -l of a device and protocols.md §6.3). */
        CHECK_LAYOUT("@Internal Flash  /0x08000000/064*0002Kg", "Internal Flash",
                     { 0x08000000, 64, 2048, 7 });
        CHECK_LAYOUT("@Internal Flash  /0x08000000/128*0002Kg", "Internal Flash",
                     { 0x08000000, 128, 2048, 7 });
        CHECK_LAYOUT("@Option Bytes  /0x1FFFF800/01*016 e", "Option Bytes", { 0x1FFFF800, 1, 16, 5 });
        /* STM32G0B1/G0C1: 256 pages of 2 KiB. */
        CHECK_LAYOUT("@Internal Flash   /0x08000000/256*02Kg", "Internal Flash",
                     { 0x08000000, 256, 2048, 7 });
        /* STM32H743: 16 sectors of 128 KiB; two banks written as two regions. */
        CHECK_LAYOUT("@Internal Flash   /0x08000000/16*128Kg", "Internal Flash",
                     { 0x08000000, 16, 131072, 7 });
        CHECK_LAYOUT("@Internal Flash   /0x08000000/08*128Kg,/0x08100000/08*128Kg", "Internal Flash",
                     { 0x08000000, 8, 131072, 7 }, { 0x08100000, 8, 131072, 7 });
        /* STM32H7B3 OTP: a 7-digit address and a 4-digit sector size. */
        CHECK_LAYOUT("@OTP Memory  /0x1FF7000/01*1024 e", "OTP Memory", { 0x01FF7000, 1, 1024, 5 });
        /* A protected bootloader area followed by flash; 'B' and 'M' units. */
        CHECK_LAYOUT("@Flash/0x08000000/8*001Ka,56*001Kg", "Flash",
                     { 0x08000000, 8, 1024, 1 }, { 0x08002000, 56, 1024, 7 });
        CHECK_LAYOUT("@SRAM /0x20000000/64*001Bg/0x90000000/2*1Md", "SRAM",
                     { 0x20000000, 64, 1, 7 }, { 0x90000000, 2, 1048576, 4 });
        /* The end of the address space is reachable, not beyond. */
        CHECK_LAYOUT("@Top/0xFFFFF000/1*4Kg", "Top", { 0xFFFFF000, 1, 4096, 7 });
}

static void test_layout_invalid(void **state) {
        static const char *const bad[] = {
                "",
                "Internal Flash  /0x08000000/04*016Kg",        /* no '@' */
                "@Internal Flash",                              /* no address */
                "@x/0x08000000/",                               /* no sectors */
                "@x/0x08000000",
                "@x/zz/1*1Kg",
                "@x/0x08000000/04*016Kz",                       /* type beyond 'g' */
                "@x/0x08000000/04*016K",                        /* no type */
                "@x/0x08000000/0*016Kg",                        /* no sectors */
                "@x/0x08000000/4*0Kg",                          /* empty sectors */
                "@x/0x08000000/04016Kg",                        /* no '*' */
                "@x/0x08000000/1*1Kg junk",
                "@x/0x08000000/1*1Kg/",
                "@x/0x08000000/-1*1Kg",
        };
        struct dfu_layout *layout = NULL;

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                assert_int_equal(dfu_layout_parse(bad[i], &layout), -EINVAL);
                assert_null(layout);
        }
        assert_int_equal(dfu_layout_parse(NULL, &layout), -EINVAL);
        assert_int_equal(dfu_layout_parse("@x/0xFFFFF000/2*4Kg", &layout), -ERANGE);
        assert_int_equal(dfu_layout_parse("@x/0x100000000/1*4Kg", &layout), -ERANGE);
        assert_int_equal(dfu_layout_parse("@x/0x08000000/1*8192Mg", &layout), -ERANGE);
        assert_null(layout);
}

static void test_layout_sectors(void **state) {
        _cleanup_(dfu_layout_freep) struct dfu_layout *layout = NULL;
        uint32_t start, size;
        uint8_t flags;

        (void) state;
        assert_int_equal(dfu_layout_parse("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg",
                                          &layout), 0);

        assert_ptr_equal(dfu_layout_find(layout, 0x08000000), &layout->segments[0]);
        assert_ptr_equal(dfu_layout_find(layout, 0x0800ffff), &layout->segments[0]);
        assert_ptr_equal(dfu_layout_find(layout, 0x08010000), &layout->segments[1]);
        assert_ptr_equal(dfu_layout_find(layout, 0x080fffff), &layout->segments[2]);
        assert_null(dfu_layout_find(layout, 0x08100000));
        assert_null(dfu_layout_find(layout, 0x07ffffff));
        assert_int_equal(dfu_segment_end(&layout->segments[2]), 0x08100000);

        assert_int_equal(dfu_layout_sector(layout, 0x08000000, &start, &size, &flags), 0);
        assert_int_equal(start, 0x08000000);
        assert_int_equal(size, 16384);
        assert_int_equal(flags, DFU_SEGMENT_READABLE | DFU_SEGMENT_ERASABLE | DFU_SEGMENT_WRITABLE);
        assert_int_equal(dfu_layout_sector(layout, 0x08008000, &start, &size, NULL), 0);
        assert_int_equal(start, 0x08008000);
        assert_int_equal(dfu_layout_sector(layout, 0x0800a123, &start, &size, NULL), 0);
        assert_int_equal(start, 0x08008000);
        assert_int_equal(dfu_layout_sector(layout, 0x0801ffff, &start, &size, NULL), 0);
        assert_int_equal(start, 0x08010000);
        assert_int_equal(size, 65536);
        assert_int_equal(dfu_layout_sector(layout, 0x080fffff, &start, &size, NULL), 0);
        assert_int_equal(start, 0x080e0000);
        assert_int_equal(size, 131072);
        assert_int_equal(dfu_layout_sector(layout, 0x08100000, &start, &size, NULL), -ENOENT);
        assert_int_equal(dfu_layout_sector(layout, 0x20000000, NULL, NULL, NULL), -ENOENT);
}

static void test_dfuse_encode(void **state) {
        static const uint8_t set_address[5] = { 0x21, 0x00, 0x80, 0x00, 0x08 };
        static const uint8_t erase[5] = { 0x41, 0x78, 0x56, 0x34, 0x12 };
        uint8_t out[5];

        (void) state;
        assert_int_equal(dfuse_encode_command(DFUSE_CMD_SET_ADDRESS, 0x08008000, out), 5);
        assert_memory_equal(out, set_address, 5);
        assert_int_equal(dfuse_encode_command(DFUSE_CMD_ERASE, 0x12345678, out), 5);
        assert_memory_equal(out, erase, 5);
}

/* ---- PICOBOOT ---- */

static void test_picoboot_encode(void **state) {
        static const uint8_t erase[32] = {
                0x0b, 0xd1, 0x1f, 0x43,         /* magic */
                0x03, 0x00, 0x00, 0x00,         /* token */
                0x03, 0x08, 0x00, 0x00,         /* FLASH_ERASE, 8 arg bytes */
                0x00, 0x00, 0x00, 0x00,         /* no data phase */
                0x00, 0x00, 0x00, 0x10,         /* 0x10000000 */
                0x00, 0x20, 0x00, 0x00,         /* 0x2000 */
        };
        static const uint8_t reboot[32] = {
                0x0b, 0xd1, 0x1f, 0x43, 0x07, 0x00, 0x00, 0x00,
                0x02, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0xf4, 0x01, 0x00, 0x00,         /* 500 ms */
        };
        static const uint8_t exclusive[32] = {
                0x0b, 0xd1, 0x1f, 0x43, 0x01, 0x00, 0x00, 0x00,
                0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x01,
        };
        uint8_t out[PICOBOOT_COMMAND_SIZE], args[17] = { PICOBOOT_EXCLUSIVE };

        (void) state;
        assert_int_equal(picoboot_encode_range(out, 3, PICOBOOT_FLASH_ERASE, 0x10000000, 0x2000), 32);
        assert_memory_equal(out, erase, 32);

        /* READ and WRITE carry the size as transfer length; READ has bit 7 set. */
        assert_int_equal(picoboot_encode_range(out, 0x01020304, PICOBOOT_READ, 0x10000100, 256), 32);
        assert_int_equal(out[4], 0x04);
        assert_int_equal(out[7], 0x01);
        assert_int_equal(out[8], 0x84);
        assert_int_equal(out[9], 8);
        assert_int_equal(out[12], 0x00);
        assert_int_equal(out[13], 0x01);
        assert_int_equal(out[16], 0x00);
        assert_int_equal(out[17], 0x01);
        assert_int_equal(out[19], 0x10);
        assert_int_equal(picoboot_encode_range(out, 5, PICOBOOT_WRITE, 0x10001000, 4096), 32);
        assert_int_equal(out[8], PICOBOOT_WRITE);
        assert_int_equal(out[13], 0x10);

        assert_int_equal(picoboot_encode_reboot(out, 7, 0, 0, 500), 32);
        assert_memory_equal(out, reboot, 32);

        assert_int_equal(picoboot_encode_command(out, 1, PICOBOOT_EXCLUSIVE_ACCESS, args, 1, 0), 32);
        assert_memory_equal(out, exclusive, 32);
        assert_int_equal(picoboot_encode_command(out, 2, PICOBOOT_EXIT_XIP, NULL, 0, 0), 32);
        assert_int_equal(out[8], PICOBOOT_EXIT_XIP);
        assert_int_equal(out[9], 0);
        assert_int_equal(picoboot_encode_command(out, 2, PICOBOOT_EXIT_XIP, args, 17, 0), 0);
}

static void test_picoboot_status(void **state) {
        static const uint8_t reply[16] = { 0x05, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
                                           0x03, 0x01 };
        struct picoboot_status st;

        (void) state;
        assert_int_equal(picoboot_parse_status(reply, sizeof(reply), &st), 0);
        assert_int_equal(st.token, 5);
        assert_int_equal(st.code, PICOBOOT_BAD_ALIGNMENT);
        assert_int_equal(st.command, PICOBOOT_FLASH_ERASE);
        assert_true(st.in_progress);
        assert_int_equal(picoboot_parse_status(reply, 9, &st), -EBADMSG);

        assert_string_equal(picoboot_status_to_string(PICOBOOT_OK), "ok");
        assert_string_equal(picoboot_status_to_string(PICOBOOT_BAD_ALIGNMENT), "bad alignment");
        assert_string_equal(picoboot_status_to_string(99), "unknown status");
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_OK), 0);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_BAD_ALIGNMENT), -EINVAL);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_INVALID_ADDRESS), -EINVAL);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_UNKNOWN_CMD), -EOPNOTSUPP);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_NOT_PERMITTED), -EPERM);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_INVALID_STATE), -EBUSY);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_REBOOTING), -ENODEV);
        assert_int_equal(picoboot_status_to_errno(PICOBOOT_UNKNOWN_ERROR), -EIO);
        assert_int_equal(picoboot_status_to_errno(1000), -EIO);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_parse_status),
                cmocka_unit_test(test_state_status_names),
                cmocka_unit_test(test_find_functional),
                cmocka_unit_test(test_layout_f4),
                cmocka_unit_test(test_layout_f1_g0_h7),
                cmocka_unit_test(test_layout_invalid),
                cmocka_unit_test(test_layout_sectors),
                cmocka_unit_test(test_dfuse_encode),
                cmocka_unit_test(test_picoboot_encode),
                cmocka_unit_test(test_picoboot_status),
        };

        if (getenv("TEST_DEBUG"))
                log_set_max_level(LOG_DEBUG);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
