/* Control of systemd units over D-Bus (org.freedesktop.systemd1), used to
 * stop Klipper's service while an MCU it holds is rebooted or flashed and
 * to start it again afterwards.  Everything is asynchronous on the daemon's
 * loop: a start or stop queues a systemd job and reports when systemd says
 * the job is gone (the Manager's JobRemoved signal) with its result.
 *
 * Like systemctl, an operation first adds the JobRemoved match, then calls
 * Subscribe() (systemd emits job signals only while somebody is
 * subscribed; the subscription is kept for the connection's lifetime, so
 * operations running side by side never cancel each other's), then queues
 * the job in "replace" mode.
 *
 * It does not decide whether a unit should be stopped (the job does), does
 * not wait for units other than the one named, and never talks to systemd
 * synchronously. */
#pragma once

#include <event2/event.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "shared/macro.h"

/* How long a whole operation may take, systemd's own default stop timeout. */
#define UNIT_OP_TIMEOUT_USEC (90ULL * 1000000ULL)

/* @r: 0 and systemd's ActiveState ("active", "inactive", "failed",
 * "activating", …) of a unit that exists; -ENOENT and "inactive" for a unit
 * systemd does not know (LoadState "not-found"); otherwise a negative errno
 * and NULL: -EHOSTDOWN systemd is not on the bus, -ETIMEDOUT no answer in
 * time, another errno for an error systemd returned. */
typedef void (*unit_state_fn)(void *userdata, int r, const char *active_state);

/* @r: 0 when the job finished with result "done"; -EIO when it finished
 * with another result (@result says which: "failed", "canceled", "timeout",
 * "dependency", "skipped", …); otherwise a negative errno and NULL:
 * -ENOENT no such unit, -EHOSTDOWN systemd is not on the bus, -ETIMEDOUT the
 * job did not finish in time (it keeps running in systemd), -EACCES systemd
 * refused, another errno for another error systemd returned. */
typedef void (*unit_job_fn)(void *userdata, int r, const char *result);

struct unit_op;

/**
 * unit_get_state() - ask for the ActiveState of @unit
 * @bus: system bus connection, attached to @base
 * @base: the loop, for the operation's deadline (UNIT_OP_TIMEOUT_USEC)
 * @unit: unit name, e.g. "klipper.service"
 * @cb: called once with the answer, from the loop, never from inside this
 *      function, and not after unit_op_free()
 * @userdata: passed to @cb
 * @ret: the pending operation
 *
 * Asks GetUnit (LoadUnit when the unit is not loaded, since systemd unloads
 * inactive units), then the unit's LoadState and ActiveState properties.
 *
 * The operation frees itself before @cb runs: forget the pointer stored in
 * @ret in @cb (set it to NULL) and never free it there; the strings @cb gets
 * are valid while it runs.  Until then, unit_op_free() cancels.  @cb runs
 * inside sd_bus_process() or from a libevent timer; re-arm the bus loop
 * (bus_kick()) if it sends.  When calling this from outside a bus callback,
 * re-arm the bus loop afterwards too.
 *
 * Returns 0 when under way, or a negative errno (nothing pending).
 */
int unit_get_state(sd_bus *bus, struct event_base *base, const char *unit, unit_state_fn cb, void *userdata,
                   struct unit_op **ret);

/**
 * unit_start() - start @unit and wait until systemd finished the job
 * unit_stop() - stop @unit and wait until systemd finished the job
 * unit_restart() - restart @unit (start it if it is not running) and wait
 *                  until systemd finished the job
 *
 * Parameters, ownership and threading as for unit_get_state(); @cb gets the
 * job's result.  On -ETIMEDOUT, or when the operation is freed early, the
 * systemd job is left alone: systemd finishes (or times out) on its own.
 */
int unit_start(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
               struct unit_op **ret);
int unit_stop(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
              struct unit_op **ret);
int unit_restart(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
                 struct unit_op **ret);

/* A oneshot service that runs one program in its own sandbox: the file
 * system read-only but for @read_write_path, no network, no new
 * privileges, only the capabilities to replace a file keeping its owner
 * and mode.  The fds become its stdin and stdout (they are duplicated:
 * the caller keeps its own). */
struct unit_transient {
        const char *unit;               /* "NAME.service", new */
        const char *description;
        char * const *argv;             /* argv[0]: absolute path */
        const char *read_write_path;
        int stdin_fd;
        int stdout_fd;
};

/**
 * unit_run_transient() - StartTransientUnit and wait until it ran
 *
 * As unit_start(): @cb gets 0 when the program exited 0 (the start job's
 * result "done"), -EIO with "failed" when it exited otherwise.  The unit
 * is garbage-collected by systemd afterwards (CollectMode=).
 */
int unit_run_transient(sd_bus *bus, struct event_base *base, const struct unit_transient *spec, unit_job_fn cb,
                       void *userdata, struct unit_op **ret);

/* Ask systemd to start @unit and return at once: the request is on the
 * bus when this returns (sd_bus_flush), no answer is waited for.  For a
 * daemon that exits now; failures are only logged. */
void unit_start_detached(sd_bus *bus, const char *unit);

/* Give a pending operation a new deadline, @timeout_usec from now, instead
 * of UNIT_OP_TIMEOUT_USEC from its start.  0 → -EINVAL. */
int unit_op_set_timeout(struct unit_op *op, uint64_t timeout_usec);

/* Cancel a pending operation: its callback is not called.  Only for
 * operations whose callback has not run yet.  Returns NULL. */
struct unit_op *unit_op_free(struct unit_op *op);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct unit_op *, unit_op_free);
