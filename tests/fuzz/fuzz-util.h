/* Shared by the libFuzzer targets in this directory (tests/fuzz/README.md):
 * quiet logging, an invariant check that aborts (so libFuzzer keeps the
 * input), a struct transport that plays fuzz input back as what a device
 * answers, and a private scratch directory for parsers that read files.
 * Header-only; nothing here is part of the daemon. */
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shared/log.h"
#include "transport/transport.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* A broken invariant is a finding: say which, then abort so that libFuzzer
 * saves the input as a crash file. */
#define fuzz_check(expr)                                                                        \
        do {                                                                                    \
                if (!(expr)) {                                                                  \
                        fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #expr); \
                        abort();                                                                \
                }                                                                               \
        } while (0)

/* The daemon's messages cost time and hide libFuzzer's; MCUFLASHD_FUZZ_LOG=1
 * shows them (at debug level) when reproducing one input. */
static inline void fuzz_setup_logging(void) {
        log_set_max_level(getenv("MCUFLASHD_FUZZ_LOG") ? LOG_DEBUG : -1);
}

/* A NUL-terminated copy of @data (embedded NULs end the string early, as they
 * would for the parser's callers). */
static inline char *fuzz_strndup(const uint8_t *data, size_t size) {
        char *s = malloc(size + 1);

        if (!s)
                abort();
        memcpy(s, data, size);
        s[size] = '\0';
        return s;
}

/* Touch every byte of a string the parser handed back, so that ASan sees a
 * missing terminator or a freed buffer. */
static inline size_t fuzz_touch_string(const char *s) {
        return s ? strlen(s) : 0;
}

/* ---- a device that answers with the fuzz input ---- */

/* read() hands out the input in chunks of varying size (1, 7, 64, 3, 256,
 * … bytes: frames get split at every kind of boundary), then -ENODEV, as an
 * unplugged device would; write() and flush() succeed and are counted.
 * With a @frame_end (Katapult's "99 03"), a chunk also ends after the next
 * occurrence of it: a device answers one command at a time, so one read
 * never holds the answer to the next command too. */
struct fuzz_transport {
        struct transport transport;
        const uint8_t *data;
        size_t size;
        size_t pos;
        const void *frame_end;
        size_t frame_end_len;
        unsigned n_reads;
        unsigned n_writes;
};

static inline ssize_t fuzz_transport_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        static const size_t chunks[] = { 1, 7, 64, 3, 256, 13, 2, 40 };
        struct fuzz_transport *f = (struct fuzz_transport *) t;
        size_t n;

        (void) timeout_ms;
        if (f->pos >= f->size)
                return -ENODEV;
        n = chunks[f->n_reads++ % (sizeof(chunks) / sizeof(chunks[0]))];
        if (n > len)
                n = len;
        if (n > f->size - f->pos)
                n = f->size - f->pos;
        if (f->frame_end_len > 0) {
                /* The marker may have begun in the previous chunk. */
                size_t from = f->pos >= f->frame_end_len - 1 ? f->pos - (f->frame_end_len - 1) : 0;
                const uint8_t *hit = memmem(f->data + from, f->pos + n - from, f->frame_end, f->frame_end_len);

                if (hit)
                        n = (size_t) (hit - f->data) + f->frame_end_len - f->pos;
        }
        memcpy(buf, f->data + f->pos, n);
        f->pos += n;
        return (ssize_t) n;
}

static inline int fuzz_transport_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        struct fuzz_transport *f = (struct fuzz_transport *) t;

        (void) buf;
        (void) len;
        (void) timeout_ms;
        if (f->pos >= f->size)
                return -ENODEV;
        f->n_writes++;
        return 0;
}

static inline int fuzz_transport_flush(struct transport *t) {
        (void) t;
        return 0;
}

static inline void fuzz_transport_free(struct transport *t) {
        (void) t;
}

static const struct transport_ops fuzz_transport_ops = {
        .name = "fuzz",
        .read = fuzz_transport_read,
        .write = fuzz_transport_write,
        .flush = fuzz_transport_flush,
        .free = fuzz_transport_free,
};

static inline void fuzz_transport_init(struct fuzz_transport *f, const uint8_t *data, size_t size) {
        *f = (struct fuzz_transport) {
                .transport = { .ops = &fuzz_transport_ops, .description = (char *) "fuzz" },
                .data = data,
                .size = size,
        };
}

/* ---- files ---- */

/* A directory of our own under $TMPDIR (or /tmp), made once per process and
 * removed at exit by fuzz_scratch_cleanup() (registered with atexit). */
static char fuzz_scratch[256];

static inline void fuzz_scratch_cleanup(void) {
        static const char *const names[] = { "input", "extra.cfg" };

        if (!fuzz_scratch[0])
                return;
        /* Only these files are ever made there. */
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
                char path[320];

                (void) snprintf(path, sizeof(path), "%s/%s", fuzz_scratch, names[i]);
                (void) unlink(path);
        }
        (void) rmdir(fuzz_scratch);
}

static inline const char *fuzz_scratch_dir(void) {
        if (!fuzz_scratch[0]) {
                const char *tmp = getenv("TMPDIR");

                (void) snprintf(fuzz_scratch, sizeof(fuzz_scratch), "%s/mcuflashd-fuzz-XXXXXX",
                                tmp && *tmp ? tmp : "/tmp");
                if (!mkdtemp(fuzz_scratch))
                        abort();
                atexit(fuzz_scratch_cleanup);
        }
        return fuzz_scratch;
}

/* Replace the file @name ("input" or "extra.cfg") in the scratch directory
 * with @data; its path goes to @path. */
static inline void fuzz_write_file(const char *name, const uint8_t *data, size_t size, char path[320]) {
        int fd;

        (void) snprintf(path, 320, "%s/%s", fuzz_scratch_dir(), name);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0)
                abort();
        while (size > 0) {
                ssize_t n = write(fd, data, size);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        abort();
                }
                data += n;
                size -= (size_t) n;
        }
        close(fd);
}
