/* Jobs: every action that changes an MCU (reboot into the bootloader or
 * back, later flashing) is a Job object with a state machine, progress and
 * a result.  This file is the generic part: lifetime, states and phases,
 * progress, cancellation requests, the one-job-per-MCU rule, retention of
 * finished jobs, and stopping/starting Klipper around a job.  What a job
 * actually does is in struct job_ops (reboot.c, later flash.c): a series of
 * steps that run on the main loop or hand blocking work to a worker.
 *
 * The bus layer (bus/job.c) observes jobs through the registry-like
 * callbacks in struct daemon; jobs never touch D-Bus themselves. */
#pragma once

#include <event2/event.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "bus/errors.h"
#include "core/worker.h"
#include "shared/macro.h"

struct daemon;
struct mcu;
struct job;
struct unit_op;

enum job_kind {
        JOB_KIND_FLASH,
        JOB_KIND_REBOOT,
        JOB_KIND_UPDATE_ALL,
        _JOB_KIND_MAX,
};

enum job_state {
        JOB_STATE_QUEUED,
        JOB_STATE_RUNNING,
        JOB_STATE_SUCCEEDED,
        JOB_STATE_FAILED,
        JOB_STATE_CANCELLED,
        _JOB_STATE_MAX,
};

enum job_phase {
        JOB_PHASE_PREPARING,
        JOB_PHASE_STOPPING_KLIPPER,
        JOB_PHASE_ENTERING_BOOTLOADER,
        JOB_PHASE_ERASING,
        JOB_PHASE_WRITING,
        JOB_PHASE_VERIFYING,
        JOB_PHASE_REBOOTING,
        JOB_PHASE_STARTING_KLIPPER,
        JOB_PHASE_DONE,
        _JOB_PHASE_MAX,
};

/* One bit per D-Bus property of io.mcuflash1.Job. */
enum job_prop {
        JOB_PROP_STATE,
        JOB_PROP_PHASE,
        JOB_PROP_BYTES_DONE,
        JOB_PROP_BYTES_TOTAL,
        JOB_PROP_PROGRESS,
        JOB_PROP_ERROR,
        JOB_PROP_ERROR_MESSAGE,
        _JOB_PROP_MAX,
};

struct job_ops {
        /* Start the job's own work (after Klipper is out of the way).  It
         * ends by calling job_finish() — at once or later, from a worker
         * completion, an MCU change or a timer. */
        void (*run)(struct job *j);
        /* An MCU property changed while the job runs (e.g. it reached its
         * bootloader). */
        void (*mcu_changed)(struct job *j, struct mcu *m);
        /* Cancel() arrived: return 0 if the job stopped (it must have called
         * job_finish() with JOB_STATE_CANCELLED), -EBUSY if this is not a
         * safe point (the job stops at the next one by itself). */
        int (*cancel)(struct job *j);   /* as job_cancel(): 0, -EBUSY, -EINPROGRESS */
        /* Release job->data. */
        void (*free)(struct job *j);
};

struct job {
        /* Exported as D-Bus properties (strings never NULL). */
        char *object_path;
        char *mcu_path;
        const char *kind;
        const char *state;
        const char *phase;
        uint64_t bytes_done;
        uint64_t bytes_total;
        double progress;
        char *error;
        char *error_message;

        /* Internal. */
        unsigned number;
        struct daemon *daemon;
        char *mcu_id;
        char *owner;                    /* unique bus name of the caller that started it; may be NULL */
        enum job_kind kind_id;
        enum job_state state_id;
        enum job_phase phase_id;
        uint64_t changed;
        const struct job_ops *ops;
        void *data;
        atomic_bool cancel_requested;   /* read by worker code at safe points */
        bool shutting_down;             /* the daemon stops: end at the next safe point */
        bool restart_klipper;           /* we stopped Klipper for this job */
        bool waiting_for_link;          /* ops->run() waits for an identify to let go of the port */
        unsigned n_workers;             /* worker tasks started by job_worker_start() still out */
        bool released;                  /* off the list; freed when the last worker is back */
        struct unit_op *unit_op;
        struct event *timer;            /* the job's own timeout, then retention */
        struct job *next;
};

const char *job_kind_to_string(enum job_kind k);
const char *job_state_to_string(enum job_state s);
const char *job_phase_to_string(enum job_phase p);
const char *job_prop_name(enum job_prop p);

/* Create a job for @m (which must have none), export it, and start it:
 * Klipper is stopped first when it holds @m (and started again after).
 * Returns 0 with the job in *ret (owned by the daemon's list), or -errno. */
int job_start(struct daemon *d, struct mcu *m, enum job_kind kind, const struct job_ops *ops,
              void *data, struct job **ret);

void job_set_phase(struct job *j, enum job_phase p);
void job_set_progress(struct job *j, uint64_t done, uint64_t total);
/* Progress of a job that moves no bytes (a reboot): 0..1. */
void job_set_fraction(struct job *j, double progress);

/* End the job's work with @state; for failures @error and a message for a
 * person.  Klipper is started again afterwards if the job stopped it; only
 * then is the job finished for D-Bus (Finished signal). */
void job_finish(struct job *j, enum job_state state, enum mcuflash_error error, const char *fmt, ...)
        _printf_(4, 5);

/* Cancel() on D-Bus: 0, -EBUSY (not a safe point; will stop at the next),
 * -EINPROGRESS (past the last point where it could stop: it runs to its
 * end), -EALREADY (finished already, or only Klipper is being started). */
int job_cancel(struct job *j);

/* The daemon stops: end @j at its next safe point (a cancel that says so
 * in its message), or let it run to its end when it is past its last one,
 * or let Klipper's start finish.  The job concludes as usual. */
void job_shutdown(struct job *j);

/* Has @j not concluded yet (its Klipper start included)? */
bool job_is_active(const struct job *j);

/* The stop deadline passed: if Klipper was stopped for @j and is not
 * started again yet, ask systemd to start it without waiting for the
 * answer (systemd carries the job out after the daemon exits). */
void job_start_klipper_now(struct job *j);

/* Run @run(@j) in a worker with @j's cancel flag (interruptible sleeps stop
 * at a cancel), then @done(@j, result) on the loop — unless the job is
 * gone by then: the job's memory lives until its last task is back, and
 * that task's result is dropped. */
int job_worker_start(struct job *j, worker_run_fn run, worker_done_fn done);

/* Arm the job's timeout: @on_timeout runs on the loop after @usec. */
int job_arm_timeout(struct job *j, uint64_t usec, void (*on_timeout)(struct job *j));
void job_disarm_timeout(struct job *j);

struct mcu *job_mcu(struct job *j);
bool job_is_finished(const struct job *j);

struct job *job_find_by_path(struct daemon *d, const char *path);

/* An identify of @m has finished and let go of its link: a job that waits
 * for that starts its work now. */
void jobs_link_released(struct daemon *d, struct mcu *m);

/* Tell running jobs that @m changed (called from registry commits). */
void jobs_mcu_changed(struct daemon *d, struct mcu *m);

/* Let running jobs hear about MCU changes (once, at start-up). */
int daemon_jobs_observe(struct daemon *d);

/* Drop every job (daemon shutdown; no signals). */
void jobs_free_all(struct daemon *d);
