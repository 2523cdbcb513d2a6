/* Klipper's CAN bus administration (protocols.md §2.1/§2.2): the admin
 * messages on ids 0x3f0/0x3f1, UUIDs, and node ids.  Message encoding and
 * parsing are pure functions; canbus_query() runs the discovery exchange on
 * an open CAN socket (blocking, with a time limit, for a worker thread). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CANBUS_ID_ADMIN 0x3f0
#define CANBUS_ID_ADMIN_RESP 0x3f1
#define CANBUS_ID_NODE_BASE 0x100

#define CANBUS_CMD_QUERY_UNASSIGNED 0x00
#define CANBUS_CMD_SET_KLIPPER_NODEID 0x01
#define CANBUS_CMD_REQUEST_BOOTLOADER 0x02
#define CANBUS_CMD_SET_KATAPULT_NODEID 0x11
#define CANBUS_CMD_CLEAR_KATAPULT_NODEID 0x12
#define CANBUS_RESP_NEED_NODEID 0x20

#define CANBUS_APP_KLIPPER 0x01
#define CANBUS_APP_KATAPULT 0x11

#define CANBUS_UUID_LEN 6
#define CANBUS_UUID_STRING_LEN (CANBUS_UUID_LEN * 2 + 1)

/* Node ids whose CAN ids stay below the admin ids: 0x100 + 2·id + 1 < 0x3f0. */
#define CANBUS_NODEID_MAX 375
/* Klipper's host numbers its nodes from 4 (klippy/extras/canbus_ids.py);
 * Katapult's flashtool.py numbers from 128 + the nodes it knows, so its first
 * node gets 129 (its admin node counts).  For Klipper nodes the daemon takes ids
 * from its own range so that it never collides with either. */
#define CANBUS_NODEID_KLIPPER_FIRST 4
#define CANBUS_NODEID_DAEMON_FIRST 64
#define CANBUS_NODEID_DAEMON_LAST 127
/* The node id the daemon gives a Katapult node: the first of Katapult's range
 * (CAN ids 0x200/0x201); flashtool.py would give 129.  A node in its
 * bootloader has one flasher at a time, so either is free. */
#define CANBUS_NODEID_KATAPULT 128

/* flashtool's waits (protocols.md §5.5), for callers of the Katapult
 * functions below: after a bootloader request until the node runs Katapult,
 * and after clearing or assigning Katapult node ids. */
#define CANBUS_BOOTLOADER_ENTRY_WAIT_MS 1000
#define CANBUS_KATAPULT_NODEID_WAIT_MS 500

struct canbus_node {
        uint8_t uuid[CANBUS_UUID_LEN];
        uint8_t app;            /* CANBUS_APP_* (or whatever the node said) */
};

/* Lower-case hex, wire order ("0e0d81e4210c"). */
void canbus_uuid_to_string(const uint8_t uuid[CANBUS_UUID_LEN], char out[CANBUS_UUID_STRING_LEN]);
/* Parse 12 hex digits (either case). 0 or -EINVAL. */
int canbus_uuid_from_string(const char *s, uint8_t uuid[CANBUS_UUID_LEN]);

/* Encoders fill @out (8 bytes) and return the frame length. */
size_t canbus_encode_query(uint8_t out[8]);
size_t canbus_encode_set_klipper_nodeid(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid);
size_t canbus_encode_request_bootloader(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN]);
size_t canbus_encode_set_katapult_nodeid(uint8_t out[8], const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid);
size_t canbus_encode_clear_katapult_nodeid(uint8_t out[8]);

/* Parse a RESP_NEED_NODEID frame (id 0x3f1). 0 or -EBADMSG. */
int canbus_parse_need_nodeid(const uint8_t *data, size_t len, struct canbus_node *ret);

/* The node id that CAN id @id belongs to (either direction), or -1 when
 * @id is not a node id (admin ids, ids below 0x100). */
int canbus_nodeid_of_canid(uint32_t id);

/* Pick the first id of the daemon's range that @used (CANBUS_NODEID_MAX + 1
 * entries, or NULL for none used) does not mark; -ENOSPC when all are taken. */
int canbus_pick_nodeid(const bool *used);

/* Discovery on an open CAN socket that receives every frame: send
 * QUERY_UNASSIGNED, collect the RESP_NEED_NODEID answers for @listen_ms
 * (duplicates folded), and mark in @used (may be NULL) every node id seen
 * in traffic meanwhile, including ids other hosts assign on 0x3f0.  Returns the number of nodes (array in *ret, malloc()ed) or
 * -errno. */
int canbus_query(int fd, int listen_ms, bool *used, struct canbus_node **ret);

/* Assign @nodeid to the node with @uuid (Klipper's SET_KLIPPER_NODEID).
 * The message carries the id in one byte: -EINVAL above 255. */
int canbus_set_klipper_nodeid(int fd, const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid);

/* Ask the node with @uuid to reboot into its bootloader (Klipper's
 * REQUEST_BOOTLOADER; honoured with or without a node id).  Only sends the
 * frame: the node needs CANBUS_BOOTLOADER_ENTRY_WAIT_MS before Katapult
 * answers.  0 or -errno. */
int canbus_request_bootloader(int fd, const uint8_t uuid[CANBUS_UUID_LEN]);

/* Assign @nodeid to the Katapult node with @uuid (SET_KATAPULT_NODEID);
 * -EINVAL above 255 or CANBUS_NODEID_MAX. */
int canbus_set_katapult_nodeid(int fd, const uint8_t uuid[CANBUS_UUID_LEN], unsigned nodeid);

/* Make every Katapult node drop its node id (CLEAR_KATAPULT_NODEID). */
int canbus_clear_katapult_nodeids(int fd);
