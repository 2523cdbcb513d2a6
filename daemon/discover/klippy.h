/* Client of klippy's API socket (protocols.md §17.1): learns klippy's own
 * state, print_stats.state and what klippy knows of each of its MCUs
 * (version, build versions, MCU type), and derives the Manager's
 * PrinterState from them (design.md §3).  It runs on the daemon's libevent
 * loop and never blocks: a non-blocking connect, inotify on the socket's
 * directory to learn when klippy (re)creates the socket, timers only for the
 * 1 s "still starting up" re-query and the reconnect back-off.
 *
 * It only reads: it never sends G-code or other commands to klippy, and it
 * does not know about the daemon's MCU objects or D-Bus; the daemon maps the
 * reported MCU names ("mcu", "mcu EBBCan") to its own MCUs.
 *
 * The pure parts (framing, status merge, PrinterState derivation, request
 * building, struct klippy_status) live in klippy-model.h, which this header
 * includes, so unit tests can reach them. */
#pragma once

#include <event2/event.h>
#include <sys/types.h>

#include "discover/klippy-model.h"
#include "shared/macro.h"

struct klippy_callbacks {
        /* Called once per change of anything in struct klippy_status.  The
         * status and its strings are valid until the next return to the
         * event loop.  Must not free the client. */
        void (*state_changed)(void *userdata, const struct klippy_status *status);
        void *userdata;
};

struct klippy_client;

/* Start following klippy's API socket at @socket_path (absolute; the file
 * and its directories need not exist yet).  Connects at once if the socket
 * is there; never calls state_changed from within this function.  Returns
 * -EINVAL for a relative path, -ENAMETOOLONG if it does not fit a
 * sockaddr_un, -ENOMEM or an inotify error. */
int klippy_client_new(struct event_base *base, const char *socket_path, const struct klippy_callbacks *cb,
                      struct klippy_client **ret);
struct klippy_client *klippy_client_free(struct klippy_client *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct klippy_client *, klippy_client_free);

/* The uid of the process at the other end of the API socket (klippy's
 * user), from SO_PEERCRED.  Returns 0, or -ENOTCONN / -errno. */
int klippy_client_peer_uid(const struct klippy_client *c, uid_t *ret);

/* The current status; valid until the next return to the event loop. */
const struct klippy_status *klippy_client_status(const struct klippy_client *c);
