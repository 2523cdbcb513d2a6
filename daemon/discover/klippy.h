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
 * building) are exported below the client API so unit tests can reach them. */
#pragma once

#include <event2/event.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

#include "shared/macro.h"

/* Longest message accepted from klippy, without its 0x03 terminator. */
#define KLIPPY_MESSAGE_MAX ((size_t) 1024 * 1024)

/* response_template of our subscription: notifications carry this key/value
 * next to "params" (klippy copies the template into each notification). */
#define KLIPPY_TEMPLATE_KEY "mcuflashd"
#define KLIPPY_TEMPLATE_VALUE "status"

struct klippy_mcu_info {
        const char *name;               /* status object name: "mcu", "mcu EBBCan" */
        const char *version;            /* mcu_version; "" while klippy has not identified it */
        const char *build_versions;     /* mcu_build_versions; "" if unknown */
        const char *mcu_type;           /* mcu_constants.MCU, e.g. "stm32f429xx"; "" if unknown */
};

struct klippy_status {
        bool connected;                 /* klippy answered "info" on the current connection */
        const char *klippy_state;       /* startup|ready|shutdown|error; NULL if unknown */
        const char *state_message;      /* klippy's text for its state; NULL if unknown */
        const char *print_state;        /* print_stats.state; NULL if unknown */
        const char *printer_state;      /* idle|printing|paused|startup|shutdown|error|stopped|unknown, never NULL */
        const char *software_version;   /* info's software_version (Klipper host version); NULL if unknown */
        const struct klippy_mcu_info *mcus; /* sorted by name, so "mcu" comes first */
        size_t n_mcus;
};

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

/* The current status; valid until the next return to the event loop. */
const struct klippy_status *klippy_client_status(const struct klippy_client *c);

/* ---- Pure parts, used by the client and by unit tests ---- */

/* PrinterState from klippy's state and print_stats.state (design.md §3):
 * not connected → "stopped"; ready → "printing"/"paused" from print_stats,
 * else "idle"; startup/shutdown/error → that state; anything else (or no
 * state yet) → "unknown". */
const char *klippy_printer_state(bool connected, const char *klippy_state, const char *print_state);

/* True for the status objects of MCUs: "mcu" and "mcu <name>". */
bool klippy_is_mcu_object(const char *name);

/* Splits a byte stream into 0x03-terminated messages. */
struct klippy_frame_buffer {
        char *data;
        size_t allocated;
        size_t start;                   /* first byte not handed out yet */
        size_t end;                     /* one past the last byte received */
        size_t scanned;                 /* no 0x03 in [start, scanned) */
};

int klippy_frame_buffer_append(struct klippy_frame_buffer *b, const void *data, size_t size);
/* Next complete message: returns 1 and points *ret at it, NUL-terminated
 * (its 0x03 is replaced), valid until the next append or done; 0 if no
 * complete message is buffered; -EMSGSIZE if a message (complete or not)
 * exceeds KLIPPY_MESSAGE_MAX.  Empty messages are returned too. */
int klippy_frame_buffer_pop(struct klippy_frame_buffer *b, char **ret, size_t *ret_size);
void klippy_frame_buffer_done(struct klippy_frame_buffer *b);

/* Parse one message: a JSON object and nothing else (whitespace allowed).
 * -EBADMSG for anything else. */
int klippy_parse_message(const char *data, size_t size, json_object **ret);

/* The "status" of a subscription notification carrying our template, or
 * NULL (borrowed from @msg). */
json_object *klippy_notification_status(json_object *msg);

/* Params of objects/subscribe for the result of objects/list: print_stats
 * (state), webhooks (state, state_message) and every MCU object listed
 * (mcu_version, mcu_build_versions, mcu_constants), with our template.
 * -EBADMSG if @list_result has no "objects" array. */
int klippy_subscribe_params(json_object *list_result, json_object **ret);

/* What the client knows of klippy, merged from "info" and status updates;
 * derives struct klippy_status. */
struct klippy_model;

int klippy_model_new(struct klippy_model **ret);
struct klippy_model *klippy_model_free(struct klippy_model *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct klippy_model *, klippy_model_free);

/* The three updaters return 1 if the derived status changed, 0 if not, or a
 * negative errno (-EBADMSG for a malformed argument, which is then ignored). */

/* Forget everything: not connected. */
int klippy_model_reset(struct klippy_model *m);
/* Apply an "info" result; marks the model connected. */
int klippy_model_set_info(struct klippy_model *m, json_object *info_result);
/* Merge a status object ({"obj": {"field": value}}) as found in a query or
 * subscribe result or a notification: fields given replace stored ones,
 * others are kept. */
int klippy_model_merge_status(struct klippy_model *m, json_object *status);

const struct klippy_status *klippy_model_status(const struct klippy_model *m);
