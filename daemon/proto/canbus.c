/* Klipper's CAN bus administration (protocols.md §2.1/§2.2): UUID text,
 * the admin messages on 0x3f0 (host → all nodes) and 0x3f1 (node → host),
 * node ids and the CAN ids derived from them, and the two exchanges the
 * daemon runs on an open CAN socket: discovery of unassigned nodes and
 * node id assignment, plus the admin frames around Katapult: bootloader
 * requests and Katapult node ids.  Encoders and parsers are pure; the
 * exchanges block with a time limit and are meant for a worker thread.
 * Talking to Katapult itself over its node ids is proto/katapult.c's job. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/canbus.h"
#include "shared/log.h"
#include "shared/time-util.h"
#include "transport/can.h"

/* How long sending one admin frame may wait for room in the TX queue. */
#define CANBUS_ADMIN_SEND_TIMEOUT_MS 100

void canbus_uuid_to_string(const uint8_t uuid[CANBUS_UUID_LEN], char out[CANBUS_UUID_STRING_LEN]) {
        static const char hex[] = "0123456789abcdef";

        for (size_t i = 0; i < CANBUS_UUID_LEN; i++) {
                out[2 * i] = hex[uuid[i] >> 4];
                out[2 * i + 1] = hex[uuid[i] & 0x0f];
        }
        out[CANBUS_UUID_LEN * 2] = '\0';
}

static int hex_digit_value(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -EINVAL;
}

int canbus_uuid_from_string(const char *s, uint8_t uuid[CANBUS_UUID_LEN]) {
        uint8_t parsed[CANBUS_UUID_LEN];

        if (!s || strlen(s) != CANBUS_UUID_LEN * 2)
                return -EINVAL;

        for (size_t i = 0; i < CANBUS_UUID_LEN; i++) {
                int high = hex_digit_value(s[2 * i]), low = hex_digit_value(s[2 * i + 1]);

                if (high < 0 || low < 0)
                        return -EINVAL;
                parsed[i] = (uint8_t) (high << 4 | low);
        }

        memcpy(uuid, parsed, sizeof(parsed));
        return 0;
}

size_t canbus_encode_query(uint8_t out[8]) {
        memset(out, 0, 8);
        out[0] = CANBUS_CMD_QUERY_UNASSIGNED;
        return 1;
}

size_t canbus_encode_set_klipper_nodeid(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid) {
        out[0] = CANBUS_CMD_SET_KLIPPER_NODEID;
        memcpy(out + 1, uuid, CANBUS_UUID_LEN);
        out[1 + CANBUS_UUID_LEN] = (uint8_t) nodeid;      /* one byte on the wire */
        return 2 + CANBUS_UUID_LEN;
}

size_t canbus_encode_request_bootloader(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN]) {
        memset(out, 0, 8);
        out[0] = CANBUS_CMD_REQUEST_BOOTLOADER;
        memcpy(out + 1, uuid, CANBUS_UUID_LEN);
        return 1 + CANBUS_UUID_LEN;
}

size_t canbus_encode_set_katapult_nodeid(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid) {
        out[0] = CANBUS_CMD_SET_KATAPULT_NODEID;
        memcpy(out + 1, uuid, CANBUS_UUID_LEN);
        out[1 + CANBUS_UUID_LEN] = (uint8_t) nodeid;      /* one byte on the wire */
        return 2 + CANBUS_UUID_LEN;
}

size_t canbus_encode_clear_katapult_nodeid(uint8_t out[8]) {
        memset(out, 0, 8);
        out[0] = CANBUS_CMD_CLEAR_KATAPULT_NODEID;
        return 1;
}

int canbus_parse_need_nodeid(const uint8_t *data, size_t len, struct canbus_node *ret) {
        /* Klipper and Katapult always send 8 bytes; a frame without the
         * app byte still names the node, so it is not refused. */
        if (!data || len < 1 + CANBUS_UUID_LEN || len > 8)
                return -EBADMSG;
        if (data[0] != CANBUS_RESP_NEED_NODEID)
                return -EBADMSG;

        memcpy(ret->uuid, data + 1, CANBUS_UUID_LEN);
        ret->app = len > 1 + CANBUS_UUID_LEN ? data[1 + CANBUS_UUID_LEN] : 0;
        return 0;
}

int canbus_nodeid_of_canid(uint32_t id) {
        if (id < CANBUS_ID_NODE_BASE || id >= CANBUS_ID_ADMIN)
                return -1;
        return (int) ((id - CANBUS_ID_NODE_BASE) / 2);
}

int canbus_pick_nodeid(const bool *used) {
        for (unsigned id = CANBUS_NODEID_DAEMON_FIRST; id <= CANBUS_NODEID_DAEMON_LAST; id++)
                if (!used || !used[id])
                        return (int) id;
        return -ENOSPC;
}

static int canbus_send_admin(int fd, const uint8_t *data, size_t len) {
        struct can_frame_data f = {
                .id = CANBUS_ID_ADMIN,
                .len = (uint8_t) len,
        };

        memcpy(f.data, data, len);
        return can_socket_send(fd, &f, CANBUS_ADMIN_SEND_TIMEOUT_MS);
}

static bool node_list_contains(const struct canbus_node *nodes, size_t n, const uint8_t uuid[CANBUS_UUID_LEN]) {
        for (size_t i = 0; i < n; i++)
                if (memcmp(nodes[i].uuid, uuid, CANBUS_UUID_LEN) == 0)
                        return true;
        return false;
}

static void mark_used(bool *used, int nodeid) {
        if (used && nodeid >= 0 && nodeid <= CANBUS_NODEID_MAX)
                used[nodeid] = true;
}

/* What one frame seen during discovery tells: an unassigned node (added to
 * the list), or a node id some host or node already uses. */
static int query_handle_frame(const struct can_frame_data *f, bool *used,
                              struct canbus_node **nodes, size_t *n_nodes) {
        struct canbus_node node;
        struct canbus_node *grown;

        switch (f->id) {
        case CANBUS_ID_ADMIN_RESP:
                if (canbus_parse_need_nodeid(f->data, f->len, &node) < 0) {
                        log_debug("CAN admin response 0x%02x of %u bytes ignored", f->len > 0 ? f->data[0] : 0,
                                  f->len);
                        return 0;
                }
                if (node_list_contains(*nodes, *n_nodes, node.uuid))
                        return 0;
                grown = reallocarray(*nodes, *n_nodes + 1, sizeof(**nodes));
                if (!grown)
                        return -ENOMEM;
                *nodes = grown;
                (*nodes)[(*n_nodes)++] = node;
                return 0;

        case CANBUS_ID_ADMIN:
                /* Another host (Klipper, Katapult's flashtool) assigning an id. */
                if (f->len >= 2 + CANBUS_UUID_LEN &&
                    (f->data[0] == CANBUS_CMD_SET_KLIPPER_NODEID || f->data[0] == CANBUS_CMD_SET_KATAPULT_NODEID))
                        mark_used(used, f->data[1 + CANBUS_UUID_LEN]);
                return 0;

        default:
                mark_used(used, canbus_nodeid_of_canid(f->id));
                return 0;
        }
}

int canbus_query(int fd, int listen_ms, bool *used, struct canbus_node **ret) {
        _cleanup_free_ struct canbus_node *nodes = NULL;
        size_t n_nodes = 0;
        uint8_t query[8];
        size_t len;
        uint64_t deadline;
        int r;

        if (fd < 0 || !ret || listen_ms < 0)
                return -EINVAL;

        len = canbus_encode_query(query);
        r = canbus_send_admin(fd, query, len);
        if (r < 0)
                return log_debug_errno(r, "Failed to send CAN query for unassigned nodes: %m");

        deadline = now_msec() + (uint64_t) listen_ms;
        for (;;) {
                struct can_frame_data f;
                uint64_t now = now_msec();

                if (now >= deadline)
                        break;

                r = can_socket_recv(fd, &f, (int) MIN(deadline - now, (uint64_t) INT32_MAX));
                if (r == -ETIMEDOUT)
                        break;
                if (r < 0)
                        return log_debug_errno(r, "Failed to receive CAN frames during discovery: %m");

                r = query_handle_frame(&f, used, &nodes, &n_nodes);
                if (r < 0)
                        return r;
        }

        log_debug("CAN query: %zu unassigned node(s) answered", n_nodes);
        *ret = TAKE_PTR(nodes);
        return (int) n_nodes;
}

int canbus_set_klipper_nodeid(int fd, const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid) {
        char uuid_string[CANBUS_UUID_STRING_LEN];
        uint8_t msg[8];
        size_t len;
        int r;

        /* The message carries the id in one byte. */
        if (fd < 0 || !uuid || nodeid > UINT8_MAX || nodeid > CANBUS_NODEID_MAX)
                return -EINVAL;

        canbus_uuid_to_string(uuid, uuid_string);
        len = canbus_encode_set_klipper_nodeid(msg, uuid, nodeid);
        r = canbus_send_admin(fd, msg, len);
        if (r < 0)
                return log_debug_errno(r, "Failed to assign CAN node id %u to %s: %m", nodeid, uuid_string);

        log_debug("Assigned CAN node id %u to %s", nodeid, uuid_string);
        return 0;
}

int canbus_request_bootloader(int fd, const uint8_t uuid[CANBUS_UUID_LEN]) {
        char uuid_string[CANBUS_UUID_STRING_LEN];
        uint8_t msg[8];
        size_t len;
        int r;

        if (fd < 0 || !uuid)
                return -EINVAL;

        canbus_uuid_to_string(uuid, uuid_string);
        len = canbus_encode_request_bootloader(msg, uuid);
        r = canbus_send_admin(fd, msg, len);
        if (r < 0)
                return log_debug_errno(r, "Failed to send the bootloader request to %s: %m", uuid_string);

        log_debug("Requested bootloader of CAN node %s", uuid_string);
        return 0;
}

int canbus_set_katapult_nodeid(int fd, const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid) {
        char uuid_string[CANBUS_UUID_STRING_LEN];
        uint8_t msg[8];
        size_t len;
        int r;

        /* The message carries the id in one byte. */
        if (fd < 0 || !uuid || nodeid > UINT8_MAX || nodeid > CANBUS_NODEID_MAX)
                return -EINVAL;

        canbus_uuid_to_string(uuid, uuid_string);
        len = canbus_encode_set_katapult_nodeid(msg, uuid, nodeid);
        r = canbus_send_admin(fd, msg, len);
        if (r < 0)
                return log_debug_errno(r, "Failed to assign Katapult node id %u to %s: %m", nodeid, uuid_string);

        log_debug("Assigned Katapult node id %u to %s", nodeid, uuid_string);
        return 0;
}

int canbus_clear_katapult_nodeids(int fd) {
        uint8_t msg[8];
        size_t len;
        int r;

        if (fd < 0)
                return -EINVAL;

        len = canbus_encode_clear_katapult_nodeid(msg);
        r = canbus_send_admin(fd, msg, len);
        if (r < 0)
                return log_debug_errno(r, "Failed to clear Katapult node ids: %m");

        log_debug("Cleared Katapult node ids");
        return 0;
}
