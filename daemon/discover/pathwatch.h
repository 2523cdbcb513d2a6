/* Watches paths that are not udev devices, the way the Linux process MCU
 * appears: klipper_mcu creates /tmp/klipper_host_mcu (a symlink to its pty)
 * when it starts, replacing a stale one, and never removes it.  One inotify
 * instance on the libevent loop watches the parent directory of each path;
 * an event naming a watched path reports it again: appeared while it
 * resolves to a character device (also when it was there before: it may
 * lead somewhere else now), vanished when it stopped doing so.  What is
 * behind the path, and whether the program that made it still runs, is the
 * caller's business (a dangling link raises no event).  No polling. */
#pragma once

#include <event2/event.h>
#include <stdbool.h>

#include "shared/macro.h"

struct path_watch_callbacks {
        void (*appeared)(void *userdata, const char *path);
        void (*vanished)(void *userdata, const char *path);
        void *userdata;
};

struct path_watch;

int path_watch_new(struct event_base *base, const struct path_watch_callbacks *cb,
                   struct path_watch **ret);
struct path_watch *path_watch_free(struct path_watch *w);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct path_watch *, path_watch_free);

/* Watch exactly the paths in the NULL-terminated @paths (absolute) from now
 * on.  Paths that exist already are reported as appeared (again, for paths
 * watched before); paths no longer watched are forgotten silently. */
int path_watch_set(struct path_watch *w, char **paths);
