/* test-auth-units-driver: a test-only D-Bus service that runs
 * daemon/core/auth.c and daemon/core/units.c for real, on the same sd-bus +
 * libevent loop the daemon uses (bus/bus-loop.c), without the daemon's job
 * machinery.  tests/integration/test_auth_units.py starts it on a private
 * bus next to the polkit and systemd mocks and calls it as root and as
 * other users.
 *
 * It owns io.mcuflash1.test.Driver (the test adds a bus policy allowing
 * that) and serves /io/mcuflash1/test, interface io.mcuflash1.test.Driver:
 *
 *   Check(s action) -> (is)           run the gate for the caller: result of
 *                                     auth_done_fn (1/0/-errno), auth_result_message()
 *   Gate(s interface, s member) -> (sis)
 *                                     auth_action_for(), then as Check; an
 *                                     open method gives ("", 1, "open")
 *   CheckCancel(s action, u ms) -> s  start a check, auth_query_free() it
 *                                     after @ms: "cancelled" (or "finished"
 *                                     if it was answered first)
 *   State(s unit, u timeout_ms) -> (is)   unit_get_state(): r, ActiveState
 *   Start(s unit, u timeout_ms) -> (is)   unit_start(): r, job result
 *   Stop(s unit, u timeout_ms) -> (is)    unit_stop(): r, job result
 *                                     (timeout_ms 0 = UNIT_OP_TIMEOUT_USEC,
 *                                     else unit_op_set_timeout())
 *   StopCancel(s unit, u ms) -> s     unit_stop(), unit_op_free() after @ms
 *   Callbacks() -> u                  how many auth/unit callbacks ran
 *                                     (a cancelled one must never run)
 *
 * It is not installed and is no example of how the daemon's handlers reply:
 * errors come back as numbers so that tests can check them exactly. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <event2/event.h>
#include <systemd/sd-bus.h>

#include "bus/bus-loop.h"
#include "core/auth.h"
#include "core/units.h"
#include "shared/log.h"

#define DRIVER_NAME "io.mcuflash1.test.Driver"
#define DRIVER_PATH "/io/mcuflash1/test"
#define DRIVER_INTERFACE "io.mcuflash1.test.Driver"

struct driver {
        struct event_base *base;
        sd_bus *bus;
        struct bus_loop *loop;
        unsigned callbacks;
};

/* One method call being served. */
struct pending {
        struct driver *d;
        sd_bus_message *request;
        const char *action;             /* Gate's action, static */
        struct auth_query *query;
        struct unit_op *op;
        struct event *cancel_timer;
};

static struct pending *pending_free(struct pending *p) {
        if (!p)
                return NULL;
        auth_query_free(p->query);
        unit_op_free(p->op);
        if (p->cancel_timer)
                event_free(p->cancel_timer);
        sd_bus_message_unref(p->request);
        free(p);
        return NULL;
}
DEFINE_TRIVIAL_CLEANUP_FUNC(struct pending *, pending_free);

static int pending_new(struct driver *d, sd_bus_message *request, struct pending **ret) {
        struct pending *p = calloc(1, sizeof(*p));

        if (!p)
                return -ENOMEM;
        p->d = d;
        p->request = sd_bus_message_ref(request);
        *ret = p;
        return 0;
}

/* Reply, write out what sd-bus queued (we may be in a libevent callback),
 * and forget @p. */
static void pending_reply(struct pending *p, const char *types, ...) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        struct driver *d = p->d;
        va_list ap;
        int r;

        r = sd_bus_message_new_method_return(p->request, &reply);
        if (r >= 0) {
                va_start(ap, types);
                r = sd_bus_message_appendv(reply, types, ap);
                va_end(ap);
        }
        if (r >= 0)
                r = sd_bus_send(d->bus, reply, NULL);
        if (r < 0)
                log_error_errno(r, "Cannot reply: %m");
        pending_free(p);
        (void) bus_loop_rearm(d->loop);
}

/* --- auth ------------------------------------------------------------------ */

static void on_check_done(void *userdata, int result) {
        struct pending *p = userdata;

        p->query = NULL;        /* freed by auth.c */
        p->d->callbacks++;
        if (p->action)
                pending_reply(p, "sis", p->action, result, auth_result_message(result));
        else
                pending_reply(p, "is", result, auth_result_message(result));
}

static int method_check(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_(pending_freep) struct pending *p = NULL;
        struct driver *d = userdata;
        const char *action;
        int r;

        r = sd_bus_message_read(m, "s", &action);
        if (r < 0)
                return r;
        r = pending_new(d, m, &p);
        if (r < 0)
                return r;
        r = auth_check_async(d->bus, d->base, m, action, on_check_done, p, &p->query);
        if (r < 0)
                return sd_bus_reply_method_return(m, "is", r, "auth_check_async failed");
        TAKE_PTR(p);
        return 1;
}

static int method_gate(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_(pending_freep) struct pending *p = NULL;
        struct driver *d = userdata;
        const char *interface, *member, *action;
        int r;

        r = sd_bus_message_read(m, "ss", &interface, &member);
        if (r < 0)
                return r;
        action = auth_action_for(interface, member);
        if (!action)
                return sd_bus_reply_method_return(m, "sis", "", 1, "open");
        r = pending_new(d, m, &p);
        if (r < 0)
                return r;
        p->action = action;
        r = auth_check_async(d->bus, d->base, m, action, on_check_done, p, &p->query);
        if (r < 0)
                return sd_bus_reply_method_return(m, "sis", action, r, "auth_check_async failed");
        TAKE_PTR(p);
        return 1;
}

static void on_cancel_check_done(void *userdata, int result) {
        struct pending *p = userdata;

        p->query = NULL;
        p->d->callbacks++;
        pending_reply(p, "s", "finished");
}

static void on_cancel_check_timer(evutil_socket_t fd, short what, void *userdata) {
        struct pending *p = userdata;

        p->query = auth_query_free(p->query);
        pending_reply(p, "s", "cancelled");
}

static int arm_cancel_timer(struct pending *p, uint32_t msec, event_callback_fn callback) {
        struct timeval tv = { .tv_sec = msec / 1000, .tv_usec = (suseconds_t) (msec % 1000) * 1000 };

        p->cancel_timer = evtimer_new(p->d->base, callback, p);
        if (!p->cancel_timer)
                return -ENOMEM;
        return evtimer_add(p->cancel_timer, &tv) < 0 ? -EIO : 0;
}

static int method_check_cancel(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_(pending_freep) struct pending *p = NULL;
        struct driver *d = userdata;
        const char *action;
        uint32_t msec;
        int r;

        r = sd_bus_message_read(m, "su", &action, &msec);
        if (r < 0)
                return r;
        r = pending_new(d, m, &p);
        if (r < 0)
                return r;
        r = auth_check_async(d->bus, d->base, m, action, on_cancel_check_done, p, &p->query);
        if (r < 0)
                return r;
        r = arm_cancel_timer(p, msec, on_cancel_check_timer);
        if (r < 0)
                return r;
        TAKE_PTR(p);
        return 1;
}

/* --- units ----------------------------------------------------------------- */

static void on_unit_done(void *userdata, int r, const char *s) {
        struct pending *p = userdata;

        p->op = NULL;           /* freed by units.c */
        p->d->callbacks++;
        pending_reply(p, "is", r, strempty(s));
}

static int method_unit(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_(pending_freep) struct pending *p = NULL;
        struct driver *d = userdata;
        const char *member = sd_bus_message_get_member(m);
        const char *unit;
        uint32_t msec;
        int r;

        r = sd_bus_message_read(m, "su", &unit, &msec);
        if (r < 0)
                return r;
        r = pending_new(d, m, &p);
        if (r < 0)
                return r;
        if (streq(member, "State"))
                r = unit_get_state(d->bus, d->base, unit, on_unit_done, p, &p->op);
        else if (streq(member, "Start"))
                r = unit_start(d->bus, d->base, unit, on_unit_done, p, &p->op);
        else
                r = unit_stop(d->bus, d->base, unit, on_unit_done, p, &p->op);
        if (r >= 0 && msec > 0)
                r = unit_op_set_timeout(p->op, (uint64_t) msec * 1000);
        if (r < 0)
                return sd_bus_reply_method_return(m, "is", r, "");
        TAKE_PTR(p);
        return 1;
}

static void on_cancel_unit_done(void *userdata, int r, const char *s) {
        struct pending *p = userdata;

        p->op = NULL;
        p->d->callbacks++;
        pending_reply(p, "s", "finished");
}

static void on_cancel_unit_timer(evutil_socket_t fd, short what, void *userdata) {
        struct pending *p = userdata;

        p->op = unit_op_free(p->op);
        pending_reply(p, "s", "cancelled");
}

static int method_stop_cancel(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_(pending_freep) struct pending *p = NULL;
        struct driver *d = userdata;
        const char *unit;
        uint32_t msec;
        int r;

        r = sd_bus_message_read(m, "su", &unit, &msec);
        if (r < 0)
                return r;
        r = pending_new(d, m, &p);
        if (r < 0)
                return r;
        r = unit_stop(d->bus, d->base, unit, on_cancel_unit_done, p, &p->op);
        if (r < 0)
                return r;
        r = arm_cancel_timer(p, msec, on_cancel_unit_timer);
        if (r < 0)
                return r;
        TAKE_PTR(p);
        return 1;
}

static int method_callbacks(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct driver *d = userdata;

        return sd_bus_reply_method_return(m, "u", d->callbacks);
}

static const sd_bus_vtable driver_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_METHOD("Check", "s", "is", method_check, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Gate", "ss", "sis", method_gate, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("CheckCancel", "su", "s", method_check_cancel, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("State", "su", "is", method_unit, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Start", "su", "is", method_unit, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Stop", "su", "is", method_unit, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("StopCancel", "su", "s", method_stop_cancel, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Callbacks", "", "u", method_callbacks, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END
};

static void on_signal(evutil_socket_t fd, short what, void *userdata) {
        event_base_loopbreak(userdata);
}

int main(int argc, char *argv[]) {
        struct driver d = {};
        struct event *sigterm = NULL, *sigint = NULL;
        sd_bus_slot *slot = NULL;
        int r, status = EXIT_FAILURE;

        if (argc > 1 && streq(argv[1], "-v"))
                log_set_max_level(LOG_DEBUG);
        (void) signal(SIGPIPE, SIG_IGN);

        d.base = event_base_new();
        if (!d.base) {
                log_oom();
                return EXIT_FAILURE;
        }
        r = sd_bus_open_system(&d.bus);
        if (r < 0) {
                log_error_errno(r, "Cannot connect to the system bus: %m");
                goto finish;
        }
        r = sd_bus_add_object_vtable(d.bus, &slot, DRIVER_PATH, DRIVER_INTERFACE, driver_vtable, &d);
        if (r < 0) {
                log_error_errno(r, "Cannot export %s: %m", DRIVER_PATH);
                goto finish;
        }
        r = sd_bus_request_name(d.bus, DRIVER_NAME, 0);
        if (r < 0) {
                log_error_errno(r, "Cannot own %s: %m", DRIVER_NAME);
                goto finish;
        }
        r = bus_loop_attach(d.bus, d.base, &d.loop);
        if (r < 0) {
                log_error_errno(r, "Cannot attach the bus to the loop: %m");
                goto finish;
        }
        sigterm = evsignal_new(d.base, SIGTERM, on_signal, d.base);
        sigint = evsignal_new(d.base, SIGINT, on_signal, d.base);
        if (!sigterm || !sigint || evsignal_add(sigterm, NULL) < 0 || evsignal_add(sigint, NULL) < 0) {
                log_error("Cannot watch SIGTERM and SIGINT.");
                goto finish;
        }
        log_info("Serving %s on %s.", DRIVER_PATH, DRIVER_NAME);
        if (event_base_dispatch(d.base) < 0)
                log_error("The event loop failed.");
        else
                status = EXIT_SUCCESS;

finish:
        if (sigterm)
                event_free(sigterm);
        if (sigint)
                event_free(sigint);
        bus_loop_free(d.loop);
        sd_bus_slot_unref(slot);
        sd_bus_flush_close_unref(d.bus);
        event_base_free(d.base);
        return status;
}
