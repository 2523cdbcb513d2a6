/* Klipper's MCU message protocol (protocols.md §1) as far as mcuflashd needs
 * it: the CRC and VLQ primitives, building and decoding message blocks, and
 * the identify exchange that downloads the compressed data dictionary.
 *
 * This is a deliberately small client, not a copy of klippy's serialqueue:
 * it has exactly one request in flight, retransmits on a doubling timeout,
 * and knows one response (identify_response, id 0).  Everything else the
 * MCU might say is skipped.  It does not inflate or parse the dictionary
 * (image/dictionary.c does) and never opens a device (transport/ does). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proto/klipper.h"
#include "proto/stream.h"
#include "shared/log.h"
#include "shared/time-util.h"

/* Retransmit timeout of the identify client: first wait, and the cap it
 * doubles up to.  Klipper's own host uses an RTT estimate between 25 ms and
 * 5 s; a fixed start of 100 ms is ample for USB, UART and CAN alike. */
#define IDENTIFY_RTO_INITIAL_MS 100
#define IDENTIFY_RTO_MAX_MS 1000

/* Bytes that may be discarded since the last valid block before we decide
 * the peer does not speak Klipper's protocol at all (wrong baud rate,
 * another firmware, a modem). */
#define IDENTIFY_GARBAGE_LIMIT 1024

uint16_t klipper_crc16(const uint8_t *data, size_t len) {
        uint16_t crc = 0xffff;

        for (size_t i = 0; i < len; i++) {
                uint8_t d = data[i] ^ (uint8_t) (crc & 0xff);

                d ^= (uint8_t) (d << 4);
                crc = (uint16_t) ((((uint16_t) d << 8) | (crc >> 8)) ^ (d >> 4) ^ ((uint16_t) d << 3));
        }
        return crc;
}

size_t klipper_vlq_encode(int64_t v, uint8_t *out) {
        /* Shift as unsigned: only the low 7 bits of each group are kept, and
         * for shifts up to 28 those never reach the bits where an arithmetic
         * and a logical shift of a negative number differ. */
        uint64_t u = (uint64_t) v;
        uint8_t *p = out;

        if (v >= 0xc000000 || v < -0x4000000)
                *p++ = (uint8_t) (((u >> 28) & 0x7f) | 0x80);
        if (v >= 0x180000 || v < -0x80000)
                *p++ = (uint8_t) (((u >> 21) & 0x7f) | 0x80);
        if (v >= 0x3000 || v < -0x1000)
                *p++ = (uint8_t) (((u >> 14) & 0x7f) | 0x80);
        if (v >= 0x60 || v < -0x20)
                *p++ = (uint8_t) (((u >> 7) & 0x7f) | 0x80);
        *p++ = (uint8_t) (u & 0x7f);

        return (size_t) (p - out);
}

int klipper_vlq_decode(const uint8_t **p, const uint8_t *end, int32_t *ret) {
        const uint8_t *q = *p;
        uint32_t v;
        uint8_t c;

        if (q >= end)
                return -EBADMSG;

        c = *q++;
        v = c & 0x7f;
        if ((c & 0x60) == 0x60)
                v |= UINT32_C(0xffffffe0);      /* -0x20: sign-extend */

        for (unsigned n = 1; c & 0x80; n++) {
                if (n >= 5 || q >= end)
                        return -EBADMSG;
                c = *q++;
                v = (v << 7) | (c & 0x7f);
        }

        *ret = (int32_t) v;
        *p = q;
        return 0;
}

int klipper_block_build(uint8_t *out, uint8_t seq, const uint8_t *content, size_t len) {
        size_t total = len + KLIPPER_MESSAGE_MIN;
        uint16_t crc;

        if (len > KLIPPER_MESSAGE_PAYLOAD_MAX)
                return -EMSGSIZE;

        out[0] = (uint8_t) total;
        out[1] = KLIPPER_MESSAGE_DEST | (seq & KLIPPER_MESSAGE_SEQ_MASK);
        if (len > 0)
                memcpy(out + 2, content, len);
        crc = klipper_crc16(out, len + 2);
        out[len + 2] = (uint8_t) (crc >> 8);
        out[len + 3] = (uint8_t) (crc & 0xff);
        out[len + 4] = KLIPPER_MESSAGE_SYNC;

        return (int) total;
}

void klipper_decoder_init(struct klipper_decoder *d) {
        *d = (struct klipper_decoder) {};
}

static void decoder_pop(struct klipper_decoder *d, size_t n, bool bad) {
        memmove(d->buf, d->buf + n, d->fill - n);
        d->fill -= n;
        if (bad)
                d->n_bad += (unsigned) n;
}

/* Drop bytes until (and including) the next sync byte, like the firmware's
 * command_find_block() after an error.  Without one in the buffer,
 * everything goes and need_sync stays set for the next input. */
static void decoder_resync(struct klipper_decoder *d) {
        const uint8_t *sync = memchr(d->buf, KLIPPER_MESSAGE_SYNC, d->fill);

        if (sync) {
                decoder_pop(d, (size_t) (sync - d->buf) + 1, true);
                d->need_sync = false;
        } else {
                decoder_pop(d, d->fill, true);
                d->need_sync = true;
        }
}

/* Look at the start of the buffer: 1 = a valid block (returned and popped),
 * 0 = need more bytes, -1 = bytes were discarded, look again. */
static int decoder_parse(struct klipper_decoder *d, struct klipper_block *ret) {
        uint8_t len, seq;
        uint16_t crc;

        if (d->fill == 0)
                return 0;

        if (d->need_sync) {
                decoder_resync(d);
                return -1;
        }

        if (d->fill < KLIPPER_MESSAGE_MIN)
                return 0;

        len = d->buf[0];
        seq = d->buf[1];
        if (len < KLIPPER_MESSAGE_MIN || len > KLIPPER_MESSAGE_MAX)
                goto error;
        if ((seq & ~KLIPPER_MESSAGE_SEQ_MASK) != KLIPPER_MESSAGE_DEST)
                goto error;
        if (d->fill < len)
                return 0;
        if (d->buf[len - 1] != KLIPPER_MESSAGE_SYNC)
                goto error;
        crc = (uint16_t) ((d->buf[len - 3] << 8) | d->buf[len - 2]);
        if (crc != klipper_crc16(d->buf, len - 3))
                goto error;

        ret->seq = seq & KLIPPER_MESSAGE_SEQ_MASK;
        ret->len = (uint8_t) (len - KLIPPER_MESSAGE_MIN);
        memcpy(ret->content, d->buf + 2, ret->len);
        decoder_pop(d, len, false);
        return 1;

error:
        /* Leading sync bytes are dropped one by one without entering the
         * resync state, as the firmware does. */
        if (d->buf[0] == KLIPPER_MESSAGE_SYNC) {
                decoder_pop(d, 1, true);
                return -1;
        }
        decoder_resync(d);
        return -1;
}

static int decoder_parse_any(void *decoder, void *ret) {
        return decoder_parse(decoder, ret);
}

int klipper_decoder_feed(struct klipper_decoder *d, const uint8_t *data, size_t len,
                         size_t *consumed, struct klipper_block *ret) {
        return stream_feed(d, d->buf, sizeof(d->buf), &d->fill, decoder_parse_any, data, len, consumed,
                           ret);
}

/* Milliseconds until @until, rounded up so that a wait never ends early. */
static int msec_until(uint64_t until, uint64_t now) {
        if (until <= now)
                return 0;
        return (int) MIN((until - now + 999) / 1000, (uint64_t) 60 * 60 * 1000);
}

struct identify_session {
        struct transport *transport;
        struct klipper_decoder decoder;
        unsigned n_bad_at_last_block;   /* decoder.n_bad when the last valid block arrived */
        bool any_block;                 /* at least one valid block arrived */

        uint8_t send_seq;               /* seq of the request in flight */
        bool synced;                    /* the MCU answered one of our requests */
        bool acked;                     /* the MCU acked the request in flight */
        int peer_expects;               /* seq named by a nak since our last send, or -1 */

        uint8_t *data;                  /* the dictionary so far */
        size_t size;
        size_t allocated;
        size_t max_size;
        bool complete;

        uint64_t deadline;
        uint64_t retransmit_at;
        unsigned rto_ms;
};

static const char *session_name(const struct identify_session *s) {
        return strempty(s->transport->description);
}

/* Send `identify offset=<size> count=40` with the current seq.  A leading
 * sync byte makes an MCU that saw garbage (or the tail of a stray block)
 * resynchronise before our block. */
static int session_send(struct identify_session *s, bool with_sync) {
        uint8_t content[16], wire[1 + KLIPPER_MESSAGE_MAX];
        size_t n = 0, off = 0;
        uint64_t now;
        int r;

        n += klipper_vlq_encode(KLIPPER_MSGID_IDENTIFY, content + n);
        n += klipper_vlq_encode((int64_t) s->size, content + n);
        n += klipper_vlq_encode(KLIPPER_IDENTIFY_CHUNK, content + n);

        if (with_sync)
                wire[off++] = KLIPPER_MESSAGE_SYNC;
        r = klipper_block_build(wire + off, s->send_seq, content, n);
        if (r < 0)
                return r;
        off += (size_t) r;

        now = now_usec();
        r = transport_write(s->transport, wire, off, MAX(1, MIN(msec_until(s->deadline, now), 1000)));
        if (r < 0)
                return log_debug_errno(r, "%s: failed to send identify: %m", session_name(s));

        s->retransmit_at = now_usec() + (uint64_t) s->rto_ms * 1000;
        s->peer_expects = -1;
        return 0;
}

static int session_append(struct identify_session *s, const uint8_t *data, size_t len) {
        if (len > s->max_size - s->size)
                return log_debug_errno(E2BIG, "%s: data dictionary exceeds %zu bytes, refusing it.",
                                       session_name(s), s->max_size);

        if (s->size + len > s->allocated) {
                size_t n = MAX(s->allocated * 2, (size_t) 4096);
                uint8_t *p;

                n = MIN(MAX(n, s->size + len), s->max_size);
                p = realloc(s->data, n);
                if (!p)
                        return -ENOMEM;
                s->data = p;
                s->allocated = n;
        }

        memcpy(s->data + s->size, data, len);
        s->size += len;
        return 0;
}

static int session_handle_response(struct identify_session *s, uint8_t block_seq, uint32_t offset,
                                   const uint8_t *data, size_t len) {
        int r;

        if (offset != s->size) {
                /* A reply to a duplicate of an earlier request. */
                log_debug("%s: ignoring identify_response for offset %u (have %zu bytes)",
                          session_name(s), offset, s->size);
                return 0;
        }

        s->synced = true;
        if (len == 0) {
                s->complete = true;
                return 0;
        }

        r = session_append(s, data, len);
        if (r < 0)
                return r;

        /* A response carries the MCU's next expected seq: the most reliable
         * source for the next request's. */
        s->send_seq = block_seq;
        s->acked = false;
        s->rto_ms = IDENTIFY_RTO_INITIAL_MS;
        return session_send(s, false);
}

/* An empty block: an ack or a nak, both carrying the MCU's next expected
 * seq.  Which of the two it is cannot always be told apart, so the RTO
 * handling in klipper_identify() covers the ambiguous cases. */
static int session_handle_ack(struct identify_session *s, uint8_t seq) {
        uint8_t next = (s->send_seq + 1) & KLIPPER_MESSAGE_SEQ_MASK;

        if (seq == next) {
                s->acked = true;
                return 0;
        }
        if (seq == s->send_seq)
                /* A nak of the request in flight (or the ack of the one
                 * before it): the retransmit timer takes care of it. */
                return 0;

        if (!s->synced) {
                /* The MCU expects another seq than the one we guessed (it was
                 * not freshly reset): adopt it and send again right away. */
                log_debug("%s: MCU expects sequence number %u, resending identify with it",
                          session_name(s), seq);
                s->send_seq = seq;
                s->acked = false;
                return session_send(s, true);
        }

        /* Synced, yet the MCU names a seq we did not use: it may have been
         * reset under us.  Adopt it if no answer comes before the RTO. */
        s->peer_expects = seq;
        return 0;
}

static int session_handle_block(struct identify_session *s, const struct klipper_block *b) {
        const uint8_t *p = b->content, *end = b->content + b->len;

        if (b->len == 0)
                return session_handle_ack(s, b->seq);

        while (p < end && !s->complete) {
                int32_t msgid, offset;
                uint8_t len;
                int r;

                if (klipper_vlq_decode(&p, end, &msgid) < 0)
                        goto malformed;
                if (msgid != KLIPPER_MSGID_IDENTIFY_RESPONSE)
                        /* Unknown message: its parameter layout is in the
                         * dictionary we do not have yet, so the rest of the
                         * block cannot be parsed. */
                        return 0;

                if (klipper_vlq_decode(&p, end, &offset) < 0)
                        goto malformed;
                if (p >= end)
                        goto malformed;
                len = *p++;
                if (len > end - p)
                        goto malformed;

                r = session_handle_response(s, b->seq, (uint32_t) offset, p, len);
                if (r < 0)
                        return r;
                p += len;
        }
        return 0;

malformed:
        log_debug("%s: ignoring malformed identify_response", session_name(s));
        return 0;
}

static int session_retransmit(struct identify_session *s) {
        if (s->acked) {
                /* The MCU took the request but its answer got lost; the same
                 * seq again would be a duplicate it drops, so send the
                 * request as a new block. */
                s->send_seq = (s->send_seq + 1) & KLIPPER_MESSAGE_SEQ_MASK;
                s->acked = false;
        } else if (s->peer_expects >= 0) {
                log_debug("%s: MCU now expects sequence number %d, resynchronising",
                          session_name(s), s->peer_expects);
                s->send_seq = (uint8_t) s->peer_expects;
        }

        s->rto_ms = MIN(s->rto_ms * 2, (unsigned) IDENTIFY_RTO_MAX_MS);
        log_debug("%s: no answer to identify offset=%zu, retransmitting (seq %u)",
                  session_name(s), s->size, s->send_seq);
        return session_send(s, true);
}

static int session_consume(struct identify_session *s, const uint8_t *buf, size_t len) {
        size_t pos = 0;

        while (!s->complete) {
                struct klipper_block block;
                size_t used;
                int r;

                r = klipper_decoder_feed(&s->decoder, buf + pos, len - pos, &used, &block);
                pos += used;
                if (r == 0)
                        break;

                s->n_bad_at_last_block = s->decoder.n_bad;
                s->any_block = true;
                r = session_handle_block(s, &block);
                if (r < 0)
                        return r;
        }

        if (s->decoder.n_bad - s->n_bad_at_last_block > IDENTIFY_GARBAGE_LIMIT)
                return log_debug_errno(EBADMSG, "%s: peer sends data that is not Klipper's protocol",
                                       session_name(s));
        return 0;
}

int klipper_identify(struct transport *t, const struct klipper_identify_params *params,
                     uint8_t **ret, size_t *ret_len) {
        int timeout_ms = params && params->timeout_ms > 0 ? params->timeout_ms : KLIPPER_IDENTIFY_TIMEOUT_MS_DEFAULT;
        struct identify_session s = {
                .transport = t,
                .send_seq = 0,
                .peer_expects = -1,
                .max_size = params && params->max_size > 0 ? params->max_size : KLIPPER_IDENTIFY_MAX_SIZE_DEFAULT,
                .rto_ms = IDENTIFY_RTO_INITIAL_MS,
                .deadline = now_usec() + (uint64_t) timeout_ms * 1000,
        };
        int r;

        klipper_decoder_init(&s.decoder);

        r = session_send(&s, true);
        if (r < 0)
                goto fail;

        while (!s.complete) {
                uint8_t buf[256];
                uint64_t now = now_usec();
                ssize_t n;

                if (now >= s.deadline && !s.any_block && s.decoder.n_bad > 0) {
                        /* It talks, but never a single valid block: not a
                         * slow Klipper, something else on this port. */
                        r = log_debug_errno(EBADMSG, "%s: only data that is not Klipper's protocol within %d ms",
                                            session_name(&s), timeout_ms);
                        goto fail;
                }
                if (now >= s.deadline) {
                        r = log_debug_errno(ETIMEDOUT, "%s: no complete answer to identify within %d ms",
                                            session_name(&s), timeout_ms);
                        goto fail;
                }
                if (now >= s.retransmit_at) {
                        r = session_retransmit(&s);
                        if (r < 0)
                                goto fail;
                        continue;
                }

                n = transport_read(t, buf, sizeof(buf), msec_until(MIN(s.retransmit_at, s.deadline), now));
                if (n == -ETIMEDOUT || n == -EINTR || n == -EAGAIN || n == 0)
                        continue;
                if (n < 0) {
                        r = log_debug_errno((int) n, "%s: read failed: %m", session_name(&s));
                        goto fail;
                }

                r = session_consume(&s, buf, (size_t) n);
                if (r < 0)
                        goto fail;
        }

        if (s.size == 0) {
                r = log_debug_errno(EBADMSG, "%s: MCU returned an empty data dictionary", session_name(&s));
                goto fail;
        }

        log_debug("%s: downloaded %zu byte data dictionary", session_name(&s), s.size);
        *ret = s.data;
        *ret_len = s.size;
        return 0;

fail:
        free(s.data);
        return r;
}
