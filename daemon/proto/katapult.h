/* Katapult's bootloader protocol (protocols.md §5): frames
 * `01 88 cmd nwords payload crc 99 03`, an incremental decoder, and the
 * blocking command exchanges the daemon runs over a struct transport (USB
 * CDC, UART or a CAN node stream) with flashtool.py's retry rules.
 * Framing is pure; the exchanges block with per-try timeouts and are meant
 * for a worker thread.  Getting the MCU into Katapult (bootloader requests)
 * and assigning CAN node ids are not done here (transport/serial.h,
 * proto/canbus.h). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/transport.h"

#define KATAPULT_CMD_CONNECT 0x11
#define KATAPULT_CMD_SEND_BLOCK 0x12
#define KATAPULT_CMD_SEND_EOF 0x13
#define KATAPULT_CMD_REQUEST_BLOCK 0x14
#define KATAPULT_CMD_COMPLETE 0x15
#define KATAPULT_CMD_GET_CANBUS_ID 0x16
/* Not a Katapult command: flashtool sends it to "prime" the USB link of
 * some STM32 parts and throws the answer (a COMMAND_ERROR) away. */
#define KATAPULT_CMD_PRIME 0x90

#define KATAPULT_RESP_ACK 0xa0
#define KATAPULT_RESP_NACK 0xf1
#define KATAPULT_RESP_COMMAND_ERROR 0xf2
#define KATAPULT_RESP_BUSY 0xf3

/* Header (2) + cmd + nwords + crc (2) + trailer (2). */
#define KATAPULT_FRAME_OVERHEAD 8
/* nwords is one byte. */
#define KATAPULT_PAYLOAD_MAX (255 * 4)
#define KATAPULT_FRAME_MAX (KATAPULT_PAYLOAD_MAX + KATAPULT_FRAME_OVERHEAD)

#define KATAPULT_BLOCK_SIZE_MAX 512
#define KATAPULT_UUID_LEN 6

/* Protocol versions as CONNECT reports them: bytes 2..0 = major.minor.patch. */
#define KATAPULT_PROTO_VERSION(major, minor, patch) \
        ((uint32_t) (major) << 16 | (uint32_t) (minor) << 8 | (uint32_t) (patch))
#define KATAPULT_PROTO_VERSION_STRING_MAX 12     /* "255.255.255" */

/* flashtool.py's defaults: 5 tries of 2 s for commands; blocks get 3 tries
 * of 5 s, and a block whose echoed address differs is sent up to 3 times. */
#define KATAPULT_TRIES 5
#define KATAPULT_TIMEOUT_MS_DEFAULT 2000
#define KATAPULT_BLOCK_TRIES 3
#define KATAPULT_BLOCK_TIMEOUT_MS 5000
#define KATAPULT_BLOCK_ATTEMPTS 3
/* How long katapult_prime() waits for the answer it discards. */
#define KATAPULT_PRIME_TIMEOUT_MS 500

/* Does Katapult (and flashtool) accept this block size? 64, 128, 256, 512. */
bool katapult_block_size_valid(uint32_t block_size);

/* "1.1.0" for KATAPULT_PROTO_VERSION(1, 1, 0). */
void katapult_proto_version_to_string(uint32_t version, char out[KATAPULT_PROTO_VERSION_STRING_MAX]);

/* Build one frame of command @cmd into @out (@size bytes).  @payload (@len
 * bytes, NULL when 0) is padded with zero bytes to whole 32-bit words.
 * Returns the frame length (nwords·4 + 8), or -EMSGSIZE when the payload
 * exceeds KATAPULT_PAYLOAD_MAX or the frame does not fit in @size. */
int katapult_frame_build(uint8_t *out, size_t size, uint8_t cmd, const void *payload, size_t len);

/* One decoded frame. */
struct katapult_frame {
        uint8_t cmd;                                    /* command or response code */
        size_t len;                                     /* payload bytes: nwords·4 */
        uint8_t payload[KATAPULT_PAYLOAD_MAX];
};

/* Incremental frame decoder: feed it bytes as they arrive.  It
 * resynchronises on the `01 88` header: a byte sequence that does not start
 * a valid frame (wrong header, trailer or CRC) loses its first byte and the
 * search goes on from the next 0x01, so a valid frame hidden behind garbage
 * or a truncated frame is still found. */
struct katapult_decoder {
        uint8_t buf[KATAPULT_FRAME_MAX];
        size_t fill;
        unsigned n_bad;                                 /* bytes discarded so far */
};

void katapult_decoder_init(struct katapult_decoder *d);

/* Consume bytes from @data until one complete valid frame is found;
 * *consumed is set to the number of bytes of @data taken (they may stay
 * buffered).  Returns 1 with the frame in *ret, 0 when more input is needed
 * (all of @data consumed).  After a 1, call again with the rest of @data
 * (possibly empty): the decoder may already hold the next frame. */
int katapult_decoder_feed(struct katapult_decoder *d, const uint8_t *data, size_t len,
                          size_t *consumed, struct katapult_frame *ret);

/* Send command @cmd with @payload and wait for its ACK, flashtool's way:
 * up to @tries tries, each waiting @timeout_ms for an answer.  Between
 * tries the link is drained (input arriving meanwhile is discarded).
 * A NACK (the MCU got a corrupted frame) or a timeout costs a try; a BUSY
 * costs a try and a longer pause; COMMAND_ERROR ends the exchange at once;
 * an ACK of another command (a late answer) and frames that are no answer
 * (our own frame echoed back) are skipped.  The pauses follow
 * flashtool at its 2 s timeout (0.5 s pause, 0.25 s drain, 1.5 s after
 * BUSY) and shrink with shorter timeouts (¼, ⅛ and ¾ of @timeout_ms).
 *
 * Returns 0 with the ACK in *ret (its payload starts with the echoed
 * command word; @ret may be NULL), or: -EIO on COMMAND_ERROR; -ENODEV when
 * the device went away; when all tries failed, the reason of the last:
 * -ETIMEDOUT (no answer), -EBADMSG (only bytes that are no Katapult frame,
 * or a NACK), -EBUSY (BUSY), -EPROTO (only answers that were skipped);
 * -EINVAL for bad arguments (no tries, @timeout_ms ≤ 0), -EMSGSIZE for a
 * payload over KATAPULT_PAYLOAD_MAX; other transport errors as they are. */
int katapult_command(struct transport *t, uint8_t cmd, const void *payload, size_t len,
                     unsigned tries, int timeout_ms, struct katapult_frame *ret);

/* What CONNECT tells (protocols.md §5.3).  Strings are printable ASCII
 * (other bytes replaced by '?'), truncated to fit, "" when absent. */
struct katapult_info {
        uint32_t proto_version;                         /* KATAPULT_PROTO_VERSION() */
        uint32_t app_start;                             /* where the application goes */
        uint32_t block_size;                            /* 64, 128, 256 or 512 */
        char mcu[64];                                   /* e.g. "stm32f446xx" */
        char version[128];                              /* Katapult's git describe; proto ≥ 1.1.0 */
};

/* Parse the payload of a CONNECT ACK after the echoed command word.
 * 0, -EBADMSG when too short, -EPROTO for a block size Katapult does not
 * use. */
int katapult_parse_connect(const uint8_t *data, size_t len, struct katapult_info *ret);

/* CONNECT with KATAPULT_TRIES tries of @timeout_ms (≤ 0: the default). */
int katapult_connect(struct transport *t, int timeout_ms, struct katapult_info *ret);

/* COMPLETE: Katapult acks and starts the application ~100 ms later.  An ACK
 * and the link going away (-ENODEV: a USB device resetting) both mean
 * success.  @timeout_ms ≤ 0: the default. */
int katapult_complete(struct transport *t, int timeout_ms);

/* GET_CANBUS_ID (Katapult on CAN only): the node's uuid in wire order, as
 * canbus.h keeps uuids.  -EBADMSG for a short answer. */
int katapult_get_canbus_id(struct transport *t, uint8_t uuid[KATAPULT_UUID_LEN]);

/* SEND_BLOCK: write @block_size bytes of @data at flash address @address.
 * The ACK echoes the address; a different one makes it send the block
 * again (KATAPULT_BLOCK_ATTEMPTS in all), then -EIO.  -EINVAL for a block
 * size katapult_block_size_valid() refuses. */
int katapult_send_block(struct transport *t, uint32_t address, const void *data, uint32_t block_size);

/* SEND_EOF: the transfer is over; Katapult writes the last page and
 * reports how many pages it wrote (@ret_pages may be NULL). */
int katapult_send_eof(struct transport *t, uint32_t *ret_pages);

/* REQUEST_BLOCK: read @block_size bytes of flash at @address into @buf.
 * An answer for another address is retried like katapult_send_block();
 * -EBADMSG for an answer of the wrong size. */
int katapult_request_block(struct transport *t, uint32_t address, void *buf, uint32_t block_size);

/* Send the "prime" frame (cmd 0x90) and discard one answer, waiting at most
 * KATAPULT_PRIME_TIMEOUT_MS for it (none arriving is fine).  0, -ENODEV or
 * another transport error. */
int katapult_prime(struct transport *t);

/* After a session broke off in the middle of a frame (the link dropped
 * bytes, the host gave up), Katapult may still be collecting that frame and
 * swallow the next commands.  Send KATAPULT_FRAME_MAX zero bytes — enough
 * to complete any frame, which then fails its CRC, after which Katapult
 * looks for the next frame start — and discard the NACK.  0, -ENODEV or
 * another transport error. */
int katapult_resync(struct transport *t);
