/* The bouncer (bolt's idea): every method call to the daemon passes here
 * before its handler reads a single argument or file descriptor.
 *
 * bus_bouncer_install() adds a filter on the connection that refuses (with
 * org.freedesktop.DBus.Error.AccessDenied) every method call that is not on
 * core/auth.c's list, so a method added to a vtable but not to the list can
 * be called by nobody.  Open methods go on to their handlers unchanged.
 *
 * bus_bouncer_admit() is what a privileged handler does first and only: it
 * asks polkit (asynchronously) and calls @admitted with the untouched
 * message once the caller is authorized; a refusal is answered here
 * (NotAuthorized) and @admitted never runs.  It does not look at arguments,
 * objects or job state — @admitted does, and finds its object again by the
 * message's path (it may have gone while polkit thought). */
#pragma once

#include <systemd/sd-bus.h>

struct daemon;

/* Runs on the loop for an authorized caller.  Like an sd-bus handler:
 * returns >= 0 when it has replied (or will reply later itself), or a
 * negative errno with @error possibly set, which the bouncer answers. */
typedef int (*bouncer_admitted_fn)(struct daemon *d, sd_bus_message *msg, sd_bus_error *error);

int bus_bouncer_install(struct daemon *d);

/**
 * bus_bouncer_admit() - authorize @msg's caller, then hand @msg on
 * @d: the daemon
 * @msg: the incoming method call, arguments unread
 * @action: the polkit action; NULL takes the one core/auth.c lists for the
 *          method (a method listed without an action is refused: a handler
 *          that calls this for an open method is a bug)
 * @admitted: called once the caller is authorized
 *
 * Returns 1 (the answer comes later; return it from the handler) or a
 * negative errno when the check could not even be started.
 */
int bus_bouncer_admit(struct daemon *d, sd_bus_message *msg, const char *action, bouncer_admitted_fn admitted);
