/* Implementation of klippy.h, the I/O half of the klippy API client: the
 * socket, inotify, timers and the request/reply session.  Framing, parsing,
 * the subscribe request and the status model are the pure half, in
 * klippy-model.c.
 *
 * The session with klippy is a small state machine, one request in flight
 * at a time, driven by replies:
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
        r = klippy_json_add(request, "id", json_object_new_int64(c->last_id + 1));
        if (r < 0)
                return r;
        r = klippy_json_add(request, "method", json_object_new_string(method));
        if (r < 0)
                return r;
        if (owned_params) {
                r = klippy_json_add(request, "params", TAKE_PTR(owned_params));
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
                r = klippy_json_add(client_info, "program", json_object_new_string("mcuflashd"));
                if (r < 0)
                        return r;
                r = klippy_json_add(client_info, "version", json_object_new_string(PACKAGE_VERSION));
                if (r < 0)
                        return r;
                r = klippy_json_add(params, "client_info", TAKE_PTR(client_info));
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
        const char *state = klippy_json_get_string(result, "state");
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
        json_object *status = klippy_json_get_typed(result, "status", json_type_object);

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
                json_object *message = klippy_json_get_typed(error, "message", json_type_string);

                log_warning("klippy: %s failed: %s; dropping the connection", phase_method(c->phase),
                            message ? json_object_get_string(message) : json_object_to_json_string(error));
                return -EPROTO;
        }
        result = klippy_json_get_typed(msg, "result", json_type_object);
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

int klippy_client_peer_uid(const struct klippy_client *c, uid_t *ret) {
        struct ucred cred;
        socklen_t len = sizeof(cred);
        int fd;

        if (!c->bev)
                return -ENOTCONN;
        fd = (int) bufferevent_getfd(c->bev);
        if (fd < 0)
                return -ENOTCONN;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                return -errno;
        *ret = cred.uid;
        return 0;
}
