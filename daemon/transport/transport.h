/* The transport interface: a byte stream to one MCU over one medium (a tty,
 * a USB endpoint pair, a CAN node).  Protocol code in proto/ only ever talks
 * to a struct transport and never opens a device itself.  All calls block
 * with a timeout; they are meant to run in a worker thread.
 *
 * Return conventions (negative errno):
 *   read:  > 0 bytes read; -ETIMEDOUT when nothing arrived in time;
 *          -ENODEV when the device went away (hangup, unplug); other -errno.
 *   write: 0 when all bytes were written; -ETIMEDOUT, -ENODEV, -errno.
 */
#pragma once

#include <stddef.h>
#include <sys/types.h>

#include "shared/macro.h"

struct transport;

struct transport_ops {
        const char *name;        /* "serial", "usb", "can" */
        ssize_t (*read)(struct transport *t, void *buf, size_t len, int timeout_ms);
        int (*write)(struct transport *t, const void *buf, size_t len, int timeout_ms);
        /* Discard pending input (and unsent output where the medium allows). */
        int (*flush)(struct transport *t);
        void (*free)(struct transport *t);
};

struct transport {
        const struct transport_ops *ops;
        char *description;      /* for log messages, e.g. the device path */
};

static inline ssize_t transport_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        return t->ops->read(t, buf, len, timeout_ms);
}

static inline int transport_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        return t->ops->write(t, buf, len, timeout_ms);
}

static inline int transport_flush(struct transport *t) {
        return t->ops->flush ? t->ops->flush(t) : 0;
}

static inline struct transport *transport_free(struct transport *t) {
        if (t)
                t->ops->free(t);
        return NULL;
}
DEFINE_TRIVIAL_CLEANUP_FUNC(struct transport *, transport_free);
