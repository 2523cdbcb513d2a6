/* Implementation of bus-loop.h, following the pattern testing.md §2 verified:
 * process until sd_bus_process() returns 0, then re-arm from
 * sd_bus_get_events()/sd_bus_get_timeout() (an absolute CLOCK_MONOTONIC
 * time). */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <time.h>

#include "bus/bus-loop.h"
#include "shared/log.h"

struct bus_loop {
        sd_bus *bus;
        struct event_base *base;
        struct event *event;
        short armed_what;
};

static void on_bus_event(evutil_socket_t fd, short what, void *userdata) {
        struct bus_loop *l = userdata;
        int r;

        do {
                r = sd_bus_process(l->bus, NULL);
        } while (r > 0);
        if (r < 0) {
                log_error_errno(r, "D-Bus connection failed: %m; exiting.");
                event_base_loopbreak(l->base);
                return;
        }
        (void) bus_loop_rearm(l);
}

int bus_loop_rearm(struct bus_loop *l) {
        struct timeval tv, *tvp = NULL;
        uint64_t until;
        short what;
        int events;

        events = sd_bus_get_events(l->bus);
        if (events < 0)
                return events;
        what = (short) (((events & POLLIN) ? EV_READ : 0) | ((events & POLLOUT) ? EV_WRITE : 0));

        if (sd_bus_get_timeout(l->bus, &until) >= 0 && until != UINT64_MAX) {
                struct timespec ts;
                uint64_t now, delta;

                clock_gettime(CLOCK_MONOTONIC, &ts);
                now = (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
                delta = until > now ? until - now : 0;
                tv.tv_sec = (time_t) (delta / 1000000);
                tv.tv_usec = (suseconds_t) (delta % 1000000);
                tvp = &tv;
        }

        if (!l->event || what != l->armed_what) {
                if (l->event)
                        event_free(l->event);
                l->event = event_new(l->base, sd_bus_get_fd(l->bus), what, on_bus_event, l);
                if (!l->event)
                        return -ENOMEM;
                l->armed_what = what;
        } else
                event_del(l->event);
        if (event_add(l->event, tvp) < 0)
                return -EIO;
        return 0;
}

int bus_loop_attach(sd_bus *bus, struct event_base *base, struct bus_loop **ret) {
        _cleanup_(bus_loop_freep) struct bus_loop *l = NULL;
        int r;

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->bus = sd_bus_ref(bus);
        l->base = base;
        l->armed_what = -1;
        r = bus_loop_rearm(l);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(l);
        return 0;
}

struct bus_loop *bus_loop_free(struct bus_loop *l) {
        if (!l)
                return NULL;
        if (l->event)
                event_free(l->event);
        sd_bus_unref(l->bus);
        free(l);
        return NULL;
}
