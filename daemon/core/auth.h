/* The one authorization gate of mcuflashd (style.md "Authorization is one
 * gate"): which polkit action a D-Bus method needs, and an asynchronous check
 * of the caller of a method against that action, run on the daemon's loop.
 *
 * Callers whose effective uid is 0 are authorized without asking polkit,
 * like systemd's privileged-caller shortcut; everybody else is checked with
 * polkit's CheckAuthorization for the caller's bus name, interactively only
 * when the caller allowed interactive authorization on its method call.
 * Reading state needs no action at all.
 *
 * This module does not reply to the method call and does not choose the
 * D-Bus error a refusal becomes: the handler does that (validate →
 * authorize → act), with auth_result_message() for the text.  It keeps no
 * cache of decisions: polkit's auth_admin_keep does that. */
#pragma once

#include <event2/event.h>
#include <systemd/sd-bus.h>

#include "shared/macro.h"

/* How long polkit may take: a person may have to type a password when the
 * caller allowed interaction. */
#define AUTH_TIMEOUT_USEC (10ULL * 1000000ULL)
#define AUTH_INTERACTIVE_TIMEOUT_USEC (30ULL * 1000000ULL)

/* @result: 1 = authorized, 0 = denied (also when polkit wants a password
 * but the caller did not allow interaction), < 0 = the check failed:
 * -EACCES polkit is not on the bus (so only root may act), -ETIMEDOUT polkit
 * did not answer in time, another negative errno when polkit returned an
 * error.  Every failure is also logged. */
typedef void (*auth_done_fn)(void *userdata, int result);

struct auth_query;

/* What the bouncer (bus/bouncer.c) makes of a method call. */
enum auth_policy {
        AUTH_POLICY_DENY,       /* not on the list: refused to everybody, unread */
        AUTH_POLICY_OPEN,       /* only reads state (or asks to read it again): everybody */
        AUTH_POLICY_ACTION,     /* polkit's answer for the action comes before anything else */
        AUTH_POLICY_JOB,        /* Job.Cancel: the job's starter, or the action of the job's kind */
};

/**
 * auth_policy_for() - the bouncer's list: what a method call needs
 * @interface: D-Bus interface of the method
 * @member: method name
 * @ret_action: for AUTH_POLICY_ACTION the polkit action, else NULL (may be NULL)
 *
 * Every method of every io.mcuflash1 interface is on the list; the standard
 * interfaces sd-bus serves are open for reading (Properties.Set is denied:
 * nothing is writable).  A method not on the list is denied, so a method
 * added to a vtable and forgotten here can be called by nobody.
 */
enum auth_policy auth_policy_for(const char *interface, const char *member, const char **ret_action);

/**
 * auth_action_for() - the polkit action a method needs
 * @interface: D-Bus interface of the method, e.g. "io.mcuflash1.Mcu"
 * @member: method name, e.g. "RebootToBootloader"
 *
 * Returns "io.mcuflash1.reboot" for Mcu.RebootToBootloader and
 * Mcu.RebootToApplication, "io.mcuflash1.flash" for Mcu.Flash,
 * "io.mcuflash1.update-all" for Manager.UpdateAll, and NULL for every other
 * method (open ones, Job.Cancel, and those not on the list at all).
 */
const char *auth_action_for(const char *interface, const char *member);

/**
 * auth_action_for_job() - the polkit action Job.Cancel needs
 * @kind: the job's Kind ("flash", "reboot", "update-all")
 *
 * Cancelling a job takes the action that starting it took (the caller that
 * started it may always cancel it; that is the Job handler's business).
 * Returns NULL for an unknown kind.
 */
const char *auth_action_for_job(const char *kind);

/**
 * auth_check_async() - is the sender of @request allowed @action?
 * @bus: the connection @request came in on
 * @base: the loop @bus runs on; a root caller's answer is delivered from it
 * @request: the incoming method call (only read here, no reference kept)
 * @action: polkit action id, normally auth_action_for()'s answer
 * @done: called exactly once with the result, always from the loop and never
 *        from inside this function; not called after auth_query_free()
 * @userdata: passed to @done
 * @ret: the pending query
 *
 * The query frees itself before @done runs: forget the pointer stored in
 * @ret in @done (set it to NULL) and never free it there.  Until then,
 * auth_query_free() cancels the check.  @done runs either inside
 * sd_bus_process() or from a libevent callback; if it sends on @bus (the
 * method reply), re-arm the bus loop (bus_kick()) so that output sd-bus had to
 * queue gets written.
 *
 * Returns 0 when the check is under way, or a negative errno (nothing
 * pending, @done will not be called): the sender's credentials could not be
 * read, out of memory, or the call to polkit could not be sent.
 */
int auth_check_async(sd_bus *bus, struct event_base *base, sd_bus_message *request, const char *action,
                     auth_done_fn done, void *userdata, struct auth_query **ret);

/* Cancel a pending check: its @done is not called.  Only for queries whose
 * @done has not run yet.  Returns NULL. */
struct auth_query *auth_query_free(struct auth_query *q);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct auth_query *, auth_query_free);

/* A sentence for an auth_done_fn result that a person can act on, e.g.
 * "polkit is not available; only root may do this" for -EACCES. */
const char *auth_result_message(int result);
