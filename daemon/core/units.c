/* Implementation of units.h.  Each operation is a little chain of
 * asynchronous calls to org.freedesktop.systemd1, one in flight at a time,
 * plus one libevent timer bounding the whole chain:
 *
 *   state:       GetUnit (→ LoadUnit if not loaded) → Get LoadState → Get ActiveState
 *   start, stop, restart: AddMatch JobRemoved → Subscribe → Start/Stop/RestartUnit → JobRemoved
 *
 * systemd sends the StartUnit/StopUnit reply before the job's JobRemoved,
 * but a JobRemoved for the unit that arrives before the reply names the job
 * is kept and checked once the job path is known, so that no ordering of
 * the two can lose the result. */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>

#include "core/units.h"
#include "shared/log.h"
#include "shared/strutil.h"

#define SYSTEMD_SERVICE "org.freedesktop.systemd1"
#define SYSTEMD_PATH "/org/freedesktop/systemd1"
#define SYSTEMD_MANAGER_INTERFACE "org.freedesktop.systemd1.Manager"
#define SYSTEMD_UNIT_INTERFACE "org.freedesktop.systemd1.Unit"
#define SYSTEMD_ERROR_NO_SUCH_UNIT "org.freedesktop.systemd1.NoSuchUnit"
#define SYSTEMD_ERROR_ALREADY_SUBSCRIBED "org.freedesktop.systemd1.AlreadySubscribed"

enum unit_op_kind {
        UNIT_OP_STATE,
        UNIT_OP_START,
        UNIT_OP_STOP,
        UNIT_OP_RESTART,
        UNIT_OP_TRANSIENT,
};

static const char *const op_verb[] = {
        [UNIT_OP_STATE] = "query",
        [UNIT_OP_START] = "start",
        [UNIT_OP_STOP] = "stop",
        [UNIT_OP_RESTART] = "restart",
        [UNIT_OP_TRANSIENT] = "run",
};

static const char *const op_done[] = {
        [UNIT_OP_STATE] = "Queried",
        [UNIT_OP_START] = "Started",
        [UNIT_OP_STOP] = "Stopped",
        [UNIT_OP_RESTART] = "Restarted",
        [UNIT_OP_TRANSIENT] = "Ran",
};

static const char *const op_method[] = {
        [UNIT_OP_START] = "StartUnit",
        [UNIT_OP_STOP] = "StopUnit",
        [UNIT_OP_RESTART] = "RestartUnit",
        [UNIT_OP_TRANSIENT] = "StartTransientUnit",
};

/* A JobRemoved for our unit seen before StartUnit/StopUnit's reply. */
struct early_job {
        char *path;
        char *result;
};

struct unit_op {
        sd_bus *bus;
        enum unit_op_kind kind;
        char *unit;
        uint64_t timeout_usec;
        unit_state_fn state_cb;
        unit_job_fn job_cb;
        void *userdata;

        sd_bus_slot *call_slot;         /* the one method call in flight */
        sd_bus_slot *match_slot;        /* JobRemoved (start and stop) */
        struct event *timer;            /* the whole operation's deadline */
        bool loaded_unit;               /* LoadUnit was asked after GetUnit's NoSuchUnit */
        char *unit_path;                /* the unit's object (state) */
        char *job;                      /* the job's path once systemd queued it */
        struct early_job *early;
        size_t n_early;

        /* StartTransientUnit: what the service runs. */
        char **argv;
        char *description;
        char *read_write_path;
        int stdin_fd, stdout_fd;
};

static void early_jobs_clear(struct unit_op *op) {
        for (size_t i = 0; i < op->n_early; i++) {
                free(op->early[i].path);
                free(op->early[i].result);
        }
        free(op->early);
        op->early = NULL;
        op->n_early = 0;
}

struct unit_op *unit_op_free(struct unit_op *op) {
        if (!op)
                return NULL;
        sd_bus_slot_unref(op->call_slot);
        sd_bus_slot_unref(op->match_slot);
        if (op->timer)
                event_free(op->timer);
        early_jobs_clear(op);
        strv_free(op->argv);
        free(op->description);
        free(op->read_write_path);
        safe_close(op->stdin_fd);
        safe_close(op->stdout_fd);
        free(op->job);
        free(op->unit_path);
        free(op->unit);
        sd_bus_unref(op->bus);
        free(op);
        return NULL;
}

/* The operation is over: free it, then call the callback (whose owner
 * forgets @op there).  @s may point into @op, so the callback gets a copy. */
static void unit_op_finish(struct unit_op *op, int r, const char *s) {
        _cleanup_free_ char *copy = NULL;
        enum unit_op_kind kind = op->kind;
        unit_state_fn state_cb = op->state_cb;
        unit_job_fn job_cb = op->job_cb;
        void *userdata = op->userdata;

        if (s) {
                copy = strdup(s);
                if (!copy)
                        r = log_oom();
        }
        /* sd-bus keeps the slot whose callback runs alive until it returns,
         * and libevent allows freeing a timer from its own callback. */
        unit_op_free(op);

        if (kind == UNIT_OP_STATE)
                state_cb(userdata, r, copy);
        else
                job_cb(userdata, r, copy);
}

/* The negative errno for an error systemd (or the bus on its behalf)
 * returned, logged once here. */
static int unit_op_error(struct unit_op *op, const sd_bus_error *error) {
        int e;

        if (sd_bus_error_has_name(error, SD_BUS_ERROR_SERVICE_UNKNOWN) ||
            sd_bus_error_has_name(error, SD_BUS_ERROR_NAME_HAS_NO_OWNER)) {
                log_error("Cannot %s %s: systemd is not on the system bus (%s).", op_verb[op->kind], op->unit,
                          strempty(error->message));
                return -EHOSTDOWN;
        }
        if (sd_bus_error_has_name(error, SYSTEMD_ERROR_NO_SUCH_UNIT)) {
                log_warning("Cannot %s %s: %s", op_verb[op->kind], op->unit, strempty(error->message));
                return -ENOENT;
        }
        if (sd_bus_error_has_name(error, SD_BUS_ERROR_NO_REPLY) ||
            sd_bus_error_has_name(error, SD_BUS_ERROR_TIMEOUT)) {
                log_warning("Cannot %s %s: systemd did not answer in time.", op_verb[op->kind], op->unit);
                return -ETIMEDOUT;
        }
        log_warning("Cannot %s %s: %s: %s", op_verb[op->kind], op->unit, error->name, strempty(error->message));
        e = sd_bus_error_get_errno(error);
        return e > 0 ? -e : -EIO;
}

static int unit_op_call(struct unit_op *op, const char *path, const char *interface, const char *member,
                        sd_bus_message_handler_t callback, const char *types, ...) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        va_list ap;
        int r;

        r = sd_bus_message_new_method_call(op->bus, &m, SYSTEMD_SERVICE, path, interface, member);
        if (r < 0)
                return r;
        if (types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return r;
        }
        op->call_slot = sd_bus_slot_unref(op->call_slot);
        r = sd_bus_call_async(op->bus, &op->call_slot, m, callback, op, op->timeout_usec);
        if (r < 0)
                return log_warning_errno(r, "Cannot call systemd's %s for %s: %m", member, op->unit);
        return 0;
}

static void on_timeout(evutil_socket_t fd, short what, void *userdata) {
        struct unit_op *op = userdata;

        log_warning("Cannot %s %s: systemd did not finish within %.1f s.", op_verb[op->kind], op->unit,
                    (double) op->timeout_usec / 1e6);
        unit_op_finish(op, -ETIMEDOUT, NULL);
}

int unit_op_set_timeout(struct unit_op *op, uint64_t timeout_usec) {
        struct timeval tv = {
                .tv_sec = (time_t) (timeout_usec / 1000000),
                .tv_usec = (suseconds_t) (timeout_usec % 1000000),
        };

        assert(op);

        if (timeout_usec == 0)
                return -EINVAL;
        op->timeout_usec = timeout_usec;
        /* Adding a pending timer again moves its deadline. */
        return evtimer_add(op->timer, &tv) < 0 ? -EIO : 0;
}

static int unit_op_new(sd_bus *bus, struct event_base *base, const char *unit, enum unit_op_kind kind,
                       struct unit_op **ret) {
        _cleanup_(unit_op_freep) struct unit_op *op = NULL;
        int r;

        assert(bus);
        assert(base);
        assert(unit);

        if (isempty(unit))
                return -EINVAL;
        op = calloc(1, sizeof(*op));
        if (!op)
                return -ENOMEM;
        op->bus = sd_bus_ref(bus);
        op->kind = kind;
        op->stdin_fd = op->stdout_fd = -1;
        op->unit = strdup(unit);
        if (!op->unit)
                return -ENOMEM;
        op->timer = evtimer_new(base, on_timeout, op);
        if (!op->timer)
                return -ENOMEM;
        r = unit_op_set_timeout(op, UNIT_OP_TIMEOUT_USEC);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(op);
        return 0;
}

/* --- state ----------------------------------------------------------------- */

/* Reads the string in a Properties.Get reply.  On failure the operation is
 * finished (and may be gone) and false returned. */
static bool unit_op_read_state(struct unit_op *op, sd_bus_message *reply, const char *property,
                               const char **ret) {
        const sd_bus_error *error;
        int r;

        op->call_slot = sd_bus_slot_unref(op->call_slot);
        error = sd_bus_message_get_error(reply);
        if (error) {
                unit_op_finish(op, unit_op_error(op, error), NULL);
                return false;
        }
        r = sd_bus_message_read(reply, "v", "s", ret);
        if (r < 0) {
                unit_op_finish(op, log_warning_errno(r, "Cannot read the %s of %s: %m", property, op->unit), NULL);
                return false;
        }
        return true;
}

static int on_active_state(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const char *state;

        if (!unit_op_read_state(op, reply, "ActiveState", &state))
                return 0;
        log_debug("ActiveState of %s: %s.", op->unit, state);
        unit_op_finish(op, 0, state);
        return 0;
}

static int on_load_state(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const char *state;
        int r;

        if (!unit_op_read_state(op, reply, "LoadState", &state))
                return 0;
        if (streq(state, "not-found")) {
                log_debug("systemd does not know %s.", op->unit);
                unit_op_finish(op, -ENOENT, "inactive");
                return 0;
        }
        r = unit_op_call(op, op->unit_path, "org.freedesktop.DBus.Properties", "Get", on_active_state,
                         "ss", SYSTEMD_UNIT_INTERFACE, "ActiveState");
        if (r < 0)
                unit_op_finish(op, r, NULL);
        return 0;
}

static int on_unit_path(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const sd_bus_error *error;
        const char *path;
        int r;

        op->call_slot = sd_bus_slot_unref(op->call_slot);
        error = sd_bus_message_get_error(reply);
        if (error && sd_bus_error_has_name(error, SYSTEMD_ERROR_NO_SUCH_UNIT) && !op->loaded_unit) {
                /* Not loaded: systemd unloads units nobody needs.  LoadUnit
                 * tells an installed unit from one that does not exist. */
                op->loaded_unit = true;
                r = unit_op_call(op, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, "LoadUnit", on_unit_path,
                                 "s", op->unit);
                if (r < 0)
                        unit_op_finish(op, r, NULL);
                return 0;
        }
        if (error) {
                unit_op_finish(op, unit_op_error(op, error), NULL);
                return 0;
        }
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0) {
                unit_op_finish(op, log_warning_errno(r, "Cannot read the object path of %s: %m", op->unit), NULL);
                return 0;
        }
        r = free_and_strdup(&op->unit_path, path);
        if (r < 0) {
                unit_op_finish(op, r, NULL);
                return 0;
        }
        r = unit_op_call(op, op->unit_path, "org.freedesktop.DBus.Properties", "Get", on_load_state,
                         "ss", SYSTEMD_UNIT_INTERFACE, "LoadState");
        if (r < 0)
                unit_op_finish(op, r, NULL);
        return 0;
}

int unit_get_state(sd_bus *bus, struct event_base *base, const char *unit, unit_state_fn cb, void *userdata,
                   struct unit_op **ret) {
        _cleanup_(unit_op_freep) struct unit_op *op = NULL;
        int r;

        assert(cb);
        assert(ret);

        r = unit_op_new(bus, base, unit, UNIT_OP_STATE, &op);
        if (r < 0)
                return r;
        op->state_cb = cb;
        op->userdata = userdata;
        r = unit_op_call(op, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, "GetUnit", on_unit_path, "s", unit);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(op);
        return 0;
}

/* --- start and stop ---------------------------------------------------------- */

static void unit_op_job_done(struct unit_op *op, const char *result) {
        if (streq(result, "done")) {
                log_info("%s %s.", op_done[op->kind], op->unit);
                unit_op_finish(op, 0, result);
        } else {
                log_warning("Cannot %s %s: systemd's job ended with result '%s'.", op_verb[op->kind], op->unit,
                            result);
                unit_op_finish(op, -EIO, result);
        }
}

static int on_job_removed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const char *path, *unit, *result;
        struct early_job *early;
        uint32_t id;
        int r;

        r = sd_bus_message_read(m, "uoss", &id, &path, &unit, &result);
        if (r < 0) {
                log_debug_errno(r, "Ignoring a JobRemoved signal that does not parse: %m");
                return 0;
        }
        if (op->job) {
                if (streq(path, op->job))
                        unit_op_job_done(op, result);
                return 0;
        }
        if (!streq(unit, op->unit))
                return 0;

        /* Our job may be this one: keep it until StartUnit/StopUnit says. */
        log_debug("systemd removed %s (%s) of %s before naming our job; keeping it.", path, result, unit);
        early = reallocarray(op->early, op->n_early + 1, sizeof(*early));
        if (!early) {
                unit_op_finish(op, log_oom(), NULL);
                return 0;
        }
        op->early = early;
        early[op->n_early] = (struct early_job) { .path = strdup(path), .result = strdup(result) };
        if (!early[op->n_early].path || !early[op->n_early].result) {
                free(early[op->n_early].path);
                free(early[op->n_early].result);
                unit_op_finish(op, log_oom(), NULL);
                return 0;
        }
        op->n_early++;
        return 0;
}

static int on_job_queued(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const sd_bus_error *error;
        const char *path;
        int r;

        op->call_slot = sd_bus_slot_unref(op->call_slot);
        error = sd_bus_message_get_error(reply);
        if (error) {
                unit_op_finish(op, unit_op_error(op, error), NULL);
                return 0;
        }
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0) {
                unit_op_finish(op, log_warning_errno(r, "Cannot read the job systemd queued for %s: %m",
                                                     op->unit), NULL);
                return 0;
        }
        r = free_and_strdup(&op->job, path);
        if (r < 0) {
                unit_op_finish(op, r, NULL);
                return 0;
        }
        log_debug("systemd queued %s to %s %s.", op->job, op_verb[op->kind], op->unit);

        for (size_t i = 0; i < op->n_early; i++)
                if (streq(op->early[i].path, op->job)) {
                        unit_op_job_done(op, op->early[i].result);
                        return 0;
                }
        early_jobs_clear(op);
        return 0;
}

/* The properties of a oneshot service that runs op->argv with the given
 * stdin/stdout, in a sandbox that may write only op->read_write_path. */
static int unit_op_call_transient(struct unit_op *op) {
        /* CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID: a new file
         * with the old one's owner and mode in a root-owned directory. */
        const uint64_t caps = (1ULL << 0) | (1ULL << 1) | (1ULL << 3) | (1ULL << 4);
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        int r;

        r = sd_bus_message_new_method_call(op->bus, &m, SYSTEMD_SERVICE, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE,
                                           "StartTransientUnit");
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "ss", op->unit, "fail");
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(m, 'a', "(sv)");
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)",
                                  "Description", "s", op->description,
                                  "Type", "s", "oneshot",
                                  "CollectMode", "s", "inactive-or-failed",
                                  "StandardInputFileDescriptor", "h", op->stdin_fd,
                                  "StandardOutputFileDescriptor", "h", op->stdout_fd,
                                  "StandardError", "s", "journal",
                                  "ProtectSystem", "s", "strict",
                                  "ProtectHome", "s", "read-only",
                                  "PrivateTmp", "b", 1,
                                  "PrivateNetwork", "b", 1,
                                  "NoNewPrivileges", "b", 1,
                                  "CapabilityBoundingSet", "t", caps,
                                  "ReadWritePaths", "as", 1, op->read_write_path);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(m, 'r', "sv");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", "ExecStart");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'v', "a(sasb)");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "(sasb)");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'r', "sasb");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", op->argv[0]);
        if (r >= 0)
                r = sd_bus_message_append_strv(m, op->argv);
        if (r >= 0)
                r = sd_bus_message_append(m, "b", 0);
        for (unsigned i = 0; r >= 0 && i < 5; i++)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_append(m, "a(sa(sv))", 0);
        if (r < 0)
                return r;
        op->call_slot = sd_bus_slot_unref(op->call_slot);
        r = sd_bus_call_async(op->bus, &op->call_slot, m, on_job_queued, op, op->timeout_usec);
        if (r < 0)
                return log_warning_errno(r, "Cannot call systemd's StartTransientUnit for %s: %m", op->unit);
        return 0;
}

static int on_subscribed(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const sd_bus_error *error;
        int r;

        op->call_slot = sd_bus_slot_unref(op->call_slot);
        error = sd_bus_message_get_error(reply);
        /* Subscribing twice on one connection is an error to systemd, and
         * harmless to us: another operation subscribed already. */
        if (error && !sd_bus_error_has_name(error, SYSTEMD_ERROR_ALREADY_SUBSCRIBED)) {
                unit_op_finish(op, unit_op_error(op, error), NULL);
                return 0;
        }
        if (op->kind == UNIT_OP_TRANSIENT)
                r = unit_op_call_transient(op);
        else
                r = unit_op_call(op, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE,
                                 op_method[op->kind], on_job_queued,
                                 "ss", op->unit, "replace");
        if (r < 0)
                unit_op_finish(op, r, NULL);
        return 0;
}

static int on_match_installed(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct unit_op *op = userdata;
        const sd_bus_error *error;
        int r;

        error = sd_bus_message_get_error(reply);
        if (error) {
                log_warning("Cannot %s %s: cannot watch systemd's jobs: %s", op_verb[op->kind], op->unit,
                            strempty(error->message));
                r = sd_bus_error_get_errno(error);
                unit_op_finish(op, r > 0 ? -r : -EIO, NULL);
                return 0;
        }
        r = unit_op_call(op, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, "Subscribe", on_subscribed, NULL);
        if (r < 0)
                unit_op_finish(op, r, NULL);
        return 0;
}

static int unit_job_async(sd_bus *bus, struct event_base *base, const char *unit, enum unit_op_kind kind,
                          unit_job_fn cb, void *userdata, struct unit_op **ret) {
        _cleanup_(unit_op_freep) struct unit_op *op = NULL;
        int r;

        assert(cb);
        assert(ret);

        r = unit_op_new(bus, base, unit, kind, &op);
        if (r < 0)
                return r;
        op->job_cb = cb;
        op->userdata = userdata;
        r = sd_bus_match_signal_async(bus, &op->match_slot, SYSTEMD_SERVICE, SYSTEMD_PATH,
                                      SYSTEMD_MANAGER_INTERFACE, "JobRemoved", on_job_removed,
                                      on_match_installed, op);
        if (r < 0)
                return log_warning_errno(r, "Cannot watch systemd's jobs for %s: %m", unit);
        log_debug("Asking systemd to %s %s.", op_verb[kind], unit);
        *ret = TAKE_PTR(op);
        return 0;
}

int unit_start(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
               struct unit_op **ret) {
        return unit_job_async(bus, base, unit, UNIT_OP_START, cb, userdata, ret);
}

int unit_stop(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
              struct unit_op **ret) {
        return unit_job_async(bus, base, unit, UNIT_OP_STOP, cb, userdata, ret);
}

int unit_run_transient(sd_bus *bus, struct event_base *base, const struct unit_transient *spec, unit_job_fn cb,
                       void *userdata, struct unit_op **ret) {
        _cleanup_(unit_op_freep) struct unit_op *op = NULL;
        int r;

        assert(spec && spec->argv && spec->argv[0]);

        r = unit_job_async(bus, base, spec->unit, UNIT_OP_TRANSIENT, cb, userdata, &op);
        if (r < 0)
                return r;
        r = strv_copy(spec->argv, &op->argv);
        if (r < 0)
                return r;
        op->description = strdup(spec->description);
        op->read_write_path = strdup(spec->read_write_path);
        if (!op->description || !op->read_write_path)
                return -ENOMEM;
        op->stdin_fd = fcntl(spec->stdin_fd, F_DUPFD_CLOEXEC, 3);
        op->stdout_fd = fcntl(spec->stdout_fd, F_DUPFD_CLOEXEC, 3);
        if (op->stdin_fd < 0 || op->stdout_fd < 0)
                return -errno;
        *ret = TAKE_PTR(op);
        return 0;
}

int unit_restart(sd_bus *bus, struct event_base *base, const char *unit, unit_job_fn cb, void *userdata,
                 struct unit_op **ret) {
        return unit_job_async(bus, base, unit, UNIT_OP_RESTART, cb, userdata, ret);
}

/* --- fire and forget -------------------------------------------------------- */

void unit_start_detached(sd_bus *bus, const char *unit) {
        int r;

        if (!bus || isempty(unit))
                return;
        /* No reply wanted: systemd queues the job all the same. */
        r = sd_bus_call_method_async(bus, NULL, SYSTEMD_SERVICE, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE,
                                     "StartUnit", NULL, NULL, "ss", unit, "replace");
        if (r < 0) {
                log_error_errno(r, "Cannot ask systemd to start %s: %m; start it by hand.", unit);
                return;
        }
        r = sd_bus_flush(bus);
        if (r < 0)
                log_error_errno(r, "Cannot ask systemd to start %s: %m; start it by hand.", unit);
        else
                log_notice("Asked systemd to start %s again.", unit);
}
