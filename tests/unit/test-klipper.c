/* Unit tests for proto/klipper.c (CRC, VLQ, block framing and decoding, the
 * identify download) and transport/serial.c (exclusive raw tty access).
 *
 * klipper_identify() runs against a fake MCU behind an in-memory struct
 * transport: it decodes the host's blocks, checks and acks sequence numbers
 * like the firmware (command.c) and serves a ~4 KB zlib dictionary.  The
 * serial transport is exercised on a real pty pair from posix_openpt(). */
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <zlib.h>

#include <cmocka.h>

#include "proto/klipper.h"
#include "shared/log.h"
#include "transport/serial.h"

/* ---- CRC, VLQ, blocks ---- */

static void test_crc16(void **state) {
        (void) state;
        assert_int_equal(klipper_crc16((const uint8_t *) "123456789", 9), 0x6f91);
        assert_int_equal(klipper_crc16(NULL, 0), 0xffff);
}

struct vlq_vector {
        int64_t value;
        uint8_t bytes[5];
        size_t len;
};

static const struct vlq_vector vlq_vectors[] = {
        { 0,          { 0x00 },                         1 },
        { 40,         { 0x28 },                         1 },
        { 95,         { 0x5f },                         1 },
        { 96,         { 0x80, 0x60 },                   2 },
        { 100,        { 0x80, 0x64 },                   2 },
        { 1000,       { 0x87, 0x68 },                   2 },
        { -1,         { 0x7f },                         1 },
        { -32,        { 0x60 },                         1 },
        { -33,        { 0xff, 0x5f },                   2 },
        { 12288,      { 0x80, 0xe0, 0x00 },             3 },
        { -4096,      { 0xe0, 0x00 },                   2 },
        { 250000,     { 0x8f, 0xa1, 0x10 },             3 },
        { 0xffffffff, { 0x8f, 0xff, 0xff, 0xff, 0x7f }, 5 },
};

/* The range table of protocols.md §1.2: boundaries and their lengths. */
static const struct {
        int64_t value;
        size_t len;
} vlq_lengths[] = {
        { -32, 1 }, { 95, 1 }, { -33, 2 }, { 96, 2 },
        { -4096, 2 }, { 12287, 2 }, { -4097, 3 }, { 12288, 3 },
        { -524288, 3 }, { 1572863, 3 }, { -524289, 4 }, { 1572864, 4 },
        { -67108864, 4 }, { 201326591, 4 }, { -67108865, 5 }, { 201326592, 5 },
        { -2147483648LL, 5 }, { 4294967295LL, 5 },
};

static void test_vlq_vectors(void **state) {
        (void) state;

        for (size_t i = 0; i < ELEMENTSOF(vlq_vectors); i++) {
                const struct vlq_vector *v = &vlq_vectors[i];
                uint8_t out[5];
                const uint8_t *p = v->bytes;
                int32_t decoded;

                assert_int_equal(klipper_vlq_encode(v->value, out), v->len);
                assert_memory_equal(out, v->bytes, v->len);

                assert_int_equal(klipper_vlq_decode(&p, v->bytes + v->len, &decoded), 0);
                assert_ptr_equal(p, v->bytes + v->len);
                assert_int_equal(decoded, (int32_t) (uint32_t) v->value);
        }

        /* Unsigned parameters are masked to 32 bits after decoding. */
        {
                static const uint8_t max[] = { 0x8f, 0xff, 0xff, 0xff, 0x7f };
                const uint8_t *p = max;
                int32_t decoded;

                assert_int_equal(klipper_vlq_decode(&p, max + sizeof(max), &decoded), 0);
                assert_int_equal((uint32_t) decoded, 0xffffffffu);
        }
}

static void test_vlq_lengths_roundtrip(void **state) {
        (void) state;

        for (size_t i = 0; i < ELEMENTSOF(vlq_lengths); i++) {
                uint8_t out[5];
                const uint8_t *p = out;
                size_t n = klipper_vlq_encode(vlq_lengths[i].value, out);
                int32_t decoded;

                assert_int_equal(n, vlq_lengths[i].len);
                assert_int_equal(klipper_vlq_decode(&p, out + n, &decoded), 0);
                assert_int_equal(decoded, (int32_t) (uint32_t) vlq_lengths[i].value);
        }

        for (int64_t v = -70000; v <= 70000; v += 7) {
                uint8_t out[5];
                const uint8_t *p = out;
                size_t n = klipper_vlq_encode(v, out);
                int32_t decoded;

                assert_int_equal(klipper_vlq_decode(&p, out + n, &decoded), 0);
                assert_int_equal(decoded, v);
        }
}

static void test_vlq_decode_errors(void **state) {
        static const uint8_t truncated[] = { 0x87 };
        static const uint8_t too_long[] = { 0x81, 0x81, 0x81, 0x81, 0x81, 0x01 };
        const uint8_t *p;
        int32_t v = 42;

        (void) state;
        p = truncated;
        assert_int_equal(klipper_vlq_decode(&p, truncated, &v), -EBADMSG);
        assert_int_equal(klipper_vlq_decode(&p, truncated + 1, &v), -EBADMSG);
        assert_ptr_equal(p, truncated);
        p = too_long;
        assert_int_equal(klipper_vlq_decode(&p, too_long + sizeof(too_long), &v), -EBADMSG);
        assert_ptr_equal(p, too_long);
        assert_int_equal(v, 42);
}

static size_t identify_content(uint8_t *out, int64_t offset) {
        size_t n = 0;

        n += klipper_vlq_encode(KLIPPER_MSGID_IDENTIFY, out + n);
        n += klipper_vlq_encode(offset, out + n);
        n += klipper_vlq_encode(KLIPPER_IDENTIFY_CHUNK, out + n);
        return n;
}

static void test_block_vectors(void **state) {
        static const struct {
                int64_t offset;
                uint8_t seq;
                uint8_t wire[9];
                size_t len;
        } requests[] = {
                { 0, 0, { 0x08, 0x10, 0x01, 0x00, 0x28, 0x5e, 0x9f, 0x7e }, 8 },
                { 0, 1, { 0x08, 0x11, 0x01, 0x00, 0x28, 0x42, 0x24, 0x7e }, 8 },
                { 40, 1, { 0x08, 0x11, 0x01, 0x28, 0x28, 0xaf, 0xd7, 0x7e }, 8 },
                { 200, 2, { 0x09, 0x12, 0x01, 0x81, 0x48, 0x28, 0xe0, 0xac, 0x7e }, 9 },
        };
        static const uint8_t acks[][5] = {
                { 0x05, 0x10, 0x9e, 0x81, 0x7e },
                { 0x05, 0x11, 0x8f, 0x08, 0x7e },
                { 0x05, 0x12, 0xbd, 0x93, 0x7e },
        };
        uint8_t content[KLIPPER_MESSAGE_PAYLOAD_MAX + 1] = {};
        uint8_t out[KLIPPER_MESSAGE_MAX];

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(requests); i++) {
                size_t n = identify_content(content, requests[i].offset);

                assert_int_equal(klipper_block_build(out, requests[i].seq, content, n), requests[i].len);
                assert_memory_equal(out, requests[i].wire, requests[i].len);
        }
        for (uint8_t seq = 0; seq < ELEMENTSOF(acks); seq++) {
                assert_int_equal(klipper_block_build(out, seq, NULL, 0), 5);
                assert_memory_equal(out, acks[seq], 5);
        }
        /* Only the low 4 bits of seq are used. */
        assert_int_equal(klipper_block_build(out, 0x11, NULL, 0), 5);
        assert_memory_equal(out, acks[1], 5);

        assert_int_equal(klipper_block_build(out, 0, content, KLIPPER_MESSAGE_PAYLOAD_MAX), KLIPPER_MESSAGE_MAX);
        assert_int_equal(klipper_block_build(out, 0, content, KLIPPER_MESSAGE_PAYLOAD_MAX + 1), -EMSGSIZE);
}

/* ---- decoder ---- */

static const uint8_t request_seq1[] = { 0x08, 0x11, 0x01, 0x00, 0x28, 0x42, 0x24, 0x7e };

/* Feed @len bytes in one call each of @step bytes; collect all blocks. */
static size_t decode_all(struct klipper_decoder *d, const uint8_t *data, size_t len, size_t step,
                         struct klipper_block *blocks, size_t max_blocks) {
        size_t n_blocks = 0;

        for (size_t pos = 0; pos < len; ) {
                size_t chunk = MIN(step, len - pos), done = 0;

                for (;;) {
                        size_t used;
                        int r = klipper_decoder_feed(d, data + pos + done, chunk - done, &used,
                                                     &blocks[n_blocks]);

                        assert_true(used <= chunk - done);
                        done += used;
                        if (r == 0)
                                break;
                        assert_int_equal(r, 1);
                        n_blocks++;
                        assert_true(n_blocks <= max_blocks);
                }
                assert_int_equal(done, chunk);
                pos += chunk;
        }
        return n_blocks;
}

static void test_decoder_byte_by_byte(void **state) {
        struct klipper_decoder d;
        struct klipper_block b[2];

        (void) state;
        klipper_decoder_init(&d);
        assert_int_equal(decode_all(&d, request_seq1, sizeof(request_seq1), 1, b, 2), 1);
        assert_int_equal(b[0].seq, 1);
        assert_int_equal(b[0].len, 3);
        assert_memory_equal(b[0].content, request_seq1 + 2, 3);
        assert_int_equal(d.n_bad, 0);
        assert_int_equal(d.fill, 0);
}

static void test_decoder_garbage_before_block(void **state) {
        uint8_t input[64];
        struct klipper_decoder d;
        struct klipper_block b[2];
        size_t n = 0;

        (void) state;
        /* stk500v2_leave's bytes, a stray sync, some noise without sync. */
        static const uint8_t junk[] = { 0x1b, 0x01, 0x00, 0x01, 0x0e, 0x11, 0x04, 0x7e, 0x7e, 0x33, 0x44 };
        memcpy(input + n, junk, sizeof(junk));
        n += sizeof(junk);
        input[n++] = 0x7e;
        memcpy(input + n, request_seq1, sizeof(request_seq1));
        n += sizeof(request_seq1);

        for (size_t step = 1; step <= n; step++) {
                klipper_decoder_init(&d);
                assert_int_equal(decode_all(&d, input, n, step, b, 2), 1);
                assert_int_equal(b[0].seq, 1);
                assert_memory_equal(b[0].content, request_seq1 + 2, 3);
                assert_int_equal(d.n_bad, sizeof(junk) + 1);
        }
}

static void test_decoder_bad_crc(void **state) {
        uint8_t input[2 * sizeof(request_seq1)];
        struct klipper_decoder d;
        struct klipper_block b[2];

        (void) state;
        memcpy(input, request_seq1, sizeof(request_seq1));
        input[6] ^= 0x01;
        memcpy(input + sizeof(request_seq1), request_seq1, sizeof(request_seq1));

        klipper_decoder_init(&d);
        assert_int_equal(decode_all(&d, input, sizeof(request_seq1), 3, b, 2), 0);
        assert_int_equal(d.n_bad, sizeof(request_seq1));
        /* The decoder resynchronised on the bad block's sync byte. */
        klipper_decoder_init(&d);
        assert_int_equal(decode_all(&d, input, sizeof(input), 5, b, 2), 1);
        assert_int_equal(b[0].seq, 1);

        /* Bad length, bad seq high nibble, missing sync: all dropped. */
        {
                uint8_t bad[3][8];

                memcpy(bad[0], request_seq1, 8);
                bad[0][0] = 0x41;
                memcpy(bad[1], request_seq1, 8);
                bad[1][1] = 0x21;
                memcpy(bad[2], request_seq1, 8);
                bad[2][7] = 0x00;
                for (size_t i = 0; i < 3; i++) {
                        uint8_t two[16];

                        memcpy(two, bad[i], 8);
                        memcpy(two + 8, request_seq1, 8);
                        klipper_decoder_init(&d);
                        assert_int_equal(decode_all(&d, two, i == 2 ? 8 : 16, 16, b, 2), i == 2 ? 0 : 1);
                }
                /* Without a trailing sync the whole next block is eaten too,
                 * exactly as the firmware would; a third one gets through. */
                {
                        uint8_t three[24];

                        memcpy(three, bad[2], 8);
                        memcpy(three + 8, request_seq1, 8);
                        memcpy(three + 16, request_seq1, 8);
                        klipper_decoder_init(&d);
                        assert_int_equal(decode_all(&d, three, 24, 1, b, 2), 1);
                }
        }
}

static void test_decoder_two_blocks(void **state) {
        uint8_t input[8 + 5 + 8];
        struct klipper_decoder d;
        struct klipper_block b[3];
        uint8_t content[4];

        (void) state;
        memcpy(input, request_seq1, 8);
        assert_int_equal(klipper_block_build(input + 8, 2, NULL, 0), 5);
        assert_int_equal(klipper_block_build(input + 13, 3, content, identify_content(content, 0)), 8);

        for (size_t step = 1; step <= sizeof(input); step++) {
                klipper_decoder_init(&d);
                assert_int_equal(decode_all(&d, input, sizeof(input), step, b, 3), 3);
                assert_int_equal(b[0].seq, 1);
                assert_int_equal(b[1].seq, 2);
                assert_int_equal(b[1].len, 0);
                assert_int_equal(b[2].seq, 3);
                assert_int_equal(d.n_bad, 0);
        }
}

static void test_decoder_sync_in_content(void **state) {
        /* identify_response offset=126 data="~~" : 0x7e in offset and data. */
        static const uint8_t content[] = { 0x00, 0x80, 0x7e, 0x02, 0x7e, 0x7e };
        uint8_t wire[KLIPPER_MESSAGE_MAX];
        struct klipper_decoder d;
        struct klipper_block b[2];
        int n;

        (void) state;
        n = klipper_block_build(wire, 5, content, sizeof(content));
        assert_int_equal(n, sizeof(content) + 5);
        for (size_t step = 1; step <= (size_t) n; step++) {
                klipper_decoder_init(&d);
                assert_int_equal(decode_all(&d, wire, (size_t) n, step, b, 2), 1);
                assert_int_equal(b[0].len, sizeof(content));
                assert_memory_equal(b[0].content, content, sizeof(content));
                assert_int_equal(d.n_bad, 0);
        }
}

/* ---- fake MCU for klipper_identify() ---- */

struct fake_mcu {
        struct transport transport;     /* first member */
        struct klipper_decoder decoder; /* host → MCU */
        uint8_t next_seq;               /* the seq the MCU expects next */

        const uint8_t *dict;
        size_t dict_len;

        uint8_t out[1 << 16];           /* MCU → host, not yet read */
        size_t out_len, out_pos;
        size_t read_chunk;              /* at most this many bytes per read; 0 = all */

        unsigned n_requests;            /* identify requests accepted */
        unsigned n_naks;                /* blocks naked for a wrong seq */

        /* Misbehaviour, by request number (1-based; 0 = never). */
        unsigned drop_reply_at;         /* lose the response, keep the ack */
        unsigned drop_all_at;           /* lose response and ack */
        unsigned silent_after;          /* stop answering after this many */
        unsigned gone_after;            /* device vanishes after this many */
        unsigned reset_after;           /* MCU resets (expects seq 0 again) */
        bool reset_done;
        bool silent;
        bool garbage;                   /* only noise, never a valid block */
        bool chatty;                    /* unrelated blocks and messages too */

        uint32_t rng;
};

static uint32_t fake_random(struct fake_mcu *m) {
        m->rng = m->rng * 1103515245u + 12345u;
        return m->rng >> 16;
}

static void fake_emit(struct fake_mcu *m, const uint8_t *data, size_t len) {
        assert_true(m->out_len + len <= sizeof(m->out));
        memcpy(m->out + m->out_len, data, len);
        m->out_len += len;
}

static void fake_emit_block(struct fake_mcu *m, const uint8_t *content, size_t len) {
        uint8_t wire[KLIPPER_MESSAGE_MAX];
        int n = klipper_block_build(wire, m->next_seq, content, len);

        assert_true(n > 0);
        fake_emit(m, wire, (size_t) n);
}

static void fake_handle_identify(struct fake_mcu *m, uint32_t offset, uint32_t count) {
        uint8_t content[KLIPPER_MESSAGE_PAYLOAD_MAX];
        size_t n = 0, len;

        m->n_requests++;
        if (m->reset_after && !m->reset_done && m->n_requests == m->reset_after + 1) {
                /* Rebooted just before this request arrived: nak it. */
                m->reset_done = true;
                m->next_seq = 0;
                m->n_requests--;
                fake_emit_block(m, NULL, 0);
                return;
        }
        if (m->silent || (m->silent_after && m->n_requests > m->silent_after))
                return;

        assert_true(count <= 50);
        len = offset < m->dict_len ? MIN((size_t) count, m->dict_len - offset) : 0;

        if (m->chatty) {
                /* An unrelated message in a block of its own (id 79 with
                 * parameters we cannot know). */
                static const uint8_t other[] = { 0x4f, 0x87, 0x68, 0x03, 0x7e, 0x00, 0x01 };
                fake_emit_block(m, other, sizeof(other));
        }

        n += klipper_vlq_encode(KLIPPER_MSGID_IDENTIFY_RESPONSE, content + n);
        n += klipper_vlq_encode(offset, content + n);
        content[n++] = (uint8_t) len;
        memcpy(content + n, m->dict + MIN(offset, m->dict_len), len);
        n += len;
        if (m->chatty && n + 3 <= sizeof(content)) {
                /* An unknown message after ours in the same block. */
                content[n++] = 0x55;
                content[n++] = 0x00;
                content[n++] = 0x7e;
        }

        if (m->drop_reply_at != m->n_requests && m->drop_all_at != m->n_requests)
                fake_emit_block(m, content, n);
        if (m->drop_all_at != m->n_requests)
                fake_emit_block(m, NULL, 0);    /* ack: seq = next expected */
}

/* What command.c does with one valid block from the host. */
static void fake_handle_block(struct fake_mcu *m, const struct klipper_block *b) {
        const uint8_t *p = b->content, *end = b->content + b->len;

        if (b->seq != m->next_seq) {
                m->n_naks++;
                fake_emit_block(m, NULL, 0);
                return;
        }
        m->next_seq = (m->next_seq + 1) & KLIPPER_MESSAGE_SEQ_MASK;

        while (p < end) {
                int32_t id, offset, count;

                assert_int_equal(klipper_vlq_decode(&p, end, &id), 0);
                assert_int_equal(id, KLIPPER_MSGID_IDENTIFY);
                assert_int_equal(klipper_vlq_decode(&p, end, &offset), 0);
                assert_int_equal(klipper_vlq_decode(&p, end, &count), 0);
                assert_int_equal(count, KLIPPER_IDENTIFY_CHUNK);
                fake_handle_identify(m, (uint32_t) offset, (uint32_t) count & 0xff);
        }
}

static int fake_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        struct fake_mcu *m = (struct fake_mcu *) t;
        size_t pos = 0;

        assert_true(timeout_ms > 0);
        if (m->gone_after && m->n_requests >= m->gone_after)
                return -ENODEV;

        for (;;) {
                struct klipper_block b;
                size_t used;
                int r = klipper_decoder_feed(&m->decoder, (const uint8_t *) buf + pos, len - pos, &used, &b);

                pos += used;
                if (r == 0)
                        break;
                fake_handle_block(m, &b);
        }
        return 0;
}

static ssize_t fake_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        struct fake_mcu *m = (struct fake_mcu *) t;
        size_t n;

        assert_true(len > 0);
        assert_true(timeout_ms >= 0);
        if (m->gone_after && m->n_requests >= m->gone_after)
                return -ENODEV;

        if (m->garbage) {
                uint8_t *p = buf;

                n = MIN(len, (size_t) 97);
                for (size_t i = 0; i < n; i++)
                        p[i] = (uint8_t) fake_random(m);
                return (ssize_t) n;
        }

        if (m->out_pos == m->out_len) {
                /* Nothing to say: the host's wait really elapses. */
                struct timespec ts = { timeout_ms / 1000, (long) (timeout_ms % 1000) * 1000000 };

                nanosleep(&ts, NULL);
                return -ETIMEDOUT;
        }

        n = m->out_len - m->out_pos;
        if (m->read_chunk)
                n = MIN(n, m->read_chunk);
        n = MIN(n, len);
        memcpy(buf, m->out + m->out_pos, n);
        m->out_pos += n;
        if (m->out_pos == m->out_len)
                m->out_pos = m->out_len = 0;
        return (ssize_t) n;
}

static void fake_free(struct transport *t) {
        (void) t;
}

static const struct transport_ops fake_ops = {
        .name = "fake",
        .read = fake_read,
        .write = fake_write,
        .free = fake_free,
};

struct dict_fixture {
        uint8_t *compressed;
        size_t len;
};

/* A dictionary of the real Linux MCU's shape: ~12 KB of JSON, ~4 KB zlib. */
static int dict_setup(void **state) {
        struct dict_fixture *f = calloc(1, sizeof(*f));
        size_t cap = 32768, n = 0;
        char *json = malloc(cap);
        uint32_t rng = 1;
        uLongf zlen;

        assert_non_null(f);
        assert_non_null(json);
        n += (size_t) snprintf(json + n, cap - n, "{\"app\":\"Klipper\",\"build_versions\":\"gcc: (GCC) 12.2.0 binutils: (GNU Binutils) 2.40\",\"commands\":{");
        for (unsigned i = 0; i < 117; i++) {
                rng = rng * 1103515245u + 12345u;
                n += (size_t) snprintf(json + n, cap - n, "%s\"cmd_%04x_%u oid=%%c value=%%u clock=%%u\":%u",
                                       i ? "," : "", rng >> 16, i, i + 2);
        }
        n += (size_t) snprintf(json + n, cap - n,
                               "},\"config\":{\"CLOCK_FREQ\":50000000,\"MCU\":\"linux\"},\"enumerations\":{\"pin\":{");
        for (unsigned i = 0; i < 250; i++) {
                rng = rng * 1103515245u + 12345u;
                n += (size_t) snprintf(json + n, cap - n, "%s\"gpio%u_%04x\":%u", i ? "," : "", i, rng >> 16, rng >> 20);
        }
        n += (size_t) snprintf(json + n, cap - n, "}},\"responses\":{");
        for (unsigned i = 0; i < 60; i++) {
                rng = rng * 1103515245u + 12345u;
                n += (size_t) snprintf(json + n, cap - n, "%s\"resp_%04x_%u oid=%%c next_clock=%%u value=%%hi\":%u",
                                       i ? "," : "", rng >> 16, i, 120 + i);
        }
        n += (size_t) snprintf(json + n, cap - n, "},\"version\":\"v0.12.0-123-gabcdef12\"}");
        assert_true(n < cap);

        zlen = compressBound((uLong) n);
        f->compressed = malloc(zlen);
        assert_non_null(f->compressed);
        assert_int_equal(compress2(f->compressed, &zlen, (const Bytef *) json, (uLong) n, 9), Z_OK);
        f->len = zlen;
        assert_true(f->len > 3000 && f->len < 6000);
        free(json);

        *state = f;
        return 0;
}

static int dict_teardown(void **state) {
        struct dict_fixture *f = *state;

        free(f->compressed);
        free(f);
        return 0;
}

static struct fake_mcu *fake_new(void **state) {
        struct dict_fixture *f = *state;
        struct fake_mcu *m = calloc(1, sizeof(*m));

        assert_non_null(m);
        m->transport.ops = &fake_ops;
        m->transport.description = (char *) "fake";
        klipper_decoder_init(&m->decoder);
        m->dict = f->compressed;
        m->dict_len = f->len;
        m->rng = 42;
        return m;
}

static uint64_t elapsed_ms(const struct timespec *start) {
        struct timespec now;

        clock_gettime(CLOCK_MONOTONIC, &now);
        return (uint64_t) ((now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000);
}

static int run_identify(struct fake_mcu *m, int timeout_ms, size_t max_size, uint64_t *ret_ms) {
        struct klipper_identify_params p = { .timeout_ms = timeout_ms, .max_size = max_size };
        uint8_t *data = NULL;
        size_t len = 0;
        struct timespec start;
        int r;

        clock_gettime(CLOCK_MONOTONIC, &start);
        r = klipper_identify(&m->transport, &p, &data, &len);
        if (ret_ms)
                *ret_ms = elapsed_ms(&start);
        if (r == 0) {
                assert_int_equal(len, m->dict_len);
                assert_memory_equal(data, m->dict, len);
                free(data);
        }
        return r;
}

static void test_identify_normal(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->read_chunk = 7;
        m->chatty = true;
        assert_int_equal(run_identify(m, 0, 0, &ms), 0);
        assert_int_equal(m->n_requests, (m->dict_len + 39) / 40 + 1);
        assert_int_equal(m->n_naks, 0);
        assert_true(ms < 1000);
        free(m);
}

static void test_identify_default_params(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint8_t *data = NULL;
        size_t len = 0;

        assert_int_equal(klipper_identify(&m->transport, NULL, &data, &len), 0);
        assert_int_equal(len, m->dict_len);
        free(data);
        free(m);
}

static void test_identify_seq_sync(void **state) {
        /* The MCU was talked to before and expects another seq than 0 — 1
         * is the ambiguous case where its nak looks like an ack. */
        for (uint8_t expected = 1; expected <= 15; expected += 3) {
                struct fake_mcu *m = fake_new(state);
                uint64_t ms;

                m->next_seq = expected;
                assert_int_equal(run_identify(m, 0, 0, &ms), 0);
                assert_true(m->n_naks >= 1);
                assert_true(ms < 1500);
                free(m);
        }
}

static void test_identify_junk_first(void **state) {
        struct fake_mcu *m = fake_new(state);
        static const uint8_t stale[] = { 0x31, 0x7e, 0x13, 0x44, 0x7e, 0x7e, 0x12, 0x55, 0x66 };

        fake_emit(m, stale, sizeof(stale));
        m->read_chunk = 5;
        assert_int_equal(run_identify(m, 0, 0, NULL), 0);
        free(m);
}

static void test_identify_lost_reply(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->drop_reply_at = 3;
        assert_int_equal(run_identify(m, 0, 0, &ms), 0);
        assert_true(ms >= 90 && ms < 1000);
        free(m);

        m = fake_new(state);
        m->drop_all_at = 5;
        assert_int_equal(run_identify(m, 0, 0, &ms), 0);
        assert_true(ms >= 90 && ms < 1000);
        free(m);
}

static void test_identify_mcu_reset(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->reset_after = 10;
        assert_int_equal(run_identify(m, 0, 0, &ms), 0);
        assert_true(m->reset_done);
        assert_true(ms < 2000);
        free(m);
}

static void test_identify_silence(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->silent = true;
        assert_int_equal(run_identify(m, 300, 0, &ms), -ETIMEDOUT);
        assert_true(ms >= 290 && ms < 600);
        free(m);
}

static void test_identify_garbage(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->garbage = true;
        assert_int_equal(run_identify(m, 5000, 0, &ms), -EBADMSG);
        assert_true(ms < 200);
        free(m);
}

static void test_identify_hang_mid_dictionary(void **state) {
        struct fake_mcu *m = fake_new(state);
        uint64_t ms;

        m->silent_after = 20;
        assert_int_equal(run_identify(m, 400, 0, &ms), -ETIMEDOUT);
        assert_true(ms >= 390 && ms < 700);
        free(m);
}

static void test_identify_device_gone(void **state) {
        struct fake_mcu *m = fake_new(state);

        m->gone_after = 10;
        assert_int_equal(run_identify(m, 0, 0, NULL), -ENODEV);
        free(m);
}

static void test_identify_too_big(void **state) {
        struct fake_mcu *m = fake_new(state);

        assert_int_equal(run_identify(m, 0, 1000, NULL), -E2BIG);
        free(m);

        m = fake_new(state);
        assert_int_equal(run_identify(m, 0, m->dict_len, NULL), 0);
        free(m);
}

/* ---- serial transport on a pty ---- */

struct pty {
        int master;
        char *slave_path;
};

static void pty_open(struct pty *p) {
        p->master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        assert_true(p->master >= 0);
        assert_int_equal(grantpt(p->master), 0);
        assert_int_equal(unlockpt(p->master), 0);
        p->slave_path = strdup(ptsname(p->master));
        assert_non_null(p->slave_path);
}

static void pty_close(struct pty *p) {
        safe_close(p->master);
        free(p->slave_path);
}

static ssize_t master_read(int fd, void *buf, size_t len, int timeout_ms) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };

        if (poll(&pfd, 1, timeout_ms) <= 0)
                return -ETIMEDOUT;
        return read(fd, buf, len);
}

static void test_serial_read_write(void **state) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        struct pty p;
        char buf[64];
        ssize_t n;

        (void) state;
        pty_open(&p);
        assert_int_equal(serial_transport_open(p.slave_path, 0, &t), 0);
        assert_string_equal(t->description, p.slave_path);
        assert_string_equal(t->ops->name, "serial");

        /* Raw: a block with 0x7e, CR, NUL and ^C must pass unchanged. */
        assert_int_equal(write(p.master, request_seq1, sizeof(request_seq1)), sizeof(request_seq1));
        assert_int_equal(write(p.master, "\r\n\0\x03", 4), 4);
        {
                uint8_t got[32];
                size_t have = 0;

                while (have < sizeof(request_seq1) + 4) {
                        n = transport_read(t, got + have, sizeof(got) - have, 500);
                        assert_true(n > 0);
                        have += (size_t) n;
                }
                assert_int_equal(have, sizeof(request_seq1) + 4);
                assert_memory_equal(got, request_seq1, sizeof(request_seq1));
                assert_memory_equal(got + sizeof(request_seq1), "\r\n\0\x03", 4);
        }

        assert_int_equal(transport_write(t, "world\n", 6, 500), 0);
        n = master_read(p.master, buf, sizeof(buf), 500);
        assert_int_equal(n, 6);
        assert_memory_equal(buf, "world\n", 6);

        assert_int_equal(transport_flush(t), 0);
        pty_close(&p);
}

static void test_serial_timeout_and_hangup(void **state) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        struct timespec start;
        struct pty p;
        char buf[8];

        (void) state;
        pty_open(&p);
        assert_int_equal(serial_transport_open(p.slave_path, 0, &t), 0);

        clock_gettime(CLOCK_MONOTONIC, &start);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 30), -ETIMEDOUT);
        assert_true(elapsed_ms(&start) >= 25 && elapsed_ms(&start) < 300);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 0), -ETIMEDOUT);

        /* The other side goes away: like an unplugged USB device. */
        p.master = safe_close(p.master);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 500), -ENODEV);
        pty_close(&p);
}

static void test_serial_exclusive(void **state) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        struct transport *second = NULL;
        struct pty p;

        (void) state;
        pty_open(&p);
        assert_int_equal(serial_transport_open(p.slave_path, 0, &t), 0);
        assert_int_equal(serial_transport_open(p.slave_path, 0, &second), -EBUSY);
        assert_null(second);

        /* Released on free: the port can be opened again. */
        t = transport_free(t);
        assert_int_equal(serial_transport_open(p.slave_path, 0, &t), 0);
        pty_close(&p);
}

static void test_serial_baud(void **state) {
        struct transport *t = NULL;
        struct termios tio;
        struct pty p;

        (void) state;
        pty_open(&p);

        assert_int_equal(serial_transport_open(p.slave_path, 115200, &t), 0);
        /* On Linux the master shows the slave's termios. */
        assert_int_equal(tcgetattr(p.master, &tio), 0);
        assert_int_equal(cfgetospeed(&tio), B115200);
        assert_int_equal(tio.c_lflag & (ICANON | ECHO), 0);
        t = transport_free(t);

        /* 250000 is not a Bxxx speed: the termios2 path. */
        assert_int_equal(serial_transport_open(p.slave_path, 250000, &t), 0);
        assert_int_equal(tcgetattr(p.master, &tio), 0);
        assert_int_equal(tio.c_cflag & CBAUD, CBAUDEX);    /* BOTHER */
        t = transport_free(t);

        pty_close(&p);
}

static void test_serial_errors(void **state) {
        struct transport *t = NULL;

        (void) state;
        assert_int_equal(serial_transport_open("/nonexistent/ttyACM9", 0, &t), -ENOENT);
        assert_null(t);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_crc16),
                cmocka_unit_test(test_vlq_vectors),
                cmocka_unit_test(test_vlq_lengths_roundtrip),
                cmocka_unit_test(test_vlq_decode_errors),
                cmocka_unit_test(test_block_vectors),
                cmocka_unit_test(test_decoder_byte_by_byte),
                cmocka_unit_test(test_decoder_garbage_before_block),
                cmocka_unit_test(test_decoder_bad_crc),
                cmocka_unit_test(test_decoder_two_blocks),
                cmocka_unit_test(test_decoder_sync_in_content),
                cmocka_unit_test_setup_teardown(test_identify_normal, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_default_params, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_seq_sync, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_junk_first, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_lost_reply, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_mcu_reset, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_silence, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_garbage, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_hang_mid_dictionary, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_device_gone, dict_setup, dict_teardown),
                cmocka_unit_test_setup_teardown(test_identify_too_big, dict_setup, dict_teardown),
                cmocka_unit_test(test_serial_read_write),
                cmocka_unit_test(test_serial_timeout_and_hangup),
                cmocka_unit_test(test_serial_exclusive),
                cmocka_unit_test(test_serial_baud),
                cmocka_unit_test(test_serial_errors),
        };

        if (getenv("TEST_DEBUG"))
                log_set_max_level(LOG_DEBUG);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
