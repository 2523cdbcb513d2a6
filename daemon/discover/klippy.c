/* Implementation of klippy.h.  The session with klippy is a small state
 * machine, one request in flight at a time, driven by replies:
 *
 *   connect → info ─ "startup" → wait 1 s → info (again, as Moonraker does;
 *                  │                         klippy has no objects before ready)
 *                  └ ready/shutdown/error → objects/list → objects/subscribe
 *                                            → notifications, merged
 *
 * Any failure (EOF, socket error, error reply, garbage, a message over
 * KLIPPY_MESSAGE_MAX) drops the connection, resets what we know to "not
 * connected" and waits: inotify on the socket's directory (or its nearest
 * existing ancestor) reports a re-created socket, and a back-off timer
 * (1 s doubling to 10 s) retries a socket file that exists but refuses.
 * A missing socket file is waited for through inotify alone.
 *
 * Nothing here blocks or polls, and nothing is sent to klippy but
 * info/objects requests. */
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "build-config.h"
#include "discover/klippy.h"
#include "shared/log.h"

#define STARTUP_REQUERY_SEC 1
#define RETRY_MIN_SEC 1
#define RETRY_MAX_SEC 10
/* klippy binds its socket (inotify fires) a moment before it listens. */
#define RETRY_AFTER_CREATE_USEC 100000
#define WATCH_MASK (IN_CREATE | IN_MOVED_TO | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
/* Bound on re-arming while directories race into existence under us. */
#define WATCH_REARM_ATTEMPTS 16

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put);
DEFINE_TRIVIAL_CLEANUP_FUNC(json_tokener *, json_tokener_free);

/* ---- small json-c helpers ---- */

static json_object *json_get_typed(json_object *o, const char *key, json_type type) {
        json_object *v;

        if (!o || !json_object_is_type(o, json_type_object))
                return NULL;
        if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, type))
                return NULL;
        return v;
}

static const char *json_get_string(json_object *o, const char *key) {
        json_object *v = json_get_typed(o, key, json_type_string);

        return v ? json_object_get_string(v) : NULL;
}

/* Adds @value under @key, consuming it in every case. */
static int json_add(json_object *o, const char *key, json_object *value) {
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
        if (!streq_ptr(json_get_string(msg, KLIPPY_TEMPLATE_KEY), KLIPPY_TEMPLATE_VALUE))
                return NULL;
        return json_get_typed(json_get_typed(msg, "params", json_type_object), "status", json_type_object);
}

int klippy_subscribe_params(json_object *list_result, json_object **ret) {
        static const char *const webhooks_fields[] = { "state", "state_message" };
        static const char *const print_stats_fields[] = { "state" };
        static const char *const mcu_fields[] = { "mcu_version", "mcu_build_versions", "mcu_constants" };
        _cleanup_(json_object_putp) json_object *params = NULL, *objects = NULL;
        json_object *list = json_get_typed(list_result, "objects", json_type_array);
        int r;

        if (!list)
                return -EBADMSG;

        objects = json_object_new_object();
        params = json_object_new_object();
        if (!objects || !params)
                return -ENOMEM;
        r = json_add(objects, "webhooks", json_string_array(webhooks_fields, ELEMENTSOF(webhooks_fields)));
        if (r < 0)
                return r;
        r = json_add(objects, "print_stats", json_string_array(print_stats_fields, ELEMENTSOF(print_stats_fields)));
        if (r < 0)
                return r;
        for (size_t i = 0; i < json_object_array_length(list); i++) {
                json_object *name = json_object_array_get_idx(list, i);

                if (!json_object_is_type(name, json_type_string) ||
                    !klippy_is_mcu_object(json_object_get_string(name)))
                        continue;
                r = json_add(objects, json_object_get_string(name),
                             json_string_array(mcu_fields, ELEMENTSOF(mcu_fields)));
                if (r < 0)
                        return r;
        }
        r = json_add(params, "objects", TAKE_PTR(objects));
        if (r < 0)
                return r;
        r = json_add(params, "response_template", json_object_new_object());
        if (r < 0)
                return r;
        r = json_add(json_get_typed(params, "response_template", json_type_object), KLIPPY_TEMPLATE_KEY,
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
        const char *printer_state;      /* static */
        struct klippy_mcu_info *mcus;   /* strings owned */
        size_t n_mcus;
};

struct klippy_model {
        bool connected;
        char *info_state;
        char *info_state_message;
        char *software_version;
        json_object *objects;           /* merged status: object name → {field: value} */

        struct snapshot current;
        struct klippy_status status;    /* points into current */
};

static void snapshot_done(struct snapshot *s) {
        free(s->klippy_state);
        free(s->state_message);
        free(s->print_state);
        free(s->software_version);
        for (size_t i = 0; i < s->n_mcus; i++) {
                free((char *) s->mcus[i].name);
                free((char *) s->mcus[i].version);
                free((char *) s->mcus[i].build_versions);
                free((char *) s->mcus[i].mcu_type);
        }
        free(s->mcus);
        *s = (struct snapshot) {};
}

static bool snapshot_equal(const struct snapshot *a, const struct snapshot *b) {
        if (a->connected != b->connected || !streq_ptr(a->klippy_state, b->klippy_state) ||
            !streq_ptr(a->state_message, b->state_message) || !streq_ptr(a->print_state, b->print_state) ||
            !streq_ptr(a->software_version, b->software_version) || !streq_ptr(a->printer_state, b->printer_state) ||
            a->n_mcus != b->n_mcus)
                return false;
        for (size_t i = 0; i < a->n_mcus; i++)
                if (!streq(a->mcus[i].name, b->mcus[i].name) || !streq(a->mcus[i].version, b->mcus[i].version) ||
                    !streq(a->mcus[i].build_versions, b->mcus[i].build_versions) ||
                    !streq(a->mcus[i].mcu_type, b->mcus[i].mcu_type))
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

static int compare_mcu_info(const void *a, const void *b) {
        return strcmp(((const struct klippy_mcu_info *) a)->name, ((const struct klippy_mcu_info *) b)->name);
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
                constants = json_get_typed(fields, "mcu_constants", json_type_object);
                info->name = strdup(name);
                info->version = strdup(strempty(json_get_string(fields, "mcu_version")));
                info->build_versions = strdup(strempty(json_get_string(fields, "mcu_build_versions")));
                info->mcu_type = strdup(strempty(json_get_string(constants, "MCU")));
                if (!info->name || !info->version || !info->build_versions || !info->mcu_type)
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
        webhooks = json_get_typed(m->objects, "webhooks", json_type_object);
        print_stats = json_get_typed(m->objects, "print_stats", json_type_object);
        state = json_get_string(webhooks, "state") ?: m->info_state;
        message = json_get_string(webhooks, "state_message") ?: m->info_state_message;

        s->connected = true;
        if (strdup_optional(state, &s->klippy_state) < 0 ||
            strdup_optional(message, &s->state_message) < 0 ||
            strdup_optional(json_get_string(print_stats, "state"), &s->print_state) < 0 ||
            strdup_optional(m->software_version, &s->software_version) < 0)
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
        json_object_put(m->objects);
        m->info_state = m->info_state_message = m->software_version = NULL;
        m->objects = NULL;
        return model_update(m);
}

int klippy_model_set_info(struct klippy_model *m, json_object *info_result) {
        const char *state = json_get_string(info_result, "state");

        if (!state)
                return -EBADMSG;
        if (free_and_strdup(&m->info_state, state) < 0 ||
            free_and_strdup(&m->info_state_message, json_get_string(info_result, "state_message")) < 0 ||
            free_and_strdup(&m->software_version, json_get_string(info_result, "software_version")) < 0)
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
                stored = json_get_typed(m->objects, name, json_type_object);
                if (!stored) {
                        stored = json_object_new_object();
                        if (json_add(m->objects, name, stored) < 0)
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

/* ---- client ---- */

enum session_phase {
        PHASE_DISCONNECTED,
        PHASE_INFO,                     /* info sent */
        PHASE_STARTUP_WAIT,             /* klippy starting: info again when info_timer fires */
        PHASE_LIST,                     /* objects/list sent */
        PHASE_SUBSCRIBE,                /* objects/subscribe sent */
        PHASE_SUBSCRIBED,               /* applying notifications */
};

struct klippy_client {
        struct event_base *base;
        struct klippy_callbacks cb;
        char *socket_path;
        const char *socket_name;        /* points into socket_path */
        char *parent_dir;

        struct klippy_model *model;
        const char *logged_printer_state;

        /* inotify on parent_dir, or on its nearest existing ancestor */
        int inotify_fd;
        int watch_wd;
        char *watch_dir;
        struct event *inotify_event;

        struct event *retry_timer;
        unsigned retry_delay_sec;
        int last_connect_error;         /* logged as a warning once, then at debug level */

        /* the session */
        struct bufferevent *bev;
        struct klippy_frame_buffer frames;
        enum session_phase phase;
        int64_t last_id;
        int64_t pending_id;
        struct event *info_timer;
};

static void client_try_connect(struct klippy_client *c, bool socket_appeared);

static void path_strip_last(char *path) {
        char *slash = strrchr(path, '/');

        if (!slash)
                return;
        while (slash > path && slash[-1] == '/')
                slash--;
        if (slash == path)
                slash++;
        *slash = '\0';
}

static bool watching_parent(const struct klippy_client *c) {
        return c->watch_wd >= 0 && streq(c->watch_dir, c->parent_dir);
}

/* The path component of parent_dir just below the watched ancestor; its
 * length goes to *ret_len. */
static const char *next_component(const struct klippy_client *c, size_t *ret_len) {
        const char *p = c->parent_dir + strlen(c->watch_dir);

        p += strspn(p, "/");
        *ret_len = strcspn(p, "/");
        return p;
}

static void watch_drop(struct klippy_client *c) {
        if (c->watch_wd >= 0)
                (void) inotify_rm_watch(c->inotify_fd, c->watch_wd);
        c->watch_wd = -1;
        free(c->watch_dir);
        c->watch_dir = NULL;
}

/* Watch parent_dir, or while it does not exist its nearest existing
 * ancestor, from which we learn when the next level appears. */
static int watch_rearm(struct klippy_client *c) {
        for (unsigned attempt = 0; attempt < WATCH_REARM_ATTEMPTS; attempt++) {
                _cleanup_free_ char *dir = strdup(c->parent_dir), *child = NULL;
                const char *next;
                size_t next_len;
                int wd;

                if (!dir)
                        return -ENOMEM;
                for (;;) {
                        wd = inotify_add_watch(c->inotify_fd, dir, WATCH_MASK);
                        if (wd >= 0)
                                break;
                        if ((errno != ENOENT && errno != ENOTDIR) || streq(dir, "/")) {
                                int r = -errno;

                                watch_drop(c);
                                return log_warning_errno(r, "klippy: cannot watch %s for %s, retrying on a timer: %m",
                                                         dir, c->socket_path);
                        }
                        path_strip_last(dir);
                }

                if (c->watch_wd >= 0 && c->watch_wd != wd)
                        (void) inotify_rm_watch(c->inotify_fd, c->watch_wd);
                c->watch_wd = wd;
                free(c->watch_dir);
                c->watch_dir = TAKE_PTR(dir);
                if (watching_parent(c))
                        return 0;

                log_debug("klippy: %s does not exist yet, watching %s", c->parent_dir, c->watch_dir);
                /* The next level may have been created after our attempt
                 * to watch it and before the ancestor's watch existed. */
                next = next_component(c, &next_len);
                child = strndup(c->parent_dir, (size_t) (next - c->parent_dir) + next_len);
                if (!child)
                        return -ENOMEM;
                if (access(child, F_OK) < 0 && errno == ENOENT)
                        return 0;
        }
        return 0;
}

static void client_notify(struct klippy_client *c) {
        const struct klippy_status *st = klippy_model_status(c->model);

        if (!streq_ptr(c->logged_printer_state, st->printer_state)) {
                log_info("klippy: printer state %s%s%s%s", st->printer_state,
                         st->klippy_state ? " (klippy " : "", strempty(st->klippy_state),
                         st->klippy_state ? ")" : "");
                c->logged_printer_state = st->printer_state;
        }
        for (size_t i = 0; i < st->n_mcus; i++)
                log_debug("klippy: %s version '%s' type '%s'", st->mcus[i].name, st->mcus[i].version,
                          st->mcus[i].mcu_type);
        if (c->cb.state_changed)
                c->cb.state_changed(c->cb.userdata, st);
}

static void client_schedule_retry(struct klippy_client *c) {
        struct timeval tv = { .tv_sec = c->retry_delay_sec };

        if (evtimer_add(c->retry_timer, &tv) < 0)
                log_warning("klippy: cannot arm the reconnect timer");
        c->retry_delay_sec = MIN(c->retry_delay_sec * 2, RETRY_MAX_SEC);
}

static void client_disconnect(struct klippy_client *c) {
        if (c->bev) {
                bufferevent_free(c->bev);
                c->bev = NULL;
        }
        klippy_frame_buffer_done(&c->frames);
        c->phase = PHASE_DISCONNECTED;
        c->pending_id = 0;
        evtimer_del(c->info_timer);
        if (klippy_model_reset(c->model) > 0)
                client_notify(c);
        client_schedule_retry(c);
}

/* Sends a request and remembers its id as the one we wait for; @params is
 * consumed (may be NULL). */
static int client_send_request(struct klippy_client *c, const char *method, json_object *params) {
        _cleanup_(json_object_putp) json_object *request = json_object_new_object();
        _cleanup_(json_object_putp) json_object *owned_params = params;
        const char *text;
        int r;

        if (!request)
                return -ENOMEM;
        r = json_add(request, "id", json_object_new_int64(c->last_id + 1));
        if (r < 0)
                return r;
        r = json_add(request, "method", json_object_new_string(method));
        if (r < 0)
                return r;
        if (owned_params) {
                r = json_add(request, "params", TAKE_PTR(owned_params));
                if (r < 0)
                        return r;
        }
        text = json_object_to_json_string_ext(request,
                                              JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return -ENOMEM;
        if (bufferevent_write(c->bev, text, strlen(text)) < 0 || bufferevent_write(c->bev, "\x03", 1) < 0)
                return -EIO;
        c->pending_id = ++c->last_id;
        log_debug("klippy: sent %s", text);
        return 0;
}

/* klippy logs client_info as who is connected: tell it once per
 * connection, not with every startup re-query. */
static int client_request_info(struct klippy_client *c, bool with_client_info) {
        _cleanup_(json_object_putp) json_object *params = NULL, *client_info = NULL;
        int r;

        if (with_client_info) {
                params = json_object_new_object();
                client_info = json_object_new_object();
                if (!params || !client_info)
                        return -ENOMEM;
                r = json_add(client_info, "program", json_object_new_string("mcuflashd"));
                if (r < 0)
                        return r;
                r = json_add(client_info, "version", json_object_new_string(PACKAGE_VERSION));
                if (r < 0)
                        return r;
                r = json_add(params, "client_info", TAKE_PTR(client_info));
                if (r < 0)
                        return r;
        }
        c->phase = PHASE_INFO;
        return client_send_request(c, "info", TAKE_PTR(params));
}

static int client_apply_status(struct klippy_client *c, json_object *status) {
        int r = klippy_model_merge_status(c->model, status);

        if (r < 0)
                return log_warning_errno(r, "klippy: cannot apply a status update: %m");
        if (r > 0)
                client_notify(c);
        return 0;
}

static int client_handle_info(struct klippy_client *c, json_object *result) {
        const char *state = json_get_string(result, "state");
        struct timeval tv = { .tv_sec = STARTUP_REQUERY_SEC };
        int changed, r;

        changed = klippy_model_set_info(c->model, result);
        if (changed == -EBADMSG)
                return log_warning_errno(changed, "klippy: info reply without a state, dropping the connection");
        if (changed < 0)
                return changed;
        /* klippy answers: reconnecting soon after a failure is fine again. */
        c->retry_delay_sec = RETRY_MIN_SEC;

        if (streq(state, "startup")) {
                c->phase = PHASE_STARTUP_WAIT;
                if (evtimer_add(c->info_timer, &tv) < 0)
                        return -ENOMEM;
        } else {
                c->phase = PHASE_LIST;
                r = client_send_request(c, "objects/list", NULL);
                if (r < 0)
                        return r;
        }
        if (changed > 0)
                client_notify(c);
        return 0;
}

static int client_handle_list(struct klippy_client *c, json_object *result) {
        json_object *params;
        int r;

        r = klippy_subscribe_params(result, &params);
        if (r == -EBADMSG)
                return log_warning_errno(r, "klippy: objects/list reply without objects, dropping the connection");
        if (r < 0)
                return r;
        c->phase = PHASE_SUBSCRIBE;
        return client_send_request(c, "objects/subscribe", params);
}

static int client_handle_subscribed(struct klippy_client *c, json_object *result) {
        json_object *status = json_get_typed(result, "status", json_type_object);

        if (!status)
                return log_warning_errno(EBADMSG, "klippy: objects/subscribe reply without status, "
                                         "dropping the connection");
        c->phase = PHASE_SUBSCRIBED;
        return client_apply_status(c, status);
}

static const char *phase_method(enum session_phase phase) {
        switch (phase) {
        case PHASE_INFO:
                return "info";
        case PHASE_LIST:
                return "objects/list";
        case PHASE_SUBSCRIBE:
                return "objects/subscribe";
        default:
                return "?";
        }
}

static int client_handle_reply(struct klippy_client *c, json_object *msg, json_object *id) {
        json_object *error, *result;

        if (!json_object_is_type(id, json_type_int) || c->pending_id == 0 ||
            json_object_get_int64(id) != c->pending_id) {
                log_debug("klippy: ignoring a reply to a request we are not waiting for");
                return 0;
        }
        c->pending_id = 0;

        if (json_object_object_get_ex(msg, "error", &error)) {
                json_object *message = json_get_typed(error, "message", json_type_string);

                log_warning("klippy: %s failed: %s; dropping the connection", phase_method(c->phase),
                            message ? json_object_get_string(message) : json_object_to_json_string(error));
                return -EPROTO;
        }
        result = json_get_typed(msg, "result", json_type_object);
        if (!result)
                return log_warning_errno(EBADMSG, "klippy: reply to %s without a result, dropping the connection",
                                         phase_method(c->phase));

        switch (c->phase) {
        case PHASE_INFO:
                return client_handle_info(c, result);
        case PHASE_LIST:
                return client_handle_list(c, result);
        case PHASE_SUBSCRIBE:
                return client_handle_subscribed(c, result);
        default:
                return 0;
        }
}

/* Negative: drop the connection. */
static int client_handle_frame(struct klippy_client *c, const char *frame, size_t size) {
        _cleanup_(json_object_putp) json_object *msg = NULL;
        json_object *id, *status;
        int r;

        if (size == 0)
                return 0;
        r = klippy_parse_message(frame, size, &msg);
        if (r == -EBADMSG)
                return log_warning_errno(r, "klippy: received a message that is not a JSON object, "
                                         "dropping the connection");
        if (r < 0)
                return r;

        if (json_object_object_get_ex(msg, "id", &id))
                return client_handle_reply(c, msg, id);

        status = klippy_notification_status(msg);
        if (status && c->phase == PHASE_SUBSCRIBED)
                return client_apply_status(c, status);
        return 0;
}

static void on_readable(struct bufferevent *bev, void *userdata) {
        struct klippy_client *c = userdata;
        struct evbuffer *input = bufferevent_get_input(bev);
        char chunk[16384];
        int n, r;

        while ((n = evbuffer_remove(input, chunk, sizeof(chunk))) > 0) {
                r = klippy_frame_buffer_append(&c->frames, chunk, (size_t) n);
                if (r < 0) {
                        log_oom();
                        client_disconnect(c);
                        return;
                }
                for (;;) {
                        char *frame;
                        size_t size;

                        r = klippy_frame_buffer_pop(&c->frames, &frame, &size);
                        if (r == 0)
                                break;
                        if (r == -EMSGSIZE)
                                log_warning("klippy: message longer than %zu bytes, dropping the connection",
                                            KLIPPY_MESSAGE_MAX);
                        if (r > 0)
                                r = client_handle_frame(c, frame, size);
                        if (r < 0) {
                                client_disconnect(c);
                                return;
                        }
                }
        }
}

static void on_connection_event(struct bufferevent *bev, short what, void *userdata) {
        struct klippy_client *c = userdata;
        int level = klippy_model_status(c->model)->connected ? LOG_INFO : LOG_DEBUG;

        if (what & BEV_EVENT_EOF)
                log_full(level, "klippy: %s closed the connection", c->socket_path);
        else if (what & BEV_EVENT_ERROR)
                log_full_errno(level, EVUTIL_SOCKET_ERROR(), "klippy: connection to %s failed: %m", c->socket_path);
        else
                return;
        client_disconnect(c);
}

static void on_info_timer(evutil_socket_t fd, short what, void *userdata) {
        struct klippy_client *c = userdata;

        if (c->phase != PHASE_STARTUP_WAIT)
                return;
        if (client_request_info(c, false) < 0) {
                log_warning("klippy: cannot send info, dropping the connection");
                client_disconnect(c);
        }
}

static void on_retry_timer(evutil_socket_t fd, short what, void *userdata) {
        client_try_connect(userdata, false);
}

static int client_start_session(struct klippy_client *c, int fd) {
        c->bev = bufferevent_socket_new(c->base, fd, BEV_OPT_CLOSE_ON_FREE);
        if (!c->bev) {
                safe_close(fd);
                return -ENOMEM;
        }
        bufferevent_setcb(c->bev, on_readable, NULL, on_connection_event, c);
        if (bufferevent_enable(c->bev, EV_READ | EV_WRITE) < 0)
                return -EIO;
        log_debug("klippy: connected to %s", c->socket_path);
        return client_request_info(c, true);
}

/* @socket_appeared: inotify just saw the socket file change. */
static void client_try_connect(struct klippy_client *c, bool socket_appeared) {
        _cleanup_close_ int fd = -1;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        socklen_t len;
        int r;

        if (c->bev)
                return;
        evtimer_del(c->retry_timer);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
                log_warning_errno(errno, "klippy: cannot create a socket: %m");
                client_schedule_retry(c);
                return;
        }
        memcpy(sa.sun_path, c->socket_path, strlen(c->socket_path));
        len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + strlen(c->socket_path) + 1);
        /* A unix socket connects at once or fails at once; EINPROGRESS is
         * handled by the session like a connected socket (errors arrive as
         * connection events). */
        if (connect(fd, (struct sockaddr *) &sa, len) < 0 && errno != EINPROGRESS) {
                r = -errno;
                if (r == -ENOENT && c->watch_wd >= 0) {
                        log_debug("klippy: %s does not exist, waiting for it", c->socket_path);
                        return;
                }
                /* ECONNREFUSED: the file is there but klippy is gone, or
                 * has just bound it and does not listen yet; EAGAIN: its
                 * backlog is full. */
                log_full_errno(r == -ECONNREFUSED || r == -ENOENT || r == -EAGAIN || r == c->last_connect_error ?
                               LOG_DEBUG : LOG_WARNING,
                               r, "klippy: cannot connect to %s: %m", c->socket_path);
                c->last_connect_error = r;
                if (r == -ECONNREFUSED && socket_appeared) {
                        struct timeval tv = { .tv_usec = RETRY_AFTER_CREATE_USEC };

                        if (evtimer_add(c->retry_timer, &tv) >= 0)
                                return;
                }
                client_schedule_retry(c);
                return;
        }

        c->last_connect_error = 0;
        r = client_start_session(c, TAKE_FD(fd));
        if (r < 0) {
                log_warning_errno(r, "klippy: cannot start a session on %s: %m", c->socket_path);
                client_disconnect(c);
        }
}

static void on_inotify(evutil_socket_t fd, short what, void *userdata) {
        struct klippy_client *c = userdata;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        bool rearm = false, reconnect = false;

        for (;;) {
                ssize_t n = read(c->inotify_fd, buf, sizeof(buf));

                if (n < 0) {
                        if (errno != EAGAIN && errno != EINTR)
                                log_warning_errno(errno, "klippy: cannot read inotify events: %m");
                        break;
                }
                for (char *p = buf; p < buf + n;) {
                        const struct inotify_event *ev = (const struct inotify_event *) p;
                        size_t next_len;
                        const char *next;

                        p += sizeof(struct inotify_event) + ev->len;
                        if (ev->mask & IN_Q_OVERFLOW) {
                                rearm = reconnect = true;
                                continue;
                        }
                        if (ev->wd != c->watch_wd)
                                continue;
                        if (ev->mask & IN_IGNORED) {
                                /* The kernel dropped the watch already. */
                                c->watch_wd = -1;
                                rearm = true;
                                continue;
                        }
                        if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT)) {
                                rearm = true;
                                continue;
                        }
                        if (ev->len == 0)
                                continue;
                        if (watching_parent(c)) {
                                if (streq(ev->name, c->socket_name))
                                        reconnect = true;
                                continue;
                        }
                        next = next_component(c, &next_len);
                        if (strlen(ev->name) == next_len && strncmp(ev->name, next, next_len) == 0)
                                rearm = true;
                }
        }

        if (rearm) {
                (void) watch_rearm(c);
                /* The socket may be in a directory that just appeared. */
                if (watching_parent(c))
                        reconnect = true;
        }
        if (reconnect && !c->bev) {
                log_debug("klippy: %s changed, connecting", c->socket_path);
                client_try_connect(c, true);
        }
}

int klippy_client_new(struct event_base *base, const char *socket_path, const struct klippy_callbacks *cb,
                      struct klippy_client **ret) {
        _cleanup_(klippy_client_freep) struct klippy_client *c = NULL;
        const char *slash;
        int r;

        if (!socket_path || socket_path[0] != '/')
                return -EINVAL;
        if (strlen(socket_path) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                return -ENAMETOOLONG;
        slash = strrchr(socket_path, '/');
        if (slash[1] == '\0')
                return -EINVAL;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->base = base;
        c->cb = *cb;
        c->inotify_fd = -1;
        c->watch_wd = -1;
        c->retry_delay_sec = RETRY_MIN_SEC;
        c->socket_path = strdup(socket_path);
        c->parent_dir = strdup(socket_path);
        if (!c->socket_path || !c->parent_dir)
                return -ENOMEM;
        c->socket_name = strrchr(c->socket_path, '/') + 1;
        path_strip_last(c->parent_dir);

        r = klippy_model_new(&c->model);
        if (r < 0)
                return r;
        c->logged_printer_state = klippy_model_status(c->model)->printer_state;

        c->retry_timer = evtimer_new(base, on_retry_timer, c);
        c->info_timer = evtimer_new(base, on_info_timer, c);
        if (!c->retry_timer || !c->info_timer)
                return -ENOMEM;

        c->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (c->inotify_fd < 0)
                return log_error_errno(errno, "klippy: cannot create an inotify instance: %m");
        c->inotify_event = event_new(base, c->inotify_fd, EV_READ | EV_PERSIST, on_inotify, c);
        if (!c->inotify_event || event_add(c->inotify_event, NULL) < 0)
                return -ENOMEM;
        r = watch_rearm(c);
        if (r == -ENOMEM)
                return r;

        log_debug("klippy: following %s", c->socket_path);
        client_try_connect(c, false);
        *ret = TAKE_PTR(c);
        return 0;
}

struct klippy_client *klippy_client_free(struct klippy_client *c) {
        if (!c)
                return NULL;
        if (c->bev)
                bufferevent_free(c->bev);
        klippy_frame_buffer_done(&c->frames);
        if (c->info_timer)
                event_free(c->info_timer);
        if (c->retry_timer)
                event_free(c->retry_timer);
        if (c->inotify_event)
                event_free(c->inotify_event);
        safe_close(c->inotify_fd);
        free(c->watch_dir);
        klippy_model_free(c->model);
        free(c->socket_path);
        free(c->parent_dir);
        free(c);
        return NULL;
}

const struct klippy_status *klippy_client_status(const struct klippy_client *c) {
        return klippy_model_status(c->model);
}
