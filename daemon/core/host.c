/* Living beside a running Klipper.  discover/klippy.c follows klippy's API
 * socket; this file turns what it reports into daemon state:
 *
 *  - Manager.PrinterState, and printer.cfg's path and the host version when
 *    the configuration does not name them;
 *  - while klippy runs, every MCU of its printer.cfg belongs to it: the
 *    daemon opens none of their links (no identify, no CAN admin message to
 *    them) and shows what klippy says of them instead — version, build
 *    versions, MCU type — including CAN nodes that only Klipper can reach;
 *  - when klippy goes away those MCUs are free again and are identified.
 *
 * Because the API connection is made on the loop, a daemon starting while
 * Klipper runs would otherwise race it: when the socket accepts a
 * connection at start-up, Klipper counts as running until the client has
 * spoken (or KLIPPY_SETTLE_SEC has passed). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "bus/manager.h"
#include "core/daemon-internal.h"
#include "discover/klippy.h"
#include "image/dictionary.h"
#include "proto/canbus.h"
#include "shared/log.h"
#include "shared/strutil.h"

#define KLIPPY_SETTLE_SEC 5
#define CAN_DEFAULT_INTERFACE "can0"

/* Does a klippy accept connections on @path right now?  A connect() on a
 * Unix socket never blocks. */
static bool klippy_socket_answers(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;

        if (strlen(path) >= sizeof(sa.sun_path))
                return false;
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        return fd >= 0 && connect(fd, (struct sockaddr *) &sa, sizeof(sa)) == 0;
}

static void daemon_set_printer_state(struct daemon *d, const char *state) {
        if (free_and_strdup_utf8(&d->printer_state, state) > 0) {
                log_info("Printer state: %s", state);
                bus_manager_emit_changed(d, "PrinterState");
        }
}

/* The MCU behind klippy's status object @name ("mcu", "mcu EBBCan"). */
static struct mcu *host_find_mcu(struct daemon *d, const char *name) {
        const struct printercfg_mcu *entry = NULL;
        struct mcu *m;

        for (size_t i = 0; i < d->registry->n_mcus; i++)
                if (strcasecmp(d->registry->mcus[i]->name, name) == 0)
                        return d->registry->mcus[i];

        for (size_t i = 0; d->printercfg && i < d->printercfg->n_mcus; i++)
                if (strcasecmp(d->printercfg->mcus[i].name, name) == 0)
                        entry = &d->printercfg->mcus[i];
        if (!entry || isempty(entry->canbus_uuid))
                return NULL;

        /* A CAN node that only Klipper reaches: it gets its object here. */
        if (mcu_new(entry->canbus_uuid, &m) < 0) {
                log_oom();
                return NULL;
        }
        m->daemon = d;
        mcu_set_transport(m, MCU_TRANSPORT_CAN);
        (void) mcu_set_string(m, MCU_PROP_CAN_UUID, entry->canbus_uuid);
        (void) mcu_set_string(m, MCU_PROP_CAN_INTERFACE,
                              isempty(entry->canbus_interface) ? CAN_DEFAULT_INTERFACE : entry->canbus_interface);
        daemon_apply_printercfg(d, m);
        log_info("%s: known from Klipper as %s", m->id, m->name);
        if (registry_add(d->registry, m) < 0)
                return NULL;
        return m;
}

static void host_apply_mcu(struct daemon *d, const struct klippy_mcu_info *info) {
        struct mcu *m = host_find_mcu(d, info->name);

        if (!m)
                return;
        daemon_cancel_offline_timer(m);
        if (!isempty(info->version)) {
                bool same_build = streq(m->firmware_version, info->version);

                mcu_set_state(m, MCU_STATE_APPLICATION);
                /* klippy does not say which app it talks to: a Kalico that
                 * identify saw stays Kalico. */
                if (!klipper_dict_app_is_klipper(m->firmware))
                        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Klipper");
                (void) mcu_set_string(m, MCU_PROP_FIRMWARE_VERSION, info->version);
                /* A klippy too old to report mcu_kconfig: keep what identify
                 * found, unless the firmware changed since. */
                if (info->kconfig || !same_build)
                        (void) mcu_set_string(m, MCU_PROP_BUILD_CONFIG, info->kconfig);
                (void) mcu_set_string(m, MCU_PROP_BUILD_VERSIONS, info->build_versions);
                if (!isempty(info->mcu_type))
                        (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, info->mcu_type);
                mcu_update_version_match(m, d->host_version);
        } else if (m->state_id == MCU_STATE_OFFLINE)
                mcu_set_state(m, MCU_STATE_UNKNOWN);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, DAEMON_HELD_REASON);
        registry_commit(d->registry, m);
}

bool daemon_mcu_held_by_klipper(struct daemon *d, const struct mcu *m) {
        if (!d->klipper_running)
                return false;
        /* A job owns its MCU's link (it stopped Klipper first, or Klipper
         * did not hold it), and Klipper never talks to a bootloader. */
        if (!streq(m->job, "/") || m->speaks_katapult || m->state_id == MCU_STATE_BOOTLOADER)
                return false;
        /* Until the daemon knows which printer.cfg Klipper runs (or while
         * the first one is still being read), every MCU may be one of
         * Klipper's. */
        if (!d->printercfg && (isempty(d->config->printer_config) || d->printercfg_read))
                return true;
        return !isempty(m->name);
}

/* MCUs that are not (or no longer) Klipper's: find out what they run. */
static void host_release_held(struct daemon *d) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                if (daemon_mcu_held_by_klipper(d, m) || !streq(m->state_reason, DAEMON_HELD_REASON))
                        continue;
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
                registry_commit(d->registry, m);
                if (m->transport_id != MCU_TRANSPORT_CAN)
                        daemon_start_identify(d, m);
        }
}

static void host_release_mcus(struct daemon *d) {
        host_release_held(d);
        daemon_can_rescan(d, NULL);
}

void daemon_host_printercfg_changed(struct daemon *d) {
        const struct klippy_status *st = d->klippy ? klippy_client_status(d->klippy) : NULL;

        /* klippy names its MCUs after printer.cfg's sections: what it said
         * of them before the names were read (klippy answers quicker than a
         * printer.cfg is read) goes to them now. */
        if (st && st->connected)
                for (size_t i = 0; i < st->n_mcus; i++)
                        host_apply_mcu(d, &st->mcus[i]);
        /* printer.cfg names the CAN nodes worth asking for, too. */
        host_release_mcus(d);
}

static void host_state_changed(void *userdata, const struct klippy_status *st) {
        struct daemon *d = userdata;
        bool was_running = d->klipper_running;

        if (d->klippy_settle_timer) {
                event_free(d->klippy_settle_timer);
                d->klippy_settle_timer = NULL;
        }
        d->klipper_running = st->connected;
        d->klippy_says_stopped = !st->connected;
        daemon_set_printer_state(d, st->printer_state);

        /* While Klipper runs its own word on its version wins over the checkout. */
        daemon_set_klippy_version(d, st->connected ? st->software_version : NULL);

        /* Without PrinterConfig=, klippy tells which printer.cfg it runs.
         * It is read like any other: in a worker, within bounds, only what
         * its owner may read; MCUs it does not name are released when that
         * read is done (daemon_host_printercfg_changed()). */
        if (isempty(d->config->printer_config) && !isempty(st->config_file) &&
            free_and_strdup(&d->klippy_config_file, st->config_file) > 0) {
                d->klippy_uid_known = klippy_client_peer_uid(d->klippy, &d->klippy_uid) >= 0;
                log_info("Reading MCU names from %s, the printer.cfg klippy runs.", st->config_file);
                daemon_reload_printercfg(d);
        }

        for (size_t i = 0; i < st->n_mcus; i++)
                host_apply_mcu(d, &st->mcus[i]);

        if (was_running && !st->connected) {
                log_info("Klipper is not running; its MCUs are free.");
                host_release_mcus(d);
        } else if (!was_running && st->connected)
                log_info("Klipper is running: its MCUs are left to it.");
}

static void on_settle_timeout(evutil_socket_t fd, short what, void *userdata) {
        struct daemon *d = userdata;
        const struct klippy_status *st = klippy_client_status(d->klippy);

        event_free(d->klippy_settle_timer);
        d->klippy_settle_timer = NULL;
        if (st->connected)
                return;
        log_info("klippy's API socket accepted a connection but klippy did not answer; going on without it.");
        host_state_changed(d, st);
}

int daemon_host_start(struct daemon *d) {
        static const struct klippy_callbacks callbacks = {
                .state_changed = host_state_changed,
        };
        struct klippy_callbacks cb = callbacks;
        struct timeval settle = { .tv_sec = KLIPPY_SETTLE_SEC };
        int r;

        if (isempty(d->config->api_socket)) {
                log_info("No klippy API socket configured ([Klipper] ApiSocket=): printer state unknown, "
                         "and a running Klipper is recognised only by the ports it holds.");
                return 0;
        }
        cb.userdata = d;
        r = klippy_client_new(d->base, d->config->api_socket, &cb, &d->klippy);
        if (r < 0)
                return log_error_errno(r, "Cannot follow klippy's API socket %s: %m", d->config->api_socket);

        if (klippy_socket_answers(d->config->api_socket)) {
                d->klipper_running = true;
                d->klippy_settle_timer = evtimer_new(d->base, on_settle_timeout, d);
                if (!d->klippy_settle_timer || evtimer_add(d->klippy_settle_timer, &settle) < 0)
                        return -ENOMEM;
        } else {
                d->klippy_says_stopped = true;
                daemon_set_printer_state(d, "stopped");
        }
        return 0;
}

void daemon_host_stop(struct daemon *d) {
        if (d->klippy_settle_timer) {
                event_free(d->klippy_settle_timer);
                d->klippy_settle_timer = NULL;
        }
        d->klippy = klippy_client_free(d->klippy);
}
