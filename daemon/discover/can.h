/* CAN interface discovery: which CAN interfaces exist, whether they are up
 * and at which bitrate, as they appear, change and vanish at run time.  The
 * real source is rtnetlink (RTM_GETLINK dump + RTMGRP_LINK events, links of
 * kind "can" or "vcan"), read through the libevent loop; no polling.
 *
 * Test seam (the only one): when the environment variable
 * MCUFLASHD_CAN_TEST_HUB names the socket of the test CAN hub
 * (tests/sim/canhub.py), the interface list comes from that hub instead,
 * because a kernel without CAN support has no CAN links to report. */
#pragma once

#include <event2/event.h>
#include <stdbool.h>
#include <stdint.h>

#include "shared/macro.h"

#define CAN_TEST_HUB_ENV "MCUFLASHD_CAN_TEST_HUB"

struct can_iface_info {
        const char *name;
        bool up;
        uint32_t bitrate;       /* 0 when unknown */
        const char *state;      /* "error-active", "bus-off", … or "unknown" */
};

struct can_watch_callbacks {
        void (*changed)(void *userdata, const struct can_iface_info *info);
        void (*gone)(void *userdata, const char *name);
        void *userdata;
};

struct can_watch;

int can_watch_new(struct event_base *base, const struct can_watch_callbacks *cb,
                  struct can_watch **ret);
struct can_watch *can_watch_free(struct can_watch *w);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct can_watch *, can_watch_free);

/* Parse one message of the test hub's WATCH protocol ("IFACE can0 up
 * 1000000", "IFACE can0 down", "IFACE can0 gone", "SYNC").  Returns 1 for
 * changed (fills @info; info->name points into @buf, which is modified), 2
 * for gone, 0 for SYNC (end of the first snapshot), -EBADMSG otherwise.
 * Exposed for unit tests. */
int can_watch_parse_hub_message(char *buf, struct can_iface_info *info);
