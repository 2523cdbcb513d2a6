/* Watches paths that are not udev devices, the way the Linux process MCU
 * appears: klipper_mcu creates /tmp/klipper_host_mcu (a symlink to its pty)
 * when it starts and removes it when it exits.  One inotify instance on the
 * libevent loop watches the parent directory of each path; the callbacks say
 * when a path starts or stops resolving to a character device.  No polling. */
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
 * on.  Paths that exist already are reported as appeared; paths no longer
 * watched are forgotten silently. */
int path_watch_set(struct path_watch *w, char **paths);
