/* SocketCAN transport: raw CAN 2.0A sockets bound to one interface, frames
 * with timeouts, and a struct transport that carries Klipper's byte stream
 * to one node (host→node id 0x100 + 2·nodeid, node→host id + 1, split into
 * frames of at most 8 bytes, protocols.md §2).  Only plain socket calls, so
 * that the test shim (tests/shim/canshim.c) covers all of it. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/transport.h"

struct can_frame_data {
        uint32_t id;            /* 11-bit standard id */
        uint8_t len;            /* 0..8 */
        uint8_t data[8];
};

/* Open a raw CAN socket on @ifname.  With @n_ids > 0 it receives only
 * standard frames with those ids (CAN_RAW_FILTER); with 0 it receives
 * every frame.  Returns an fd (non-blocking, close-on-exec) or -errno:
 * -ENODEV for an interface that does not exist, -ENETDOWN when it is down,
 * -EAFNOSUPPORT when the kernel has no CAN. */
int can_socket_open(const char *ifname, const uint32_t *ids, size_t n_ids);

/* Send one standard frame. 0 or -errno (-ETIMEDOUT when the TX queue stays
 * full for @timeout_ms). */
int can_socket_send(int fd, const struct can_frame_data *f, int timeout_ms);

/* Receive one frame within @timeout_ms: 0, -ETIMEDOUT, -ENETDOWN, -errno.
 * Error frames and extended/RTR frames are skipped. */
int can_socket_recv(int fd, struct can_frame_data *f, int timeout_ms);

/* A struct transport speaking to node @nodeid on @ifname: a socket that
 * receives only the node's id; write() splits the stream into frames of at
 * most 8 bytes, read() returns the bytes of the frames received.  Read and
 * write report a vanished or downed interface as -ENODEV.  -EINVAL for a
 * node id above CANBUS_NODEID_MAX, else the errors of can_socket_open(). */
int can_stream_transport_open(const char *ifname, unsigned nodeid, struct transport **ret);

/* The same over @fd, an already open socket that carries struct can_frame
 * datagrams (from can_socket_open(), or a socketpair in tests); frames of
 * other ids are ignored.  On success the transport owns @fd; @description
 * (NULL: "CAN node <n>") names it in log messages. */
int can_stream_transport_new(int fd, const char *description, unsigned nodeid, struct transport **ret);
