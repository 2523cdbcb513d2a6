/* Unit tests for proto/katapult.c and the tty bootloader requests of
 * transport/serial.c.
 *
 * Frames are checked byte for byte against the examples of protocols.md
 * §5.2; the decoder against garbage, broken and split input.  The command
 * exchanges run against a fake transport that plays a small Katapult in
 * memory (CONNECT, SEND_BLOCK, SEND_EOF, REQUEST_BLOCK, COMPLETE,
 * GET_CANBUS_ID) and can be scripted to NACK, be BUSY, refuse, stay silent,
 * talk garbage or vanish, one reaction per received frame.  When the fake
 * has nothing to say its read fails with -ETIMEDOUT at once, as if the
 * timeout had passed, so retry tests take only the pauses between tries.
 * One exchange also runs over a real pty with serial_transport_open().
 *
 * The bootloader requests run on ptys from posix_openpt(): the 1200 baud
 * touch shows as the slave's speed read through the master (DTR cannot be
 * seen on a pty), the UART magic string arrives on the master.  A forked
 * child holding the slave stands for Klipper owning the port. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cmocka.h>

#include "proto/katapult.h"
#include "proto/klipper.h"
#include "shared/log.h"
#include "shared/time-util.h"
#include "transport/serial.h"

static void put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
        p[2] = (uint8_t) (v >> 16);
        p[3] = (uint8_t) (v >> 24);
}

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

/* ---- frames (protocols.md §5.2) ---- */

struct example {
        const char *name;
        uint8_t cmd;
        uint8_t payload[8];
        size_t payload_len;
        uint8_t wire[12];
        size_t wire_len;
};

static const struct example examples[] = {
        { "CONNECT", 0x11, {}, 0, { 0x01, 0x88, 0x11, 0x00, 0xf1, 0x7c, 0x99, 0x03 }, 8 },
        { "SEND_EOF", 0x13, {}, 0, { 0x01, 0x88, 0x13, 0x00, 0x41, 0x4f, 0x99, 0x03 }, 8 },
        { "COMPLETE", 0x15, {}, 0, { 0x01, 0x88, 0x15, 0x00, 0x91, 0x1b, 0x99, 0x03 }, 8 },
        { "GET_CANBUS_ID", 0x16, {}, 0, { 0x01, 0x88, 0x16, 0x00, 0xf9, 0x31, 0x99, 0x03 }, 8 },
        { "REQUEST_BLOCK @0x08002000", 0x14, { 0x00, 0x20, 0x00, 0x08 }, 4,
          { 0x01, 0x88, 0x14, 0x01, 0x00, 0x20, 0x00, 0x08, 0x5b, 0xde, 0x99, 0x03 }, 12 },
        { "NACK", 0xf1, {}, 0, { 0x01, 0x88, 0xf1, 0x00, 0x68, 0x95, 0x99, 0x03 }, 8 },
        { "COMMAND_ERROR", 0xf2, {}, 0, { 0x01, 0x88, 0xf2, 0x00, 0x00, 0xbf, 0x99, 0x03 }, 8 },
        { "BUSY", 0xf3, {}, 0, { 0x01, 0x88, 0xf3, 0x00, 0xd8, 0xa6, 0x99, 0x03 }, 8 },
        { "prime", 0x90, {}, 0, { 0x01, 0x88, 0x90, 0x00, 0xe5, 0xe9, 0x99, 0x03 }, 8 },
};

static void test_frame_examples(void **state) {
        uint8_t out[KATAPULT_FRAME_MAX];

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(examples); i++) {
                const struct example *e = &examples[i];

                memset(out, 0xaa, sizeof(out));
                print_message("# frame %s\n", e->name);     /* a TAP comment */
                assert_int_equal(katapult_frame_build(out, sizeof(out), e->cmd, e->payload_len ? e->payload : NULL,
                                                      e->payload_len),
                                 (int) e->wire_len);
                assert_memory_equal(out, e->wire, e->wire_len);
        }
}

static void test_frame_send_block_example(void **state) {
        /* SEND_BLOCK @0x08002000 with 64×0xFF: 76 bytes, CRC 07 EA. */
        static const uint8_t head[8] = { 0x01, 0x88, 0x12, 0x11, 0x00, 0x20, 0x00, 0x08 };
        static const uint8_t tail[4] = { 0x07, 0xea, 0x99, 0x03 };
        uint8_t payload[4 + 64], out[KATAPULT_FRAME_MAX];

        (void) state;
        put_le32(payload, 0x08002000);
        memset(payload + 4, 0xff, 64);
        assert_int_equal(katapult_frame_build(out, sizeof(out), KATAPULT_CMD_SEND_BLOCK, payload, sizeof(payload)), 76);
        assert_memory_equal(out, head, sizeof(head));
        for (size_t i = 8; i < 72; i++)
                assert_int_equal(out[i], 0xff);
        assert_memory_equal(out + 72, tail, sizeof(tail));
}

static void test_frame_padding_and_limits(void **state) {
        static const uint8_t five[5] = { 1, 2, 3, 4, 5 };
        uint8_t out[KATAPULT_FRAME_MAX + 4], big[KATAPULT_PAYLOAD_MAX + 1];

        (void) state;
        /* A partial word is padded with zeros and counted as a word. */
        assert_int_equal(katapult_frame_build(out, sizeof(out), 0x42, five, 5), 16);
        assert_int_equal(out[3], 2);
        assert_memory_equal(out + 4, five, 5);
        assert_int_equal(out[9], 0);
        assert_int_equal(out[10], 0);
        assert_int_equal(out[11], 0);
        assert_int_equal(out[12] | out[13] << 8, klipper_crc16(out + 2, 10));

        memset(big, 0x5a, sizeof(big));
        assert_int_equal(katapult_frame_build(out, sizeof(out), 0x42, big, KATAPULT_PAYLOAD_MAX),
                         KATAPULT_FRAME_MAX);
        assert_int_equal(out[3], 255);
        assert_int_equal(katapult_frame_build(out, sizeof(out), 0x42, big, KATAPULT_PAYLOAD_MAX + 1), -EMSGSIZE);
        /* The output buffer must hold the whole frame. */
        assert_int_equal(katapult_frame_build(out, 7, KATAPULT_CMD_CONNECT, NULL, 0), -EMSGSIZE);
        assert_int_equal(katapult_frame_build(out, 11, 0x14, five, 4), -EMSGSIZE);
        assert_int_equal(katapult_frame_build(out, 12, 0x14, five, 4), 12);
}

static void test_proto_version_string(void **state) {
        char text[KATAPULT_PROTO_VERSION_STRING_MAX];

        (void) state;
        assert_int_equal(KATAPULT_PROTO_VERSION(1, 1, 0), 0x00010100);
        katapult_proto_version_to_string(0x00010100, text);
        assert_string_equal(text, "1.1.0");
        katapult_proto_version_to_string(KATAPULT_PROTO_VERSION(255, 255, 255), text);
        assert_string_equal(text, "255.255.255");
        assert_true(katapult_block_size_valid(64));
        assert_true(katapult_block_size_valid(512));
        assert_false(katapult_block_size_valid(0));
        assert_false(katapult_block_size_valid(32));
        assert_false(katapult_block_size_valid(1024));
}

/* ---- decoder ---- */

/* Feed @len bytes in pieces of @chunk; collect up to @max frames. */
static size_t decode_all(struct katapult_decoder *d, const uint8_t *data, size_t len, size_t chunk,
                         struct katapult_frame *frames, size_t max) {
        size_t n = 0, pos = 0;

        while (pos < len) {
                size_t piece = MIN(chunk, len - pos), off = 0;

                for (;;) {
                        static struct katapult_frame frame;
                        size_t used;
                        int r;

                        r = katapult_decoder_feed(d, data + pos + off, piece - off, &used, &frame);
                        off += used;
                        if (r == 0)
                                break;
                        assert_int_equal(r, 1);
                        assert_true(n < max);
                        frames[n++] = frame;
                }
                assert_int_equal(off, piece);
                pos += piece;
        }
        return n;
}

static void test_decoder_examples(void **state) {
        static struct katapult_frame frames[4];
        struct katapult_decoder d;

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(examples); i++) {
                const struct example *e = &examples[i];

                katapult_decoder_init(&d);
                assert_int_equal(decode_all(&d, e->wire, e->wire_len, e->wire_len, frames, 4), 1);
                assert_int_equal(frames[0].cmd, e->cmd);
                assert_int_equal(frames[0].len, e->payload_len);
                if (e->payload_len)
                        assert_memory_equal(frames[0].payload, e->payload, e->payload_len);
                assert_int_equal(d.n_bad, 0);
                assert_int_equal(d.fill, 0);
        }
}

static void test_decoder_split_and_joined(void **state) {
        static const size_t chunks[] = { 1, 3, 8, 256 };
        static struct katapult_frame frames[ELEMENTSOF(examples)];
        uint8_t stream[256];
        size_t len = 0;
        struct katapult_decoder d;

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(examples); i++) {
                memcpy(stream + len, examples[i].wire, examples[i].wire_len);
                len += examples[i].wire_len;
        }

        /* Byte by byte, in odd pieces, CAN-sized pieces, all at once. */
        for (size_t c = 0; c < ELEMENTSOF(chunks); c++) {
                katapult_decoder_init(&d);
                memset(frames, 0, sizeof(frames));
                assert_int_equal(decode_all(&d, stream, len, chunks[c], frames, ELEMENTSOF(frames)),
                                 ELEMENTSOF(examples));
                for (size_t i = 0; i < ELEMENTSOF(examples); i++) {
                        assert_int_equal(frames[i].cmd, examples[i].cmd);
                        assert_int_equal(frames[i].len, examples[i].payload_len);
                }
                assert_int_equal(d.fill, 0);
                assert_int_equal(d.n_bad, 0);
        }
}

static void test_decoder_resync(void **state) {
        static struct katapult_frame frames[8];
        static const uint8_t busy[8] = { 0x01, 0x88, 0xf3, 0x00, 0xd8, 0xa6, 0x99, 0x03 };
        static const uint8_t nack[8] = { 0x01, 0x88, 0xf1, 0x00, 0x68, 0x95, 0x99, 0x03 };
        uint8_t stream[128];
        size_t len = 0, n;
        struct katapult_decoder d;

        (void) state;
        /* Garbage, a lone 0x01, 0x01 0x01 0x88 (the second starts the frame). */
        memcpy(stream + len, "\x7e\x10\x99\x03\x88", 5);
        len += 5;
        stream[len++] = 0x01;
        stream[len++] = 0x42;
        stream[len++] = 0x01;
        memcpy(stream + len, busy, 8);
        len += 8;
        /* A frame with a broken CRC, then a valid one. */
        memcpy(stream + len, nack, 8);
        stream[len + 4] ^= 0x01;
        len += 8;
        memcpy(stream + len, nack, 8);
        len += 8;
        /* A truncated frame (header claims 2 words) swallowing the start of a
         * real one: the real one is still found. */
        memcpy(stream + len, "\x01\x88\xa0\x02\x11\x00", 6);
        len += 6;
        memcpy(stream + len, busy, 8);
        len += 8;
        /* Bad trailer. */
        memcpy(stream + len, busy, 8);
        stream[len + 7] = 0x04;
        len += 8;
        memcpy(stream + len, "garbage", 7);
        len += 7;

        for (size_t chunk = 1; chunk <= 8; chunk += 7) {
                katapult_decoder_init(&d);
                n = decode_all(&d, stream, len, chunk, frames, 8);
                assert_int_equal(n, 3);
                assert_int_equal(frames[0].cmd, KATAPULT_RESP_BUSY);
                assert_int_equal(frames[1].cmd, KATAPULT_RESP_NACK);
                assert_int_equal(frames[2].cmd, KATAPULT_RESP_BUSY);
                assert_int_equal(frames[2].len, 0);
                /* Everything else was thrown away. */
                assert_int_equal(d.n_bad + d.fill, len - 24);
        }
}

static void test_decoder_large_frame(void **state) {
        static struct katapult_frame frames[2];
        static uint8_t payload[KATAPULT_PAYLOAD_MAX], wire[KATAPULT_FRAME_MAX * 2 + 3];
        struct katapult_decoder d;
        int len;

        (void) state;
        for (size_t i = 0; i < sizeof(payload); i++)
                payload[i] = (uint8_t) (i * 7);
        wire[0] = 0x01;                 /* a false start right before it */
        wire[1] = 0x88;
        wire[2] = 0xa0;
        len = katapult_frame_build(wire + 3, KATAPULT_FRAME_MAX, KATAPULT_RESP_ACK, payload, sizeof(payload));
        assert_int_equal(len, KATAPULT_FRAME_MAX);
        memcpy(wire + 3 + len, wire + 3, (size_t) len);

        katapult_decoder_init(&d);
        assert_int_equal(decode_all(&d, wire, sizeof(wire), 100, frames, 2), 2);
        assert_int_equal(frames[0].cmd, KATAPULT_RESP_ACK);
        assert_int_equal(frames[0].len, KATAPULT_PAYLOAD_MAX);
        assert_memory_equal(frames[0].payload, payload, sizeof(payload));
        assert_memory_equal(frames[1].payload, payload, sizeof(payload));
        assert_int_equal(d.n_bad, 3);
}

/* ---- CONNECT parsing (protocols.md §5.3) ---- */

/* The CONNECT ACK payload after the echoed command, as command_connect()
 * lays it out. Returns its length. */
static size_t connect_payload(uint8_t *out, uint32_t proto, uint32_t start, uint32_t block_size, const char *mcu,
                              const char *version) {
        size_t mcu_words = (strlen(mcu) + 3) / 4, n = 12;

        put_le32(out, proto);
        put_le32(out + 4, start);
        put_le32(out + 8, block_size);
        memset(out + n, 0, mcu_words * 4);
        memcpy(out + n, mcu, strlen(mcu));
        n += mcu_words * 4;
        if (version) {
                size_t version_words = (strlen(version) + 3) / 4;

                memset(out + n, 0, 4 + version_words * 4);
                n += 4;
                memcpy(out + n, version, strlen(version));
                n += version_words * 4;
        }
        return n;
}

static void test_parse_connect(void **state) {
        uint8_t payload[256];
        struct katapult_info info;
        size_t len;

        (void) state;
        /* Protocol 1.1.0: MCU and version. */
        len = connect_payload(payload, 0x00010100, 0x08002000, 64, "stm32f446xx", "v0.0.1-95-g2b22438");
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_int_equal(info.proto_version, KATAPULT_PROTO_VERSION(1, 1, 0));
        assert_int_equal(info.app_start, 0x08002000);
        assert_int_equal(info.block_size, 64);
        assert_string_equal(info.mcu, "stm32f446xx");
        assert_string_equal(info.version, "v0.0.1-95-g2b22438");

        /* An MCU name filling its words exactly: the separator word ends it. */
        len = connect_payload(payload, 0x00010100, 0x10004000, 256, "rp2040", "v0.0.1");
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_string_equal(info.mcu, "rp2040");
        assert_string_equal(info.version, "v0.0.1");
        len = connect_payload(payload, 0x00010100, 0x4000, 512, "lpc1769x", "v1");
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_string_equal(info.mcu, "lpc1769x");
        assert_string_equal(info.version, "v1");
        assert_int_equal(info.block_size, 512);

        /* Protocol 1.0.0: MCU only; bytes after it are not a version. */
        len = connect_payload(payload, 0x00010000, 0x08002000, 128, "stm32f103xe", NULL);
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_int_equal(info.proto_version, KATAPULT_PROTO_VERSION(1, 0, 0));
        assert_int_equal(info.block_size, 128);
        assert_string_equal(info.mcu, "stm32f103xe");
        assert_string_equal(info.version, "");
        len = connect_payload(payload, 0x00010000, 0x08002000, 64, "stm32f103xe", "junk");
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_string_equal(info.version, "");

        /* No strings at all, and an unprintable byte. */
        assert_int_equal(katapult_parse_connect(payload, 12, &info), 0);
        assert_string_equal(info.mcu, "");
        len = connect_payload(payload, 0x00010100, 0x08002000, 64, "stm\x01\xff", "v");
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_string_equal(info.mcu, "stm??");

        /* Bad block sizes, short payloads. */
        len = connect_payload(payload, 0x00010100, 0x08002000, 1024, "stm32f446xx", "v");
        assert_int_equal(katapult_parse_connect(payload, len, &info), -EPROTO);
        len = connect_payload(payload, 0x00010100, 0x08002000, 0, "stm32f446xx", "v");
        assert_int_equal(katapult_parse_connect(payload, len, &info), -EPROTO);
        len = connect_payload(payload, 0x00010100, 0x08002000, 100, "stm32f446xx", "v");
        assert_int_equal(katapult_parse_connect(payload, len, &info), -EPROTO);
        assert_int_equal(katapult_parse_connect(payload, 11, &info), -EBADMSG);
        assert_int_equal(katapult_parse_connect(NULL, 0, &info), -EBADMSG);
}

static void test_parse_connect_long_strings(void **state) {
        char mcu[200], version[300];
        uint8_t payload[600];
        struct katapult_info info;
        size_t len;

        (void) state;
        memset(mcu, 'm', sizeof(mcu) - 1);
        mcu[sizeof(mcu) - 1] = 0;
        memset(version, 'v', sizeof(version) - 1);
        version[sizeof(version) - 1] = 0;
        len = connect_payload(payload, 0x00010100, 0x08002000, 64, mcu, version);
        assert_int_equal(katapult_parse_connect(payload, len, &info), 0);
        assert_int_equal(strlen(info.mcu), sizeof(info.mcu) - 1);
        assert_int_equal(strlen(info.version), sizeof(info.version) - 1);
}

/* ---- a fake Katapult behind a struct transport ---- */

enum fake_action {
        FAKE_ANSWER,            /* what Katapult answers */
        FAKE_NACK,
        FAKE_BUSY,
        FAKE_ERROR,             /* COMMAND_ERROR */
        FAKE_SILENT,
        FAKE_GARBAGE,           /* bytes that are no frame */
        FAKE_STALE_FIRST,       /* an ACK of another command, then the answer */
        FAKE_WRONG_ADDRESS,     /* blocks: the answer names the next block */
        FAKE_SHORT,             /* an ACK with nothing after the echoed command */
        FAKE_GONE,              /* the device vanishes without answering */
        FAKE_ANSWER_GONE,       /* it answers, then vanishes */
        FAKE_NACK_GONE,         /* it NACKs, then vanishes */
};

#define FAKE_FLASH_SIZE 4096
#define FAKE_MAX_RECEIVED 32

struct fake_received {
        uint8_t cmd;
        size_t len;
        uint8_t payload[4 + KATAPULT_BLOCK_SIZE_MAX];
};

struct fake {
        struct transport transport;     /* first: the ops cast back to us */

        uint32_t proto_version, app_start, block_size;
        const char *mcu, *version;
        uint8_t uuid[KATAPULT_UUID_LEN];
        uint8_t flash[FAKE_FLASH_SIZE];
        uint32_t pages;

        enum fake_action script[16];    /* one per received frame, then FAKE_ANSWER */
        size_t n_script;
        enum fake_action always;        /* used when the script is done */

        uint8_t out[4096];
        size_t out_len, out_pos;
        size_t read_chunk;              /* bytes per read, 0 = as many as fit */
        bool gone, gone_when_drained;
        bool real_timeouts;             /* an empty read sleeps its timeout */

        struct fake_received received[FAKE_MAX_RECEIVED];
        size_t n_received;
        unsigned n_flush, n_empty_reads;
        unsigned n_fillers;             /* katapult_resync() fillers seen */
        int last_read_timeout;
};

static struct fake *fake_from(struct transport *t) {
        return (struct fake *) t;
}

static void fake_queue(struct fake *f, const void *data, size_t len) {
        assert_true(f->out_len + len <= sizeof(f->out));
        memcpy(f->out + f->out_len, data, len);
        f->out_len += len;
}

static void fake_queue_frame(struct fake *f, uint8_t cmd, const void *payload, size_t len) {
        uint8_t wire[KATAPULT_FRAME_MAX];
        int n = katapult_frame_build(wire, sizeof(wire), cmd, payload, len);

        assert_true(n > 0);
        fake_queue(f, wire, (size_t) n);
}

static void fake_ack(struct fake *f, uint8_t cmd, const void *extra, size_t len) {
        uint8_t payload[4 + 4 + KATAPULT_BLOCK_SIZE_MAX + 256];

        assert_true(len <= sizeof(payload) - 4);
        put_le32(payload, cmd);
        if (len > 0)
                memcpy(payload + 4, extra, len);
        fake_queue_frame(f, KATAPULT_RESP_ACK, payload, 4 + len);
}

static uint8_t *fake_flash_at(struct fake *f, uint32_t address) {
        assert_true(address >= f->app_start);
        assert_true(address - f->app_start + f->block_size <= FAKE_FLASH_SIZE);
        return f->flash + (address - f->app_start);
}

/* Katapult's answer to a valid command (src/flashcmd.c). */
static void fake_answer(struct fake *f, const struct fake_received *c, bool wrong_address) {
        uint8_t extra[4 + KATAPULT_BLOCK_SIZE_MAX + 256];
        uint32_t address;
        size_t n;

        switch (c->cmd) {
        case KATAPULT_CMD_CONNECT:
                n = connect_payload(extra, f->proto_version, f->app_start, f->block_size, f->mcu,
                                    f->proto_version >= 0x00010100 ? f->version : NULL);
                fake_ack(f, c->cmd, extra, n);
                return;
        case KATAPULT_CMD_GET_CANBUS_ID:
                memset(extra, 0, 8);
                memcpy(extra, f->uuid, KATAPULT_UUID_LEN);
                fake_ack(f, c->cmd, extra, 8);
                return;
        case KATAPULT_CMD_SEND_BLOCK:
                if (c->len != 4 + f->block_size)
                        break;
                address = get_le32(c->payload);
                if (!wrong_address)
                        memcpy(fake_flash_at(f, address), c->payload + 4, f->block_size);
                put_le32(extra, wrong_address ? address + f->block_size : address);
                fake_ack(f, c->cmd, extra, 4);
                return;
        case KATAPULT_CMD_SEND_EOF:
                put_le32(extra, f->pages);
                fake_ack(f, c->cmd, extra, 4);
                return;
        case KATAPULT_CMD_REQUEST_BLOCK:
                if (c->len != 4)
                        break;
                address = get_le32(c->payload);
                put_le32(extra, wrong_address ? address + f->block_size : address);
                memcpy(extra + 4, fake_flash_at(f, address), f->block_size);
                fake_ack(f, c->cmd, extra, 4 + f->block_size);
                return;
        case KATAPULT_CMD_COMPLETE:
                fake_ack(f, c->cmd, NULL, 0);
                return;
        default:
                break;
        }
        fake_queue_frame(f, KATAPULT_RESP_COMMAND_ERROR, NULL, 0);
}

static int fake_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        struct fake *f = fake_from(t);
        const uint8_t *p = buf;
        struct fake_received *c;
        enum fake_action action;
        size_t payload_len;

        assert_true(timeout_ms > 0);
        if (f->gone)
                return -ENODEV;

        /* katapult_resync(): zeros completing a half-received frame,
         * which fails its CRC: Katapult answers NACK. */
        if (p[0] == 0x00) {
                assert_int_equal(len, KATAPULT_FRAME_MAX);
                for (size_t i = 0; i < len; i++)
                        assert_int_equal(p[i], 0);
                f->n_fillers++;
                fake_queue_frame(f, KATAPULT_RESP_NACK, NULL, 0);
                return 0;
        }

        /* Otherwise the host writes exactly one well-formed frame per call. */
        assert_true(len >= KATAPULT_FRAME_OVERHEAD);
        assert_int_equal(p[0], 0x01);
        assert_int_equal(p[1], 0x88);
        payload_len = (size_t) p[3] * 4;
        assert_int_equal(len, payload_len + KATAPULT_FRAME_OVERHEAD);
        assert_int_equal(p[len - 4] | p[len - 3] << 8, klipper_crc16(p + 2, len - 6));
        assert_int_equal(p[len - 2], 0x99);
        assert_int_equal(p[len - 1], 0x03);

        assert_true(f->n_received < FAKE_MAX_RECEIVED);
        assert_true(payload_len <= sizeof(c->payload));
        c = &f->received[f->n_received];
        c->cmd = p[2];
        c->len = payload_len;
        memcpy(c->payload, p + 4, payload_len);
        action = f->n_received < f->n_script ? f->script[f->n_received] : f->always;
        f->n_received++;

        switch (action) {
        case FAKE_ANSWER:
                fake_answer(f, c, false);
                break;
        case FAKE_NACK:
                fake_queue_frame(f, KATAPULT_RESP_NACK, NULL, 0);
                break;
        case FAKE_BUSY:
                fake_queue_frame(f, KATAPULT_RESP_BUSY, NULL, 0);
                break;
        case FAKE_ERROR:
                fake_queue_frame(f, KATAPULT_RESP_COMMAND_ERROR, NULL, 0);
                break;
        case FAKE_SILENT:
                break;
        case FAKE_GARBAGE: {
                static const char garbage[] = "\x7e\x05\x10\x00\x00\x7e garbage \x99\x03";

                fake_queue(f, garbage, sizeof(garbage) - 1);
                break;
        }
        case FAKE_STALE_FIRST:
                fake_ack(f, c->cmd == KATAPULT_CMD_CONNECT ? KATAPULT_CMD_SEND_EOF : KATAPULT_CMD_CONNECT,
                         "\0\0\0\0", 4);
                fake_answer(f, c, false);
                break;
        case FAKE_WRONG_ADDRESS:
                fake_answer(f, c, true);
                break;
        case FAKE_SHORT:
                fake_ack(f, c->cmd, NULL, 0);
                break;
        case FAKE_GONE:
                f->gone = true;
                break;
        case FAKE_ANSWER_GONE:
                fake_answer(f, c, false);
                f->gone_when_drained = true;
                break;
        case FAKE_NACK_GONE:
                fake_queue_frame(f, KATAPULT_RESP_NACK, NULL, 0);
                f->gone_when_drained = true;
                break;
        }
        return 0;
}

static ssize_t fake_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        struct fake *f = fake_from(t);
        size_t n;

        f->last_read_timeout = timeout_ms;
        if (f->out_pos < f->out_len) {
                n = MIN(len, f->out_len - f->out_pos);
                if (f->read_chunk > 0)
                        n = MIN(n, f->read_chunk);
                memcpy(buf, f->out + f->out_pos, n);
                f->out_pos += n;
                if (f->out_pos == f->out_len) {
                        f->out_pos = f->out_len = 0;
                        if (f->gone_when_drained)
                                f->gone = true;
                }
                return (ssize_t) n;
        }
        if (f->gone)
                return -ENODEV;
        f->n_empty_reads++;
        assert_true(timeout_ms >= 0);
        if (f->real_timeouts)
                (void) poll(NULL, 0, timeout_ms);
        return -ETIMEDOUT;
}

static int fake_flush(struct transport *t) {
        struct fake *f = fake_from(t);

        f->n_flush++;
        f->out_pos = f->out_len = 0;
        return f->gone ? -ENODEV : 0;
}

static void fake_free(struct transport *t) {
        free(t);
}

static const struct transport_ops fake_ops = {
        .name = "fake",
        .read = fake_read,
        .write = fake_write,
        .flush = fake_flush,
        .free = fake_free,
};

static int fake_setup(void **state) {
        static const uint8_t uuid[KATAPULT_UUID_LEN] = { 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c };
        struct fake *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        f->transport.ops = &fake_ops;
        f->transport.description = (char *) "fake katapult";
        f->proto_version = 0x00010100;
        f->app_start = 0x08002000;
        f->block_size = 64;
        f->mcu = "stm32f446xx";
        f->version = "v0.0.1-95-g2b22438";
        memcpy(f->uuid, uuid, sizeof(uuid));
        memset(f->flash, 0xff, sizeof(f->flash));
        f->pages = 3;
        f->always = FAKE_ANSWER;
        *state = f;
        return 0;
}

static int fake_teardown(void **state) {
        free(*state);
        return 0;
}

static void fake_script(struct fake *f, size_t n, const enum fake_action *actions) {
        assert_true(n <= ELEMENTSOF(f->script));
        memcpy(f->script, actions, n * sizeof(*actions));
        f->n_script = n;
}

#define SCRIPT(f, ...)                                                                  \
        do {                                                                            \
                static const enum fake_action _a[] = { __VA_ARGS__ };                   \
                fake_script((f), ELEMENTSOF(_a), _a);                                   \
        } while (0)

/* Short per-try timeout of the tests: pauses of 10 ms, drains of 5 ms,
 * 30 ms after BUSY. */
#define T_MS 40

/* ---- command exchange ---- */

static void test_connect(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(f->n_received, 1);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_CONNECT);
        assert_int_equal(f->received[0].len, 0);
        assert_int_equal(info.proto_version, 0x00010100);
        assert_int_equal(info.app_start, 0x08002000);
        assert_int_equal(info.block_size, 64);
        assert_string_equal(info.mcu, "stm32f446xx");
        assert_string_equal(info.version, "v0.0.1-95-g2b22438");
        assert_true(f->n_flush >= 1);   /* stale input goes before the command */
}

static void test_connect_proto_1_0(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        f->proto_version = 0x00010000;
        f->block_size = 128;
        f->mcu = "lpc1769";
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(info.proto_version, 0x00010000);
        assert_int_equal(info.block_size, 128);
        assert_string_equal(info.mcu, "lpc1769");
        assert_string_equal(info.version, "");
}

static void test_connect_bad_block_size(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        f->block_size = 1024;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EPROTO);
        assert_int_equal(f->n_received, 1);
        f->block_size = 48;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EPROTO);
}

static void test_connect_in_can_pieces(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        /* A CAN node stream delivers at most 8 bytes per frame. */
        f->read_chunk = 8;
        SCRIPT(f, FAKE_STALE_FIRST);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(f->n_received, 1);     /* the late ACK was skipped, not a failed try */
        assert_string_equal(info.mcu, "stm32f446xx");
        f->read_chunk = 1;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_string_equal(info.version, "v0.0.1-95-g2b22438");
}

static void test_nack_retries(void **state) {
        struct fake *f = *state;
        struct katapult_info info;
        unsigned flushes;

        SCRIPT(f, FAKE_NACK, FAKE_NACK);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(f->n_received, 3);
        for (size_t i = 0; i < 3; i++)
                assert_int_equal(f->received[i].cmd, KATAPULT_CMD_CONNECT);
        assert_string_equal(info.mcu, "stm32f446xx");

        /* NACKs all the time: -EBADMSG after 5 tries, drained in between. */
        f->n_received = 0;
        f->n_script = 0;
        f->always = FAKE_NACK;
        flushes = f->n_flush;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EBADMSG);
        assert_int_equal(f->n_received, KATAPULT_TRIES);
        assert_true(f->n_flush - flushes >= 2 * KATAPULT_TRIES - 1);
}

static void test_busy_waits(void **state) {
        struct fake *f = *state;
        struct katapult_info info;
        uint64_t start;

        SCRIPT(f, FAKE_BUSY);
        start = now_msec();
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_true(now_msec() - start >= T_MS * 3 / 4);
        assert_int_equal(f->n_received, 2);

        f->n_received = 0;
        f->n_script = 0;
        f->always = FAKE_BUSY;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EBUSY);
        assert_int_equal(f->n_received, KATAPULT_TRIES);
}

static void test_command_error_is_final(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        SCRIPT(f, FAKE_ERROR);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EIO);
        assert_int_equal(f->n_received, 1);

        /* After a NACK too. */
        f->n_received = 0;
        SCRIPT(f, FAKE_NACK, FAKE_ERROR);
        assert_int_equal(katapult_complete(&f->transport, T_MS), -EIO);
        assert_int_equal(f->n_received, 2);
}

static void test_timeout(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        f->always = FAKE_SILENT;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -ETIMEDOUT);
        assert_int_equal(f->n_received, KATAPULT_TRIES);
        assert_true(f->last_read_timeout <= T_MS);

        /* Silence, then an answer within the tries. */
        f->n_received = 0;
        f->always = FAKE_ANSWER;
        SCRIPT(f, FAKE_SILENT, FAKE_SILENT, FAKE_SILENT, FAKE_SILENT);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(f->n_received, 5);
}

static void test_timeout_takes_its_time(void **state) {
        struct fake *f = *state;
        uint64_t start, elapsed;

        /* With a transport that really waits: 2 tries of 20 ms, and a
         * pause of 5 ms between them. */
        f->real_timeouts = true;
        f->always = FAKE_SILENT;
        start = now_msec();
        assert_int_equal(katapult_command(&f->transport, KATAPULT_CMD_CONNECT, NULL, 0, 2, 20, NULL), -ETIMEDOUT);
        elapsed = now_msec() - start;
        assert_true(elapsed >= 40);
        assert_true(elapsed < 1000);
        assert_int_equal(f->n_received, 2);
}

static void test_garbage(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        /* A peer that talks, but not Katapult (Klipper, a wrong baud rate). */
        f->always = FAKE_GARBAGE;
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -EBADMSG);
        assert_int_equal(f->n_received, KATAPULT_TRIES);

        f->n_received = 0;
        f->always = FAKE_ANSWER;
        SCRIPT(f, FAKE_GARBAGE);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(f->n_received, 2);
}

static void test_device_gone(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        SCRIPT(f, FAKE_GONE);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -ENODEV);
        assert_int_equal(f->n_received, 1);
        /* Gone before we even write. */
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -ENODEV);
        assert_int_equal(f->n_received, 1);

        /* Gone during the pause after a failed try. */
        f->gone = false;
        f->n_received = 0;
        SCRIPT(f, FAKE_NACK_GONE);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), -ENODEV);
        assert_int_equal(f->n_received, 1);
}

static void test_command_arguments(void **state) {
        struct fake *f = *state;
        uint8_t big[KATAPULT_PAYLOAD_MAX + 1] = {};

        assert_int_equal(katapult_command(NULL, 0x11, NULL, 0, 1, T_MS, NULL), -EINVAL);
        assert_int_equal(katapult_command(&f->transport, 0x11, NULL, 0, 0, T_MS, NULL), -EINVAL);
        assert_int_equal(katapult_command(&f->transport, 0x11, NULL, 0, 1, 0, NULL), -EINVAL);
        assert_int_equal(katapult_command(&f->transport, 0x11, NULL, 4, 1, T_MS, NULL), -EINVAL);
        assert_int_equal(katapult_command(&f->transport, 0x11, big, sizeof(big), 1, T_MS, NULL), -EMSGSIZE);
        assert_int_equal(f->n_received, 0);
}

static void test_complete(void **state) {
        struct fake *f = *state;

        assert_int_equal(katapult_complete(&f->transport, T_MS), 0);
        assert_int_equal(f->n_received, 1);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_COMPLETE);

        /* USB: the ACK arrives and the device resets. */
        SCRIPT(f, FAKE_ANSWER, FAKE_ANSWER_GONE);
        assert_int_equal(katapult_complete(&f->transport, T_MS), 0);
        assert_true(f->gone);

        /* The device resets before its ACK gets through. */
        f->gone = f->gone_when_drained = false;
        f->n_received = 0;
        SCRIPT(f, FAKE_NACK, FAKE_GONE);
        assert_int_equal(katapult_complete(&f->transport, T_MS), 0);
        assert_int_equal(f->n_received, 2);

        /* Gone already. */
        assert_int_equal(katapult_complete(&f->transport, T_MS), 0);

        f->gone = false;
        f->n_script = 0;
        f->always = FAKE_SILENT;
        assert_int_equal(katapult_complete(&f->transport, T_MS), -ETIMEDOUT);
}

static void test_get_canbus_id(void **state) {
        static const uint8_t expected[KATAPULT_UUID_LEN] = { 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c };
        struct fake *f = *state;
        uint8_t uuid[KATAPULT_UUID_LEN];

        assert_int_equal(katapult_get_canbus_id(&f->transport, uuid), 0);
        assert_memory_equal(uuid, expected, sizeof(uuid));
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_GET_CANBUS_ID);

        SCRIPT(f, FAKE_ANSWER, FAKE_SHORT);
        assert_int_equal(katapult_get_canbus_id(&f->transport, uuid), -EBADMSG);
}

static void test_send_block(void **state) {
        struct fake *f = *state;
        uint8_t block[64];

        for (size_t i = 0; i < sizeof(block); i++)
                block[i] = (uint8_t) i;

        assert_int_equal(katapult_send_block(&f->transport, 0x08002040, block, 64), 0);
        assert_int_equal(f->n_received, 1);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_SEND_BLOCK);
        assert_int_equal(f->received[0].len, 68);
        assert_int_equal(get_le32(f->received[0].payload), 0x08002040);
        assert_memory_equal(f->received[0].payload + 4, block, 64);
        assert_memory_equal(f->flash + 64, block, 64);

        /* The echoed address is wrong once: the block goes again. */
        f->n_received = 0;
        SCRIPT(f, FAKE_WRONG_ADDRESS);
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), 0);
        assert_int_equal(f->n_received, 2);
        assert_int_equal(get_le32(f->received[1].payload), 0x08002000);

        /* ... and always. */
        f->n_received = 0;
        f->n_script = 0;
        f->always = FAKE_WRONG_ADDRESS;
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), -EIO);
        assert_int_equal(f->n_received, KATAPULT_BLOCK_ATTEMPTS);

        /* Refused (bad address, flash error). */
        f->n_received = 0;
        f->always = FAKE_ERROR;
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), -EIO);
        assert_int_equal(f->n_received, 1);

        /* A NACK costs a try. */
        f->n_received = 0;
        f->always = FAKE_ANSWER;
        SCRIPT(f, FAKE_NACK);
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), 0);
        assert_int_equal(f->n_received, 2);

        SCRIPT(f, FAKE_SHORT);
        f->n_received = 0;
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), -EBADMSG);

        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 32), -EINVAL);
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, NULL, 64), -EINVAL);
}

static void test_send_block_sizes(void **state) {
        static uint8_t block[KATAPULT_BLOCK_SIZE_MAX];
        struct fake *f = *state;

        for (uint32_t size = 64; size <= KATAPULT_BLOCK_SIZE_MAX; size *= 2) {
                f->block_size = size;
                f->n_received = 0;
                memset(block, (int) size, size);
                assert_int_equal(katapult_send_block(&f->transport, 0x08002000 + size, block, size), 0);
                assert_int_equal(f->received[0].len, 4 + size);
                assert_memory_equal(f->flash + size, block, size);
        }
}

static void test_send_block_timeout(void **state) {
        struct fake *f = *state;
        uint8_t block[64] = {};

        /* Blocks get KATAPULT_BLOCK_TRIES tries, not KATAPULT_TRIES. */
        f->always = FAKE_SILENT;
        assert_int_equal(katapult_send_block(&f->transport, 0x08002000, block, 64), -ETIMEDOUT);
        assert_int_equal(f->n_received, KATAPULT_BLOCK_TRIES);
        assert_true(f->last_read_timeout > KATAPULT_BLOCK_TIMEOUT_MS - 1000);
        assert_true(f->last_read_timeout <= KATAPULT_BLOCK_TIMEOUT_MS);
}

static void test_send_eof(void **state) {
        struct fake *f = *state;
        uint32_t pages = 0;

        f->pages = 17;
        assert_int_equal(katapult_send_eof(&f->transport, &pages), 0);
        assert_int_equal(pages, 17);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_SEND_EOF);
        assert_int_equal(f->received[0].len, 0);
        assert_int_equal(katapult_send_eof(&f->transport, NULL), 0);

        SCRIPT(f, FAKE_ANSWER, FAKE_ANSWER, FAKE_ERROR);
        assert_int_equal(katapult_send_eof(&f->transport, &pages), -EIO);
}

static void test_request_block(void **state) {
        struct fake *f = *state;
        uint8_t block[64], read_back[64];

        for (size_t i = 0; i < sizeof(block); i++)
                block[i] = (uint8_t) (0xa0 ^ i);
        memcpy(f->flash + 128, block, sizeof(block));

        assert_int_equal(katapult_request_block(&f->transport, 0x08002080, read_back, 64), 0);
        assert_memory_equal(read_back, block, 64);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_REQUEST_BLOCK);
        assert_int_equal(f->received[0].len, 4);
        assert_int_equal(get_le32(f->received[0].payload), 0x08002080);

        /* Erased flash reads as 0xff. */
        assert_int_equal(katapult_request_block(&f->transport, 0x08002000, read_back, 64), 0);
        for (size_t i = 0; i < 64; i++)
                assert_int_equal(read_back[i], 0xff);

        f->n_received = 0;
        SCRIPT(f, FAKE_WRONG_ADDRESS);
        memset(read_back, 0, sizeof(read_back));
        assert_int_equal(katapult_request_block(&f->transport, 0x08002080, read_back, 64), 0);
        assert_int_equal(f->n_received, 2);
        assert_memory_equal(read_back, block, 64);

        /* The MCU uses another block size than we asked for. */
        f->block_size = 128;
        assert_int_equal(katapult_request_block(&f->transport, 0x08002080, read_back, 64), -EBADMSG);
        f->block_size = 64;

        f->n_received = 0;
        f->n_script = 0;
        f->always = FAKE_WRONG_ADDRESS;
        assert_int_equal(katapult_request_block(&f->transport, 0x08002080, read_back, 64), -EIO);
        assert_int_equal(f->n_received, KATAPULT_BLOCK_ATTEMPTS);

        assert_int_equal(katapult_request_block(&f->transport, 0x08002080, read_back, 100), -EINVAL);
}

static void test_flash_roundtrip(void **state) {
        struct fake *f = *state;
        uint8_t image[200], block[64], back[64];
        uint32_t pages = 0, address = f->app_start;

        for (size_t i = 0; i < sizeof(image); i++)
                image[i] = (uint8_t) (i * 13 + 1);

        /* The flow of protocols.md §5.4, minus the image checks. */
        f->read_chunk = 8;
        assert_int_equal(katapult_prime(&f->transport), 0);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_PRIME);
        for (size_t off = 0; off < sizeof(image); off += 64, address += 64) {
                memset(block, 0xff, sizeof(block));
                memcpy(block, image + off, MIN((size_t) 64, sizeof(image) - off));
                assert_int_equal(katapult_send_block(&f->transport, address, block, 64), 0);
        }
        assert_int_equal(katapult_send_eof(&f->transport, &pages), 0);
        address = f->app_start;
        for (size_t off = 0; off < sizeof(image); off += 64, address += 64) {
                assert_int_equal(katapult_request_block(&f->transport, address, back, 64), 0);
                assert_memory_equal(back, image + off, MIN((size_t) 64, sizeof(image) - off));
        }
        assert_int_equal(katapult_complete(&f->transport, T_MS), 0);
        assert_int_equal(f->n_received, 1 + 4 + 1 + 4 + 1);
}

static void test_prime(void **state) {
        struct fake *f = *state;
        struct katapult_info info;
        uint64_t start;

        /* Katapult answers the unknown 0x90 with COMMAND_ERROR: discarded. */
        assert_int_equal(katapult_prime(&f->transport), 0);
        assert_int_equal(f->n_received, 1);
        assert_int_equal(f->received[0].cmd, KATAPULT_CMD_PRIME);
        assert_int_equal(f->received[0].len, 0);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);

        /* No answer at all is fine too. */
        f->n_received = 0;
        SCRIPT(f, FAKE_SILENT);
        start = now_msec();
        assert_int_equal(katapult_prime(&f->transport), 0);
        assert_true(now_msec() - start < 1000);

        SCRIPT(f, FAKE_SILENT, FAKE_GONE);
        assert_int_equal(katapult_prime(&f->transport), -ENODEV);
        assert_int_equal(katapult_prime(&f->transport), -ENODEV);
}

static void test_resync(void **state) {
        struct fake *f = *state;
        struct katapult_info info;

        /* The NACK to the filler is thrown away; CONNECT works afterwards. */
        assert_int_equal(katapult_resync(&f->transport), 0);
        assert_int_equal(f->n_fillers, 1);
        assert_int_equal(f->n_received, 0);
        assert_int_equal(katapult_connect(&f->transport, T_MS, &info), 0);
        assert_int_equal(info.block_size, 64);

        f->gone = true;
        assert_int_equal(katapult_resync(&f->transport), -ENODEV);
        assert_int_equal(katapult_resync(NULL), -EINVAL);
}

/* ---- over a real pty ---- */

struct pty_katapult {
        int master;
        bool answered;
};

/* Read one CONNECT from the master and answer it like Katapult. */
static void *pty_katapult_thread(void *userdata) {
        struct pty_katapult *k = userdata;
        static const uint8_t connect[8] = { 0x01, 0x88, 0x11, 0x00, 0xf1, 0x7c, 0x99, 0x03 };
        uint8_t buf[64], extra[128], payload[132], wire[KATAPULT_FRAME_MAX];
        size_t fill = 0, n;
        int len;

        while (fill < sizeof(connect)) {
                struct pollfd p = { .fd = k->master, .events = POLLIN };
                ssize_t r;

                if (poll(&p, 1, 2000) <= 0)
                        return NULL;
                r = read(k->master, buf + fill, sizeof(buf) - fill);
                if (r <= 0)
                        return NULL;
                fill += (size_t) r;
        }
        if (memcmp(buf, connect, sizeof(connect)) != 0)
                return NULL;

        n = connect_payload(extra, 0x00010100, 0x10004000, 256, "rp2040", "v0.0.1-100-gabcdef0");
        put_le32(payload, KATAPULT_CMD_CONNECT);
        memcpy(payload + 4, extra, n);
        len = katapult_frame_build(wire, sizeof(wire), KATAPULT_RESP_ACK, payload, 4 + n);
        if (len > 0 && write(k->master, wire, (size_t) len) == len)
                k->answered = true;
        return NULL;
}

static int open_pty(char **ret_slave) {
        int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        const char *slave;

        assert_true(master >= 0);
        assert_int_equal(grantpt(master), 0);
        assert_int_equal(unlockpt(master), 0);
        slave = ptsname(master);
        assert_non_null(slave);
        *ret_slave = strdup(slave);
        assert_non_null(*ret_slave);
        return master;
}

static void test_connect_over_pty(void **state) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        _cleanup_free_ char *slave = NULL;
        struct pty_katapult k = {};
        struct katapult_info info;
        pthread_t thread;

        (void) state;
        k.master = open_pty(&slave);
        assert_int_equal(serial_transport_open(slave, 0, &t), 0);
        assert_int_equal(pthread_create(&thread, NULL, pty_katapult_thread, &k), 0);
        assert_int_equal(katapult_connect(t, 2000, &info), 0);
        assert_int_equal(pthread_join(thread, NULL), 0);
        assert_true(k.answered);
        assert_int_equal(info.app_start, 0x10004000);
        assert_int_equal(info.block_size, 256);
        assert_string_equal(info.mcu, "rp2040");
        assert_string_equal(info.version, "v0.0.1-100-gabcdef0");
        t = transport_free(t);
        close(k.master);
}

/* ---- bootloader requests over a tty (protocols.md §4.1/§4.2) ---- */

static speed_t master_speed(int master) {
        struct termios tio;

        assert_int_equal(tcgetattr(master, &tio), 0);
        assert_int_equal(cfgetispeed(&tio), cfgetospeed(&tio));
        return cfgetospeed(&tio);
}

static void set_master_speed(int master, speed_t speed) {
        struct termios tio;

        assert_int_equal(tcgetattr(master, &tio), 0);
        assert_int_equal(cfsetspeed(&tio, speed), 0);
        assert_int_equal(tcsetattr(master, TCSANOW, &tio), 0);
        assert_int_equal(master_speed(master), speed);
}

/* A child that holds @slave open (without the master, so that it is a
 * competing user and not the pty's owner) until killed. */
static pid_t spawn_holder(const char *slave, int master) {
        int ready[2];
        pid_t pid;
        char c;

        assert_int_equal(pipe(ready), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                close(master);
                close(ready[0]);
                if (open(slave, O_RDWR | O_NOCTTY) < 0)
                        _exit(1);
                (void) !write(ready[1], "x", 1);
                for (;;)
                        pause();
        }
        close(ready[1]);
        assert_int_equal(read(ready[0], &c, 1), 1);
        close(ready[0]);
        return pid;
}

static void reap(pid_t pid) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
}

/* Whatever the master has to read within @timeout_ms. */
static size_t master_read(int master, uint8_t *buf, size_t size, int timeout_ms) {
        size_t fill = 0;

        while (fill < size) {
                struct pollfd p = { .fd = master, .events = POLLIN };
                ssize_t n;

                if (poll(&p, 1, timeout_ms) <= 0 || !(p.revents & POLLIN))
                        break;
                n = read(master, buf + fill, size - fill);
                if (n <= 0)
                        break;
                fill += (size_t) n;
        }
        return fill;
}

static void test_usb_touch(void **state) {
        _cleanup_free_ char *slave = NULL;
        int master;

        (void) state;
        master = open_pty(&slave);
        set_master_speed(master, B115200);

        assert_int_equal(serial_request_bootloader_usb(slave), 0);
        assert_int_equal(master_speed(master), B1200);

        /* Again from another speed; the port is free afterwards. */
        set_master_speed(master, B9600);
        assert_int_equal(serial_request_bootloader_usb(slave), 0);
        assert_int_equal(master_speed(master), B1200);
        close(master);
}

static void test_usb_touch_held_port(void **state) {
        _cleanup_free_ char *slave = NULL;
        int master;
        pid_t pid;

        (void) state;
        master = open_pty(&slave);
        set_master_speed(master, B115200);

        /* Klipper has the port: nothing is touched. */
        pid = spawn_holder(slave, master);
        assert_int_equal(serial_request_bootloader_usb(slave), -EBUSY);
        assert_int_equal(master_speed(master), B115200);
        reap(pid);

        assert_int_equal(serial_request_bootloader_usb(slave), 0);
        assert_int_equal(master_speed(master), B1200);
        close(master);
}

static void test_usb_touch_missing_device(void **state) {
        (void) state;
        assert_int_equal(serial_request_bootloader_usb("/dev/mcuflashd-test-no-such-tty"), -ENOENT);
        assert_int_equal(serial_request_bootloader_usb(NULL), -EINVAL);
}

static void test_uart_request(void **state) {
        /* protocols.md §4.2: 0x7e, then 20 1C 20 "Request Serial Bootloader!!" 20 7E. */
        static const uint8_t expected[] = "\x7e" "\x20\x1c\x20" "Request Serial Bootloader!!" "\x20\x7e";
        _cleanup_free_ char *slave = NULL;
        uint8_t buf[128];
        int master;

        (void) state;
        assert_int_equal(sizeof(expected) - 1, 33);
        assert_int_equal(SERIAL_BOOTLOADER_REQUEST_LEN, 33);
        assert_memory_equal(SERIAL_BOOTLOADER_REQUEST, expected, 33);

        master = open_pty(&slave);
        assert_int_equal(serial_request_bootloader_uart(slave, 250000), 0);
        assert_int_equal(master_read(master, buf, sizeof(buf), 200), 33);
        assert_memory_equal(buf, expected, 33);

        /* At a standard rate too. */
        assert_int_equal(serial_request_bootloader_uart(slave, 115200), 0);
        assert_int_equal(master_read(master, buf, sizeof(buf), 200), 33);
        assert_memory_equal(buf, expected, 33);
        assert_int_equal(master_speed(master), B115200);
        close(master);
}

static void test_uart_request_held_port(void **state) {
        _cleanup_free_ char *slave = NULL;
        uint8_t buf[64];
        int master;
        pid_t pid;

        (void) state;
        master = open_pty(&slave);
        pid = spawn_holder(slave, master);
        assert_int_equal(serial_request_bootloader_uart(slave, 250000), -EBUSY);
        assert_int_equal(master_read(master, buf, sizeof(buf), 50), 0);
        reap(pid);
        close(master);

        assert_int_equal(serial_request_bootloader_uart("/dev/mcuflashd-test-no-such-tty", 250000), -ENOENT);
}

#define fake_test(t) cmocka_unit_test_setup_teardown(t, fake_setup, fake_teardown)

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_frame_examples),
                cmocka_unit_test(test_frame_send_block_example),
                cmocka_unit_test(test_frame_padding_and_limits),
                cmocka_unit_test(test_proto_version_string),
                cmocka_unit_test(test_decoder_examples),
                cmocka_unit_test(test_decoder_split_and_joined),
                cmocka_unit_test(test_decoder_resync),
                cmocka_unit_test(test_decoder_large_frame),
                cmocka_unit_test(test_parse_connect),
                cmocka_unit_test(test_parse_connect_long_strings),
                fake_test(test_connect),
                fake_test(test_connect_proto_1_0),
                fake_test(test_connect_bad_block_size),
                fake_test(test_connect_in_can_pieces),
                fake_test(test_nack_retries),
                fake_test(test_busy_waits),
                fake_test(test_command_error_is_final),
                fake_test(test_timeout),
                fake_test(test_timeout_takes_its_time),
                fake_test(test_garbage),
                fake_test(test_device_gone),
                fake_test(test_command_arguments),
                fake_test(test_complete),
                fake_test(test_get_canbus_id),
                fake_test(test_send_block),
                fake_test(test_send_block_sizes),
                fake_test(test_send_block_timeout),
                fake_test(test_send_eof),
                fake_test(test_request_block),
                fake_test(test_flash_roundtrip),
                fake_test(test_prime),
                fake_test(test_resync),
                cmocka_unit_test(test_connect_over_pty),
                cmocka_unit_test(test_usb_touch),
                cmocka_unit_test(test_usb_touch_held_port),
                cmocka_unit_test(test_usb_touch_missing_device),
                cmocka_unit_test(test_uart_request),
                cmocka_unit_test(test_uart_request_held_port),
        };

        if (getenv("TEST_DEBUG"))
                log_set_max_level(LOG_DEBUG);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
