/* libFuzzer target: Klipper's MCU message framing (proto/klipper.c).  The
 * input is what an MCU (or anything else on the port) sends:
 *   - the block decoder must find the same blocks whether the bytes come at
 *     once or one by one, and each block it returns must be one that
 *     klipper_block_build() produces byte for byte;
 *   - every VLQ in a block decodes without reading past it and re-encodes
 *     to the same value;
 *   - the identify exchange (klipper_identify) runs against the input as
 *     the device's answers, through a transport that then unplugs. */
#include <stdlib.h>
#include <string.h>

#include "fuzz-util.h"
#include "proto/klipper.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

struct block_log {
        struct klipper_block blocks[256];
        size_t n;
        size_t n_total;
};

static void log_block(struct block_log *l, const struct klipper_block *b) {
        if (l->n < sizeof(l->blocks) / sizeof(l->blocks[0]))
                l->blocks[l->n++] = *b;
        l->n_total++;
}

/* Feed @data in pieces of @step bytes (0: all at once). */
static void decode_all(const uint8_t *data, size_t size, size_t step, struct block_log *l,
                       unsigned *ret_bad) {
        struct klipper_decoder d;
        size_t pos = 0;

        klipper_decoder_init(&d);
        do {
                size_t piece = step ? MIN(step, size - pos) : size - pos;
                const uint8_t *p = data + pos;

                pos += piece;
                for (;;) {
                        struct klipper_block b;
                        size_t used;
                        int r;

                        r = klipper_decoder_feed(&d, p, piece, &used, &b);
                        fuzz_check(used <= piece);
                        fuzz_check(d.fill <= sizeof(d.buf));
                        p += used;
                        piece -= used;
                        if (r == 0) {
                                fuzz_check(piece == 0);
                                break;
                        }
                        fuzz_check(r == 1);
                        fuzz_check(b.len <= KLIPPER_MESSAGE_PAYLOAD_MAX);
                        fuzz_check(b.seq <= KLIPPER_MESSAGE_SEQ_MASK);
                        log_block(l, &b);
                }
        } while (pos < size);
        *ret_bad = d.n_bad;
}

static void check_block(const struct klipper_block *b) {
        uint8_t wire[KLIPPER_MESSAGE_MAX], again[KLIPPER_MESSAGE_MAX];
        const uint8_t *p = b->content, *end = b->content + b->len;
        struct klipper_decoder d;
        struct klipper_block back;
        size_t used;
        int n;

        /* Rebuild it: the decoder only returns what the encoder makes. */
        n = klipper_block_build(wire, b->seq, b->content, b->len);
        fuzz_check(n == b->len + KLIPPER_MESSAGE_MIN);
        klipper_decoder_init(&d);
        fuzz_check(klipper_decoder_feed(&d, wire, (size_t) n, &used, &back) == 1);
        fuzz_check(used == (size_t) n && d.n_bad == 0);
        fuzz_check(back.seq == b->seq && back.len == b->len && memcmp(back.content, b->content, b->len) == 0);
        fuzz_check(klipper_block_build(again, back.seq, back.content, back.len) == n);
        fuzz_check(memcmp(wire, again, (size_t) n) == 0);

        /* The content as a run of VLQs (what most Klipper messages are). */
        while (p < end) {
                const uint8_t *start = p, *q;
                uint8_t enc[8];
                int32_t v, v2;
                size_t len;

                if (klipper_vlq_decode(&p, end, &v) < 0) {
                        fuzz_check(p == start);
                        break;
                }
                fuzz_check(p > start && p <= end && p - start <= 5);
                len = klipper_vlq_encode(v, enc);
                fuzz_check(len >= 1 && len <= 5);
                q = enc;
                fuzz_check(klipper_vlq_decode(&q, enc + len, &v2) == 0 && v2 == v && q == enc + len);
        }
}

static void run_identify(const uint8_t *data, size_t size) {
        struct klipper_identify_params params = { .timeout_ms = 5000, .max_size = 4096 };
        struct fuzz_transport t;
        _cleanup_free_ uint8_t *dict = NULL;
        size_t dict_len = 0;
        int r;

        fuzz_transport_init(&t, data, size);
        r = klipper_identify(&t.transport, &params, &dict, &dict_len);
        if (r < 0) {
                fuzz_check(r == -ENODEV || r == -EBADMSG || r == -E2BIG || r == -ETIMEDOUT);
                return;
        }
        fuzz_check(dict && dict_len > 0 && dict_len <= params.max_size);
        /* Each piece of the answer fits one block and is followed by the
         * next request. */
        fuzz_check(dict_len <= (size_t) t.n_writes * KLIPPER_MESSAGE_PAYLOAD_MAX);
        {
                volatile uint8_t last = dict[dict_len - 1];
                (void) last;
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static struct block_log whole, bytewise, odd;
        unsigned bad_whole, bad_bytewise, bad_odd;

        whole.n = whole.n_total = 0;
        bytewise.n = bytewise.n_total = 0;
        odd.n = odd.n_total = 0;

        decode_all(data, size, 0, &whole, &bad_whole);
        decode_all(data, size, 1, &bytewise, &bad_bytewise);
        decode_all(data, size, 23, &odd, &bad_odd);

        /* Chunking must not change what is found or how much is dropped. */
        fuzz_check(whole.n_total == bytewise.n_total && whole.n_total == odd.n_total);
        fuzz_check(bad_whole == bad_bytewise && bad_whole == bad_odd);
        for (size_t i = 0; i < whole.n; i++) {
                fuzz_check(whole.blocks[i].seq == bytewise.blocks[i].seq &&
                           whole.blocks[i].len == bytewise.blocks[i].len &&
                           memcmp(whole.blocks[i].content, bytewise.blocks[i].content, whole.blocks[i].len) == 0);
                fuzz_check(whole.blocks[i].seq == odd.blocks[i].seq && whole.blocks[i].len == odd.blocks[i].len &&
                           memcmp(whole.blocks[i].content, odd.blocks[i].content, whole.blocks[i].len) == 0);
                check_block(&whole.blocks[i]);
        }

        run_identify(data, size);
        return 0;
}
