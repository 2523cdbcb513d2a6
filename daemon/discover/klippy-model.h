/* The pure half of the klippy API client (protocols.md §17.1): 0x03
 * framing, message parsing, the objects/subscribe request, the model of
 * what klippy reports (merged from "info" and status updates) and the
 * PrinterState derived from it (design.md §3).
 *
 * Nothing here does I/O, runs timers or logs; the client in klippy.h feeds
 * it bytes and replies.  It is exported so that unit tests reach it without
 * a socket.  Include klippy.h rather than this file unless only the pure
 * half is wanted. */
#pragma once

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
        const char *kconfig;            /* mcu_kconfig (build config); NULL if klippy does not report it */
};

struct klippy_status {
        bool connected;                 /* klippy answered "info" on the current connection */
        const char *klippy_state;       /* startup|ready|shutdown|error; NULL if unknown */
        const char *state_message;      /* klippy's text for its state; NULL if unknown */
        const char *print_state;        /* print_stats.state; NULL if unknown */
        const char *printer_state;      /* idle|printing|paused|startup|shutdown|error|stopped|unknown, never NULL */
        const char *software_version;   /* info's software_version (Klipper host version); NULL if unknown */
        const char *config_file;        /* info's config_file (klippy's printer.cfg); NULL if unknown */
        const struct klippy_mcu_info *mcus; /* sorted by name, so "mcu" comes first */
        size_t n_mcus;
};

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

/* Small json-c helpers shared by klippy.c and klippy-model.c. */

/* @key of object @o if it has type @type, else NULL (also for a NULL or
 * non-object @o); borrowed. */
json_object *klippy_json_get_typed(json_object *o, const char *key, json_type type);
/* The string under @key of @o, or NULL; borrowed. */
const char *klippy_json_get_string(json_object *o, const char *key);
/* Adds @value under @key of @o, consuming @value in every case; -ENOMEM if
 * @value is NULL or cannot be added. */
int klippy_json_add(json_object *o, const char *key, json_object *value);
