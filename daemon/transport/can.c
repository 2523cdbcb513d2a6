/* SocketCAN transport: raw CAN_RAW sockets bound to one interface, sending
 * and receiving single standard (11-bit) frames with timeouts, and the
 * struct transport that carries Klipper's byte stream to one node over its
 * pair of data ids (protocols.md §2).
 *
 * Only plain socket calls are used (socket, if_nametoindex, ioctl
 * SIOCGIFFLAGS, setsockopt, bind, read, send, poll), so the LD_PRELOAD
 * shim of the tests (tests/shim/canshim.c) covers all of it.  Bitrates,
 * controller state and interface discovery are not handled here; neither
 * are CAN FD, extended ids or the admin messages (proto/canbus.c). */
#include <errno.h>
#include <linux/can.h>
#include <linux/can/raw.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proto/canbus.h"
#include "shared/interrupt.h"
#include "shared/log.h"
#include "transport/can.h"
#include "transport/fdwait.h"

/* How long a send waits before retrying when the interface's TX queue is
 * full (ENOBUFS): poll() cannot tell when room comes back, the socket
 * itself stays writable. */
#define CAN_TXQUEUE_RETRY_MS 2

/* At most this many queued frames are discarded by one flush. */
#define CAN_FLUSH_MAX_FRAMES 4096

/* Sleep up to @ms, but not beyond @deadline.  -ETIMEDOUT once it has
 * passed, -ECANCELED when the job is cancelled meanwhile. */
static int sleep_until_retry(unsigned ms, uint64_t deadline) {
        int left = deadline_poll_timeout(deadline);

        if (left == 0)
                return -ETIMEDOUT;
        return interruptible_sleep_msec(left < 0 ? ms : MIN((unsigned) left, ms));
}

static bool ifname_is_valid(const char *ifname) {
        return !isempty(ifname) && strlen(ifname) < IFNAMSIZ;
}

int can_socket_open(const char *ifname, const uint32_t *ids, size_t n_ids) {
        _cleanup_close_ int fd = -1;
        struct sockaddr_can addr = { .can_family = AF_CAN };
        can_err_mask_t err_mask = 0;
        struct ifreq ifr = {};
        unsigned ifindex;

        if (!ifname_is_valid(ifname))
                return -EINVAL;
        if (n_ids > 0 && !ids)
                return -EINVAL;
        for (size_t i = 0; i < n_ids; i++)
                if (ids[i] > CAN_SFF_MASK)
                        return -EINVAL;

        ifindex = if_nametoindex(ifname);
        if (ifindex == 0) {
                if (errno == ENODEV || errno == ENXIO || errno == 0)
                        return log_debug_errno(ENODEV, "%s: no such network interface", ifname);
                return log_debug_errno(errno, "%s: failed to look up interface: %m", ifname);
        }

        fd = socket(PF_CAN, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, CAN_RAW);
        if (fd < 0)
                return log_debug_errno(errno, "%s: failed to create CAN socket: %m", ifname);

        /* The kernel lets a raw socket bind to a down interface and only
         * fails its sends; tell the caller at once instead. */
        strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
        if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
                log_debug_errno(errno, "%s: cannot read interface flags, assuming it is up: %m", ifname);
        else if (!(ifr.ifr_flags & IFF_UP))
                return log_debug_errno(ENETDOWN, "%s: interface is down", ifname);

        if (n_ids > 0) {
                _cleanup_free_ struct can_filter *filters = NULL;

                filters = calloc(n_ids, sizeof(*filters));
                if (!filters)
                        return -ENOMEM;
                /* Matching the EFF and RTR bits too lets only standard
                 * data frames through. */
                for (size_t i = 0; i < n_ids; i++) {
                        filters[i].can_id = ids[i];
                        filters[i].can_mask = CAN_SFF_MASK | CAN_EFF_FLAG | CAN_RTR_FLAG;
                }
                if (setsockopt(fd, SOL_CAN_RAW, CAN_RAW_FILTER, filters,
                               (socklen_t) (n_ids * sizeof(*filters))) < 0)
                        return log_debug_errno(errno, "%s: failed to set CAN filters: %m", ifname);
        }

        if (setsockopt(fd, SOL_CAN_RAW, CAN_RAW_ERR_FILTER, &err_mask, sizeof(err_mask)) < 0)
                return log_debug_errno(errno, "%s: failed to clear the CAN error filter: %m", ifname);

        addr.can_ifindex = (int) ifindex;
        if (bind(fd, (const struct sockaddr *) &addr, sizeof(addr)) < 0)
                return log_debug_errno(errno, "%s: failed to bind CAN socket: %m", ifname);

        return TAKE_FD(fd);
}

int can_socket_send(int fd, const struct can_frame_data *f, int timeout_ms) {
        uint64_t deadline = deadline_after_ms(timeout_ms);
        struct can_frame frame = {};

        if (fd < 0 || !f)
                return -EINVAL;
        if (f->id > CAN_SFF_MASK || f->len > CAN_MAX_DLEN)
                return -EINVAL;

        frame.can_id = f->id;
        frame.can_dlc = f->len;
        memcpy(frame.data, f->data, f->len);

        for (;;) {
                ssize_t n;
                int r;

                /* send() rather than write() only for MSG_NOSIGNAL: a
                 * socket standing in for CAN (tests) must not raise SIGPIPE. */
                n = send(fd, &frame, sizeof(frame), MSG_NOSIGNAL);
                if (n == (ssize_t) sizeof(frame))
                        return 0;
                if (n >= 0)
                        return -EIO;    /* a raw CAN socket never takes part of a frame */

                switch (errno) {
                case EINTR:
                        continue;
                case EAGAIN:
                        r = fd_wait_ready(fd, POLLOUT, deadline);
                        if (r < 0)
                                return r;
                        /* POLLERR: the pending socket error comes out of
                         * the next write. */
                        break;
                case ENOBUFS:
                        r = sleep_until_retry(CAN_TXQUEUE_RETRY_MS, deadline);
                        if (r < 0)
                                return r;
                        break;
                default:
                        return -errno;
                }
        }
}

static bool frame_is_plain_standard(const struct can_frame *frame) {
        return !(frame->can_id & (CAN_ERR_FLAG | CAN_EFF_FLAG | CAN_RTR_FLAG));
}

int can_socket_recv(int fd, struct can_frame_data *f, int timeout_ms) {
        uint64_t deadline = deadline_after_ms(timeout_ms);

        if (fd < 0 || !f)
                return -EINVAL;

        for (;;) {
                struct can_frame frame;
                ssize_t n;
                int revents;

                revents = fd_wait_ready(fd, POLLIN, deadline);
                if (revents < 0)
                        return revents;

                /* Read on POLLERR too: that is how the socket error
                 * (ENETDOWN, ENODEV) gets reported. */
                n = read(fd, &frame, sizeof(frame));
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                return -errno;
                        if (revents & POLLHUP)
                                return -ENODEV;
                        continue;
                }
                if (n == 0)
                        return -ENODEV;         /* only a hung-up socket reads 0 bytes */
                if (n != (ssize_t) sizeof(frame))
                        continue;               /* not a classic CAN frame */
                if (!frame_is_plain_standard(&frame))
                        continue;

                *f = (struct can_frame_data) {
                        .id = frame.can_id & CAN_SFF_MASK,
                        .len = MIN(frame.can_dlc, CAN_MAX_DLEN),
                };
                memcpy(f->data, frame.data, f->len);
                return 0;
        }
}

/* ---- the byte stream to one node ---- */

struct can_stream_transport {
        struct transport transport;     /* first member: the ops cast back to us */
        int fd;
        uint32_t tx_id;                 /* host → node */
        uint32_t rx_id;                 /* node → host */

        /* Bytes of a received frame that did not fit the caller's buffer. */
        uint8_t pending[CAN_MAX_DLEN];
        size_t pending_off;
        size_t pending_len;

        /* An error that came up while reading ahead, after some bytes had
         * already been received; reported by the next read. */
        int pending_error;
};

static struct can_stream_transport *can_stream_from_transport(struct transport *t) {
        return (struct can_stream_transport *) t;
}

/* Socket errors that mean the interface went down or away. */
static int map_interface_gone(int r) {
        if (r == -ENETDOWN || r == -ENODEV || r == -ENXIO)
                return -ENODEV;
        return r;
}

static size_t take_pending(struct can_stream_transport *s, uint8_t *buf, size_t len) {
        size_t n = MIN(len, s->pending_len - s->pending_off);

        memcpy(buf, s->pending + s->pending_off, n);
        s->pending_off += n;
        if (s->pending_off == s->pending_len)
                s->pending_off = s->pending_len = 0;
        return n;
}

/* Receive the next data frame of our node (with data) within @timeout_ms. */
static int can_stream_recv_frame(struct can_stream_transport *s, struct can_frame_data *f, int timeout_ms) {
        uint64_t deadline = deadline_after_ms(timeout_ms);

        for (;;) {
                int r;

                r = can_socket_recv(s->fd, f, deadline_poll_timeout(deadline));
                if (r < 0)
                        return map_interface_gone(r);
                /* The socket filter already passes only rx_id; a socket
                 * handed to us by the caller may not have one. */
                if (f->id == s->rx_id && f->len > 0)
                        return 0;
        }
}

static ssize_t can_stream_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        struct can_stream_transport *s = can_stream_from_transport(t);
        uint8_t *out = buf;
        struct can_frame_data f;
        size_t done;
        int r;

        if (len == 0)
                return 0;

        if (s->pending_len > 0)
                return (ssize_t) take_pending(s, out, len);

        if (s->pending_error < 0) {
                r = s->pending_error;
                s->pending_error = 0;
                return r;
        }

        r = can_stream_recv_frame(s, &f, timeout_ms);
        if (r < 0)
                return r;

        done = MIN(len, (size_t) f.len);
        memcpy(out, f.data, done);
        if (done < f.len) {
                memcpy(s->pending, f.data + done, f.len - done);
                s->pending_off = 0;
                s->pending_len = f.len - done;
                return (ssize_t) done;
        }

        /* Hand over whatever further frames are already queued and fit
         * whole, so that a block of 64 bytes needs one call, not eight. */
        while (len - done >= CAN_MAX_DLEN) {
                r = can_stream_recv_frame(s, &f, 0);
                if (r == -ETIMEDOUT)
                        break;
                if (r < 0) {
                        s->pending_error = r;
                        break;
                }
                memcpy(out + done, f.data, f.len);
                done += f.len;
        }

        return (ssize_t) done;
}

static int can_stream_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        struct can_stream_transport *s = can_stream_from_transport(t);
        uint64_t deadline = deadline_after_ms(timeout_ms);
        const uint8_t *p = buf;

        for (size_t done = 0; done < len;) {
                struct can_frame_data f = {
                        .id = s->tx_id,
                        .len = (uint8_t) MIN(len - done, (size_t) CAN_MAX_DLEN),
                };
                int r;

                memcpy(f.data, p + done, f.len);
                r = can_socket_send(s->fd, &f, deadline_poll_timeout(deadline));
                if (r < 0)
                        return map_interface_gone(r);
                done += f.len;
        }

        return 0;
}

static int can_stream_flush(struct transport *t) {
        struct can_stream_transport *s = can_stream_from_transport(t);

        s->pending_off = s->pending_len = 0;
        s->pending_error = 0;

        /* Bounded, so that a node that never stops talking cannot keep us
         * here; what arrives after the snapshot is not "pending" anyway. */
        for (unsigned i = 0; i < CAN_FLUSH_MAX_FRAMES; i++) {
                struct can_frame_data f;
                int r;

                r = can_socket_recv(s->fd, &f, 0);
                if (r == -ETIMEDOUT)
                        return 0;
                if (r < 0)
                        return map_interface_gone(r);
        }
        return 0;
}

static void can_stream_free(struct transport *t) {
        struct can_stream_transport *s = can_stream_from_transport(t);

        safe_close(s->fd);
        free(s->transport.description);
        free(s);
}

static const struct transport_ops can_stream_ops = {
        .name = "can",
        .read = can_stream_read,
        .write = can_stream_write,
        .flush = can_stream_flush,
        .free = can_stream_free,
};

int can_stream_transport_new(int fd, const char *description, unsigned nodeid, struct transport **ret) {
        struct can_stream_transport *s;

        if (fd < 0 || !ret || nodeid > CANBUS_NODEID_MAX)
                return -EINVAL;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->transport.ops = &can_stream_ops;
        if (description)
                s->transport.description = strdup(description);
        else if (asprintf(&s->transport.description, "CAN node %u", nodeid) < 0)
                s->transport.description = NULL;
        if (!s->transport.description) {
                free(s);
                return -ENOMEM;
        }
        s->fd = fd;
        s->tx_id = CANBUS_ID_NODE_BASE + 2 * nodeid;
        s->rx_id = s->tx_id + 1;

        *ret = &s->transport;
        return 0;
}

int can_stream_transport_open(const char *ifname, unsigned nodeid, struct transport **ret) {
        _cleanup_free_ char *description = NULL;
        _cleanup_close_ int fd = -1;
        uint32_t rx_id;
        int r;

        if (!ifname_is_valid(ifname) || !ret || nodeid > CANBUS_NODEID_MAX)
                return -EINVAL;

        rx_id = CANBUS_ID_NODE_BASE + 2 * nodeid + 1;
        fd = can_socket_open(ifname, &rx_id, 1);
        if (fd < 0)
                return fd;

        if (asprintf(&description, "%s node %u", ifname, nodeid) < 0)
                return -ENOMEM;

        r = can_stream_transport_new(fd, description, nodeid, ret);
        if (r < 0)
                return r;
        TAKE_FD(fd);
        return 0;
}
