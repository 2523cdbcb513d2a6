/* The Linux process MCU: klipper_mcu on the host itself, reached through
 * the pty it creates (printer.cfg "serial: /tmp/klipper_host_mcu", changed
 * with its -I option).  Such paths are not udev devices: every printer.cfg
 * serial: outside /dev is watched with discover/pathwatch.c, and while it
 * resolves to a character device there is an MCU with transport "linux"
 * behind it, identified like any other. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/daemon-internal.h"
#include "shared/log.h"

/* The id of a Linux process MCU: "linux-" and the basename of its path, so
 * that /tmp/klipper_host_mcu is "linux-klipper_host_mcu". */
static int linux_mcu_id(const char *path, char **ret) {
        const char *base = strrchr(path, '/');

        return asprintf(ret, "linux-%s", base ? base + 1 : path) < 0 ? -ENOMEM : 0;
}

static struct mcu *find_linux_mcu(struct daemon *d, const char *path) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                if (m->transport_id == MCU_TRANSPORT_LINUX && streq(m->device_path, path))
                        return m;
        }
        return NULL;
}

static void linux_path_appeared(void *userdata, const char *path) {
        struct daemon *d = userdata;
        _cleanup_free_ char *id = NULL;
        struct mcu *m = find_linux_mcu(d, path);
        bool is_new = !m;

        if (!m) {
                if (linux_mcu_id(path, &id) < 0 || mcu_new(id, &m) < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
        }
        daemon_cancel_offline_timer(m);
        mcu_set_transport(m, MCU_TRANSPORT_LINUX);
        (void) mcu_set_string(m, MCU_PROP_DEVICE_PATH, path);
        /* "Flashing" a Linux process MCU means installing a new klipper_mcu. */
        (void) mcu_set_string(m, MCU_PROP_BOOTLOADER, "linux");
        daemon_mcu_attached(d, m, is_new);
}

static void linux_path_vanished(void *userdata, const char *path) {
        struct daemon *d = userdata;
        struct mcu *m = find_linux_mcu(d, path);

        if (!m)
                return;
        log_info("%s: %s is gone (klipper_mcu stopped); keeping the MCU as offline.", m->id, path);
        daemon_mcu_gone(d, m, "the Linux process MCU is not running (klipper_mcu stopped)");
}

/* Watch every printer.cfg serial: path outside /dev (see above). */
int daemon_linux_mcus_update(struct daemon *d) {
        static const struct path_watch_callbacks callbacks = {
                .appeared = linux_path_appeared,
                .vanished = linux_path_vanished,
        };
        _cleanup_free_ char **paths = NULL;
        size_t n = 0;
        int r;

        if (!d->path_watch) {
                struct path_watch_callbacks cb = callbacks;

                cb.userdata = d;
                r = path_watch_new(d->base, &cb, &d->path_watch);
                if (r < 0)
                        return r;
        }
        paths = calloc((d->printercfg ? d->printercfg->n_mcus : 0) + 1, sizeof(char *));
        if (!paths)
                return -ENOMEM;
        for (size_t i = 0; d->printercfg && i < d->printercfg->n_mcus; i++) {
                const char *serial = d->printercfg->mcus[i].serial;

                if (!isempty(serial) && serial[0] == '/' && !startswith(serial, "/dev/"))
                        paths[n++] = (char *) serial;
        }
        return path_watch_set(d->path_watch, paths);
}
