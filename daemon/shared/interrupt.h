/* Waits in worker code that a job's cancel (Job.Cancel, or the daemon
 * shutting down) can cut short.  The worker pool gives each task the
 * cancel flag of the job it runs for (worker_start_cancellable()); every
 * pause in transport, protocol and job code goes through
 * interruptible_sleep_msec(), which looks at that flag at short intervals,
 * so no sleep outlasts a cancel by more than INTERRUPT_CHECK_MSEC.
 *
 * It does not stop blocking reads or writes: those have their own
 * deadlines (transport/fdwait.h). */
#pragma once

#include <stdatomic.h>
#include <stdbool.h>

/* How often a sleep looks at the cancel flag. */
#define INTERRUPT_CHECK_MSEC 50

/* The calling thread's cancel flag (NULL: none); worker.c sets it. */
void interrupt_set_flag(const atomic_bool *flag);

/* Has the calling thread's job been asked to stop? */
bool interrupt_requested(void);

/* Sleep @ms milliseconds unless the calling thread's job is asked to stop
 * meanwhile: 0 after the whole sleep, -ECANCELED as soon as it is. */
int interruptible_sleep_msec(unsigned ms);
