/* Katapult's bootloader protocol (protocols.md §5) as the daemon speaks it:
 * building and decoding frames, the generic command exchange with
 * flashtool.py's retry rules, and the commands built on it (CONNECT,
 * SEND_BLOCK, SEND_EOF, REQUEST_BLOCK, COMPLETE, GET_CANBUS_ID, "prime").
 *
 * One command is in flight at a time and every call blocks until its answer
 * or its last try has timed out.  This file knows nothing about images,
 * checksums over a whole transfer or how the MCU got into Katapult; it never
 * opens a device (transport/ does) and never sleeps longer than the retry
 * pauses documented in katapult.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proto/katapult.h"
#include "proto/klipper.h"
#include "proto/stream.h"
#include "shared/interrupt.h"
#include "shared/log.h"
#include "shared/time-util.h"

#define FRAME_HEADER_0 0x01
#define FRAME_HEADER_1 0x88
#define FRAME_TRAILER_0 0x99
#define FRAME_TRAILER_1 0x03

/* flashtool.py's pauses at its 2 s timeout; shorter timeouts scale them. */
#define RETRY_PAUSE_MS_MAX 500
#define RETRY_DRAIN_MS_MAX 250
#define BUSY_PAUSE_MS_MAX 1500
/* Pause before sending a block again whose echoed address was wrong. */
#define BLOCK_REATTEMPT_PAUSE_MS 100

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
        p[2] = (uint8_t) (v >> 16);
        p[3] = (uint8_t) (v >> 24);
}

static const char *transport_name(const struct transport *t) {
        return strempty(t->description);
}

bool katapult_block_size_valid(uint32_t block_size) {
        return block_size == 64 || block_size == 128 || block_size == 256 || block_size == 512;
}

void katapult_proto_version_to_string(uint32_t version, char out[KATAPULT_PROTO_VERSION_STRING_MAX]) {
        snprintf(out, KATAPULT_PROTO_VERSION_STRING_MAX, "%u.%u.%u",
                 (unsigned) (version >> 16) & 0xff, (unsigned) (version >> 8) & 0xff, (unsigned) version & 0xff);
}

int katapult_frame_build(uint8_t *out, size_t size, uint8_t cmd, const void *payload, size_t len) {
        size_t nwords = (len + 3) / 4, total;
        uint16_t crc;

        if (len > KATAPULT_PAYLOAD_MAX)
                return -EMSGSIZE;
        total = nwords * 4 + KATAPULT_FRAME_OVERHEAD;
        if (total > size)
                return -EMSGSIZE;

        out[0] = FRAME_HEADER_0;
        out[1] = FRAME_HEADER_1;
        out[2] = cmd;
        out[3] = (uint8_t) nwords;
        if (len > 0)
                memcpy(out + 4, payload, len);
        memset(out + 4 + len, 0, nwords * 4 - len);
        crc = klipper_crc16(out + 2, 2 + nwords * 4);
        out[total - 4] = (uint8_t) (crc & 0xff);
        out[total - 3] = (uint8_t) (crc >> 8);
        out[total - 2] = FRAME_TRAILER_0;
        out[total - 1] = FRAME_TRAILER_1;

        return (int) total;
}

void katapult_decoder_init(struct katapult_decoder *d) {
        d->fill = 0;
        d->n_bad = 0;
}

static void decoder_pop(struct katapult_decoder *d, size_t n, bool bad) {
        memmove(d->buf, d->buf + n, d->fill - n);
        d->fill -= n;
        if (bad)
                d->n_bad += (unsigned) n;
}

/* Look at the start of the buffer: 1 = a valid frame (returned and popped),
 * 0 = need more bytes, -1 = bytes were discarded, look again. */
static int decoder_parse(struct katapult_decoder *d, struct katapult_frame *ret) {
        size_t len;
        uint16_t crc;

        if (d->fill == 0)
                return 0;

        if (d->buf[0] != FRAME_HEADER_0) {
                const uint8_t *next = memchr(d->buf, FRAME_HEADER_0, d->fill);

                decoder_pop(d, next ? (size_t) (next - d->buf) : d->fill, true);
                return -1;
        }
        if (d->fill < 2)
                return 0;
        if (d->buf[1] != FRAME_HEADER_1)
                goto bad;
        if (d->fill < 4)
                return 0;

        len = (size_t) d->buf[3] * 4 + KATAPULT_FRAME_OVERHEAD;
        if (d->fill < len)
                return 0;
        if (d->buf[len - 2] != FRAME_TRAILER_0 || d->buf[len - 1] != FRAME_TRAILER_1)
                goto bad;
        crc = (uint16_t) (d->buf[len - 4] | d->buf[len - 3] << 8);
        if (crc != klipper_crc16(d->buf + 2, len - 6))
                goto bad;

        ret->cmd = d->buf[2];
        ret->len = len - KATAPULT_FRAME_OVERHEAD;
        memcpy(ret->payload, d->buf + 4, ret->len);
        decoder_pop(d, len, false);
        return 1;

bad:
        /* Not a frame after all: drop its 0x01 and search on from there, so
         * that a real frame inside the bytes we looked at is not lost. */
        decoder_pop(d, 1, true);
        return -1;
}

static int decoder_parse_any(void *decoder, void *ret) {
        return decoder_parse(decoder, ret);
}

int katapult_decoder_feed(struct katapult_decoder *d, const uint8_t *data, size_t len,
                          size_t *consumed, struct katapult_frame *ret) {
        return stream_feed(d, d->buf, sizeof(d->buf), &d->fill, decoder_parse_any, data, len, consumed,
                           ret);
}

/* ---- the command exchange ---- */

static unsigned scaled_pause(int timeout_ms, unsigned numerator, unsigned denominator, unsigned max) {
        return MIN((unsigned) timeout_ms / denominator * numerator, max);
}

/* Discard whatever the MCU still sends for @drain_ms, then anything queued.
 * 0, -ENODEV or another transport error. */
static int link_drain(struct transport *t, unsigned drain_ms) {
        uint64_t deadline = now_msec() + drain_ms;
        int r;

        for (;;) {
                uint8_t buf[256];
                uint64_t now = now_msec();
                ssize_t n;

                if (now >= deadline)
                        break;
                n = transport_read(t, buf, sizeof(buf), (int) (deadline - now));
                if (n == -ETIMEDOUT)
                        break;
                if (n == -EINTR || n == -EAGAIN || n >= 0)
                        continue;
                return (int) n;
        }

        r = transport_flush(t);
        return r == -ENODEV ? r : 0;
}

/* What an answer means for command @cmd: 1 = its ACK, 0 = not ours (a late
 * ACK of something else, our own frame echoed back), or the negative errno
 * that ends the try. */
static int classify_answer(const struct transport *t, uint8_t cmd, const struct katapult_frame *f) {
        switch (f->cmd) {
        case KATAPULT_RESP_ACK:
                if (f->len >= 4 && get_le32(f->payload) == cmd)
                        return 1;
                log_debug("%s: Katapult acknowledged 0x%02x while we wait for 0x%02x, skipping it",
                          transport_name(t), f->len >= 4 ? (unsigned) get_le32(f->payload) : 0u, cmd);
                return 0;
        case KATAPULT_RESP_NACK:
                log_debug("%s: Katapult NACKed command 0x%02x (garbled frame)", transport_name(t), cmd);
                return -EBADMSG;
        case KATAPULT_RESP_BUSY:
                log_debug("%s: Katapult is busy, command 0x%02x not taken", transport_name(t), cmd);
                return -EBUSY;
        case KATAPULT_RESP_COMMAND_ERROR:
                return log_debug_errno(EIO, "%s: Katapult answered command 0x%02x with COMMAND_ERROR",
                                       transport_name(t), cmd);
        default:
                log_debug("%s: skipping unexpected Katapult frame 0x%02x", transport_name(t), f->cmd);
                return 0;
        }
}

/* One try: send @wire, wait up to @timeout_ms for the answer. */
static int command_try(struct transport *t, uint8_t cmd, const uint8_t *wire, size_t wire_len,
                       int timeout_ms, struct katapult_frame *ret) {
        struct katapult_decoder decoder;
        uint64_t deadline;
        int failure = -ETIMEDOUT, r;

        /* Whatever arrived before our command cannot answer it. */
        r = transport_flush(t);
        if (r == -ENODEV)
                return r;

        r = transport_write(t, wire, wire_len, timeout_ms);
        if (r < 0)
                return r;

        katapult_decoder_init(&decoder);
        deadline = now_msec() + (uint64_t) timeout_ms;
        for (;;) {
                uint8_t buf[256];
                uint64_t now = now_msec();
                size_t pos = 0;
                ssize_t n;

                if (now >= deadline)
                        break;
                n = transport_read(t, buf, sizeof(buf), (int) MIN(deadline - now, (uint64_t) INT32_MAX));
                if (n == -ETIMEDOUT)
                        break;
                if (n == -EINTR || n == -EAGAIN || n == 0)
                        continue;
                if (n < 0)
                        return (int) n;

                for (;;) {
                        size_t used;

                        r = katapult_decoder_feed(&decoder, buf + pos, (size_t) n - pos, &used, ret);
                        pos += used;
                        if (r == 0)
                                break;

                        r = classify_answer(t, cmd, ret);
                        if (r > 0)
                                return 0;
                        if (r < 0)
                                return r;
                        failure = -EPROTO;
                }
        }

        if (failure == -ETIMEDOUT && decoder.n_bad > 0)
                /* It talks, but not Katapult's protocol. */
                failure = -EBADMSG;
        return failure;
}

static bool try_failure_retryable(int r) {
        return r == -ETIMEDOUT || r == -EBADMSG || r == -EBUSY || r == -EPROTO;
}

int katapult_command(struct transport *t, uint8_t cmd, const void *payload, size_t len,
                     unsigned tries, int timeout_ms, struct katapult_frame *ret) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        uint8_t wire[KATAPULT_FRAME_MAX];
        int wire_len, last = -ETIMEDOUT;

        if (!t || tries == 0 || timeout_ms <= 0 || (len > 0 && !payload))
                return -EINVAL;

        wire_len = katapult_frame_build(wire, sizeof(wire), cmd, payload, len);
        if (wire_len < 0)
                return wire_len;

        if (!ret) {
                answer = malloc(sizeof(*answer));
                if (!answer)
                        return -ENOMEM;
                ret = answer;
        }

        for (unsigned attempt = 1; attempt <= tries; attempt++) {
                int r;

                if (attempt > 1) {
                        unsigned pause = last == -EBUSY ? scaled_pause(timeout_ms, 3, 4, BUSY_PAUSE_MS_MAX)
                                                        : scaled_pause(timeout_ms, 1, 4, RETRY_PAUSE_MS_MAX);

                        r = interruptible_sleep_msec(pause);
                        if (r < 0)
                                return r;
                        r = link_drain(t, scaled_pause(timeout_ms, 1, 8, RETRY_DRAIN_MS_MAX));
                        if (r < 0)
                                return log_debug_errno(r, "%s: Katapult link lost: %m", transport_name(t));
                }

                r = command_try(t, cmd, wire, (size_t) wire_len, timeout_ms, ret);
                if (r >= 0)
                        return 0;
                if (!try_failure_retryable(r))
                        return log_debug_errno(r, "%s: Katapult command 0x%02x failed: %m", transport_name(t), cmd);

                last = r;
                log_debug_errno(r, "%s: Katapult command 0x%02x, try %u of %u failed: %m",
                                transport_name(t), cmd, attempt, tries);
        }

        return log_debug_errno(last, "%s: Katapult command 0x%02x failed in all %u tries: %m",
                               transport_name(t), cmd, tries);
}

/* ---- commands ---- */

/* Copy @len bytes (no NUL needed) into @dst of @size as printable ASCII. */
static void copy_printable(char *dst, size_t size, const uint8_t *src, size_t len) {
        size_t n = MIN(len, size - 1);

        for (size_t i = 0; i < n; i++)
                dst[i] = src[i] >= 0x20 && src[i] < 0x7f ? (char) src[i] : '?';
        dst[n] = '\0';
}

/* The next non-empty NUL-separated string in [*p, end), or NULL. */
static const uint8_t *next_string(const uint8_t **p, const uint8_t *end, size_t *ret_len) {
        const uint8_t *q = *p, *start, *nul;

        while (q < end && *q == '\0')
                q++;
        if (q >= end) {
                *p = end;
                return NULL;
        }
        start = q;
        nul = memchr(start, '\0', (size_t) (end - start));
        *ret_len = nul ? (size_t) (nul - start) : (size_t) (end - start);
        *p = start + *ret_len;
        return start;
}

int katapult_parse_connect(const uint8_t *data, size_t len, struct katapult_info *ret) {
        struct katapult_info info = {};
        const uint8_t *p, *end, *s;
        size_t n;

        if (!data || len < 12)
                return -EBADMSG;

        info.proto_version = get_le32(data);
        info.app_start = get_le32(data + 4);
        info.block_size = get_le32(data + 8);
        if (!katapult_block_size_valid(info.block_size))
                return -EPROTO;

        p = data + 12;
        end = data + len;
        s = next_string(&p, end, &n);
        if (s) {
                copy_printable(info.mcu, sizeof(info.mcu), s, n);
                if (info.proto_version >= KATAPULT_PROTO_VERSION(1, 1, 0)) {
                        s = next_string(&p, end, &n);
                        if (s)
                                copy_printable(info.version, sizeof(info.version), s, n);
                }
        }

        *ret = info;
        return 0;
}

int katapult_connect(struct transport *t, int timeout_ms, struct katapult_info *ret) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        char proto[KATAPULT_PROTO_VERSION_STRING_MAX];
        int r;

        if (!t || !ret)
                return -EINVAL;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        r = katapult_command(t, KATAPULT_CMD_CONNECT, NULL, 0, KATAPULT_TRIES,
                             timeout_ms > 0 ? timeout_ms : KATAPULT_TIMEOUT_MS_DEFAULT, answer);
        if (r < 0)
                return r;

        r = katapult_parse_connect(answer->payload + 4, answer->len - 4, ret);
        if (r == -EPROTO)
                return log_debug_errno(r, "%s: Katapult reports block size %u, which it never uses",
                                       transport_name(t),
                                       answer->len >= 16 ? (unsigned) get_le32(answer->payload + 12) : 0u);
        if (r < 0)
                return log_debug_errno(r, "%s: malformed answer to Katapult CONNECT", transport_name(t));

        katapult_proto_version_to_string(ret->proto_version, proto);
        log_debug("%s: Katapult %s (protocol %s), MCU %s, application at 0x%08x, blocks of %u bytes",
                  transport_name(t), isempty(ret->version) ? "(version unknown)" : ret->version, proto,
                  ret->mcu, ret->app_start, ret->block_size);
        return 0;
}

int katapult_complete(struct transport *t, int timeout_ms) {
        int r;

        if (!t)
                return -EINVAL;

        r = katapult_command(t, KATAPULT_CMD_COMPLETE, NULL, 0, KATAPULT_TRIES,
                             timeout_ms > 0 ? timeout_ms : KATAPULT_TIMEOUT_MS_DEFAULT, NULL);
        if (r == -ENODEV) {
                log_debug("%s: link went away after COMPLETE: the MCU is restarting", transport_name(t));
                return 0;
        }
        return r;
}

int katapult_get_canbus_id(struct transport *t, uint8_t uuid[KATAPULT_UUID_LEN]) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        int r;

        if (!t || !uuid)
                return -EINVAL;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        r = katapult_command(t, KATAPULT_CMD_GET_CANBUS_ID, NULL, 0, KATAPULT_TRIES,
                             KATAPULT_TIMEOUT_MS_DEFAULT, answer);
        if (r < 0)
                return r;
        if (answer->len < 4 + KATAPULT_UUID_LEN)
                return log_debug_errno(EBADMSG, "%s: short answer to Katapult GET_CANBUS_ID", transport_name(t));

        memcpy(uuid, answer->payload + 4, KATAPULT_UUID_LEN);
        return 0;
}

int katapult_send_block(struct transport *t, uint32_t address, const void *data, uint32_t block_size) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        uint8_t payload[4 + KATAPULT_BLOCK_SIZE_MAX];
        uint32_t echoed = 0;

        if (!t || !data || !katapult_block_size_valid(block_size))
                return -EINVAL;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        put_le32(payload, address);
        memcpy(payload + 4, data, block_size);

        for (unsigned attempt = 1; attempt <= KATAPULT_BLOCK_ATTEMPTS; attempt++) {
                int r;

                if (attempt > 1 && interruptible_sleep_msec(BLOCK_REATTEMPT_PAUSE_MS) < 0)
                        return -ECANCELED;

                r = katapult_command(t, KATAPULT_CMD_SEND_BLOCK, payload, 4 + block_size, KATAPULT_BLOCK_TRIES,
                                     KATAPULT_BLOCK_TIMEOUT_MS, answer);
                if (r < 0)
                        return r;
                if (answer->len < 8)
                        return log_debug_errno(EBADMSG, "%s: short answer to Katapult SEND_BLOCK",
                                               transport_name(t));

                echoed = get_le32(answer->payload + 4);
                if (echoed == address)
                        return 0;
                log_debug("%s: Katapult wrote block 0x%08x instead of 0x%08x, sending it again",
                          transport_name(t), echoed, address);
        }

        return log_debug_errno(EIO, "%s: Katapult keeps writing block 0x%08x at 0x%08x", transport_name(t),
                               address, echoed);
}

int katapult_send_eof(struct transport *t, uint32_t *ret_pages) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        int r;

        if (!t)
                return -EINVAL;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        r = katapult_command(t, KATAPULT_CMD_SEND_EOF, NULL, 0, KATAPULT_TRIES, KATAPULT_TIMEOUT_MS_DEFAULT,
                             answer);
        if (r < 0)
                return r;
        if (answer->len < 8)
                return log_debug_errno(EBADMSG, "%s: short answer to Katapult SEND_EOF", transport_name(t));

        if (ret_pages)
                *ret_pages = get_le32(answer->payload + 4);
        return 0;
}

int katapult_request_block(struct transport *t, uint32_t address, void *buf, uint32_t block_size) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        uint8_t payload[4];
        uint32_t echoed = 0;

        if (!t || !buf || !katapult_block_size_valid(block_size))
                return -EINVAL;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        put_le32(payload, address);

        for (unsigned attempt = 1; attempt <= KATAPULT_BLOCK_ATTEMPTS; attempt++) {
                int r;

                if (attempt > 1 && interruptible_sleep_msec(BLOCK_REATTEMPT_PAUSE_MS) < 0)
                        return -ECANCELED;

                r = katapult_command(t, KATAPULT_CMD_REQUEST_BLOCK, payload, sizeof(payload),
                                     KATAPULT_BLOCK_TRIES, KATAPULT_BLOCK_TIMEOUT_MS, answer);
                if (r < 0)
                        return r;
                if (answer->len < 8)
                        return log_debug_errno(EBADMSG, "%s: short answer to Katapult REQUEST_BLOCK",
                                               transport_name(t));

                echoed = get_le32(answer->payload + 4);
                if (echoed != address) {
                        log_debug("%s: Katapult returned block 0x%08x instead of 0x%08x, asking again",
                                  transport_name(t), echoed, address);
                        continue;
                }
                if (answer->len != 8 + (size_t) block_size)
                        return log_debug_errno(EBADMSG, "%s: Katapult returned %zu bytes for a block of %u",
                                               transport_name(t), answer->len - 8, block_size);

                memcpy(buf, answer->payload + 8, block_size);
                return 0;
        }

        return log_debug_errno(EIO, "%s: Katapult keeps returning block 0x%08x for 0x%08x", transport_name(t),
                               echoed, address);
}

/* Send @wire and throw away what comes back for up to @timeout_ms: the
 * first whole frame ends it (@what names the step in messages). */
static int katapult_send_and_discard(struct transport *t, const uint8_t *wire, size_t len, int timeout_ms,
                                     const char *what) {
        _cleanup_free_ struct katapult_frame *answer = NULL;
        struct katapult_decoder decoder;
        uint64_t deadline;
        int r;

        answer = malloc(sizeof(*answer));
        if (!answer)
                return -ENOMEM;

        r = transport_flush(t);
        if (r == -ENODEV)
                return r;
        r = transport_write(t, wire, len, timeout_ms);
        if (r < 0)
                return log_debug_errno(r, "%s: failed to send %s: %m", transport_name(t), what);

        katapult_decoder_init(&decoder);
        deadline = now_msec() + (uint64_t) timeout_ms;
        for (;;) {
                uint8_t buf[256];
                uint64_t now = now_msec();
                size_t used;
                ssize_t n;

                if (now >= deadline)
                        break;
                n = transport_read(t, buf, sizeof(buf), (int) (deadline - now));
                if (n == -ETIMEDOUT)
                        break;
                if (n == -EINTR || n == -EAGAIN || n == 0)
                        continue;
                if (n < 0)
                        return log_debug_errno((int) n, "%s: Katapult link lost after %s: %m",
                                               transport_name(t), what);

                if (katapult_decoder_feed(&decoder, buf, (size_t) n, &used, answer) > 0) {
                        log_debug("%s: discarded the answer 0x%02x to %s", transport_name(t), answer->cmd, what);
                        break;
                }
        }

        r = transport_flush(t);
        return r == -ENODEV ? r : 0;
}

int katapult_prime(struct transport *t) {
        uint8_t wire[KATAPULT_FRAME_OVERHEAD];
        int wire_len;

        if (!t)
                return -EINVAL;
        wire_len = katapult_frame_build(wire, sizeof(wire), KATAPULT_CMD_PRIME, NULL, 0);
        if (wire_len < 0)
                return wire_len;
        return katapult_send_and_discard(t, wire, (size_t) wire_len, KATAPULT_PRIME_TIMEOUT_MS, "the prime frame");
}

int katapult_resync(struct transport *t) {
        _cleanup_free_ uint8_t *filler = NULL;

        if (!t)
                return -EINVAL;
        /* Zeros: never a frame start, and enough of them to complete the
         * longest frame Katapult could be waiting for. */
        filler = calloc(1, KATAPULT_FRAME_MAX);
        if (!filler)
                return -ENOMEM;
        log_debug("%s: Katapult does not answer; sending %d filler bytes to end a half-received frame",
                  transport_name(t), KATAPULT_FRAME_MAX);
        return katapult_send_and_discard(t, filler, KATAPULT_FRAME_MAX, KATAPULT_PRIME_TIMEOUT_MS, "the filler");
}
