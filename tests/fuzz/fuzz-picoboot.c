/* libFuzzer target: PICOBOOT replies (proto/picoboot.c).  The input is
 * what the RP2040 boot ROM answers to PICOBOOT_IF_CMD_STATUS; the parsed
 * status must carry the input's fields, and every status code maps to a
 * name and an errno.  The input also serves as command arguments, which the
 * encoder must take up to 16 bytes of and refuse beyond. */
#include <string.h>

#include "fuzz-util.h"
#include "proto/picoboot.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static uint32_t le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct picoboot_status st;
        uint8_t packet[PICOBOOT_COMMAND_SIZE];
        size_t n;
        int r;

        r = picoboot_parse_status(data, size, &st);
        if (r < 0) {
                /* Its fields take the first 10 of the 16 bytes. */
                fuzz_check(r == -EBADMSG && size < 10);
        } else {
                fuzz_check(size >= 10);
                fuzz_check(st.command == data[8] && st.in_progress == (data[9] != 0));
                fuzz_check(st.token == le32(data) && st.code == le32(data + 4));
                fuzz_touch_string(picoboot_status_to_string(st.code));
                r = picoboot_status_to_errno(st.code);
                fuzz_check(r <= 0 && (r == 0) == (st.code == PICOBOOT_OK));
        }

        n = picoboot_encode_command(packet, size >= 4 ? le32(data) : 0, size > 0 ? data[0] : 0, data,
                                    size, (uint32_t) size);
        if (size > PICOBOOT_MAX_ARGS)
                fuzz_check(n == 0);
        else {
                fuzz_check(n == PICOBOOT_COMMAND_SIZE);
                fuzz_check(le32(packet) == PICOBOOT_MAGIC);
                fuzz_check(size == 0 || memcmp(packet + 16, data, size) == 0);
        }
        return 0;
}
