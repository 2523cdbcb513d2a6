/* libFuzzer target: Klipper's CAN bus admin messages (proto/canbus.c).  The
 * input is a run of raw Linux `struct can_frame`s (16 bytes each; a short
 * tail is sent as a short packet) that arrive on the discovery socket while
 * canbus_query() listens: RESP_NEED_NODEID answers from unassigned nodes,
 * other hosts' SET_*_NODEID on 0x3f0, node traffic, error/RTR/extended frames.
 * A SOCK_SEQPACKET socket pair stands in for the CAN socket; the writer
 * shuts down after the frames, which ends the listening.  Node ids marked
 * used must all be real node ids, and the id the daemon would pick must be
 * free.  The input is also read as a uuid string. */
#include <linux/can.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "fuzz-util.h"
#include "proto/canbus.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static void check_uuid_string(const uint8_t *data, size_t size) {
        _cleanup_free_ char *s = fuzz_strndup(data, size);
        uint8_t uuid[CANBUS_UUID_LEN];
        char back[CANBUS_UUID_STRING_LEN];

        if (canbus_uuid_from_string(s, uuid) < 0)
                return;
        canbus_uuid_to_string(uuid, back);
        fuzz_check(strlen(s) == CANBUS_UUID_LEN * 2 && strcasecmp(s, back) == 0);
}

static void check_frames(const uint8_t *data, size_t size) {
        bool used[CANBUS_NODEID_MAX + 1] = {};
        _cleanup_free_ struct canbus_node *nodes = NULL;
        int sv[2], r, picked;
        size_t pos = 0;

        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
                abort();

        while (pos < size) {
                size_t n = MIN(sizeof(struct can_frame), size - pos);

                if (send(sv[1], data + pos, n, MSG_NOSIGNAL) != (ssize_t) n)
                        break;  /* socket buffer full: enough frames */
                pos += n;
        }
        if (shutdown(sv[1], SHUT_WR) < 0)
                abort();

        /* The writer is gone: the query ends with -ENODEV once it has seen
         * every frame. */
        r = canbus_query(sv[0], 10000, used, &nodes);
        fuzz_check(r == -ENODEV);

        /* The query it sent. */
        {
                struct can_frame q;

                fuzz_check(recv(sv[1], &q, sizeof(q), 0) == (ssize_t) sizeof(q));
                fuzz_check(q.can_id == CANBUS_ID_ADMIN && q.can_dlc == 1 && q.data[0] == CANBUS_CMD_QUERY_UNASSIGNED);
        }
        close(sv[0]);
        close(sv[1]);

        picked = canbus_pick_nodeid(used);
        if (picked >= 0)
                fuzz_check(picked >= CANBUS_NODEID_DAEMON_FIRST && picked <= CANBUS_NODEID_DAEMON_LAST &&
                           !used[picked]);
        else {
                fuzz_check(picked == -ENOSPC);
                for (int id = CANBUS_NODEID_DAEMON_FIRST; id <= CANBUS_NODEID_DAEMON_LAST; id++)
                        fuzz_check(used[id]);
        }
}

/* Every frame's payload on its own: the parser and the id mapping. */
static void check_parsers(const uint8_t *data, size_t size) {
        for (size_t pos = 0; pos + sizeof(struct can_frame) <= size; pos += sizeof(struct can_frame)) {
                struct can_frame f;
                struct canbus_node node;
                int nodeid;

                memcpy(&f, data + pos, sizeof(f));
                if (canbus_parse_need_nodeid(f.data, f.can_dlc, &node) == 0)
                        fuzz_check(f.can_dlc >= 1 + CANBUS_UUID_LEN && f.can_dlc <= 8 &&
                                   memcmp(node.uuid, f.data + 1, CANBUS_UUID_LEN) == 0);
                nodeid = canbus_nodeid_of_canid(f.can_id);
                if (nodeid >= 0) {
                        fuzz_check(nodeid <= CANBUS_NODEID_MAX);
                        fuzz_check(f.can_id == CANBUS_ID_NODE_BASE + 2u * (unsigned) nodeid ||
                                   f.can_id == CANBUS_ID_NODE_BASE + 2u * (unsigned) nodeid + 1);
                }
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_frames(data, size);
        check_parsers(data, size);
        check_uuid_string(data, size);
        return 0;
}
