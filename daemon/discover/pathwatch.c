/* Implementation of pathwatch.h.  For every watched path we remember
 * whether it was present; an inotify event naming it (a symlink can be
 * replaced in several ways: create, rename over, delete), or one about its
 * directory itself, checks it again.  Events about other files in the
 * directory (/tmp is busy) are ignored. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>

#include "discover/pathwatch.h"
#include "shared/log.h"

struct watched_path {
        char *path;
        char *dir;
        const char *name;       /* the last component, inside path */
        int wd;
        bool present;
};

struct path_watch {
        int fd;
        struct event *event;
        struct watched_path *paths;
        size_t n_paths;
        struct path_watch_callbacks cb;
};

static bool path_is_char_device(const char *path) {
        struct stat st;

        return stat(path, &st) >= 0 && S_ISCHR(st.st_mode);
}

/* Report @p if it changed; with @again also when it is present as before. */
static void path_watch_check(struct path_watch *w, struct watched_path *p, bool again) {
        bool now = path_is_char_device(p->path);

        if (now == p->present && !(now && again))
                return;
        p->present = now;
        if (now)
                w->cb.appeared(w->cb.userdata, p->path);
        else
                w->cb.vanished(w->cb.userdata, p->path);
}

/* Check every path that @ev is about. */
static void path_watch_event(struct path_watch *w, const struct inotify_event *ev) {
        for (size_t i = 0; i < w->n_paths; i++) {
                struct watched_path *p = &w->paths[i];

                if (ev->mask & IN_Q_OVERFLOW)
                        path_watch_check(w, p, true);   /* events were lost */
                else if (p->wd == ev->wd && (ev->len == 0 || streq(ev->name, p->name)))
                        path_watch_check(w, p, true);
        }
}

static void on_inotify(evutil_socket_t fd, short what, void *userdata) {
        struct path_watch *w = userdata;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n;

        while ((n = read(fd, buf, sizeof(buf))) > 0)
                for (char *p = buf; p < buf + n;) {
                        const struct inotify_event *ev = (const struct inotify_event *) p;

                        path_watch_event(w, ev);
                        p += sizeof(*ev) + ev->len;
                }
}

int path_watch_new(struct event_base *base, const struct path_watch_callbacks *cb,
                   struct path_watch **ret) {
        _cleanup_(path_watch_freep) struct path_watch *w = NULL;

        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->cb = *cb;
        w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (w->fd < 0)
                return log_error_errno(errno, "Cannot create an inotify instance: %m");
        w->event = event_new(base, w->fd, EV_READ | EV_PERSIST, on_inotify, w);
        if (!w->event || event_add(w->event, NULL) < 0)
                return -ENOMEM;
        *ret = TAKE_PTR(w);
        return 0;
}

static void path_watch_clear(struct path_watch *w) {
        for (size_t i = 0; i < w->n_paths; i++) {
                if (w->paths[i].wd >= 0)
                        (void) inotify_rm_watch(w->fd, w->paths[i].wd);
                free(w->paths[i].path);
                free(w->paths[i].dir);
        }
        free(w->paths);
        w->paths = NULL;
        w->n_paths = 0;
}

struct path_watch *path_watch_free(struct path_watch *w) {
        if (!w)
                return NULL;
        path_watch_clear(w);
        if (w->event)
                event_free(w->event);
        safe_close(w->fd);
        free(w);
        return NULL;
}

int path_watch_set(struct path_watch *w, char **paths) {
        size_t n = 0;

        path_watch_clear(w);
        for (char **p = paths; p && *p; p++)
                n++;
        if (n == 0)
                return 0;
        w->paths = calloc(n, sizeof(*w->paths));
        if (!w->paths)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                struct watched_path *p = &w->paths[w->n_paths];
                _cleanup_free_ char *copy = strdup(paths[i]);

                if (!copy)
                        return -ENOMEM;
                p->path = strdup(paths[i]);
                p->dir = strdup(dirname(copy));
                if (!p->path || !p->dir) {
                        free(p->path);
                        free(p->dir);
                        return -ENOMEM;
                }
                p->name = strrchr(p->path, '/') ? strrchr(p->path, '/') + 1 : p->path;
                /* inotify_add_watch on the same directory twice returns the
                 * same descriptor; removing it once removes it for both, which
                 * path_watch_clear() tolerates. */
                p->wd = inotify_add_watch(w->fd, p->dir,
                                          IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO |
                                          IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF);
                if (p->wd < 0)
                        log_warning_errno(errno, "Cannot watch %s for %s: %m", p->dir, p->path);
                w->n_paths++;
        }
        for (size_t i = 0; i < w->n_paths; i++)
                path_watch_check(w, &w->paths[i], true);
        return 0;
}
