/* Implementation of job.h.  A job's life:
 *
 *   queued → running (preparing) → [stopping-klipper] → ops->run() …
 *          → job_finish() → [starting-klipper] → succeeded|failed|cancelled
 *          → kept JobRetentionSec for late readers → removed.
 *
 * Every state or phase change goes through one setter that marks the
 * changed properties and announces them, and logs. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "bus/job.h"
#include "core/config.h"
#include "core/daemon-internal.h"
#include "core/job.h"
#include "core/units.h"
#include "shared/log.h"
#include "shared/strutil.h"

#define JOB_OBJECT_PATH_PREFIX "/io/mcuflash1/job"

static const char *const kind_names[_JOB_KIND_MAX] = {
        [JOB_KIND_FLASH] = "flash",
        [JOB_KIND_REBOOT] = "reboot",
        [JOB_KIND_UPDATE_ALL] = "update-all",
};

static const char *const state_names[_JOB_STATE_MAX] = {
        [JOB_STATE_QUEUED] = "queued",
        [JOB_STATE_RUNNING] = "running",
        [JOB_STATE_SUCCEEDED] = "succeeded",
        [JOB_STATE_FAILED] = "failed",
        [JOB_STATE_CANCELLED] = "cancelled",
};

static const char *const phase_names[_JOB_PHASE_MAX] = {
        [JOB_PHASE_PREPARING] = "preparing",
        [JOB_PHASE_STOPPING_KLIPPER] = "stopping-klipper",
        [JOB_PHASE_ENTERING_BOOTLOADER] = "entering-bootloader",
        [JOB_PHASE_ERASING] = "erasing",
        [JOB_PHASE_WRITING] = "writing",
        [JOB_PHASE_VERIFYING] = "verifying",
        [JOB_PHASE_REBOOTING] = "rebooting",
        [JOB_PHASE_STARTING_KLIPPER] = "starting-klipper",
        [JOB_PHASE_DONE] = "done",
};

static const char *const prop_names[_JOB_PROP_MAX] = {
        [JOB_PROP_STATE] = "State",
        [JOB_PROP_PHASE] = "Phase",
        [JOB_PROP_BYTES_DONE] = "BytesDone",
        [JOB_PROP_BYTES_TOTAL] = "BytesTotal",
        [JOB_PROP_PROGRESS] = "Progress",
        [JOB_PROP_ERROR] = "Error",
        [JOB_PROP_ERROR_MESSAGE] = "ErrorMessage",
};

const char *job_kind_to_string(enum job_kind k) {
        return k < _JOB_KIND_MAX ? kind_names[k] : NULL;
}

const char *job_state_to_string(enum job_state s) {
        return s < _JOB_STATE_MAX ? state_names[s] : NULL;
}

const char *job_phase_to_string(enum job_phase p) {
        return p < _JOB_PHASE_MAX ? phase_names[p] : NULL;
}

const char *job_prop_name(enum job_prop p) {
        return p < _JOB_PROP_MAX ? prop_names[p] : NULL;
}

static void job_commit(struct job *j) {
        uint64_t mask = j->changed;

        if (!mask)
                return;
        j->changed = 0;
        bus_job_changed(j->daemon, j, mask);
}

static void job_mark(struct job *j, enum job_prop p) {
        j->changed |= UINT64_C(1) << p;
}

static void job_set_state(struct job *j, enum job_state s) {
        if (j->state_id == s)
                return;
        j->state_id = s;
        j->state = job_state_to_string(s);
        job_mark(j, JOB_PROP_STATE);
        log_info("job %u (%s %s): %s", j->number, j->kind, j->mcu_id, j->state);
        job_commit(j);
}

void job_set_phase(struct job *j, enum job_phase p) {
        if (j->phase_id == p)
                return;
        j->phase_id = p;
        j->phase = job_phase_to_string(p);
        job_mark(j, JOB_PROP_PHASE);
        log_info("job %u (%s %s): %s", j->number, j->kind, j->mcu_id, j->phase);
        job_commit(j);
}

void job_set_progress(struct job *j, uint64_t done, uint64_t total) {
        double progress = total ? (double) done / (double) total : 0.0;

        if (j->bytes_done != done) {
                j->bytes_done = done;
                job_mark(j, JOB_PROP_BYTES_DONE);
        }
        if (j->bytes_total != total) {
                j->bytes_total = total;
                job_mark(j, JOB_PROP_BYTES_TOTAL);
        }
        if (progress > 1.0)
                progress = 1.0;
        if (j->progress != progress) {
                j->progress = progress;
                job_mark(j, JOB_PROP_PROGRESS);
        }
        job_commit(j);
}

void job_set_fraction(struct job *j, double progress) {
        if (progress > 1.0)
                progress = 1.0;
        if (j->progress == progress)
                return;
        j->progress = progress;
        job_mark(j, JOB_PROP_PROGRESS);
        job_commit(j);
}

struct mcu *job_mcu(struct job *j) {
        return registry_find_by_id(j->daemon->registry, j->mcu_id);
}

bool job_is_finished(const struct job *j) {
        return j->state_id == JOB_STATE_SUCCEEDED || j->state_id == JOB_STATE_FAILED ||
               j->state_id == JOB_STATE_CANCELLED;
}

struct job *job_find_by_path(struct daemon *d, const char *path) {
        for (struct job *j = d->jobs; j; j = j->next)
                if (streq(j->object_path, path))
                        return j;
        return NULL;
}

/* ---- timers ------------------------------------------------------------ */

struct job_timeout {
        struct job *job;
        void (*on_timeout)(struct job *j);
};

void job_disarm_timeout(struct job *j) {
        if (j->timer) {
                free(event_get_callback_arg(j->timer));
                event_free(j->timer);
                j->timer = NULL;
        }
}

static void on_job_timer(evutil_socket_t fd, short what, void *userdata) {
        struct job_timeout *t = userdata;
        struct job *j = t->job;
        void (*cb)(struct job *) = t->on_timeout;

        job_disarm_timeout(j);
        cb(j);
}

int job_arm_timeout(struct job *j, uint64_t usec, void (*on_timeout)(struct job *j)) {
        struct timeval tv = { .tv_sec = (time_t) (usec / 1000000), .tv_usec = (suseconds_t) (usec % 1000000) };
        struct job_timeout *t;

        job_disarm_timeout(j);
        t = malloc(sizeof(*t));
        if (!t)
                return -ENOMEM;
        *t = (struct job_timeout) { .job = j, .on_timeout = on_timeout };
        j->timer = evtimer_new(j->daemon->base, on_job_timer, t);
        if (!j->timer || evtimer_add(j->timer, &tv) < 0) {
                free(t);
                if (j->timer)
                        event_free(j->timer);
                j->timer = NULL;
                return -ENOMEM;
        }
        return 0;
}

/* ---- lifetime ---------------------------------------------------------- */

static void job_free(struct job *j) {
        job_disarm_timeout(j);
        unit_op_free(j->unit_op);
        if (j->ops && j->ops->free)
                j->ops->free(j);
        free(j->object_path);
        free(j->mcu_path);
        free(j->mcu_id);
        free(j->error);
        free(j->error_message);
        free(j->owner);
        free(j);
}

static void job_unlink(struct daemon *d, struct job *j) {
        for (struct job **i = &d->jobs; *i; i = &(*i)->next)
                if (*i == j) {
                        *i = j->next;
                        return;
                }
}

/* Gone from the list and the bus; freed now, or when its last worker
 * task has come back (that task's result then goes nowhere). */
static void job_release(struct job *j) {
        j->released = true;
        if (j->n_workers == 0)
                job_free(j);
}

static void job_expire(struct job *j) {
        struct daemon *d = j->daemon;

        log_debug("job %u expired", j->number);
        bus_job_removed(d, j);
        job_unlink(d, j);
        job_release(j);
}

void jobs_free_all(struct daemon *d) {
        while (d->jobs) {
                struct job *j = d->jobs;

                d->jobs = j->next;
                job_release(j);
        }
}

/* A finished job keeps only its result (state, error, message, numbers)
 * for late readers: the image, its memfd, buffers, fds and timers of its
 * work go at once. */
static void job_drop_work(struct job *j) {
        j->unit_op = unit_op_free(j->unit_op);
        if (j->n_workers > 0)
                return;         /* when the last worker task is back (job_task_done) */
        if (j->data && j->ops && j->ops->free)
                j->ops->free(j);
        j->data = NULL;
}

/* ---- worker tasks ------------------------------------------------------ */

struct job_task {
        struct job *job;
        worker_run_fn run;
        worker_done_fn done;
};

static int job_task_run(void *userdata) {
        struct job_task *t = userdata;

        return t->run(t->job);
}

static void job_task_done(void *userdata, int result) {
        struct job_task *t = userdata;
        struct job *j = t->job;
        worker_done_fn done = t->done;

        free(t);
        j->n_workers--;
        if (j->released) {
                log_debug("job %u: a worker came back after the job was gone (%d); dropped.", j->number, result);
                if (j->n_workers == 0)
                        job_free(j);
                return;
        }
        done(j, result);
        /* Concluded while this task was out (job_conclude() left the work
         * to the last task): drop it now.  Not merely finished: a finished
         * job may still be starting Klipper again through its unit_op. */
        if (j->n_workers == 0 && j->phase_id == JOB_PHASE_DONE)
                job_drop_work(j);
}

int job_worker_start(struct job *j, worker_run_fn run, worker_done_fn done) {
        struct job_task *t;
        int r;

        t = malloc(sizeof(*t));
        if (!t)
                return -ENOMEM;
        *t = (struct job_task) { .job = j, .run = run, .done = done };
        r = worker_start_cancellable(j->daemon->workers, job_task_run, job_task_done, t, &j->cancel_requested);
        if (r < 0) {
                free(t);
                return r;
        }
        j->n_workers++;
        return 0;
}

/* When the daemon stops: one line per job saying where its MCU is. */
static void job_log_where_left(struct job *j, struct mcu *m) {
        const char *name = m && !isempty(m->name) ? m->name : j->mcu_id;

        if (!m)
                log_notice("MCU %s is gone (job %u %s).", name, j->number, j->state);
        else if (m->state_id == MCU_STATE_BOOTLOADER)
                log_notice("MCU %s left in its bootloader (%s): flash again with 'mcuflashctl flash %s FILE', "
                           "or 'mcuflashctl reboot %s' starts what is in its flash (job %u %s).",
                           name, m->bootloader, name, name, j->number, j->state);
        else if (m->state_id == MCU_STATE_APPLICATION)
                log_notice("MCU %s back in its application (%s%s%s; job %u %s).", name, m->firmware,
                           isempty(m->firmware_version) ? "" : " ", strempty(m->firmware_version), j->number,
                           j->state);
        else
                log_notice("MCU %s left in state %s%s%s (job %u %s).", name, m->state,
                           isempty(m->state_reason) ? "" : ": ", strempty(m->state_reason), j->number, j->state);
}

/* The job is over for D-Bus: final state, MCU free, Finished, retention. */
static void job_conclude(struct job *j, enum job_state state) {
        struct daemon *d = j->daemon;
        struct mcu *m = job_mcu(j);

        job_set_phase(j, JOB_PHASE_DONE);
        job_set_state(j, state);
        if (m && streq(m->job, j->object_path)) {
                (void) mcu_set_string(m, MCU_PROP_JOB, "/");
                registry_commit(d->registry, m);
        }
        bus_job_finished(d, j);
        job_drop_work(j);
        if (job_arm_timeout(j, d->config->job_retention_usec, job_expire) < 0)
                log_oom();
        if (d->stopping) {
                job_log_where_left(j, m);
                daemon_stop_progress(d);
        }
}

static void on_klipper_started(void *userdata, int result, const char *job_result) {
        struct job *j = userdata;

        j->unit_op = NULL;
        if (result < 0)
                log_warning_errno(result, "Starting %s again after job %u failed: %m",
                                  j->daemon->config->klipper_service, j->number);
        else
                log_info("Started %s again (%s).", j->daemon->config->klipper_service, strempty(job_result));
        job_conclude(j, j->state_id == JOB_STATE_RUNNING ? JOB_STATE_SUCCEEDED : j->state_id);
}

void job_finish(struct job *j, enum job_state state, enum mcuflash_error error, const char *fmt, ...) {
        int r;

        job_disarm_timeout(j);
        if (state != JOB_STATE_SUCCEEDED) {
                _cleanup_free_ char *message = NULL;
                va_list ap;

                va_start(ap, fmt);
                if (vasprintf(&message, fmt, ap) < 0)
                        message = NULL;
                va_end(ap);
                if (message && j->shutting_down && state == JOB_STATE_CANCELLED) {
                        char *stopped = NULL;

                        if (asprintf(&stopped, "mcuflashd is stopping: %s", message) >= 0) {
                                free(message);
                                message = stopped;
                        }
                }
                (void) free_and_strdup(&j->error, mcuflash_error_name(error));
                /* May quote outside text (a dictionary, a bootloader's reply). */
                (void) free_and_strdup_utf8(&j->error_message, message ?: "");
                job_mark(j, JOB_PROP_ERROR);
                job_mark(j, JOB_PROP_ERROR_MESSAGE);
                log_warning("job %u (%s %s) %s: %s", j->number, j->kind, j->mcu_id,
                            job_state_to_string(state), strempty(message));
                /* The state goes out with the error, before Klipper restarts. */
                job_set_state(j, state);
        }

        if (j->restart_klipper) {
                j->restart_klipper = false;
                job_set_phase(j, JOB_PHASE_STARTING_KLIPPER);
                r = unit_start(j->daemon->bus, j->daemon->base, j->daemon->config->klipper_service,
                               on_klipper_started, j, &j->unit_op);
                if (r >= 0)
                        return;
                log_warning_errno(r, "Cannot start %s again: %m", j->daemon->config->klipper_service);
        }
        job_conclude(j, state);
}

int job_cancel(struct job *j) {
        int r;

        if (job_is_finished(j) || j->phase_id == JOB_PHASE_STARTING_KLIPPER)
                return -EALREADY;
        j->cancel_requested = true;
        if (j->phase_id == JOB_PHASE_STOPPING_KLIPPER || j->phase_id == JOB_PHASE_PREPARING) {
                /* Nothing has been sent to the MCU yet.  systemd carries
                 * out a stop it has been asked for even when nobody waits
                 * for it: Klipper is started again. */
                if (j->phase_id == JOB_PHASE_STOPPING_KLIPPER && j->unit_op)
                        j->restart_klipper = true;
                j->unit_op = unit_op_free(j->unit_op);
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED,
                           "Cancelled before anything was sent to the MCU.");
                return 0;
        }
        r = j->ops->cancel ? j->ops->cancel(j) : -EBUSY;
        if (r == -EINPROGRESS)
                j->cancel_requested = false;    /* it will not stop */
        return r;
}

void job_shutdown(struct job *j) {
        int r;

        if (j->phase_id == JOB_PHASE_DONE || j->shutting_down)
                return;
        j->shutting_down = true;
        if (j->phase_id == JOB_PHASE_STARTING_KLIPPER)
                return;         /* only Klipper is being started again: wait for that */
        if (job_is_finished(j))
                return;
        r = job_cancel(j);
        if (r == -EBUSY)
                log_info("job %u (%s %s): stopping at its next safe point.", j->number, j->kind, j->mcu_id);
        else if (r == -EINPROGRESS)
                log_info("job %u (%s %s): past its last safe point; waiting for it to end.", j->number, j->kind,
                         j->mcu_id);
        else if (r < 0 && r != -EALREADY)
                log_warning_errno(r, "job %u (%s %s): cannot stop it: %m", j->number, j->kind, j->mcu_id);
}

bool job_is_active(const struct job *j) {
        return j->phase_id != JOB_PHASE_DONE;
}

void job_start_klipper_now(struct job *j) {
        struct daemon *d = j->daemon;

        if (!j->restart_klipper && !(j->phase_id == JOB_PHASE_STARTING_KLIPPER && j->unit_op))
                return;
        j->restart_klipper = false;
        j->unit_op = unit_op_free(j->unit_op);
        unit_start_detached(d->bus, d->config->klipper_service);
}

/* Start the job's own work, unless it was cancelled meanwhile. */
static void job_run_ops_now(struct job *j) {
        j->waiting_for_link = false;
        if (j->cancel_requested) {
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED,
                           "Cancelled before anything was sent to the MCU.");
                return;
        }
        j->ops->run(j);
}

/* The identify did not let go in time: start anyway; the job's step says
 * what it finds. */
static void on_link_wait_timeout(struct job *j) {
        log_warning("job %u: the identify of %s did not end in time; starting anyway.", j->number, j->mcu_id);
        job_run_ops_now(j);
}

static void job_run_ops(struct job *j) {
        struct mcu *m = job_mcu(j);

        /* An identify that began before the job holds the port for a moment
         * more: the job's first step waits for it (jobs_link_released()),
         * instead of finding the port taken. */
        if (!j->cancel_requested && m && m->identifying && m->transport_id != MCU_TRANSPORT_CAN) {
                log_debug("job %u waits for the identify of %s in progress.", j->number, m->id);
                j->waiting_for_link = true;
                if (job_arm_timeout(j, j->daemon->config->identify_timeout_usec + 2000000ULL,
                                    on_link_wait_timeout) < 0)
                        job_run_ops_now(j);
                return;
        }
        job_run_ops_now(j);
}

void jobs_link_released(struct daemon *d, struct mcu *m) {
        for (struct job *j = d->jobs; j; j = j->next)
                if (j->waiting_for_link && !job_is_finished(j) && streq(j->mcu_id, m->id)) {
                        job_disarm_timeout(j);
                        job_run_ops(j);
                        return;
                }
}

static void on_klipper_stopped(void *userdata, int result, const char *job_result) {
        struct job *j = userdata;

        j->unit_op = NULL;
        if (result < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_BUSY,
                           "Klipper holds this MCU and stopping %s failed (%s); nothing was sent to the MCU.",
                           j->daemon->config->klipper_service, strerror(-result));
                return;
        }
        j->restart_klipper = true;
        log_info("Stopped %s for job %u.", j->daemon->config->klipper_service, j->number);
        job_run_ops(j);
}

int job_start(struct daemon *d, struct mcu *m, enum job_kind kind, const struct job_ops *ops,
              void *data, struct job **ret) {
        struct job *j;
        bool held;
        int r;

        if (d->stopping)
                return -ESHUTDOWN;
        if (!streq(m->job, "/"))
                return -EBUSY;
        j = calloc(1, sizeof(*j));
        if (!j)
                return -ENOMEM;
        j->daemon = d;
        j->number = ++d->n_jobs_started;
        j->kind_id = kind;
        j->kind = job_kind_to_string(kind);
        j->state_id = JOB_STATE_QUEUED;
        j->state = job_state_to_string(j->state_id);
        j->phase_id = JOB_PHASE_PREPARING;
        j->phase = job_phase_to_string(j->phase_id);
        if (asprintf(&j->object_path, JOB_OBJECT_PATH_PREFIX "/%u", j->number) < 0) {
                j->object_path = NULL;
                job_free(j);
                return -ENOMEM;
        }
        j->mcu_path = strdup(m->object_path);
        j->mcu_id = strdup(m->id);
        j->error = strdup("");
        j->error_message = strdup("");
        if (!j->mcu_path || !j->mcu_id || !j->error || !j->error_message) {
                job_free(j);
                return -ENOMEM;
        }
        /* Only now: on failure above, @data stays the caller's. */
        j->ops = ops;
        j->data = data;

        /* Before the MCU is marked as the job's: then it is no longer
         * Klipper's (daemon_mcu_held_by_klipper()). */
        held = daemon_mcu_held_by_klipper(d, m);
        j->next = d->jobs;
        d->jobs = j;
        bus_job_added(d, j);
        (void) mcu_set_string(m, MCU_PROP_JOB, j->object_path);
        registry_commit(d->registry, m);

        job_set_state(j, JOB_STATE_RUNNING);
        if (held) {
                job_set_phase(j, JOB_PHASE_STOPPING_KLIPPER);
                r = unit_stop(d->bus, d->base, d->config->klipper_service, on_klipper_stopped, j, &j->unit_op);
                if (r < 0)
                        on_klipper_stopped(j, r, NULL);
        } else
                job_run_ops(j);
        *ret = j;
        return 0;
}

void jobs_mcu_changed(struct daemon *d, struct mcu *m) {
        for (struct job *j = d->jobs; j; j = j->next)
                if (!job_is_finished(j) && streq(j->mcu_id, m->id) && j->ops->mcu_changed &&
                    j->phase_id != JOB_PHASE_STOPPING_KLIPPER && j->phase_id != JOB_PHASE_STARTING_KLIPPER)
                        j->ops->mcu_changed(j, m);
}

static void on_registry_changed(void *userdata, struct mcu *m, uint64_t mask) {
        jobs_mcu_changed(userdata, m);
}

int daemon_jobs_observe(struct daemon *d) {
        const struct registry_observer o = {
                .changed = on_registry_changed,
                .added = NULL,
                .userdata = d,
        };

        return registry_add_observer(d->registry, &o);
}
