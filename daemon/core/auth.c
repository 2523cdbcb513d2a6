/* Implementation of auth.h: the bouncer's method list and the polkit check.
 *
 * The check asks org.freedesktop.PolicyKit1.Authority.CheckAuthorization
 * with the subject ("system-bus-name", {"name": <sender>}) — polkit looks up
 * the process and user behind the name itself, so no pid is passed that
 * could be recycled — and never waits for polkit on the loop: the call is an
 * sd_bus_call_async() whose reply callback delivers the result.  The one
 * synchronous call is the sender's credentials (GetConnectionCredentials,
 * answered by the bus daemon itself, as in systemd).  A root caller's
 * answer is delivered from a zero-delay libevent event so that @done never
 * runs inside auth_check_async()'s caller. */
#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "core/auth.h"
#include "shared/log.h"

#define POLKIT_SERVICE "org.freedesktop.PolicyKit1"
#define POLKIT_PATH "/org/freedesktop/PolicyKit1/Authority"
#define POLKIT_INTERFACE "org.freedesktop.PolicyKit1.Authority"
#define POLKIT_FLAG_ALLOW_USER_INTERACTION 1U

struct auth_query {
        auth_done_fn done;
        void *userdata;
        char *action;
        char *sender;
        uid_t uid;
        sd_bus_slot *slot;      /* the CheckAuthorization call in flight */
        struct event *deferred; /* a root caller's answer, due on the next loop iteration */
};

/* The bouncer's list (bolt's idea): every method the daemon serves, and
 * what it takes.  Not listed = denied. */
static const struct {
        const char *interface;
        const char *member;
        enum auth_policy policy;
        const char *action;
} method_policies[] = {
        { "io.mcuflash1.Manager", "ListMcus", AUTH_POLICY_OPEN, NULL },
        { "io.mcuflash1.Manager", "GetMcu", AUTH_POLICY_OPEN, NULL },
        { "io.mcuflash1.Manager", "ListJobs", AUTH_POLICY_OPEN, NULL },
        /* Coalesced and at most once a second; never touches an MCU with a job. */
        { "io.mcuflash1.Manager", "Rescan", AUTH_POLICY_OPEN, NULL },
        { "io.mcuflash1.Manager", "UpdateAll", AUTH_POLICY_ACTION, "io.mcuflash1.update-all" },
        /* Joins an identify in flight; Busy while the MCU has a job. */
        { "io.mcuflash1.Mcu", "Refresh", AUTH_POLICY_OPEN, NULL },
        { "io.mcuflash1.Mcu", "RebootToBootloader", AUTH_POLICY_ACTION, "io.mcuflash1.reboot" },
        { "io.mcuflash1.Mcu", "RebootToApplication", AUTH_POLICY_ACTION, "io.mcuflash1.reboot" },
        { "io.mcuflash1.Mcu", "Flash", AUTH_POLICY_ACTION, "io.mcuflash1.flash" },
        { "io.mcuflash1.Job", "Cancel", AUTH_POLICY_JOB, NULL },
        { "org.freedesktop.DBus.Properties", "Get", AUTH_POLICY_OPEN, NULL },
        { "org.freedesktop.DBus.Properties", "GetAll", AUTH_POLICY_OPEN, NULL },
        { "org.freedesktop.DBus.Introspectable", "Introspect", AUTH_POLICY_OPEN, NULL },
        { "org.freedesktop.DBus.Peer", "Ping", AUTH_POLICY_OPEN, NULL },
        { "org.freedesktop.DBus.Peer", "GetMachineId", AUTH_POLICY_OPEN, NULL },
        { "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", AUTH_POLICY_OPEN, NULL },
};

static const struct {
        const char *kind;
        const char *action;
} job_actions[] = {
        { "reboot", "io.mcuflash1.reboot" },
        { "flash", "io.mcuflash1.flash" },
        { "update-all", "io.mcuflash1.update-all" },
};

const char *auth_action_for_job(const char *kind) {
        if (!kind)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(job_actions); i++)
                if (streq(job_actions[i].kind, kind))
                        return job_actions[i].action;
        return NULL;
}

enum auth_policy auth_policy_for(const char *interface, const char *member, const char **ret_action) {
        if (ret_action)
                *ret_action = NULL;
        if (!interface || !member)
                return AUTH_POLICY_DENY;
        for (size_t i = 0; i < ELEMENTSOF(method_policies); i++)
                if (streq(method_policies[i].interface, interface) && streq(method_policies[i].member, member)) {
                        if (ret_action)
                                *ret_action = method_policies[i].action;
                        return method_policies[i].policy;
                }
        return AUTH_POLICY_DENY;
}

const char *auth_action_for(const char *interface, const char *member) {
        const char *action;

        return auth_policy_for(interface, member, &action) == AUTH_POLICY_ACTION ? action : NULL;
}

const char *auth_result_message(int result) {
        if (result > 0)
                return "Authorized.";
        switch (result) {
        case 0:
                return "Not authorized: polkit denied the request.";
        case -EACCES:
                return "polkit is not available; only root may do this.";
        case -ETIMEDOUT:
                return "polkit did not answer in time; try again.";
        default:
                return "polkit could not check the authorization; see the daemon's log.";
        }
}

struct auth_query *auth_query_free(struct auth_query *q) {
        if (!q)
                return NULL;
        sd_bus_slot_unref(q->slot);
        if (q->deferred)
                event_free(q->deferred);
        free(q->action);
        free(q->sender);
        free(q);
        return NULL;
}

/* The effective uid of the sender of @request, from the bus's credentials of
 * the sender's connection (augmented from /proc when the bus does not know
 * the effective uid, as sd-bus does); the connection's uid if the effective
 * one cannot be had. */
static int sender_uid(sd_bus_message *request, uid_t *ret) {
        _cleanup_(sd_bus_creds_unrefp) sd_bus_creds *creds = NULL;
        int r;

        r = sd_bus_query_sender_creds(request, SD_BUS_CREDS_EUID | SD_BUS_CREDS_UID | SD_BUS_CREDS_AUGMENT,
                                      &creds);
        if (r < 0)
                return r;
        r = sd_bus_creds_get_euid(creds, ret);
        if (r == -ENODATA)
                r = sd_bus_creds_get_uid(creds, ret);
        return r;
}

/* Free @q, then tell its owner: the owner forgets @q in @done. */
static void auth_query_complete(struct auth_query *q, int result) {
        auth_done_fn done = q->done;
        void *userdata = q->userdata;

        auth_query_free(q);
        done(userdata, result);
}

static void on_root_deferred(evutil_socket_t fd, short what, void *userdata) {
        struct auth_query *q = userdata;

        log_debug("Authorized %s for %s: uid 0.", q->action, q->sender);
        auth_query_complete(q, 1);
}

static int polkit_error_to_result(struct auth_query *q, const sd_bus_error *error) {
        int e;

        if (sd_bus_error_has_name(error, SD_BUS_ERROR_SERVICE_UNKNOWN) ||
            sd_bus_error_has_name(error, SD_BUS_ERROR_NAME_HAS_NO_OWNER)) {
                log_warning("Cannot check %s for %s (uid %u): polkit is not on the system bus (%s); "
                            "only root may do this.",
                            q->action, q->sender, (unsigned) q->uid, strempty(error->message));
                return -EACCES;
        }
        if (sd_bus_error_has_name(error, SD_BUS_ERROR_NO_REPLY) ||
            sd_bus_error_has_name(error, SD_BUS_ERROR_TIMEOUT)) {
                log_warning("polkit did not answer the check of %s for %s (uid %u) in time.",
                            q->action, q->sender, (unsigned) q->uid);
                return -ETIMEDOUT;
        }
        log_warning("polkit failed to check %s for %s (uid %u): %s: %s", q->action, q->sender,
                    (unsigned) q->uid, error->name, strempty(error->message));
        /* sd-bus maps names it does not know to EIO; never hand out 0 (= denied)
         * or an errno that means "not available" for an unexpected error. */
        e = sd_bus_error_get_errno(error);
        return e > 0 && e != EACCES ? -e : -EIO;
}

static int on_check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        struct auth_query *q = userdata;
        const sd_bus_error *error;
        int authorized = 0, challenge = 0, result, r;

        error = sd_bus_message_get_error(reply);
        if (error)
                result = polkit_error_to_result(q, error);
        else {
                r = sd_bus_message_enter_container(reply, 'r', "bba{ss}");
                if (r >= 0)
                        r = sd_bus_message_read(reply, "bb", &authorized, &challenge);
                if (r < 0)
                        result = log_warning_errno(r, "Cannot parse polkit's answer for %s: %m", q->action);
                else if (authorized) {
                        log_debug("polkit authorized %s for %s (uid %u).", q->action, q->sender,
                                  (unsigned) q->uid);
                        result = 1;
                } else {
                        log_info("polkit denied %s to %s (uid %u)%s.", q->action, q->sender, (unsigned) q->uid,
                                 challenge ? ": authentication would be needed and the caller did not allow it"
                                           : "");
                        result = 0;
                }
        }

        /* sd-bus keeps the slot alive while this callback runs. */
        auth_query_complete(q, result);
        return 0;
}

static int polkit_check_async(sd_bus *bus, struct auth_query *q, bool interactive) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        int r;

        r = sd_bus_message_new_method_call(bus, &m, POLKIT_SERVICE, POLKIT_PATH, POLKIT_INTERFACE,
                                           "CheckAuthorization");
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "(sa{sv})sa{ss}us",
                                  "system-bus-name", 1, "name", "s", q->sender,
                                  q->action,
                                  0,
                                  interactive ? POLKIT_FLAG_ALLOW_USER_INTERACTION : 0U,
                                  "");
        if (r < 0)
                return r;
        return sd_bus_call_async(bus, &q->slot, m, on_check_reply, q,
                                 interactive ? AUTH_INTERACTIVE_TIMEOUT_USEC : AUTH_TIMEOUT_USEC);
}

int auth_check_async(sd_bus *bus, struct event_base *base, sd_bus_message *request, const char *action,
                     auth_done_fn done, void *userdata, struct auth_query **ret) {
        _cleanup_(auth_query_freep) struct auth_query *q = NULL;
        const char *sender;
        bool interactive;
        int r;

        assert(bus);
        assert(base);
        assert(request);
        assert(action);
        assert(done);
        assert(ret);

        sender = sd_bus_message_get_sender(request);
        if (!sender)
                return log_warning_errno(EINVAL, "Cannot check %s: the request has no sender.", action);

        q = calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        q->done = done;
        q->userdata = userdata;
        q->action = strdup(action);
        q->sender = strdup(sender);
        if (!q->action || !q->sender)
                return -ENOMEM;

        r = sender_uid(request, &q->uid);
        if (r < 0)
                return log_warning_errno(r, "Cannot check %s: no credentials for %s: %m", action, sender);

        if (q->uid == 0) {
                q->deferred = event_new(base, -1, 0, on_root_deferred, q);
                if (!q->deferred)
                        return -ENOMEM;
                event_active(q->deferred, EV_TIMEOUT, 0);
        } else {
                interactive = sd_bus_message_get_allow_interactive_authorization(request) > 0;
                r = polkit_check_async(bus, q, interactive);
                if (r < 0)
                        return log_warning_errno(r, "Cannot ask polkit about %s for %s: %m", action, sender);
                log_debug("Asking polkit whether %s (uid %u) may %s%s.", sender, (unsigned) q->uid, action,
                          interactive ? ", interactively" : "");
        }

        *ret = TAKE_PTR(q);
        return 0;
}
