/* The byte-stream half shared by the Klipper and Katapult decoders: moving
 * received bytes into a decoder's buffer until its parser finds a whole
 * frame.  What a frame looks like, and how a parser resynchronises after
 * garbage, stays in each protocol's own file.  Header-only, so that every
 * program built from klipper.c or katapult.c alone gets it too. */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "shared/macro.h"

/* Looks at the bytes buffered in @decoder: 1 and a frame in @ret (its bytes
 * popped), 0 if more bytes are needed, negative after dropping bytes that
 * cannot start a frame. */
typedef int (*stream_parse_fn)(void *decoder, void *ret);

/* Feeds @data into @buf (@size bytes, @*fill used) and parses until a frame
 * is found (1) or all of @data is buffered without one (0); @consumed says
 * how much of @data was taken either way.  The parser must never need more
 * than @size bytes to decide. */
static inline int stream_feed(void *decoder, uint8_t *buf, size_t size, size_t *fill,
                              stream_parse_fn parse, const uint8_t *data, size_t len, size_t *consumed,
                              void *ret) {
        size_t taken = 0;

        for (;;) {
                size_t n;
                int r;

                r = parse(decoder, ret);
                if (r > 0) {
                        *consumed = taken;
                        return 1;
                }
                if (r < 0)
                        continue;

                if (taken == len) {
                        *consumed = taken;
                        return 0;
                }

                /* Needing more means less than one maximal frame is
                 * buffered, so there is always room here. */
                n = MIN(size - *fill, len - taken);
                memcpy(buf + *fill, data + taken, n);
                *fill += n;
                taken += n;
        }
}
