/* Implementation of can.h.  Two sources behind one set of callbacks:
 * rtnetlink (production) and the test hub (see can.h).  Interface names
 * seen are remembered so that a link that disappears is reported once. */
#include <errno.h>
#include <linux/can/netlink.h>
#include <linux/if.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "discover/can.h"
#include "shared/log.h"
#include "shared/strutil.h"
#include "build-config.h"

#if HAVE_LIBSOCKETCAN
#include <libsocketcan.h>
#endif

struct can_watch {
        int fd;
        bool test_hub;
        struct event *event;
        struct can_watch_callbacks cb;
        char **known;           /* names of the CAN links reported so far */
};

static void can_watch_forget(struct can_watch *w, const char *name) {
        size_t n = strv_length(w->known);

        for (size_t i = 0; i < n; i++)
                if (streq(w->known[i], name)) {
                        free(w->known[i]);
                        w->known[i] = w->known[n - 1];
                        w->known[n - 1] = NULL;
                        return;
                }
}

static void can_watch_report(struct can_watch *w, const struct can_iface_info *info) {
        if (!strv_contains(w->known, info->name) && strv_extend(&w->known, info->name) < 0) {
                log_oom();
                return;
        }
        w->cb.changed(w->cb.userdata, info);
}

static void can_watch_report_gone(struct can_watch *w, const char *name) {
        if (!strv_contains(w->known, name))
                return;
        can_watch_forget(w, name);
        w->cb.gone(w->cb.userdata, name);
}

/* ---- test hub ---------------------------------------------------------- */

int can_watch_parse_hub_message(char *buf, struct can_iface_info *info) {
        char *save = NULL, *word, *name, *what, *rate;

        word = strtok_r(buf, " \n", &save);
        if (word && streq(word, "SYNC"))
                return 0;       /* end of the first snapshot: nothing to do */
        if (!word || !streq(word, "IFACE"))
                return -EBADMSG;
        name = strtok_r(NULL, " \n", &save);
        what = strtok_r(NULL, " \n", &save);
        if (!name || !what || strlen(name) >= IFNAMSIZ)
                return -EBADMSG;
        *info = (struct can_iface_info) { .name = name, .state = "unknown" };
        if (streq(what, "gone"))
                return 2;
        if (streq(what, "down"))
                return 1;
        if (!streq(what, "up"))
                return -EBADMSG;
        info->up = true;
        rate = strtok_r(NULL, " \n", &save);
        if (rate) {
                char *end;
                unsigned long v = strtoul(rate, &end, 10);

                if (*end || v > UINT32_MAX)
                        return -EBADMSG;
                info->bitrate = (uint32_t) v;
        }
        info->state = "error-active";
        return 1;
}

static void on_hub_message(evutil_socket_t fd, short what, void *userdata) {
        struct can_watch *w = userdata;
        char buf[256];
        ssize_t n;

        while ((n = recv(fd, buf, sizeof(buf) - 1, 0)) > 0) {
                struct can_iface_info info;
                int r;

                buf[n] = 0;
                r = can_watch_parse_hub_message(buf, &info);
                if (r == 1)
                        can_watch_report(w, &info);
                else if (r == 2)
                        can_watch_report_gone(w, info.name);
                else if (r < 0)
                        log_warning("CAN test hub sent something unexpected; ignored.");
        }
}

static int can_watch_connect_hub(struct can_watch *w, const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        w->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (w->fd < 0)
                return -errno;
        /* Autobind, so that the hub can answer us. */
        if (bind(w->fd, (struct sockaddr *) &sa, sizeof(sa_family_t)) < 0)
                return -errno;
        if (connect(w->fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -errno;
        if (send(w->fd, "WATCH", 5, 0) < 0)
                return -errno;
        w->test_hub = true;
        log_notice("Taking CAN interfaces from the test hub at %s (%s is set).", path, CAN_TEST_HUB_ENV);
        return 0;
}

/* ---- rtnetlink --------------------------------------------------------- */

static const char *can_state_name(uint32_t state) {
        static const char *const names[] = {
                [CAN_STATE_ERROR_ACTIVE] = "error-active",
                [CAN_STATE_ERROR_WARNING] = "error-warning",
                [CAN_STATE_ERROR_PASSIVE] = "error-passive",
                [CAN_STATE_BUS_OFF] = "bus-off",
                [CAN_STATE_STOPPED] = "stopped",
                [CAN_STATE_SLEEPING] = "sleeping",
        };

        return state < ELEMENTSOF(names) && names[state] ? names[state] : "unknown";
}

/* Find IFLA_INFO_KIND and, inside IFLA_INFO_DATA, the bitrate and state. */
static void parse_linkinfo(struct rtattr *linkinfo, const char **kind, uint32_t *bitrate,
                           uint32_t *state, bool *have_state) {
        int len = RTA_PAYLOAD(linkinfo);

        for (struct rtattr *a = RTA_DATA(linkinfo); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                if (a->rta_type == IFLA_INFO_KIND)
                        *kind = RTA_DATA(a);
                else if (a->rta_type == IFLA_INFO_DATA) {
                        int dlen = RTA_PAYLOAD(a);

                        for (struct rtattr *b = RTA_DATA(a); RTA_OK(b, dlen); b = RTA_NEXT(b, dlen)) {
                                if (b->rta_type == IFLA_CAN_BITTIMING &&
                                    RTA_PAYLOAD(b) >= sizeof(struct can_bittiming))
                                        *bitrate = ((struct can_bittiming *) RTA_DATA(b))->bitrate;
                                else if (b->rta_type == IFLA_CAN_STATE && RTA_PAYLOAD(b) >= sizeof(uint32_t)) {
                                        *state = *(uint32_t *) RTA_DATA(b);
                                        *have_state = true;
                                }
                        }
                }
        }
}

static void handle_link(struct can_watch *w, struct nlmsghdr *h) {
        struct ifinfomsg *ifi = NLMSG_DATA(h);
        int len = (int) h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifi));
        const char *name = NULL, *kind = NULL;
        uint32_t bitrate = 0, state = 0;
        bool have_state = false;
        struct can_iface_info info;

        if (len < 0)
                return;
        for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                if (a->rta_type == IFLA_IFNAME)
                        name = RTA_DATA(a);
                else if (a->rta_type == IFLA_LINKINFO)
                        parse_linkinfo(a, &kind, &bitrate, &state, &have_state);
        }
        if (!name)
                return;
        if (h->nlmsg_type == RTM_DELLINK) {
                can_watch_report_gone(w, name);
                return;
        }
        if (!kind || (!streq(kind, "can") && !streq(kind, "vcan"))) {
                /* Renamed or changed into something else: no longer ours. */
                can_watch_report_gone(w, name);
                return;
        }

#if HAVE_LIBSOCKETCAN
        /* libsocketcan knows the bitrate and state of real CAN controllers
         * better than the attributes of a link event may carry them. */
        if (streq(kind, "can")) {
                struct can_bittiming bt;
                int s;

                if (can_get_bittiming(name, &bt) == 0)
                        bitrate = bt.bitrate;
                if (can_get_state(name, &s) == 0) {
                        state = (uint32_t) s;
                        have_state = true;
                }
        }
#endif

        info = (struct can_iface_info) {
                .name = name,
                .up = (ifi->ifi_flags & IFF_UP) != 0,
                .bitrate = bitrate,
                .state = have_state ? can_state_name(state) : "unknown",
        };
        can_watch_report(w, &info);
}

static int netlink_request_dump(struct can_watch *w) {
        struct {
                struct nlmsghdr h;
                struct ifinfomsg ifi;
        } req = {
                .h.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg)),
                .h.nlmsg_type = RTM_GETLINK,
                .h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP,
                .h.nlmsg_seq = 1,
                .ifi.ifi_family = AF_UNSPEC,
        };

        return send(w->fd, &req, req.h.nlmsg_len, 0) < 0 ? -errno : 0;
}

static void on_netlink(evutil_socket_t fd, short what, void *userdata) {
        struct can_watch *w = userdata;
        char buf[16384] __attribute__((aligned(NLMSG_ALIGNTO)));
        ssize_t n;

        for (;;) {
                n = recv(fd, buf, sizeof(buf), 0);
                if (n < 0) {
                        if (errno == ENOBUFS) {
                                /* Events were lost: ask for the whole picture again. */
                                log_debug("rtnetlink overrun; dumping links again.");
                                (void) netlink_request_dump(w);
                                continue;
                        }
                        return;
                }
                if (n == 0)
                        return;
                for (struct nlmsghdr *h = (struct nlmsghdr *) buf; NLMSG_OK(h, (size_t) n);
                     h = NLMSG_NEXT(h, n)) {
                        if (h->nlmsg_type == RTM_NEWLINK || h->nlmsg_type == RTM_DELLINK)
                                handle_link(w, h);
                }
        }
}

static int can_watch_connect_netlink(struct can_watch *w) {
        struct sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = RTMGRP_LINK };

        w->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_ROUTE);
        if (w->fd < 0)
                return -errno;
        if (bind(w->fd, (struct sockaddr *) &sa, sizeof(sa)) < 0)
                return -errno;
        return netlink_request_dump(w);
}

/* ---- common ------------------------------------------------------------ */

int can_watch_new(struct event_base *base, const struct can_watch_callbacks *cb,
                  struct can_watch **ret) {
        _cleanup_(can_watch_freep) struct can_watch *w = NULL;
        const char *hub = getenv(CAN_TEST_HUB_ENV);
        int r;

        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->fd = -1;
        w->cb = *cb;
        if (!isempty(hub))
                r = can_watch_connect_hub(w, hub);
        else
                r = can_watch_connect_netlink(w);
        if (r < 0)
                return log_error_errno(r, "Cannot watch CAN interfaces: %m");
        w->event = event_new(base, w->fd, EV_READ | EV_PERSIST,
                             w->test_hub ? on_hub_message : on_netlink, w);
        if (!w->event || event_add(w->event, NULL) < 0)
                return -ENOMEM;
        *ret = TAKE_PTR(w);
        return 0;
}

struct can_watch *can_watch_free(struct can_watch *w) {
        if (!w)
                return NULL;
        if (w->event)
                event_free(w->event);
        safe_close(w->fd);
        strv_free(w->known);
        free(w);
        return NULL;
}
