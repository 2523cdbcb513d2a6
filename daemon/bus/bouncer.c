/* Implementation of bus/bouncer.h.  The filter runs inside sd_bus_process()
 * for every incoming message, before the object vtables; it only looks at
 * the header (interface, member), never at the body. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bus/bouncer.h"
#include "bus/bus.h"
#include "bus/errors.h"
#include "core/auth.h"
#include "core/daemon.h"
#include "shared/log.h"

struct admission {
        struct daemon *daemon;
        sd_bus_message *message;
        bouncer_admitted_fn admitted;
        struct auth_query *query;
};

static struct admission *admission_free(struct admission *a) {
        if (!a)
                return NULL;
        auth_query_free(a->query);
        sd_bus_message_unref(a->message);
        free(a);
        return NULL;
}
DEFINE_TRIVIAL_CLEANUP_FUNC(struct admission *, admission_free);

static const char *or_none(const char *s) {
        return s ?: "(none)";
}

static int on_method_call(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        const char *interface, *member;
        int r;

        if (!sd_bus_message_is_method_call(msg, NULL, NULL))
                return 0;
        interface = sd_bus_message_get_interface(msg);
        member = sd_bus_message_get_member(msg);
        /* Without an interface sd-bus would look the member up in every
         * interface of the object: only the listed pairs pass. */
        if (auth_policy_for(interface, member, NULL) != AUTH_POLICY_DENY)
                return 0;
        log_debug("Refused %s.%s from %s: not on the list of methods.", or_none(interface), or_none(member),
                 or_none(sd_bus_message_get_sender(msg)));
        if (sd_bus_message_get_expect_reply(msg)) {
                r = sd_bus_reply_method_errorf(msg, SD_BUS_ERROR_ACCESS_DENIED,
                                               "%s.%s is not a method mcuflashd serves.", or_none(interface),
                                               or_none(member));
                if (r < 0)
                        log_warning_errno(r, "Cannot refuse %s: %m", or_none(member));
        }
        return 1;
}

int bus_bouncer_install(struct daemon *d) {
        /* Floating: the filter lives as long as the connection. */
        return sd_bus_add_filter(d->bus, NULL, on_method_call, d);
}

static void on_authorized(void *userdata, int result) {
        _cleanup_(admission_freep) struct admission *a = userdata;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        a->query = NULL;
        if (result <= 0)
                r = bus_error_setf(&error, MCUFLASH_ERROR_NOT_AUTHORIZED, "%s", auth_result_message(result));
        else
                r = a->admitted(a->daemon, a->message, &error);
        if (r < 0) {
                if (!sd_bus_error_is_set(&error))
                        sd_bus_error_set_errno(&error, r);
                (void) sd_bus_reply_method_error(a->message, &error);
        }
        bus_kick(a->daemon);
}

int bus_bouncer_admit(struct daemon *d, sd_bus_message *msg, const char *action, bouncer_admitted_fn admitted) {
        _cleanup_(admission_freep) struct admission *a = NULL;
        int r;

        if (!action && auth_policy_for(sd_bus_message_get_interface(msg), sd_bus_message_get_member(msg),
                                       &action) != AUTH_POLICY_ACTION)
                return log_error_errno(EPERM, "%s has no polkit action; refused.",
                                       or_none(sd_bus_message_get_member(msg)));
        a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->daemon = d;
        a->message = sd_bus_message_ref(msg);
        a->admitted = admitted;
        r = auth_check_async(d->bus, d->base, msg, action, on_authorized, a, &a->query);
        if (r < 0)
                return r;
        TAKE_PTR(a);
        return 1;
}
