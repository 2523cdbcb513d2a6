/* Implementation of bus/job.h.  Properties are read straight from struct
 * job; Cancel() asks core/job.c and says plainly when stopping is not safe
 * at this moment.  Cancelling is as privileged as starting: the caller that
 * started the job, or one polkit allows the job kind's action. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bouncer.h"
#include "bus/bus.h"
#include "bus/errors.h"
#include "bus/job.h"
#include "core/auth.h"
#include "core/daemon.h"
#include "core/job.h"
#include "shared/log.h"

#define JOB_INTERFACE "io.mcuflash1.Job"
#define JOB_PATH_PREFIX "/io/mcuflash1/job"

static int job_find(sd_bus *bus, const char *path, const char *interface, void *userdata,
                    void **found, sd_bus_error *error) {
        struct job *j = job_find_by_path(userdata, path);

        if (!j)
                return 0;
        *found = j;
        return 1;
}

static int job_enumerate(sd_bus *bus, const char *prefix, void *userdata, char ***nodes,
                         sd_bus_error *error) {
        struct daemon *d = userdata;
        size_t n = 0, i = 0;
        char **l;

        for (struct job *j = d->jobs; j; j = j->next)
                n++;
        l = calloc(n + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        for (struct job *j = d->jobs; j; j = j->next) {
                l[i] = strdup(j->object_path);
                if (!l[i]) {
                        while (i > 0)
                                free(l[--i]);
                        free(l);
                        return -ENOMEM;
                }
                i++;
        }
        *nodes = l;
        return 0;
}

/* Cancel @j now: 0, or a Busy error in @error for a job that has finished
 * or cannot stop safely at this moment. */
static int job_cancel_now(struct job *j, sd_bus_error *error) {
        int r;

        r = job_cancel(j);
        if (r == -EALREADY && job_is_finished(j))
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY, "Job %u has finished already (%s).",
                                      j->number, j->state);
        if (r == -EALREADY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY, "Job %u is done with the MCU and only "
                                      "starts Klipper again; there is nothing left to cancel.", j->number);
        if (r == -EBUSY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "Job %u cannot stop safely while %s; it stops at the next safe point.",
                                      j->number, j->phase);
        if (r == -EINPROGRESS)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "Job %u has put the new program in place and waits for it to answer; "
                                      "it cannot be cancelled now: the new program answers, or the old one "
                                      "is put back.", j->number);
        return r;
}

static int cancel_admitted(struct daemon *d, sd_bus_message *msg, sd_bus_error *error) {
        struct job *j = job_find_by_path(d, sd_bus_message_get_path(msg));
        int r;

        if (!j)
                return bus_error_setf(error, MCUFLASH_ERROR_NOT_FOUND, "Job %s is gone.",
                                      sd_bus_message_get_path(msg));
        r = job_cancel_now(j, error);
        return r < 0 ? r : sd_bus_reply_method_return(msg, NULL);
}

/* Authorize, then act: the caller that started the job may cancel it;
 * anybody else needs the action that starting such a job needs (the
 * bouncer's list says AUTH_POLICY_JOB).  Cancel has no arguments. */
static int method_cancel(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct job *j = userdata;
        const char *action;

        if (job_is_finished(j))
                return job_cancel_now(j, error);
        if (j->owner && streq_ptr(sd_bus_message_get_sender(msg), j->owner))
                return cancel_admitted(j->daemon, msg, error);
        action = auth_action_for_job(j->kind);
        if (!action)
                return bus_error_setf(error, MCUFLASH_ERROR_NOT_AUTHORIZED, "Job %u cannot be cancelled by others.",
                                      j->number);
        return bus_bouncer_admit(j->daemon, msg, action, cancel_admitted);
}

#define JOB_PROPERTY(name, sig, field) \
        SD_BUS_PROPERTY(name, sig, NULL, offsetof(struct job, field), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

static const sd_bus_vtable job_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Mcu", "o", NULL, offsetof(struct job, mcu_path), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Kind", "s", NULL, offsetof(struct job, kind), SD_BUS_VTABLE_PROPERTY_CONST),
        JOB_PROPERTY("State", "s", state),
        JOB_PROPERTY("Phase", "s", phase),
        JOB_PROPERTY("BytesDone", "t", bytes_done),
        JOB_PROPERTY("BytesTotal", "t", bytes_total),
        JOB_PROPERTY("Progress", "d", progress),
        JOB_PROPERTY("Error", "s", error),
        JOB_PROPERTY("ErrorMessage", "s", error_message),
        SD_BUS_METHOD("Cancel", "", "", method_cancel, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_NAMES("Finished", "sss", SD_BUS_PARAM(state) SD_BUS_PARAM(error)
                                 SD_BUS_PARAM(message), 0),
        SD_BUS_VTABLE_END,
};

int bus_job_install(struct daemon *d) {
        int r;

        r = sd_bus_add_fallback_vtable(d->bus, &d->job_slot, JOB_PATH_PREFIX, JOB_INTERFACE, job_vtable,
                                       job_find, d);
        if (r < 0)
                return r;
        return sd_bus_add_node_enumerator(d->bus, &d->job_enumerator_slot, JOB_PATH_PREFIX, job_enumerate, d);
}

static void warn(int r, const char *what, const char *path) {
        if (r < 0)
                log_warning_errno(r, "Cannot emit %s for %s: %m", what, path);
}

void bus_job_added(struct daemon *d, struct job *j) {
        if (!d->bus)
                return;
        warn(sd_bus_emit_object_added(d->bus, j->object_path), "InterfacesAdded", j->object_path);
        bus_kick(d);
}

void bus_job_changed(struct daemon *d, struct job *j, uint64_t mask) {
        const char *names[_JOB_PROP_MAX + 1];
        size_t n = 0;

        if (!d->bus)
                return;
        for (enum job_prop p = 0; p < _JOB_PROP_MAX; p++)
                if (mask & (UINT64_C(1) << p))
                        names[n++] = job_prop_name(p);
        names[n] = NULL;
        warn(sd_bus_emit_properties_changed_strv(d->bus, j->object_path, JOB_INTERFACE, (char **) names),
             "PropertiesChanged", j->object_path);
        bus_kick(d);
}

void bus_job_finished(struct daemon *d, struct job *j) {
        if (!d->bus)
                return;
        warn(sd_bus_emit_signal(d->bus, j->object_path, JOB_INTERFACE, "Finished", "sss", j->state, j->error,
                                j->error_message),
             "Finished", j->object_path);
        bus_kick(d);
}

void bus_job_removed(struct daemon *d, struct job *j) {
        if (!d->bus)
                return;
        warn(sd_bus_emit_object_removed(d->bus, j->object_path), "InterfacesRemoved", j->object_path);
        bus_kick(d);
}
