/* Worker threads: run one piece of blocking code (an identify probe, later a
 * flash job) in its own thread and hand the result back to the main loop.
 * The thread puts its finished task on the pool's list and wakes the
 * libevent loop through an eventfd, which never blocks; the completion
 * callback then runs on the main thread, where touching the registry and
 * D-Bus is allowed.  Worker code must never touch sd-bus or the registry. */
#pragma once

#include <event2/event.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "shared/macro.h"

struct worker_pool;

/* Runs in the worker thread; returns 0 or -errno. */
typedef int (*worker_run_fn)(void *userdata);
/* Runs on the main thread with run's return value. */
typedef void (*worker_done_fn)(void *userdata, int result);

int worker_pool_new(struct event_base *base, struct worker_pool **ret);

/* Wait for running tasks (their code has its own timeouts), then free.  Their
 * done callbacks run with -ECANCELED so that they can release their data. */
struct worker_pool *worker_pool_free(struct worker_pool *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct worker_pool *, worker_pool_free);

/* Start @run(@userdata) in a new thread; @done(@userdata, r) follows on the
 * main loop.  Returns 0 or -errno (then nothing was started). */
int worker_start(struct worker_pool *p, worker_run_fn run, worker_done_fn done, void *userdata);

/* The same for a job's task: while @run runs, interruptible_sleep_msec()
 * (shared/interrupt.h) in its thread stops early once *@cancel is true. */
int worker_start_cancellable(struct worker_pool *p, worker_run_fn run, worker_done_fn done, void *userdata,
                             const atomic_bool *cancel);

unsigned worker_pool_running(struct worker_pool *p);
