/* Implementation of daemon.h: lifecycle, the tty → MCU decision, naming
 * from printer.cfg, identification scheduling, offline handling and the
 * host version.  D-Bus details live in bus/; this file only calls the few
 * bus_* functions that announce changes. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "bus/bus.h"
#include "bus/manager.h"
#include "bus/mcu.h"
#include "core/daemon.h"
#include "core/identify.h"
#include "core/version.h"
#include "shared/log.h"
#include "build-config.h"

#define KLIPPER_USB_VENDOR_ID 0x1d50
#define KLIPPER_USB_PRODUCT_ID 0x614e
/* Klipper's CONFIG_USB_SERIAL_NUMBER default, used when the chip has no id:
 * not unique, so such boards are identified by their USB port instead. */
#define KLIPPER_DEFAULT_USB_SERIAL "12345"
#define DEFAULT_UART_BAUD 250000

static void daemon_start_identify(struct daemon *d, struct mcu *m);
static void daemon_arm_offline_timer(struct daemon *d, struct mcu *m);

/* ---- host version ------------------------------------------------------ */

struct host_version_request {
        struct daemon *daemon;
        char *path;
        char *version;
};

static int host_version_run(void *userdata) {
        struct host_version_request *req = userdata;

        return version_read_host(req->path, &req->version);
}

static void daemon_set_host_version(struct daemon *d, const char *version) {
        const char *v = (isempty(version) || streq(version, "?")) ? "" : version;

        if (free_and_strdup(&d->host_version, v) <= 0)
                return;
        log_info("Host Klipper version: %s", isempty(v) ? "unknown" : v);
        bus_manager_emit_changed(d, "HostVersion");
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];
                mcu_update_version_match(m, d->host_version);
                registry_commit(d->registry, m);
        }
}

static void host_version_done(void *userdata, int result) {
        struct host_version_request *req = userdata;
        struct daemon *d = req->daemon;

        if (result != -ECANCELED) {
                d->host_version_pending = false;
                if (result < 0)
                        log_warning_errno(result, "Cannot read the Klipper version of %s: %m", req->path);
                daemon_set_host_version(d, result < 0 ? "" : req->version);
        }
        free(req->path);
        free(req->version);
        free(req);
}

static void daemon_read_host_version(struct daemon *d) {
        struct host_version_request *req;
        int r;

        if (isempty(d->config->klipper_path)) {
                log_info("No Klipper checkout configured ([Klipper] Path=): host version unknown.");
                daemon_set_host_version(d, "");
                return;
        }
        if (d->host_version_pending)
                return;
        req = calloc(1, sizeof(*req));
        if (!req || !(req->path = strdup(d->config->klipper_path))) {
                free(req);
                log_oom();
                return;
        }
        req->daemon = d;
        r = worker_start(d->workers, host_version_run, host_version_done, req);
        if (r < 0) {
                log_error_errno(r, "Cannot start reading the host version: %m");
                free(req->path);
                free(req);
                return;
        }
        d->host_version_pending = true;
}

/* ---- printer.cfg ------------------------------------------------------- */

static void daemon_load_printercfg(struct daemon *d) {
        struct printercfg *p = NULL;
        int r;

        d->printercfg = printercfg_free(d->printercfg);
        if (isempty(d->config->printer_config))
                return;
        r = printercfg_load(d->config->printer_config, &p);
        if (r < 0) {
                log_warning_errno(r, "Cannot read %s: %m; MCUs are shown without names.",
                                  d->config->printer_config);
                return;
        }
        if (p->n_warnings > 0)
                log_warning("%s has %u problem(s), see above; what could be read is used.",
                            d->config->printer_config, p->n_warnings);
        d->printercfg = p;
}

static const struct printercfg_mcu *daemon_printercfg_entry(struct daemon *d, const struct mcu *m) {
        if (!d->printercfg || isempty(m->device_path))
                return NULL;
        return printercfg_find_serial(d->printercfg, m->device_path, m->devlinks, m->usb_serial);
}

/* Name and UART speed as printer.cfg says. */
static void daemon_apply_printercfg(struct daemon *d, struct mcu *m) {
        const struct printercfg_mcu *entry = daemon_printercfg_entry(d, m);

        (void) mcu_set_string(m, MCU_PROP_NAME, entry ? entry->name : "");
        if (m->transport_id == MCU_TRANSPORT_SERIAL)
                m->baud = entry && entry->baud ? entry->baud : DEFAULT_UART_BAUD;
        else
                m->baud = 0;
}

/* ---- tty discovery ----------------------------------------------------- */

static bool strv_contains(char **l, const char *s) {
        for (; l && *l; l++)
                if (streq(*l, s))
                        return true;
        return false;
}

static bool devlinks_in_list(const char *devlinks, char **l) {
        _cleanup_free_ char *copy = strdup(devlinks);
        char *save = NULL;

        if (!copy)
                return false;
        for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
                if (strv_contains(l, w))
                        return true;
        return false;
}

static bool tty_is_klipper_usb(const struct udev_tty_info *info) {
        return info->usb_vendor_id == KLIPPER_USB_VENDOR_ID &&
               info->usb_product_id == KLIPPER_USB_PRODUCT_ID;
}

/* Is this tty one we watch: Klipper's USB id, named in printer.cfg, or
 * listed in SerialDevices=? */
static bool daemon_tty_wanted(struct daemon *d, const struct udev_tty_info *info) {
        if (tty_is_klipper_usb(info))
                return true;
        if (d->printercfg &&
            printercfg_find_serial(d->printercfg, info->devnode, info->devlinks, info->usb_serial))
                return true;
        return strv_contains(d->config->extra_serial_devices, info->devnode) ||
               devlinks_in_list(info->devlinks, d->config->extra_serial_devices);
}

/* The stable identity of the chip behind a tty: its USB serial when that
 * is a real chip id, else the USB port, else the device name. */
static int tty_mcu_id(const struct udev_tty_info *info, char **ret) {
        const char *base;

        if (!isempty(info->usb_serial) && !streq(info->usb_serial, KLIPPER_DEFAULT_USB_SERIAL))
                return (*ret = strdup(info->usb_serial)) ? 0 : -ENOMEM;
        if (!isempty(info->usb_port))
                return asprintf(ret, "usb-%s", info->usb_port) < 0 ? -ENOMEM : 0;
        base = strrchr(info->devnode, '/');
        return (*ret = strdup(base ? base + 1 : info->devnode)) ? 0 : -ENOMEM;
}

static void daemon_cancel_offline_timer(struct mcu *m) {
        if (m->offline_timer) {
                event_free(m->offline_timer);
                m->offline_timer = NULL;
        }
}

static void daemon_tty_added(void *userdata, const struct udev_tty_info *info) {
        struct daemon *d = userdata;
        _cleanup_free_ char *id = NULL;
        struct mcu *m;
        bool is_new = false;
        int r;

        if (!daemon_tty_wanted(d, info))
                return;

        m = registry_find_by_syspath(d->registry, info->syspath);
        if (!m) {
                r = tty_mcu_id(info, &id);
                if (r < 0) {
                        log_oom();
                        return;
                }
                m = registry_find_by_id(d->registry, id);
                /* Two boards claiming one serial number: the second one is
                 * told apart by its port. */
                if (m && m->state_id != MCU_STATE_OFFLINE && !isempty(info->usb_port)) {
                        log_warning("%s and %s report the same USB serial %s; identifying %s by its port.",
                                    m->device_path, info->devnode, info->usb_serial, info->devnode);
                        free(id);
                        if (asprintf(&id, "usb-%s", info->usb_port) < 0) {
                                id = NULL;
                                log_oom();
                                return;
                        }
                        m = registry_find_by_id(d->registry, id);
                }
        }
        if (!m) {
                r = mcu_new(id, &m);
                if (r < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
                is_new = true;
        }

        daemon_cancel_offline_timer(m);
        (void) free_and_strdup(&m->syspath, info->syspath);
        (void) free_and_strdup(&m->devlinks, info->devlinks);
        mcu_set_transport(m, info->usb_vendor_id ? MCU_TRANSPORT_USB_SERIAL : MCU_TRANSPORT_SERIAL);
        (void) mcu_set_string(m, MCU_PROP_DEVICE_PATH, info->devnode);
        mcu_set_usb_ids(m, info->usb_vendor_id, info->usb_product_id);
        (void) mcu_set_string(m, MCU_PROP_USB_SERIAL, info->usb_serial);
        (void) mcu_set_string(m, MCU_PROP_USB_PORT, info->usb_port);
        if (tty_is_klipper_usb(info)) {
                /* Klipper's USB descriptors name the firmware and the chip;
                 * good to know even before (or without) identify. */
                if (isempty(m->firmware))
                        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Klipper");
                if (isempty(m->mcu_type) && !isempty(info->usb_product))
                        (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, info->usb_product);
        }
        if (m->state_id == MCU_STATE_OFFLINE) {
                mcu_set_state(m, MCU_STATE_UNKNOWN);
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
        }
        daemon_apply_printercfg(d, m);

        if (is_new) {
                log_info("%s: found %s%s%s", m->id, m->device_path,
                         isempty(m->name) ? "" : " as ", m->name);
                if (registry_add(d->registry, m) < 0) {
                        log_oom();
                        return;
                }
        } else
                registry_commit(d->registry, m);

        daemon_start_identify(d, m);
}

/* An offline MCU stays visible (its identity and last version are useful to
 * a person looking for it) until OfflineTimeoutSec has passed. */
static void on_offline_timeout(evutil_socket_t fd, short what, void *userdata) {
        struct mcu *m = userdata;

        log_info("%s: offline for too long; forgetting it.", m->id);
        registry_remove(m->daemon->registry, m);
}

static void daemon_arm_offline_timer(struct daemon *d, struct mcu *m) {
        uint64_t timeout = d->config->offline_timeout_usec;
        struct timeval tv = {
                .tv_sec = (time_t) (timeout / 1000000),
                .tv_usec = (suseconds_t) (timeout % 1000000),
        };

        daemon_cancel_offline_timer(m);
        if (timeout == 0)
                return;
        m->offline_timer = evtimer_new(d->base, on_offline_timeout, m);
        if (!m->offline_timer || evtimer_add(m->offline_timer, &tv) < 0)
                log_oom();
}

static void daemon_tty_removed(void *userdata, const char *syspath) {
        struct daemon *d = userdata;
        struct mcu *m = registry_find_by_syspath(d->registry, syspath);

        if (!m)
                return;
        log_info("%s: %s is gone; keeping the MCU as offline.", m->id, m->device_path);
        (void) free_and_strdup(&m->syspath, "");
        m->identify_generation++;
        m->identifying = false;
        mcu_set_state(m, MCU_STATE_OFFLINE);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "device was unplugged or reset");
        registry_commit(d->registry, m);
        bus_mcu_complete_refresh(d, m, -ENODEV);
        daemon_arm_offline_timer(d, m);
}

/* ---- identification ---------------------------------------------------- */

struct identify_job {
        struct daemon *daemon;
        struct identify_request *req;
};

static void identify_done(void *userdata, int result) {
        struct identify_job *job = userdata;
        struct daemon *d = job->daemon;
        struct mcu *m;

        if (result != -ECANCELED) {
                m = registry_find_by_id(d->registry, job->req->mcu_id);
                /* Unplugged (or re-plugged) meanwhile: this answer is stale. */
                if (m && m->identify_generation == job->req->generation) {
                        m->identifying = false;
                        identify_apply(m, job->req, result, d->host_version);
                        registry_commit(d->registry, m);
                        bus_mcu_complete_refresh(d, m, result);
                }
        }
        identify_request_free(job->req);
        free(job);
}

static int identify_job_run(void *userdata) {
        struct identify_job *job = userdata;

        return identify_run(job->req);
}

static void daemon_start_identify(struct daemon *d, struct mcu *m) {
        struct identify_job *job;
        int timeout_ms = (int) MIN(d->config->identify_timeout_usec / 1000, 600000);
        int r;

        if (m->identifying || m->state_id == MCU_STATE_OFFLINE || isempty(m->device_path))
                return;
        job = calloc(1, sizeof(*job));
        if (!job) {
                log_oom();
                return;
        }
        job->daemon = d;
        m->identify_generation++;
        r = identify_request_new(m, timeout_ms, &job->req);
        if (r >= 0)
                r = worker_start(d->workers, identify_job_run, identify_done, job);
        if (r < 0) {
                log_error_errno(r, "%s: cannot start identify: %m", m->id);
                identify_request_free(job->req);
                free(job);
                return;
        }
        m->identifying = true;
        log_debug("%s: identifying on %s", m->id, m->device_path);
}

int daemon_refresh_mcu(struct daemon *d, struct mcu *m) {
        if (m->state_id == MCU_STATE_OFFLINE || isempty(m->device_path))
                return -ENODEV;
        daemon_start_identify(d, m);
        return m->identifying ? 0 : -ENOMEM;
}

/* ---- rescan ------------------------------------------------------------ */

int daemon_rescan(struct daemon *d) {
        int r;

        log_info("Rescanning.");
        daemon_load_printercfg(d);
        daemon_read_host_version(d);

        for (size_t i = d->registry->n_mcus; i > 0; i--) {
                struct mcu *m = d->registry->mcus[i - 1];

                if (m->state_id == MCU_STATE_OFFLINE) {
                        registry_remove(d->registry, m);
                        continue;
                }
                daemon_apply_printercfg(d, m);
                registry_commit(d->registry, m);
        }

        r = udev_discovery_enumerate(d->udev);
        if (r < 0)
                return r;

        /* Cold plug re-identifies what it (re)added; MCUs that stayed
         * attached and are still unconfirmed get another try. */
        for (size_t i = 0; i < d->registry->n_mcus; i++)
                if (d->registry->mcus[i]->state_id == MCU_STATE_UNKNOWN)
                        daemon_start_identify(d, d->registry->mcus[i]);
        return 0;
}

/* ---- lifecycle --------------------------------------------------------- */

int daemon_new(const char *config_path, struct daemon **ret) {
        _cleanup_(daemon_freep) struct daemon *d = NULL;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        d->host_version = strdup("");
        d->printer_state = strdup("unknown");
        d->config_path = strdup(config_path ?: DEFAULT_CONFIG_FILE);
        if (!d->host_version || !d->printer_state || !d->config_path)
                return -ENOMEM;

        r = config_new(&d->config);
        if (r < 0)
                return r;
        r = config_load(d->config, d->config_path, !config_path);
        if (r < 0)
                return r;

        d->base = event_base_new();
        if (!d->base)
                return -ENOMEM;
        r = registry_new(&d->registry);
        if (r < 0)
                return r;
        r = worker_pool_new(d->base, &d->workers);
        if (r < 0)
                return r;

        daemon_load_printercfg(d);
        *ret = TAKE_PTR(d);
        return 0;
}

struct daemon *daemon_free(struct daemon *d) {
        if (!d)
                return NULL;
        /* Workers first: their completions still refer to the registry. */
        d->workers = worker_pool_free(d->workers);
        d->udev = udev_discovery_free(d->udev);
        bus_disconnect(d);
        d->registry = registry_free(d->registry);
        if (d->sigterm_event)
                event_free(d->sigterm_event);
        if (d->sigint_event)
                event_free(d->sigint_event);
        if (d->base)
                event_base_free(d->base);
        printercfg_free(d->printercfg);
        config_free(d->config);
        free(d->config_path);
        free(d->host_version);
        free(d->printer_state);
        free(d);
        return NULL;
}

static void on_signal(evutil_socket_t sig, short what, void *userdata) {
        struct daemon *d = userdata;

        log_info("Received %s, shutting down.", strsignal((int) sig));
        (void) sd_notify(false, "STOPPING=1");
        event_base_loopbreak(d->base);
}

int daemon_run(struct daemon *d) {
        static const struct udev_discovery_callbacks udev_callbacks = {
                .tty_added = daemon_tty_added,
                .tty_removed = daemon_tty_removed,
        };
        struct udev_discovery_callbacks cb = udev_callbacks;
        int r;

        d->sigterm_event = evsignal_new(d->base, SIGTERM, on_signal, d);
        d->sigint_event = evsignal_new(d->base, SIGINT, on_signal, d);
        if (!d->sigterm_event || !d->sigint_event ||
            evsignal_add(d->sigterm_event, NULL) < 0 || evsignal_add(d->sigint_event, NULL) < 0)
                return log_error_errno(ENOMEM, "Cannot watch signals: %m");

        r = bus_connect(d);
        if (r < 0)
                return r;

        cb.userdata = d;
        r = udev_discovery_new(d->base, &cb, &d->udev);
        if (r < 0)
                return r;

        daemon_read_host_version(d);
        r = udev_discovery_enumerate(d->udev);
        if (r < 0)
                return r;

        /* The name last: a client that sees it finds the objects ready. */
        r = bus_request_name(d);
        if (r < 0)
                return r;

        (void) sd_notify(false, "READY=1\nSTATUS=Watching for MCUs");
        log_info("mcuflashd " PACKAGE_VERSION " running.");

        if (event_base_dispatch(d->base) < 0)
                return log_error_errno(EIO, "Event loop failed: %m");
        return 0;
}
