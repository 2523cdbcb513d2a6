/* libFuzzer target: Katapult's replies (proto/katapult.c).  The input is
 * what comes back from a Katapult bootloader:
 *   - the frame decoder must find the same frames whether the bytes come at
 *     once or one by one, and each frame must be one katapult_frame_build()
 *     produces byte for byte;
 *   - every frame's payload is read as a CONNECT answer, whose strings must
 *     come out printable and terminated;
 *   - a whole flashing session (prime, CONNECT, GET_CANBUS_ID, SEND_BLOCK,
 *     REQUEST_BLOCK, SEND_EOF, COMPLETE) runs against the input as the
 *     device's answers through a transport that then unplugs.  The session
 *     is skipped when the input holds a NACK or BUSY, or a block answer for
 *     another address: the retries those cause pause for up to 1.5 s, as
 *     flashtool does, which would only slow the fuzzer down. */
#include <stdlib.h>
#include <string.h>

#include "fuzz-util.h"
#include "proto/katapult.h"

#define BLOCK_ADDRESS 0x08002000u

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static uint32_t le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

struct frame_digest {
        size_t n;
        uint64_t hash;          /* FNV-1a over cmd, len and payload of every frame */
};

static void digest_add(struct frame_digest *d, const struct katapult_frame *f) {
        uint64_t h = d->hash ? d->hash : UINT64_C(0xcbf29ce484222325);
        uint8_t head[3] = { f->cmd, (uint8_t) f->len, (uint8_t) (f->len >> 8) };

        for (size_t i = 0; i < sizeof(head); i++)
                h = (h ^ head[i]) * UINT64_C(0x100000001b3);
        for (size_t i = 0; i < f->len; i++)
                h = (h ^ f->payload[i]) * UINT64_C(0x100000001b3);
        d->hash = h;
        d->n++;
}

/* Could the session meet an answer that makes it pause?  Each command
 * starts a fresh decoder wherever the previous one stopped reading, so any
 * frame header counts, wherever it is and whatever its CRC. */
static bool session_would_pause(const uint8_t *data, size_t size) {
        for (size_t i = 0; i + 4 <= size; i++) {
                if (data[i] != 0x01 || data[i + 1] != 0x88)
                        continue;
                if (data[i + 2] == KATAPULT_RESP_NACK || data[i + 2] == KATAPULT_RESP_BUSY)
                        return true;
                if (data[i + 2] == KATAPULT_RESP_ACK && data[i + 3] >= 2 && i + 12 <= size &&
                    (le32(data + i + 4) == KATAPULT_CMD_SEND_BLOCK ||
                     le32(data + i + 4) == KATAPULT_CMD_REQUEST_BLOCK) &&
                    le32(data + i + 8) != BLOCK_ADDRESS)
                        return true;
        }
        return false;
}

static void check_frame(const struct katapult_frame *f) {
        static uint8_t wire[KATAPULT_FRAME_MAX];
        static struct katapult_frame back;
        struct katapult_decoder *d;
        struct katapult_info info;
        size_t used;
        int n, r;

        fuzz_check(f->len % 4 == 0 && f->len <= KATAPULT_PAYLOAD_MAX);

        n = katapult_frame_build(wire, sizeof(wire), f->cmd, f->payload, f->len);
        fuzz_check(n == (int) f->len + KATAPULT_FRAME_OVERHEAD);
        d = malloc(sizeof(*d));
        if (!d)
                abort();
        katapult_decoder_init(d);
        fuzz_check(katapult_decoder_feed(d, wire, (size_t) n, &used, &back) == 1);
        fuzz_check(used == (size_t) n && d->n_bad == 0 && d->fill == 0);
        fuzz_check(back.cmd == f->cmd && back.len == f->len && memcmp(back.payload, f->payload, f->len) == 0);
        free(d);

        /* The payload as a CONNECT answer (after the echoed command word). */
        r = katapult_parse_connect(f->len >= 4 ? f->payload + 4 : f->payload, f->len >= 4 ? f->len - 4 : 0, &info);
        if (r == 0) {
                fuzz_check(katapult_block_size_valid(info.block_size));
                fuzz_check(memchr(info.mcu, '\0', sizeof(info.mcu)) && memchr(info.version, '\0', sizeof(info.version)));
                for (const char *c = info.mcu; *c; c++)
                        fuzz_check(*c >= 0x20 && *c < 0x7f);
                for (const char *c = info.version; *c; c++)
                        fuzz_check(*c >= 0x20 && *c < 0x7f);
        } else
                fuzz_check(r == -EBADMSG || r == -EPROTO);
}

/* Feed @data in pieces of @step bytes (0: all at once). */
static void decode_all(const uint8_t *data, size_t size, size_t step, bool check, struct frame_digest *ret,
                       unsigned *ret_bad) {
        static struct katapult_decoder d;
        static struct katapult_frame f;
        size_t pos = 0;

        *ret = (struct frame_digest) {};
        katapult_decoder_init(&d);
        do {
                size_t piece = step ? MIN(step, size - pos) : size - pos;
                const uint8_t *p = data + pos;

                pos += piece;
                for (;;) {
                        size_t used;
                        int r;

                        r = katapult_decoder_feed(&d, p, piece, &used, &f);
                        fuzz_check(used <= piece && d.fill <= sizeof(d.buf));
                        p += used;
                        piece -= used;
                        if (r == 0) {
                                fuzz_check(piece == 0);
                                break;
                        }
                        fuzz_check(r == 1);
                        digest_add(ret, &f);
                        if (check)
                                check_frame(&f);
                }
        } while (pos < size);
        *ret_bad = d.n_bad;
}

static void run_session(const uint8_t *data, size_t size) {
        static uint8_t block[KATAPULT_BLOCK_SIZE_MAX];
        uint8_t uuid[KATAPULT_UUID_LEN];
        struct fuzz_transport t;
        struct katapult_info info;
        uint32_t pages;
        int r;

        fuzz_transport_init(&t, data, size);
        t.frame_end = "\x99\x03";
        t.frame_end_len = 2;
        r = katapult_prime(&t.transport);
        if (r < 0)
                return;
        r = katapult_connect(&t.transport, 0, &info);
        if (r < 0)
                return;
        fuzz_check(katapult_block_size_valid(info.block_size));
        (void) katapult_get_canbus_id(&t.transport, uuid);
        memset(block, 0xa5, sizeof(block));
        r = katapult_send_block(&t.transport, BLOCK_ADDRESS, block, info.block_size);
        if (r < 0)
                return;
        r = katapult_request_block(&t.transport, BLOCK_ADDRESS, block, info.block_size);
        if (r < 0)
                return;
        r = katapult_send_eof(&t.transport, &pages);
        if (r < 0)
                return;
        (void) katapult_complete(&t.transport, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct frame_digest whole, bytewise, odd;
        unsigned bad_whole, bad_bytewise, bad_odd;

        decode_all(data, size, 0, true, &whole, &bad_whole);
        decode_all(data, size, 1, false, &bytewise, &bad_bytewise);
        decode_all(data, size, 37, false, &odd, &bad_odd);

        /* Chunking must not change what is found or how much is dropped. */
        fuzz_check(whole.n == bytewise.n && whole.n == odd.n);
        fuzz_check(whole.hash == bytewise.hash && whole.hash == odd.hash);
        fuzz_check(bad_whole == bad_bytewise && bad_whole == bad_odd);

        if (!session_would_pause(data, size))
                run_session(data, size);
        return 0;
}
