/* Unit tests for proto/canbus.c (UUID text, admin message encoders and
 * parser, node ids, discovery, node id assignment, bootloader requests and
 * Katapult node ids) and
 * transport/can.c (frame send/receive and the byte stream to one node).
 *
 * This machine's kernel has no CAN, and unit tests run without the
 * LD_PRELOAD shim: opening a CAN socket must fail cleanly here (-ENODEV for
 * a missing interface, -EAFNOSUPPORT for an existing one).  Everything
 * after the open runs on an AF_UNIX datagram socketpair instead, which
 * carries struct can_frame datagrams exactly like a raw CAN socket; the
 * test plays the bus on the other end.  The real socket path against a
 * simulated node is tests/integration/test_can_transport.py. */
#include <linux/can.h>
#include <linux/can/error.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "proto/canbus.h"
#include "shared/log.h"
#include "shared/time-util.h"
#include "transport/can.h"

static const uint8_t uuid_a[CANBUS_UUID_LEN] = { 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c };
static const uint8_t uuid_b[CANBUS_UUID_LEN] = { 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6 };

/* ---- UUIDs ---- */

static void test_uuid_roundtrip(void **state) {
        char text[CANBUS_UUID_STRING_LEN];
        uint8_t uuid[CANBUS_UUID_LEN];

        (void) state;
        assert_int_equal(canbus_uuid_from_string("0e0d81e4210c", uuid), 0);
        assert_memory_equal(uuid, uuid_a, CANBUS_UUID_LEN);     /* data[1] first */
        canbus_uuid_to_string(uuid, text);
        assert_string_equal(text, "0e0d81e4210c");

        /* Either case in, lower case out. */
        assert_int_equal(canbus_uuid_from_string("A1B2c3D4e5F6", uuid), 0);
        assert_memory_equal(uuid, uuid_b, CANBUS_UUID_LEN);
        canbus_uuid_to_string(uuid, text);
        assert_string_equal(text, "a1b2c3d4e5f6");

        memset(uuid, 0, sizeof(uuid));
        canbus_uuid_to_string(uuid, text);
        assert_string_equal(text, "000000000000");
        memset(uuid, 0xff, sizeof(uuid));
        canbus_uuid_to_string(uuid, text);
        assert_string_equal(text, "ffffffffffff");
        assert_int_equal(canbus_uuid_from_string("ffffffffffff", uuid), 0);
}

static void test_uuid_bad_strings(void **state) {
        static const char *const bad[] = {
                "",
                "0e0d81e4210",          /* 11 digits */
                "0e0d81e4210c0",        /* 13 digits */
                "0e0d81e4210g",
                "0x0d81e4210c",
                " e0d81e4210c",
                "0e0d81e4210 ",
                "0e0d81-4210c",
                "0e:0d:81:e4:21:0c",
                "0e0d81e4210c\n",
        };
        uint8_t uuid[CANBUS_UUID_LEN];

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                memcpy(uuid, uuid_b, sizeof(uuid));
                assert_int_equal(canbus_uuid_from_string(bad[i], uuid), -EINVAL);
                /* A failed parse leaves the output alone. */
                assert_memory_equal(uuid, uuid_b, CANBUS_UUID_LEN);
        }
        assert_int_equal(canbus_uuid_from_string(NULL, uuid), -EINVAL);
}

/* ---- encoders and parser (protocols.md §2.1) ---- */

static void test_encode_query(void **state) {
        uint8_t out[8];

        (void) state;
        memset(out, 0xaa, sizeof(out));
        assert_int_equal(canbus_encode_query(out), 1);
        assert_int_equal(out[0], 0x00);
}

static void test_encode_set_klipper_nodeid(void **state) {
        static const uint8_t expected[8] = { 0x01, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c, 0x40 };
        static const uint8_t expected_first_klipper[8] = { 0x01, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x04 };
        uint8_t out[8];

        (void) state;
        assert_int_equal(canbus_encode_set_klipper_nodeid(out, uuid_a, 64), 8);
        assert_memory_equal(out, expected, 8);
        assert_int_equal(canbus_encode_set_klipper_nodeid(out, uuid_b, CANBUS_NODEID_KLIPPER_FIRST), 8);
        assert_memory_equal(out, expected_first_klipper, 8);
}

static void test_encode_request_bootloader(void **state) {
        static const uint8_t expected[7] = { 0x02, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c };
        uint8_t out[8];

        (void) state;
        assert_int_equal(canbus_encode_request_bootloader(out, uuid_a), 7);
        assert_memory_equal(out, expected, 7);
}

static void test_encode_set_katapult_nodeid(void **state) {
        /* flashtool's assignment: [0x11 uuid nodeid], nodeid 128. */
        static const uint8_t expected[8] = { 0x11, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c, 0x80 };
        static const uint8_t expected_low[8] = { 0x11, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x04 };
        uint8_t out[8];

        (void) state;
        assert_int_equal(CANBUS_NODEID_KATAPULT, 128);
        assert_int_equal(canbus_encode_set_katapult_nodeid(out, uuid_a, CANBUS_NODEID_KATAPULT), 8);
        assert_memory_equal(out, expected, 8);
        assert_int_equal(canbus_encode_set_katapult_nodeid(out, uuid_b, 4), 8);
        assert_memory_equal(out, expected_low, 8);
}

static void test_encode_clear_katapult_nodeid(void **state) {
        uint8_t out[8];

        (void) state;
        memset(out, 0xaa, sizeof(out));
        assert_int_equal(canbus_encode_clear_katapult_nodeid(out), 1);
        assert_int_equal(out[0], 0x12);
}

static void test_parse_need_nodeid(void **state) {
        static const uint8_t klipper[8] = { 0x20, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c, 0x01 };
        static const uint8_t katapult[8] = { 0x20, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x11 };
        static const uint8_t wrong_cmd[8] = { 0x21, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c, 0x01 };
        static const uint8_t query[1] = { 0x00 };
        uint8_t nine[9] = { 0x20, 1, 2, 3, 4, 5, 6, 1, 0 };
        struct canbus_node node;

        (void) state;
        assert_int_equal(canbus_parse_need_nodeid(klipper, 8, &node), 0);
        assert_memory_equal(node.uuid, uuid_a, CANBUS_UUID_LEN);
        assert_int_equal(node.app, CANBUS_APP_KLIPPER);

        assert_int_equal(canbus_parse_need_nodeid(katapult, 8, &node), 0);
        assert_memory_equal(node.uuid, uuid_b, CANBUS_UUID_LEN);
        assert_int_equal(node.app, CANBUS_APP_KATAPULT);

        /* Without the app byte: the node is known, its app is not. */
        assert_int_equal(canbus_parse_need_nodeid(klipper, 7, &node), 0);
        assert_memory_equal(node.uuid, uuid_a, CANBUS_UUID_LEN);
        assert_int_equal(node.app, 0);

        for (size_t len = 0; len < 7; len++)
                assert_int_equal(canbus_parse_need_nodeid(klipper, len, &node), -EBADMSG);
        assert_int_equal(canbus_parse_need_nodeid(wrong_cmd, 8, &node), -EBADMSG);
        assert_int_equal(canbus_parse_need_nodeid(query, 1, &node), -EBADMSG);
        assert_int_equal(canbus_parse_need_nodeid(nine, 9, &node), -EBADMSG);
        assert_int_equal(canbus_parse_need_nodeid(NULL, 8, &node), -EBADMSG);
}

/* ---- node ids ---- */

static void test_nodeid_of_canid(void **state) {
        (void) state;
        assert_int_equal(canbus_nodeid_of_canid(0), -1);
        assert_int_equal(canbus_nodeid_of_canid(0xff), -1);
        assert_int_equal(canbus_nodeid_of_canid(0x100), 0);
        assert_int_equal(canbus_nodeid_of_canid(0x101), 0);
        assert_int_equal(canbus_nodeid_of_canid(0x108), 4);
        assert_int_equal(canbus_nodeid_of_canid(0x109), 4);
        assert_int_equal(canbus_nodeid_of_canid(0x200), 128);
        assert_int_equal(canbus_nodeid_of_canid(0x201), 128);
        assert_int_equal(canbus_nodeid_of_canid(0x3ee), CANBUS_NODEID_MAX);
        assert_int_equal(canbus_nodeid_of_canid(0x3ef), CANBUS_NODEID_MAX);
        assert_int_equal(canbus_nodeid_of_canid(0x3f0), -1);
        assert_int_equal(canbus_nodeid_of_canid(0x3f1), -1);
        assert_int_equal(canbus_nodeid_of_canid(0x7ff), -1);
        assert_int_equal(canbus_nodeid_of_canid(0x1fffffff), -1);
}

static void test_pick_nodeid(void **state) {
        bool used[CANBUS_NODEID_MAX + 1] = {};

        (void) state;
        assert_int_equal(canbus_pick_nodeid(NULL), CANBUS_NODEID_DAEMON_FIRST);
        assert_int_equal(canbus_pick_nodeid(used), 64);

        /* Klipper's and Katapult's ids are outside the daemon's range. */
        used[CANBUS_NODEID_KLIPPER_FIRST] = used[5] = used[128] = true;
        assert_int_equal(canbus_pick_nodeid(used), 64);

        used[64] = used[65] = used[66] = true;
        assert_int_equal(canbus_pick_nodeid(used), 67);
        used[68] = true;
        assert_int_equal(canbus_pick_nodeid(used), 67);

        for (unsigned id = CANBUS_NODEID_DAEMON_FIRST; id < CANBUS_NODEID_DAEMON_LAST; id++)
                used[id] = true;
        assert_int_equal(canbus_pick_nodeid(used), CANBUS_NODEID_DAEMON_LAST);
        used[CANBUS_NODEID_DAEMON_LAST] = true;
        assert_int_equal(canbus_pick_nodeid(used), -ENOSPC);
}

/* ---- sockets without kernel CAN ---- */

#define MISSING_IFACE "mcuflashnone0"

static void test_socket_open_fails_cleanly(void **state) {
        static const uint32_t ids[] = { 0x3f1 };
        static const uint32_t bad_ids[] = { 0x800 };
        int r;

        (void) state;
        assert_int_equal(can_socket_open(MISSING_IFACE, NULL, 0), -ENODEV);
        assert_int_equal(can_socket_open(MISSING_IFACE, ids, 1), -ENODEV);

        /* "lo" exists: here the kernel refuses the CAN socket itself; with
         * CAN support it refuses to bind a CAN socket to a non-CAN device. */
        r = can_socket_open("lo", ids, ELEMENTSOF(ids));
        assert_true(r == -EAFNOSUPPORT || r == -ENODEV);
        r = can_socket_open("lo", NULL, 0);
        assert_true(r == -EAFNOSUPPORT || r == -ENODEV);

        assert_int_equal(can_socket_open(NULL, NULL, 0), -EINVAL);
        assert_int_equal(can_socket_open("", NULL, 0), -EINVAL);
        assert_int_equal(can_socket_open("a-very-long-interface-name", NULL, 0), -EINVAL);
        assert_int_equal(can_socket_open("lo", NULL, 1), -EINVAL);
        assert_int_equal(can_socket_open("lo", bad_ids, 1), -EINVAL);
}

static void test_stream_open_fails_cleanly(void **state) {
        struct transport *t = NULL;
        int r;

        (void) state;
        assert_int_equal(can_stream_transport_open(MISSING_IFACE, 4, &t), -ENODEV);
        assert_null(t);
        r = can_stream_transport_open("lo", 4, &t);
        assert_true(r == -EAFNOSUPPORT || r == -ENODEV);
        assert_null(t);
        assert_int_equal(can_stream_transport_open("lo", CANBUS_NODEID_MAX + 1, &t), -EINVAL);
        assert_int_equal(can_stream_transport_open(NULL, 4, &t), -EINVAL);
        assert_null(t);
        assert_int_equal(can_stream_transport_new(-1, NULL, 4, &t), -EINVAL);
        assert_null(t);
}

static void test_admin_bad_arguments(void **state) {
        struct can_frame_data f = { .id = 0x3f0, .len = 1 };
        struct canbus_node *nodes = NULL;

        (void) state;
        assert_int_equal(can_socket_send(-1, &f, 10), -EINVAL);
        assert_int_equal(can_socket_recv(-1, &f, 10), -EINVAL);
        assert_int_equal(canbus_query(-1, 10, NULL, &nodes), -EINVAL);
        assert_null(nodes);
        assert_int_equal(canbus_set_klipper_nodeid(-1, uuid_a, 64), -EINVAL);
        assert_int_equal(canbus_request_bootloader(-1, uuid_a), -EINVAL);
        assert_int_equal(canbus_set_katapult_nodeid(-1, uuid_a, CANBUS_NODEID_KATAPULT), -EINVAL);
        assert_int_equal(canbus_clear_katapult_nodeids(-1), -EINVAL);
}

/* ---- frames over a socketpair standing in for a CAN socket ---- */

struct bus {
        int host;       /* the end the code under test uses */
        int peer;       /* the end the test plays the bus on */
};

static int bus_setup_type(void **state, int type) {
        struct bus *b = calloc(1, sizeof(*b));
        int sv[2];

        assert_non_null(b);
        assert_int_equal(socketpair(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
        b->host = sv[0];
        b->peer = sv[1];
        *state = b;
        return 0;
}

static int bus_setup(void **state) {
        return bus_setup_type(state, SOCK_DGRAM);
}

static int bus_setup_seqpacket(void **state) {
        return bus_setup_type(state, SOCK_SEQPACKET);
}

static int bus_teardown(void **state) {
        struct bus *b = *state;

        safe_close(b->host);
        safe_close(b->peer);
        free(b);
        return 0;
}

static void peer_send(const struct bus *b, canid_t id, const void *data, uint8_t len) {
        struct can_frame frame = { .can_id = id, .can_dlc = len };

        memcpy(frame.data, data, len);
        assert_int_equal(write(b->peer, &frame, sizeof(frame)), sizeof(frame));
}

static void peer_recv(const struct bus *b, struct can_frame *frame) {
        struct pollfd p = { .fd = b->peer, .events = POLLIN };

        assert_int_equal(poll(&p, 1, 1000), 1);
        assert_int_equal(read(b->peer, frame, sizeof(*frame)), sizeof(*frame));
}

static void peer_assert_silent(const struct bus *b) {
        struct pollfd p = { .fd = b->peer, .events = POLLIN };

        assert_int_equal(poll(&p, 1, 0), 0);
}

static void test_socket_send(void **state) {
        static const uint8_t data[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
        struct bus *b = *state;
        struct can_frame_data f = { .id = 0x108, .len = 8 };
        struct can_frame frame;

        memcpy(f.data, data, 8);
        assert_int_equal(can_socket_send(b->host, &f, 100), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x108);
        assert_int_equal(frame.can_dlc, 8);
        assert_memory_equal(frame.data, data, 8);

        f = (struct can_frame_data) { .id = 0x3f0, .len = 0 };
        assert_int_equal(can_socket_send(b->host, &f, 100), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 0);

        f = (struct can_frame_data) { .id = 0x800, .len = 1 };
        assert_int_equal(can_socket_send(b->host, &f, 100), -EINVAL);
        f = (struct can_frame_data) { .id = 0x100, .len = 9 };
        assert_int_equal(can_socket_send(b->host, &f, 100), -EINVAL);
        peer_assert_silent(b);
}

static void test_socket_send_queue_full(void **state) {
        struct bus *b = *state;
        struct can_frame_data f = { .id = 0x108, .len = 8 };
        struct can_frame frame = { .can_id = 0x108, .can_dlc = 8 };
        uint64_t start;
        unsigned n;

        /* Fill the peer's receive queue until the host end would block. */
        for (n = 0; n < 100000; n++)
                if (write(b->host, &frame, sizeof(frame)) < 0)
                        break;
        assert_true(errno == EAGAIN);

        start = now_msec();
        assert_int_equal(can_socket_send(b->host, &f, 50), -ETIMEDOUT);
        assert_true(now_msec() - start >= 45);
}

static void test_socket_recv_skips_special_frames(void **state) {
        static const uint8_t data[3] = { 0xde, 0xad, 0xbe };
        struct bus *b = *state;
        struct can_frame_data f;
        uint8_t junk[4] = {};
        uint64_t start;

        peer_send(b, CAN_ERR_FLAG | CAN_ERR_BUSOFF, data, 3);
        peer_send(b, CAN_EFF_FLAG | 0x108, data, 3);
        peer_send(b, CAN_RTR_FLAG | 0x109, data, 0);
        assert_int_equal(write(b->peer, junk, sizeof(junk)), sizeof(junk));    /* not a frame */
        peer_send(b, 0x109, data, 3);

        assert_int_equal(can_socket_recv(b->host, &f, 100), 0);
        assert_int_equal(f.id, 0x109);
        assert_int_equal(f.len, 3);
        assert_memory_equal(f.data, data, 3);

        start = now_msec();
        assert_int_equal(can_socket_recv(b->host, &f, 50), -ETIMEDOUT);
        assert_true(now_msec() - start >= 45);
        assert_int_equal(can_socket_recv(b->host, &f, 0), -ETIMEDOUT);

        /* Skipped frames do not stretch the timeout into a hang. */
        peer_send(b, CAN_ERR_FLAG, data, 0);
        assert_int_equal(can_socket_recv(b->host, &f, 20), -ETIMEDOUT);
}

static void test_socket_recv_hangup(void **state) {
        struct bus *b = *state;
        struct can_frame_data f;

        b->peer = safe_close(b->peer);
        assert_int_equal(can_socket_recv(b->host, &f, 1000), -ENODEV);
}

/* ---- the stream transport ---- */

static struct transport *stream_new(struct bus *b, unsigned nodeid) {
        struct transport *t = NULL;
        int fd = dup(b->host);

        assert_true(fd >= 0);
        assert_int_equal(can_stream_transport_new(fd, NULL, nodeid, &t), 0);
        assert_non_null(t);
        return t;
}

static void test_stream_write_splits(void **state) {
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, 4);
        uint8_t stream[20];
        struct can_frame frame;

        assert_string_equal(t->ops->name, "can");
        assert_string_equal(t->description, "CAN node 4");

        for (size_t i = 0; i < sizeof(stream); i++)
                stream[i] = (uint8_t) (0x30 + i);
        assert_int_equal(transport_write(t, stream, sizeof(stream), 100), 0);

        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x108);
        assert_int_equal(frame.can_dlc, 8);
        assert_memory_equal(frame.data, stream, 8);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x108);
        assert_int_equal(frame.can_dlc, 8);
        assert_memory_equal(frame.data, stream + 8, 8);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x108);
        assert_int_equal(frame.can_dlc, 4);
        assert_memory_equal(frame.data, stream + 16, 4);
        peer_assert_silent(b);

        /* Nothing to write sends nothing. */
        assert_int_equal(transport_write(t, stream, 0, 100), 0);
        peer_assert_silent(b);
}

static void test_stream_write_highest_node(void **state) {
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, CANBUS_NODEID_MAX);
        struct can_frame frame;

        assert_int_equal(transport_write(t, "x", 1, 100), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3ee);
        assert_int_equal(frame.can_dlc, 1);
}

static void test_stream_read(void **state) {
        static const uint8_t stream[] = "0123456789abcdefghijk";       /* 21 bytes + NUL */
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, 4);
        uint8_t buf[256];

        peer_send(b, 0x109, stream, 8);
        peer_send(b, 0x10b, "other", 5);       /* node 5's answer, not ours */
        peer_send(b, 0x108, "echo", 4);        /* our own direction */
        peer_send(b, 0x109, stream + 8, 0);    /* empty frame */
        peer_send(b, 0x109, stream + 8, 8);
        peer_send(b, 0x109, stream + 16, 5);

        /* All queued frames of our node arrive in one read. */
        memset(buf, 0, sizeof(buf));
        assert_int_equal(transport_read(t, buf, sizeof(buf), 100), 21);
        assert_memory_equal(buf, stream, 21);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 30), -ETIMEDOUT);
}

static void test_stream_read_small_buffer(void **state) {
        static const uint8_t stream[] = "ABCDEFGHIJKL";
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, 4);
        uint8_t buf[8];

        peer_send(b, 0x109, stream, 8);
        peer_send(b, 0x109, stream + 8, 4);

        assert_int_equal(transport_read(t, buf, 3, 100), 3);
        assert_memory_equal(buf, "ABC", 3);
        assert_int_equal(transport_read(t, buf, 3, 100), 3);
        assert_memory_equal(buf, "DEF", 3);
        assert_int_equal(transport_read(t, buf, 3, 100), 2);
        assert_memory_equal(buf, "GH", 2);
        /* A buffer of exactly one frame takes one frame. */
        assert_int_equal(transport_read(t, buf, 8, 100), 4);
        assert_memory_equal(buf, "IJKL", 4);
        assert_int_equal(transport_read(t, buf, 0, 100), 0);
}

static void test_stream_flush(void **state) {
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, 4);
        uint8_t buf[8];

        peer_send(b, 0x109, "12345678", 8);
        assert_int_equal(transport_read(t, buf, 2, 100), 2);   /* 6 bytes stay buffered */
        peer_send(b, 0x109, "stale", 5);
        peer_send(b, 0x109, "stale", 5);

        assert_int_equal(transport_flush(t), 0);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 20), -ETIMEDOUT);

        peer_send(b, 0x109, "fresh", 5);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 100), 5);
        assert_memory_equal(buf, "fresh", 5);
}

static void test_stream_hangup(void **state) {
        struct bus *b = *state;
        _cleanup_(transport_freep) struct transport *t = stream_new(b, 4);
        uint8_t buf[64];

        peer_send(b, 0x109, "last", 4);
        b->peer = safe_close(b->peer);
        /* What arrived before the hangup is still delivered. */
        assert_int_equal(transport_read(t, buf, sizeof(buf), 100), 4);
        assert_memory_equal(buf, "last", 4);
        assert_int_equal(transport_read(t, buf, sizeof(buf), 100), -ENODEV);
}

/* ---- discovery and node id assignment ---- */

static void need_nodeid_frame(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN], uint8_t app) {
        out[0] = CANBUS_RESP_NEED_NODEID;
        memcpy(out + 1, uuid, CANBUS_UUID_LEN);
        out[7] = app;
}

static void test_query(void **state) {
        struct bus *b = *state;
        bool used[CANBUS_NODEID_MAX + 1] = {};
        _cleanup_free_ struct canbus_node *nodes = NULL;
        uint8_t msg[8];
        struct can_frame frame;

        /* What the bus answers (queued before the query goes out, which
         * makes no difference to a receiver). */
        need_nodeid_frame(msg, uuid_a, CANBUS_APP_KLIPPER);
        peer_send(b, 0x3f1, msg, 8);
        peer_send(b, 0x3f1, msg, 8);                           /* duplicate */
        need_nodeid_frame(msg, uuid_b, CANBUS_APP_KATAPULT);
        peer_send(b, 0x3f1, msg, 8);
        msg[0] = 0x21;
        peer_send(b, 0x3f1, msg, 8);                           /* not RESP_NEED_NODEID */
        peer_send(b, 0x3f1, msg, 3);                           /* short */
        peer_send(b, 0x109, "\x05\x10\x9e\x81\x7e", 5);        /* node 4 talks */
        peer_send(b, 0x200, "x", 1);                           /* katapult's node 128 */
        canbus_encode_set_klipper_nodeid(msg, uuid_b, 70);     /* another host assigns 70 */
        peer_send(b, 0x3f0, msg, 8);
        peer_send(b, CAN_EFF_FLAG | 0x150, "x", 1);            /* extended: ignored */

        assert_int_equal(canbus_query(b->host, 100, used, &nodes), 2);
        assert_non_null(nodes);
        assert_memory_equal(nodes[0].uuid, uuid_a, CANBUS_UUID_LEN);
        assert_int_equal(nodes[0].app, CANBUS_APP_KLIPPER);
        assert_memory_equal(nodes[1].uuid, uuid_b, CANBUS_UUID_LEN);
        assert_int_equal(nodes[1].app, CANBUS_APP_KATAPULT);

        assert_true(used[4]);
        assert_true(used[70]);
        assert_true(used[128]);
        assert_false(used[0x150 - 0x100]);
        assert_false(used[0x50 / 2]);
        assert_false(used[64]);
        assert_int_equal(canbus_pick_nodeid(used), 64);

        /* The query itself: [0x00] on 0x3f0. */
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 1);
        assert_int_equal(frame.data[0], 0x00);
        peer_assert_silent(b);
}

static void test_query_silent_bus(void **state) {
        struct bus *b = *state;
        struct canbus_node *nodes = (struct canbus_node *) 1;
        struct can_frame frame;
        uint64_t start = now_msec();

        assert_int_equal(canbus_query(b->host, 60, NULL, &nodes), 0);
        assert_true(now_msec() - start >= 55);
        assert_null(nodes);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);

        assert_int_equal(canbus_query(b->host, -1, NULL, &nodes), -EINVAL);
}

static void test_query_hangup(void **state) {
        struct bus *b = *state;
        struct canbus_node *nodes = NULL;

        /* A socket that went away fails the query, it does not hang. */
        b->peer = safe_close(b->peer);
        assert_true(canbus_query(b->host, 1000, NULL, &nodes) < 0);
        assert_null(nodes);
}

static void test_set_klipper_nodeid(void **state) {
        static const uint8_t expected[8] = { 0x01, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c, 0x40 };
        struct bus *b = *state;
        struct can_frame frame;

        assert_int_equal(canbus_set_klipper_nodeid(b->host, uuid_a, 64), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 8);
        assert_memory_equal(frame.data, expected, 8);

        assert_int_equal(canbus_set_klipper_nodeid(b->host, uuid_a, 256), -EINVAL);
        assert_int_equal(canbus_set_klipper_nodeid(b->host, NULL, 64), -EINVAL);
        peer_assert_silent(b);
}

static void test_request_bootloader(void **state) {
        static const uint8_t expected[7] = { 0x02, 0x0e, 0x0d, 0x81, 0xe4, 0x21, 0x0c };
        struct bus *b = *state;
        struct can_frame frame;

        assert_int_equal(canbus_request_bootloader(b->host, uuid_a), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 7);
        assert_memory_equal(frame.data, expected, 7);

        assert_int_equal(canbus_request_bootloader(b->host, NULL), -EINVAL);
        peer_assert_silent(b);
}

static void test_set_katapult_nodeid(void **state) {
        static const uint8_t expected[8] = { 0x11, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x80 };
        struct bus *b = *state;
        struct can_frame frame;

        assert_int_equal(canbus_set_katapult_nodeid(b->host, uuid_b, CANBUS_NODEID_KATAPULT), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 8);
        assert_memory_equal(frame.data, expected, 8);
        /* Katapult then talks on 0x100 + 2·128 and answers on the id after it. */
        assert_int_equal(canbus_nodeid_of_canid(0x200), CANBUS_NODEID_KATAPULT);
        assert_int_equal(canbus_nodeid_of_canid(0x201), CANBUS_NODEID_KATAPULT);

        assert_int_equal(canbus_set_katapult_nodeid(b->host, uuid_b, 256), -EINVAL);
        assert_int_equal(canbus_set_katapult_nodeid(b->host, NULL, CANBUS_NODEID_KATAPULT), -EINVAL);
        peer_assert_silent(b);
}

static void test_clear_katapult_nodeids(void **state) {
        struct bus *b = *state;
        struct can_frame frame;

        assert_int_equal(canbus_clear_katapult_nodeids(b->host), 0);
        peer_recv(b, &frame);
        assert_int_equal(frame.can_id, 0x3f0);
        assert_int_equal(frame.can_dlc, 1);
        assert_int_equal(frame.data[0], 0x12);
        peer_assert_silent(b);
}

static void test_katapult_admin_hangup(void **state) {
        struct bus *b = *state;

        /* A bus that went away fails the sends, it does not hang. */
        b->peer = safe_close(b->peer);
        assert_true(canbus_request_bootloader(b->host, uuid_a) < 0);
        assert_true(canbus_clear_katapult_nodeids(b->host) < 0);
        assert_true(canbus_set_katapult_nodeid(b->host, uuid_a, CANBUS_NODEID_KATAPULT) < 0);
}

#define bus_test(t) cmocka_unit_test_setup_teardown(t, bus_setup, bus_teardown)
#define seqpacket_test(t) cmocka_unit_test_setup_teardown(t, bus_setup_seqpacket, bus_teardown)

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_uuid_roundtrip),
                cmocka_unit_test(test_uuid_bad_strings),
                cmocka_unit_test(test_encode_query),
                cmocka_unit_test(test_encode_set_klipper_nodeid),
                cmocka_unit_test(test_encode_request_bootloader),
                cmocka_unit_test(test_encode_set_katapult_nodeid),
                cmocka_unit_test(test_encode_clear_katapult_nodeid),
                cmocka_unit_test(test_parse_need_nodeid),
                cmocka_unit_test(test_nodeid_of_canid),
                cmocka_unit_test(test_pick_nodeid),
                cmocka_unit_test(test_socket_open_fails_cleanly),
                cmocka_unit_test(test_stream_open_fails_cleanly),
                cmocka_unit_test(test_admin_bad_arguments),
                bus_test(test_socket_send),
                bus_test(test_socket_send_queue_full),
                bus_test(test_socket_recv_skips_special_frames),
                seqpacket_test(test_socket_recv_hangup),
                bus_test(test_stream_write_splits),
                bus_test(test_stream_write_highest_node),
                bus_test(test_stream_read),
                bus_test(test_stream_read_small_buffer),
                bus_test(test_stream_flush),
                seqpacket_test(test_stream_hangup),
                bus_test(test_query),
                bus_test(test_query_silent_bus),
                seqpacket_test(test_query_hangup),
                bus_test(test_set_klipper_nodeid),
                bus_test(test_request_bootloader),
                bus_test(test_set_katapult_nodeid),
                bus_test(test_clear_katapult_nodeids),
                seqpacket_test(test_katapult_admin_hangup),
        };

        if (getenv("TEST_DEBUG"))
                log_set_max_level(LOG_DEBUG);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
