/* The Manager object: the sd_bus_vtable and thin handlers that call into
 * core/.  ListMcus, GetMcu (selector resolution is the registry's), Rescan;
 * McuAdded/McuRemoved are emitted by bus/mcu.c as the registry announces. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "bus/bus.h"
#include "bus/errors.h"
#include "bus/manager.h"
#include "core/daemon.h"
#include "core/job.h"
#include "shared/log.h"
#include "shared/time-util.h"
#include "build-config.h"

static int property_get_version(sd_bus *bus, const char *path, const char *interface,
                                const char *property, sd_bus_message *reply, void *userdata,
                                sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PACKAGE_VERSION);
}

static int method_list_mcus(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = sd_bus_message_new_method_return(m, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "o");
        if (r < 0)
                return r;
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                r = sd_bus_message_append(reply, "o", d->registry->mcus[i]->object_path);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int method_list_jobs(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = sd_bus_message_new_method_return(m, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "o");
        if (r < 0)
                return r;
        for (struct job *j = d->jobs; j; j = j->next) {
                r = sd_bus_message_append(reply, "o", j->object_path);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int method_get_mcu(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        const char *selector;
        struct mcu *mcu;
        int r;

        r = sd_bus_message_read(m, "s", &selector);
        if (r < 0)
                return r;
        mcu = registry_find_by_selector(d->registry, selector);
        if (!mcu)
                return bus_error_setf(error, MCUFLASH_ERROR_NOT_FOUND,
                                      "No MCU matches '%s'; 'mcuflashctl status' lists the known ones.",
                                      selector);
        return sd_bus_reply_method_return(m, "o", mcu->object_path);
}

/* Rescan is open to everybody, so it is rate-limited for everybody: at
 * most one rescan a second, and calls that come in meanwhile join the next
 * one (each caller is answered when it has run).  A rescan leaves MCUs with
 * a job alone (core/daemon.c). */
#define RESCAN_INTERVAL_USEC (1000ULL * 1000ULL)
#define RESCAN_WAITING_MAX 256

struct bus_rescans {
        struct event *timer;            /* the next rescan, when calls wait for it */
        uint64_t last_usec;             /* when the last rescan ran (CLOCK_MONOTONIC) */
        sd_bus_message *waiting[RESCAN_WAITING_MAX];
        size_t n_waiting;
};

static void rescans_answer(struct daemon *d, int r) {
        struct bus_rescans *q = d->rescans;

        for (size_t i = 0; i < q->n_waiting; i++) {
                if (r < 0)
                        (void) sd_bus_reply_method_errorf(q->waiting[i], SD_BUS_ERROR_FAILED, "Rescan failed: %s",
                                                          strerror(-r));
                else
                        (void) sd_bus_reply_method_return(q->waiting[i], NULL);
                q->waiting[i] = sd_bus_message_unref(q->waiting[i]);
        }
        q->n_waiting = 0;
        bus_kick(d);
}

/* Each waiting caller is answered once the rescan is complete, the names
 * from printer.cfg included (it is read in a worker). */
static void rescan_finished(struct daemon *d, int result, void *userdata) {
        if (d->rescans)         /* not when the bus is gone at shutdown */
                rescans_answer(d, result);
}

static void rescan_now(struct daemon *d) {
        int r;

        d->rescans->last_usec = now_usec();
        r = daemon_rescan(d, rescan_finished, NULL);
        if (r < 0)
                rescans_answer(d, r);
}

static void on_rescan_due(evutil_socket_t fd, short what, void *userdata) {
        rescan_now(userdata);
}

static int method_rescan(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        struct bus_rescans *q = d->rescans;
        uint64_t now = now_usec(), due = q->last_usec + RESCAN_INTERVAL_USEC;
        struct timeval tv;

        if (q->n_waiting >= RESCAN_WAITING_MAX)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "%d Rescan calls are waiting already; try again in a second.",
                                      RESCAN_WAITING_MAX);
        q->waiting[q->n_waiting++] = sd_bus_message_ref(m);
        if (evtimer_pending(q->timer, NULL))
                return 1;       /* joins the rescan that is due */
        if (q->last_usec == 0 || now >= due) {
                rescan_now(d);
                return 1;
        }
        due -= now;
        tv.tv_sec = (time_t) (due / 1000000);
        tv.tv_usec = (suseconds_t) (due % 1000000);
        if (evtimer_add(q->timer, &tv) < 0) {
                q->waiting[--q->n_waiting] = sd_bus_message_unref(m);
                return -ENOMEM;
        }
        return 1;
}

static const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("HostVersion", "s", NULL, offsetof(struct daemon, host_version),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("PrinterState", "s", NULL, offsetof(struct daemon, printer_state),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("AutoFlash", "b", NULL, offsetof(struct daemon, auto_flash),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_NAMES("ListMcus", "", , "ao", SD_BUS_PARAM(mcus),
                                 method_list_mcus, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("GetMcu", "s", SD_BUS_PARAM(selector), "o", SD_BUS_PARAM(mcu),
                                 method_get_mcu, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Rescan", "", "", method_rescan, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("ListJobs", "", , "ao", SD_BUS_PARAM(jobs),
                                 method_list_jobs, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_NAMES("McuAdded", "o", SD_BUS_PARAM(mcu), 0),
        SD_BUS_SIGNAL_WITH_NAMES("McuRemoved", "o", SD_BUS_PARAM(mcu), 0),
        SD_BUS_VTABLE_END,
};

int bus_manager_install(struct daemon *d) {
        int r;

        d->rescans = calloc(1, sizeof(*d->rescans));
        if (!d->rescans)
                return -ENOMEM;
        d->rescans->timer = evtimer_new(d->base, on_rescan_due, d);
        if (!d->rescans->timer)
                return -ENOMEM;

        r = sd_bus_add_object_vtable(d->bus, &d->manager_slot, MCUFLASH_MANAGER_PATH,
                                     "io.mcuflash1.Manager", manager_vtable, d);
        if (r < 0)
                return r;
        return sd_bus_add_object_manager(d->bus, &d->object_manager_slot, MCUFLASH_MANAGER_PATH);
}

void bus_manager_uninstall(struct daemon *d) {
        struct bus_rescans *q = d->rescans;

        if (!q)
                return;
        for (size_t i = 0; i < q->n_waiting; i++) {
                (void) sd_bus_reply_method_errorf(q->waiting[i], SD_BUS_ERROR_FAILED, "mcuflashd is stopping.");
                sd_bus_message_unref(q->waiting[i]);
        }
        if (q->timer)
                event_free(q->timer);
        free(q);
        d->rescans = NULL;
}

void bus_manager_emit_changed(struct daemon *d, const char *property) {
        int r;

        if (!d->bus)
                return;
        r = sd_bus_emit_properties_changed(d->bus, MCUFLASH_MANAGER_PATH, "io.mcuflash1.Manager",
                                           property, NULL);
        if (r < 0)
                log_warning_errno(r, "Cannot announce the change of %s: %m", property);
        bus_kick(d);
}
