/* Klipper's MCU message protocol (protocols.md §1): CRC16, VLQ integers,
 * message blocks, and the identify exchange that downloads the compressed
 * data dictionary.  Framing functions are pure and unit-tested; the identify
 * session runs over a struct transport with blocking I/O and timeouts. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/transport.h"

#define KLIPPER_MESSAGE_MIN 5
#define KLIPPER_MESSAGE_MAX 64
#define KLIPPER_MESSAGE_PAYLOAD_MAX (KLIPPER_MESSAGE_MAX - KLIPPER_MESSAGE_MIN)
#define KLIPPER_MESSAGE_DEST 0x10
#define KLIPPER_MESSAGE_SEQ_MASK 0x0f
#define KLIPPER_MESSAGE_SYNC 0x7e

#define KLIPPER_MSGID_IDENTIFY_RESPONSE 0
#define KLIPPER_MSGID_IDENTIFY 1
#define KLIPPER_IDENTIFY_CHUNK 40

/* CRC-16/MCRF4XX as Klipper computes it (init 0xffff). */
uint16_t klipper_crc16(const uint8_t *data, size_t len);

/* Encode @v as a Klipper VLQ into @out (at least 5 bytes).  Returns the
 * number of bytes written (1..5). */
size_t klipper_vlq_encode(int64_t v, uint8_t *out);

/* Decode one VLQ from *p (not beyond @end), advance *p.  Returns 0, or
 * -EBADMSG when the input ends inside the number or it is longer than 5
 * bytes. The value is the sign-extended 32-bit result. */
int klipper_vlq_decode(const uint8_t **p, const uint8_t *end, int32_t *ret);

/* Build one message block from @content (at most 59 bytes) with sequence
 * number @seq (low 4 bits used).  @out must hold 64 bytes.  Returns the
 * block length, or -EMSGSIZE. */
int klipper_block_build(uint8_t *out, uint8_t seq, const uint8_t *content, size_t len);

/* Incremental block decoder: feed it bytes as they arrive; it resynchronises
 * on garbage the way the firmware does (drop up to and including the next
 * 0x7e). */
struct klipper_block {
        uint8_t seq;                                    /* low 4 bits */
        uint8_t len;                                    /* content length */
        uint8_t content[KLIPPER_MESSAGE_PAYLOAD_MAX];
};

struct klipper_decoder {
        uint8_t buf[KLIPPER_MESSAGE_MAX * 2];
        size_t fill;
        unsigned n_bad;                                 /* bytes discarded so far */
        bool need_sync;                                 /* dropping bytes up to the next 0x7e */
};

void klipper_decoder_init(struct klipper_decoder *d);

/* Consume bytes from @data until one complete valid block is found; *consumed
 * is set to the number of bytes of @data taken (they may stay buffered in the
 * decoder).  Returns 1 with the block in *ret, 0 when more input is needed
 * (all of @data consumed).  After a 1, call again with the rest of @data
 * (possibly empty): the decoder may already hold the next block. */
int klipper_decoder_feed(struct klipper_decoder *d, const uint8_t *data, size_t len,
                         size_t *consumed, struct klipper_block *ret);

#define KLIPPER_IDENTIFY_TIMEOUT_MS_DEFAULT 5000
#define KLIPPER_IDENTIFY_MAX_SIZE_DEFAULT (1024 * 1024)

/* NULL params, or a zero field, mean the default. */
struct klipper_identify_params {
        int timeout_ms;         /* whole download, default 5000 */
        size_t max_size;        /* refuse dictionaries larger than this, default 1 MiB */
};

/* Run the identify exchange over @t: sync the sequence number, download the
 * compressed dictionary in 40-byte chunks with retransmit on loss.  Returns
 * 0 with a malloc()ed buffer in *ret and *ret_len; -ETIMEDOUT when the MCU does
 * not answer (or stops answering mid-dictionary); -EBADMSG when it answers
 * with something that is not Klipper's protocol; -ENODEV when it vanished;
 * -E2BIG beyond max_size. */
int klipper_identify(struct transport *t, const struct klipper_identify_params *params,
                     uint8_t **ret, size_t *ret_len);
