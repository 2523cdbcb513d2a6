/* The pure half of the klippy API client (klippy-model.h): splitting the
 * byte stream into 0x03-terminated messages, parsing them, building the
 * objects/subscribe request, merging status updates into a model of what
 * klippy reports and deriving PrinterState from it.
 *
 * It does no I/O, keeps no timers and logs nothing: klippy.c owns the socket,
 * inotify and timers, feeds received bytes and replies in here and decides
 * what to do with the results.  That keeps all of it testable without an
 * event loop. */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "discover/klippy-model.h"
#include "shared/strutil.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put);
DEFINE_TRIVIAL_CLEANUP_FUNC(json_tokener *, json_tokener_free);

/* ---- small json-c helpers ---- */

json_object *klippy_json_get_typed(json_object *o, const char *key, json_type type) {
        json_object *v;

        if (!o || !json_object_is_type(o, json_type_object))
                return NULL;
        if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, type))
                return NULL;
        return v;
}

const char *klippy_json_get_string(json_object *o, const char *key) {
        json_object *v = klippy_json_get_typed(o, key, json_type_string);

        return v ? json_object_get_string(v) : NULL;
}

/* Adds @value under @key, consuming it in every case. */
int klippy_json_add(json_object *o, const char *key, json_object *value) {
        if (!value)
                return -ENOMEM;
        if (json_object_object_add(o, key, value) < 0) {
                json_object_put(value);
                return -ENOMEM;
        }
        return 0;
}

static json_object *json_string_array(const char *const *items, size_t n) {
        _cleanup_(json_object_putp) json_object *a = json_object_new_array();

        if (!a)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                json_object *s = json_object_new_string(items[i]);

                if (!s || json_object_array_add(a, s) < 0) {
                        json_object_put(s);
                        return NULL;
                }
        }
        return TAKE_PTR(a);
}

/* ---- PrinterState ---- */

const char *klippy_printer_state(bool connected, const char *klippy_state, const char *print_state) {
        if (!connected)
                return "stopped";
        if (!klippy_state)
                return "unknown";
        if (streq(klippy_state, "ready")) {
                if (streq_ptr(print_state, "printing"))
                        return "printing";
                if (streq_ptr(print_state, "paused"))
                        return "paused";
                return "idle";
        }
        if (streq(klippy_state, "startup"))
                return "startup";
        if (streq(klippy_state, "shutdown"))
                return "shutdown";
        if (streq(klippy_state, "error"))
                return "error";
        return "unknown";
}

bool klippy_is_mcu_object(const char *name) {
        return streq(name, "mcu") || (startswith(name, "mcu ") && name[4] != '\0');
}

/* ---- framing ---- */

int klippy_frame_buffer_append(struct klippy_frame_buffer *b, const void *data, size_t size) {
        size_t pending;

        if (size == 0)
                return 0;

        /* Move what is still pending to the front before growing. */
        pending = b->end - b->start;
        if (b->start > 0) {
                if (pending > 0)
                        memmove(b->data, b->data + b->start, pending);
                b->scanned = b->scanned > b->start ? b->scanned - b->start : 0;
                b->end = pending;
                b->start = 0;
        }

        if (size > SIZE_MAX / 2 - b->end)
                return -ENOMEM;
        if (b->end + size > b->allocated) {
                size_t allocated = MAX(MAX(b->end + size, b->allocated * 2), (size_t) 4096);
                char *p = realloc(b->data, allocated);

                if (!p)
                        return -ENOMEM;
                b->data = p;
                b->allocated = allocated;
        }
        memcpy(b->data + b->end, data, size);
        b->end += size;
        return 0;
}

int klippy_frame_buffer_pop(struct klippy_frame_buffer *b, char **ret, size_t *ret_size) {
        size_t from = MAX(b->scanned, b->start);
        char *terminator = NULL;
        size_t size;

        if (from < b->end)
                terminator = memchr(b->data + from, 0x03, b->end - from);
        if (!terminator) {
                b->scanned = b->end;
                return b->end - b->start > KLIPPY_MESSAGE_MAX ? -EMSGSIZE : 0;
        }

        size = (size_t) (terminator - (b->data + b->start));
        if (size > KLIPPY_MESSAGE_MAX)
                return -EMSGSIZE;
        *terminator = '\0';
        *ret = b->data + b->start;
        *ret_size = size;
        b->start = b->scanned = (size_t) (terminator - b->data) + 1;
        return 1;
}

void klippy_frame_buffer_done(struct klippy_frame_buffer *b) {
        free(b->data);
        *b = (struct klippy_frame_buffer) {};
}

int klippy_parse_message(const char *data, size_t size, json_object **ret) {
        _cleanup_(json_tokener_freep) json_tokener *tok = NULL;
        _cleanup_(json_object_putp) json_object *o = NULL;
        size_t end;

        if (size > INT_MAX)
                return -EBADMSG;
        tok = json_tokener_new();
        if (!tok)
                return -ENOMEM;
        o = json_tokener_parse_ex(tok, data, (int) size);
        if (!o || json_tokener_get_error(tok) != json_tokener_success)
                return -EBADMSG;
        for (end = json_tokener_get_parse_end(tok); end < size; end++)
                if (!strchr(" \t\r\n", data[end]) || data[end] == '\0')
                        return -EBADMSG;
        if (!json_object_is_type(o, json_type_object))
                return -EBADMSG;
        *ret = TAKE_PTR(o);
        return 0;
}

json_object *klippy_notification_status(json_object *msg) {
        if (!streq_ptr(klippy_json_get_string(msg, KLIPPY_TEMPLATE_KEY), KLIPPY_TEMPLATE_VALUE))
                return NULL;
        return klippy_json_get_typed(klippy_json_get_typed(msg, "params", json_type_object), "status", json_type_object);
}

int klippy_subscribe_params(json_object *list_result, json_object **ret) {
        static const char *const webhooks_fields[] = { "state", "state_message" };
        static const char *const print_stats_fields[] = { "state" };
        static const char *const mcu_fields[] = { "mcu_version", "mcu_build_versions", "mcu_constants",
                                                   "mcu_kconfig" };
        _cleanup_(json_object_putp) json_object *params = NULL, *objects = NULL;
        json_object *list = klippy_json_get_typed(list_result, "objects", json_type_array);
        int r;

        if (!list)
                return -EBADMSG;

        objects = json_object_new_object();
        params = json_object_new_object();
        if (!objects || !params)
                return -ENOMEM;
        r = klippy_json_add(objects, "webhooks", json_string_array(webhooks_fields, ELEMENTSOF(webhooks_fields)));
        if (r < 0)
                return r;
        r = klippy_json_add(objects, "print_stats", json_string_array(print_stats_fields, ELEMENTSOF(print_stats_fields)));
        if (r < 0)
                return r;
        for (size_t i = 0; i < json_object_array_length(list); i++) {
                json_object *name = json_object_array_get_idx(list, i);

                if (!json_object_is_type(name, json_type_string) ||
                    !klippy_is_mcu_object(json_object_get_string(name)))
                        continue;
                r = klippy_json_add(objects, json_object_get_string(name),
                             json_string_array(mcu_fields, ELEMENTSOF(mcu_fields)));
                if (r < 0)
                        return r;
        }
        r = klippy_json_add(params, "objects", TAKE_PTR(objects));
        if (r < 0)
                return r;
        r = klippy_json_add(params, "response_template", json_object_new_object());
        if (r < 0)
                return r;
        r = klippy_json_add(klippy_json_get_typed(params, "response_template", json_type_object), KLIPPY_TEMPLATE_KEY,
                     json_object_new_string(KLIPPY_TEMPLATE_VALUE));
        if (r < 0)
                return r;
        *ret = TAKE_PTR(params);
        return 0;
}

/* ---- model ---- */

/* A derived status with its own copies of every string. */
struct snapshot {
        bool connected;
        char *klippy_state;
        char *state_message;
        char *print_state;
        char *software_version;
        char *config_file;
        const char *printer_state;      /* static */
        struct klippy_mcu_info *mcus;   /* strings owned */
        size_t n_mcus;
};

struct klippy_model {
        bool connected;
        char *info_state;
        char *info_state_message;
        char *software_version;
        char *config_file;
        json_object *objects;           /* merged status: object name → {field: value} */

        struct snapshot current;
        struct klippy_status status;    /* points into current */
};

static void snapshot_done(struct snapshot *s) {
        free(s->klippy_state);
        free(s->state_message);
        free(s->print_state);
        free(s->software_version);
        free(s->config_file);
        for (size_t i = 0; i < s->n_mcus; i++) {
                free((char *) s->mcus[i].name);
                free((char *) s->mcus[i].version);
                free((char *) s->mcus[i].build_versions);
                free((char *) s->mcus[i].mcu_type);
                free((char *) s->mcus[i].kconfig);
        }
        free(s->mcus);
        *s = (struct snapshot) {};
}

static bool snapshot_equal(const struct snapshot *a, const struct snapshot *b) {
        if (a->connected != b->connected || !streq_ptr(a->klippy_state, b->klippy_state) ||
            !streq_ptr(a->state_message, b->state_message) || !streq_ptr(a->print_state, b->print_state) ||
            !streq_ptr(a->software_version, b->software_version) || !streq_ptr(a->printer_state, b->printer_state) ||
            !streq_ptr(a->config_file, b->config_file) ||
            a->n_mcus != b->n_mcus)
                return false;
        for (size_t i = 0; i < a->n_mcus; i++)
                if (!streq(a->mcus[i].name, b->mcus[i].name) || !streq(a->mcus[i].version, b->mcus[i].version) ||
                    !streq(a->mcus[i].build_versions, b->mcus[i].build_versions) ||
                    !streq(a->mcus[i].mcu_type, b->mcus[i].mcu_type) ||
                    !streq_ptr(a->mcus[i].kconfig, b->mcus[i].kconfig))
                        return false;
        return true;
}

static int strdup_optional(const char *s, char **ret) {
        if (!s) {
                *ret = NULL;
                return 0;
        }
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

static int strdup_optional_utf8(const char *s, char **ret) {
        if (!s) {
                *ret = NULL;
                return 0;
        }
        *ret = utf8_sanitize(s);
        return *ret ? 0 : -ENOMEM;
}

static int compare_mcu_info(const void *a, const void *b) {
        return strcmp(((const struct klippy_mcu_info *) a)->name, ((const struct klippy_mcu_info *) b)->name);
}

/* mcu_kconfig (Klipper ≥ v0.13.0-753, protocols.md §15.5): the build config
 * text, "" for firmware without one; NULL when this klippy does not report
 * it at all.  Like the dictionary, accept the {"defconfig": …} shape. */
static int mcu_kconfig_dup(json_object *fields, const char **ret) {
        json_object *v = NULL;
        const char *text;

        *ret = NULL;
        if (!json_object_object_get_ex(fields, "mcu_kconfig", &v))
                return 0;
        if (json_object_is_type(v, json_type_object))
                text = klippy_json_get_string(v, "defconfig");
        else if (json_object_is_type(v, json_type_string))
                text = json_object_get_string(v);
        else
                text = NULL;
        return strdup_optional(strempty(text), (char **) ret);
}

static int snapshot_fill_mcus(struct snapshot *s, json_object *objects) {
        size_t n = 0;

        json_object_object_foreach(objects, counted_name, counted_fields)
                if (klippy_is_mcu_object(counted_name) && json_object_is_type(counted_fields, json_type_object))
                        n++;
        if (n == 0)
                return 0;
        s->mcus = calloc(n, sizeof(*s->mcus));
        if (!s->mcus)
                return -ENOMEM;

        json_object_object_foreach(objects, name, fields) {
                struct klippy_mcu_info *info;
                json_object *constants;

                if (!klippy_is_mcu_object(name) || !json_object_is_type(fields, json_type_object))
                        continue;
                /* Count first, so a half-filled entry is freed with the rest. */
                info = &s->mcus[s->n_mcus++];
                constants = klippy_json_get_typed(fields, "mcu_constants", json_type_object);
                /* Valid UTF-8 from here on: these reach D-Bus (strutil.h). */
                info->name = utf8_sanitize(name);
                info->version = utf8_sanitize(strempty(klippy_json_get_string(fields, "mcu_version")));
                info->build_versions = utf8_sanitize(strempty(klippy_json_get_string(fields, "mcu_build_versions")));
                info->mcu_type = utf8_sanitize(strempty(klippy_json_get_string(constants, "MCU")));
                if (!info->name || !info->version || !info->build_versions || !info->mcu_type)
                        return -ENOMEM;
                if (mcu_kconfig_dup(fields, &info->kconfig) < 0)
                        return -ENOMEM;
        }
        qsort(s->mcus, s->n_mcus, sizeof(*s->mcus), compare_mcu_info);
        return 0;
}

static int snapshot_build(const struct klippy_model *m, struct snapshot *s) {
        json_object *webhooks, *print_stats;
        const char *state, *message;
        int r;

        *s = (struct snapshot) { .printer_state = klippy_printer_state(false, NULL, NULL) };
        if (!m->connected)
                return 0;

        /* webhooks is klippy's state as it changes; info only tells the
         * state at the time of asking. */
        webhooks = klippy_json_get_typed(m->objects, "webhooks", json_type_object);
        print_stats = klippy_json_get_typed(m->objects, "print_stats", json_type_object);
        state = klippy_json_get_string(webhooks, "state") ?: m->info_state;
        message = klippy_json_get_string(webhooks, "state_message") ?: m->info_state_message;

        s->connected = true;
        if (strdup_optional(state, &s->klippy_state) < 0 ||
            strdup_optional_utf8(message, &s->state_message) < 0 ||
            strdup_optional(klippy_json_get_string(print_stats, "state"), &s->print_state) < 0 ||
            strdup_optional(m->software_version, &s->software_version) < 0 ||
            strdup_optional(m->config_file, &s->config_file) < 0)
                return -ENOMEM;
        s->printer_state = klippy_printer_state(true, s->klippy_state, s->print_state);
        if (m->objects) {
                r = snapshot_fill_mcus(s, m->objects);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Re-derive the status; 1 if it changed. */
static int model_update(struct klippy_model *m) {
        struct snapshot s;
        int r;

        r = snapshot_build(m, &s);
        if (r < 0) {
                snapshot_done(&s);
                return r;
        }
        if (snapshot_equal(&s, &m->current)) {
                snapshot_done(&s);
                return 0;
        }
        snapshot_done(&m->current);
        m->current = s;
        m->status = (struct klippy_status) {
                .connected = s.connected,
                .klippy_state = s.klippy_state,
                .state_message = s.state_message,
                .print_state = s.print_state,
                .printer_state = s.printer_state,
                .software_version = s.software_version,
                .config_file = s.config_file,
                .mcus = s.mcus,
                .n_mcus = s.n_mcus,
        };
        return 1;
}

int klippy_model_new(struct klippy_model **ret) {
        struct klippy_model *m = calloc(1, sizeof(*m));

        if (!m)
                return -ENOMEM;
        (void) model_update(m);
        *ret = m;
        return 0;
}

struct klippy_model *klippy_model_free(struct klippy_model *m) {
        if (!m)
                return NULL;
        free(m->info_state);
        free(m->info_state_message);
        free(m->software_version);
        free(m->config_file);
        json_object_put(m->objects);
        snapshot_done(&m->current);
        free(m);
        return NULL;
}

int klippy_model_reset(struct klippy_model *m) {
        m->connected = false;
        free(m->info_state);
        free(m->info_state_message);
        free(m->software_version);
        free(m->config_file);
        json_object_put(m->objects);
        m->info_state = m->info_state_message = m->software_version = m->config_file = NULL;
        m->objects = NULL;
        return model_update(m);
}

int klippy_model_set_info(struct klippy_model *m, json_object *info_result) {
        const char *state = klippy_json_get_string(info_result, "state");

        if (!state)
                return -EBADMSG;
        if (free_and_strdup(&m->info_state, state) < 0 ||
            free_and_strdup_utf8(&m->info_state_message, klippy_json_get_string(info_result, "state_message")) < 0 ||
            free_and_strdup_utf8(&m->software_version, klippy_json_get_string(info_result, "software_version")) < 0 ||
            free_and_strdup(&m->config_file, klippy_json_get_string(info_result, "config_file")) < 0)
                return -ENOMEM;
        m->connected = true;
        return model_update(m);
}

int klippy_model_merge_status(struct klippy_model *m, json_object *status) {
        if (!status || !json_object_is_type(status, json_type_object))
                return -EBADMSG;
        if (!m->objects) {
                m->objects = json_object_new_object();
                if (!m->objects)
                        return -ENOMEM;
        }

        json_object_object_foreach(status, name, fields) {
                json_object *stored;

                if (!json_object_is_type(fields, json_type_object))
                        continue;
                stored = klippy_json_get_typed(m->objects, name, json_type_object);
                if (!stored) {
                        stored = json_object_new_object();
                        if (klippy_json_add(m->objects, name, stored) < 0)
                                return -ENOMEM;
                }
                json_object_object_foreach(fields, field, value) {
                        /* A JSON null is a NULL json_object: stored as null. */
                        if (json_object_object_add(stored, field, json_object_get(value)) < 0) {
                                json_object_put(value);
                                return -ENOMEM;
                        }
                }
        }
        return model_update(m);
}

const struct klippy_status *klippy_model_status(const struct klippy_model *m) {
        return &m->status;
}
