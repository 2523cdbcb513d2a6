/* Implementation of daemon.h: lifecycle, the tty → MCU decision, naming
 * from printer.cfg, identification scheduling, offline handling and the
 * host version.  D-Bus details live in bus/; this file only calls the few
 * bus_* functions that announce changes. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "bus/bus.h"
#include "bus/manager.h"
#include "bus/mcu.h"
#include "core/daemon-internal.h"
#include "core/identify.h"
#include "core/job.h"
#include "core/version.h"
#include "shared/log.h"
#include "shared/strutil.h"
#include "build-config.h"



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

void daemon_set_host_version(struct daemon *d, const char *version) {
        const char *v = (isempty(version) || streq(version, "?")) ? "" : version;

        if (free_and_strdup_utf8(&d->host_version, v) <= 0)
                return;
        log_info("Host Klipper version: %s", isempty(v) ? "unknown" : v);
        bus_manager_emit_changed(d, "HostVersion");
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];
                mcu_update_version_match(m, d->host_version);
                registry_commit(d->registry, m);
        }
}

static void daemon_read_host_version(struct daemon *d);

static void host_version_done(void *userdata, int result) {
        struct host_version_request *req = userdata;
        struct daemon *d = req->daemon;

        if (result != -ECANCELED) {
                d->host_version_pending = false;
                if (d->host_version_reread) {
                        /* The checkout may have changed after this read
                         * began (a Rescan after a commit): read it again
                         * rather than show what may be stale. */
                        d->host_version_reread = false;
                        daemon_read_host_version(d);
                        if (d->host_version_pending)
                                goto done;
                }
                if (result < 0)
                        log_warning_errno(result, "Cannot read the Klipper version of %s: %m", req->path);
                /* If Klipper started meanwhile, its own version wins. */
                if (!d->host_version_from_klippy)
                        daemon_set_host_version(d, result < 0 ? "" : req->version);
        }
done:
        free(req->path);
        free(req->version);
        free(req);
}

static void daemon_read_host_version(struct daemon *d) {
        struct host_version_request *req;
        int r;

        if (d->host_version_from_klippy)
                return; /* Klipper runs and has said which version it is. */
        if (isempty(d->config->klipper_path)) {
                log_info("No Klipper checkout configured ([Klipper] Path=): host version unknown.");
                daemon_set_host_version(d, "");
                return;
        }
        if (d->host_version_pending) {
                d->host_version_reread = true;
                return;
        }
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

void daemon_set_klippy_version(struct daemon *d, const char *version) {
        if (!isempty(version) && !streq(version, "?")) {
                d->host_version_from_klippy = true;
                daemon_set_host_version(d, version);
                return;
        }
        if (!d->host_version_from_klippy)
                return;
        /* Klipper stopped: the checkout again, if there is one; without
         * Path= klippy's last word stays. */
        d->host_version_from_klippy = false;
        if (!isempty(d->config->klipper_path))
                daemon_read_host_version(d);
}

/* ---- printer.cfg ------------------------------------------------------- */

/* printer.cfg is the Klipper user's file: it is read in a worker thread
 * (core/printercfg.c bounds the work and checks every file), so the loop
 * keeps answering D-Bus however slow or hostile it is.  The current view
 * stays in place until a read finishes; a newer read supersedes (cancels)
 * one still running, whose result is then dropped. */
struct printercfg_read {
        struct daemon *daemon;
        char *path;
        atomic_bool cancel;
        bool rediscover;        /* enumerate ttys again when done (start-up, Rescan) */
        uid_t reader;           /* whose read rights count (printercfg.h) */
        struct printercfg *result;
};

/* A Rescan waiting for the read it started (or a newer one) to finish. */
struct rescan_waiter {
        daemon_rescan_done_fn done;
        void *userdata;
        struct rescan_waiter *next;
};

static void daemon_finish_rescans(struct daemon *d, int result) {
        struct rescan_waiter *w = d->rescan_waiters;

        d->rescan_waiters = NULL;
        while (w) {
                struct rescan_waiter *next = w->next;

                w->done(d, result, w->userdata);
                free(w);
                w = next;
        }
}

static void printercfg_read_free(struct printercfg_read *req) {
        printercfg_free(req->result);
        free(req->path);
        free(req);
}

static int printercfg_read_run(void *userdata) {
        struct printercfg_read *req = userdata;

        return printercfg_load_cancellable(req->path, req->reader, &req->cancel, &req->result);
}

/* Give every MCU its name from the printer.cfg now in place, and look
 * again at what depends on it once discovery runs: Linux MCU links, ttys
 * that only printer.cfg names (@rediscover), MCUs no longer Klipper's. */
static void daemon_printercfg_changed(struct daemon *d, bool rediscover) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                daemon_apply_printercfg(d, d->registry->mcus[i]);
                registry_commit(d->registry, d->registry->mcus[i]);
        }
        if (!d->udev)
                return;         /* start-up: discovery has not begun */
        (void) daemon_linux_mcus_update(d);
        if (rediscover)
                (void) udev_discovery_enumerate(d->udev);
        daemon_host_printercfg_changed(d);
}

static void printercfg_read_done(void *userdata, int result) {
        struct printercfg_read *req = userdata;
        struct daemon *d = req->daemon;

        if (result == -ECANCELED || d->printercfg_read != req) {
                printercfg_read_free(req);
                return;
        }
        d->printercfg_read = NULL;
        d->printercfg = printercfg_free(d->printercfg);
        if (result == -E2BIG || result == -EFBIG)
                log_warning("printer.cfg %s is not used: it exceeds a bound (see above); "
                            "MCUs are shown without names.", req->path);
        else if (result < 0)
                log_warning_errno(result, "printer.cfg %s is not used: %m; MCUs are shown without names.",
                                  req->path);
        else {
                if (req->result->n_warnings > 0)
                        log_warning("%s has %u problem(s), see above; what could be read is used.",
                                    req->path, req->result->n_warnings);
                log_debug("Read %s: %zu MCU section(s).", req->path, req->result->n_mcus);
                d->printercfg = TAKE_PTR(req->result);
        }
        daemon_printercfg_changed(d, req->rediscover);
        printercfg_read_free(req);
        daemon_finish_rescans(d, 0);
}

/* printer.cfg: PrinterConfig=, else the file klippy's API says it runs.
 * Starts reading it; the result follows on the loop. */
static void daemon_start_printercfg_read(struct daemon *d, bool rediscover) {
        const char *path = d->config->printer_config ?: d->klippy_config_file;
        struct printercfg_read *req;
        int r;

        if (d->printercfg_read) {
                atomic_store(&d->printercfg_read->cancel, true);
                d->printercfg_read = NULL;
        }
        if (isempty(path)) {
                d->printercfg = printercfg_free(d->printercfg);
                return;
        }

        req = calloc(1, sizeof(*req));
        if (!req || !(req->path = strdup(path))) {
                free(req);
                log_oom();
                return;
        }
        req->daemon = d;
        req->rediscover = rediscover;
        /* PrinterConfig= is root's choice: its owner is the Klipper user.
         * The file klippy names is read with klippy's rights. */
        req->reader = !d->config->printer_config && d->klippy_uid_known ? d->klippy_uid : PRINTERCFG_OWNER;
        atomic_init(&req->cancel, false);
        r = worker_start(d->workers, printercfg_read_run, printercfg_read_done, req);
        if (r < 0) {
                log_error_errno(r, "Cannot start reading %s: %m", path);
                printercfg_read_free(req);
                return;
        }
        d->printercfg_read = req;
}

static void daemon_load_printercfg(struct daemon *d, bool rediscover) {
        daemon_start_printercfg_read(d, rediscover);
        /* Without a read to wait for, waiting Rescans are complete. */
        if (!d->printercfg_read)
                daemon_finish_rescans(d, 0);
}

void daemon_reload_printercfg(struct daemon *d) {
        daemon_load_printercfg(d, false);
        if (!d->printercfg_read)
                daemon_printercfg_changed(d, false);
}

/* At start-up, names should be there when the bus name appears: give the
 * first read a few seconds (the loop runs, nothing else is on it yet); a
 * slower one is applied when it finishes.  Returns false if a signal asked
 * to stop meanwhile. */
static void on_wait_timeout(evutil_socket_t fd, short what, void *userdata) {
}

static bool daemon_wait_printercfg(struct daemon *d) {
        struct timeval limit = { .tv_sec = PRINTERCFG_STARTUP_WAIT_SEC };
        struct event *timer;
        bool stop = false;

        if (!d->printercfg_read)
                return true;
        timer = evtimer_new(d->base, on_wait_timeout, NULL);
        if (!timer || evtimer_add(timer, &limit) < 0) {
                if (timer)
                        event_free(timer);
                return true;
        }
        while (d->printercfg_read && evtimer_pending(timer, NULL) && !stop) {
                if (event_base_loop(d->base, EVLOOP_ONCE) < 0)
                        break;
                stop = event_base_got_break(d->base) || event_base_got_exit(d->base);
        }
        if (d->printercfg_read && !stop)
                log_warning("Still reading %s; MCU names follow when it is done.", d->printercfg_read->path);
        event_free(timer);
        return !stop;
}

static const struct printercfg_mcu *daemon_printercfg_entry(struct daemon *d, const struct mcu *m) {
        if (m->transport_id == MCU_TRANSPORT_CAN)
                return printercfg_find_canbus(d->printercfg, m->can_uuid);
        if (!d->printercfg || isempty(m->device_path))
                return NULL;
        return printercfg_find_serial(d->printercfg, m->device_path, m->devlinks, m->usb_serial);
}

/* Name and UART speed as printer.cfg says. */
void daemon_apply_printercfg(struct daemon *d, struct mcu *m) {
        const struct printercfg_mcu *entry = daemon_printercfg_entry(d, m);
        uint64_t flash_start;

        /* mcuflashd.conf's [Mcu ID] FlashStart=, for bootloaders that cannot
         * tell where the application goes (Katapult's CONNECT overrides). */
        if (m->flash_start == MCU_FLASH_START_UNKNOWN && config_mcu_flash_start(d->config, m->id, &flash_start) >= 0)
                mcu_set_flash_start(m, flash_start);

        (void) mcu_set_string(m, MCU_PROP_NAME, entry ? entry->name : "");
        if (m->transport_id == MCU_TRANSPORT_SERIAL)
                m->baud = entry && entry->baud ? entry->baud : DEFAULT_UART_BAUD;
        else
                m->baud = 0;
}

/* ---- rescan ------------------------------------------------------------ */

static int rescan(struct daemon *d, daemon_rescan_done_fn done, void *userdata) {
        struct rescan_waiter *w;
        int r;

        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;

        log_info("Rescanning.");
        /* Names and ttys that only the new printer.cfg gives follow when it
         * has been read. */
        daemon_load_printercfg(d, true);
        daemon_read_host_version(d);

        for (size_t i = d->registry->n_mcus; i > 0; i--) {
                struct mcu *m = d->registry->mcus[i - 1];

                if (daemon_mcu_has_job(m))
                        continue;
                if (m->state_id == MCU_STATE_OFFLINE) {
                        registry_remove(d->registry, m);
                        continue;
                }
                daemon_apply_printercfg(d, m);
                registry_commit(d->registry, m);
        }

        r = udev_discovery_enumerate(d->udev);
        if (r >= 0)
                r = daemon_linux_mcus_update(d);
        if (r < 0) {
                free(w);
                return r;
        }
        daemon_can_rescan(d, NULL);

        /* Cold plug re-identifies what it (re)added; MCUs that stayed
         * attached and are still unconfirmed get another try. */
        for (size_t i = 0; i < d->registry->n_mcus; i++)
                if (d->registry->mcus[i]->state_id == MCU_STATE_UNKNOWN)
                        daemon_start_identify(d, d->registry->mcus[i]);

        /* Done when the names of the new printer.cfg are in place. */
        *w = (struct rescan_waiter) { .done = done, .userdata = userdata, .next = d->rescan_waiters };
        d->rescan_waiters = w;
        if (!d->printercfg_read)
                daemon_finish_rescans(d, 0);
        return 0;
}

/* Rescan on request: devices that are there are looked at again, but an
 * MCU with a job is the job's alone (its link may be in the middle of a
 * reset, or about to be opened by the job): not removed, not re-added, not
 * identified. */
int daemon_rescan(struct daemon *d, daemon_rescan_done_fn done, void *userdata) {
        int r;

        d->rescanning = true;
        r = rescan(d, done, userdata);
        d->rescanning = false;
        return r;
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

        /* Read in a worker; daemon_run() waits a little for it. */
        daemon_load_printercfg(d, true);
        *ret = TAKE_PTR(d);
        return 0;
}

struct daemon *daemon_free(struct daemon *d) {
        if (!d)
                return NULL;
        /* Workers first: their completions still refer to the registry.
         * A printer.cfg read stops at its next file. */
        if (d->printercfg_read)
                atomic_store(&d->printercfg_read->cancel, true);
        d->workers = worker_pool_free(d->workers);
        daemon_finish_rescans(d, -ESHUTDOWN);
        jobs_free_all(d);
        d->udev = udev_discovery_free(d->udev);
        d->path_watch = path_watch_free(d->path_watch);
        daemon_linux_mcus_free(d);
        daemon_can_stop(d);
        daemon_host_stop(d);
        bus_disconnect(d);
        d->registry = registry_free(d->registry);
        if (d->sigterm_event)
                event_free(d->sigterm_event);
        if (d->sigint_event)
                event_free(d->sigint_event);
        if (d->stop_deadline)
                event_free(d->stop_deadline);
        if (d->watchdog_timer)
                event_free(d->watchdog_timer);
        if (d->base)
                event_base_free(d->base);
        printercfg_free(d->printercfg);
        config_free(d->config);
        free(d->config_path);
        free(d->host_version);
        free(d->printer_state);
        free(d->klippy_config_file);
        free(d);
        return NULL;
}

/* ---- stopping ---------------------------------------------------------- */

static unsigned daemon_active_jobs(struct daemon *d) {
        unsigned n = 0;

        for (struct job *j = d->jobs; j; j = j->next)
                if (job_is_active(j))
                        n++;
        return n;
}

/* How long the bus is still served after the last job ended. */
#define STOP_GRACE_USEC (500 * 1000)

static void on_stop_grace_over(evutil_socket_t fd, short what, void *userdata) {
        struct daemon *d = userdata;

        event_base_loopbreak(d->base);
}

void daemon_stop_progress(struct daemon *d) {
        unsigned n;

        if (!d->stopping || d->forced_exit)
                return;
        n = daemon_active_jobs(d);
        if (n == 0) {
                /* Clients that saw Finished read the job's final properties
                 * next: answer them a moment longer. */
                const struct timeval grace = { .tv_sec = 0, .tv_usec = d->jobs ? STOP_GRACE_USEC : 0 };

                log_info("No job is running; exiting.");
                (void) sd_notify(false, "STATUS=Exiting");
                if (event_base_once(d->base, -1, EV_TIMEOUT, on_stop_grace_over, d, &grace) < 0)
                        event_base_loopbreak(d->base);
                return;
        }
        (void) sd_notifyf(false, "STOPPING=1\nSTATUS=Stopping: waiting for %u job(s) to reach a safe point "
                          "and for Klipper to be started again", n);
}

/* Exit now: a second signal or the deadline.  Klipper is still started
 * again where a job stopped it (systemd carries that out on its own). */
static void daemon_force_stop(struct daemon *d, const char *why) {
        log_warning("%s: exiting with %u job(s) not finished.", why, daemon_active_jobs(d));
        for (struct job *j = d->jobs; j; j = j->next) {
                if (!job_is_active(j))
                        continue;
                log_warning("job %u (%s %s) cut short in phase %s; see 'mcuflashctl status' for where the MCU "
                            "is.", j->number, j->kind, j->mcu_id, j->phase);
                job_start_klipper_now(j);
        }
        if (d->bus)
                (void) sd_bus_flush(d->bus);
        (void) sd_notify(false, "STATUS=Exiting before every job ended");
        d->forced_exit = true;
        event_base_loopbreak(d->base);
}

static void on_stop_deadline(evutil_socket_t fd, short what, void *userdata) {
        struct daemon *d = userdata;

        daemon_force_stop(d, "The jobs did not end in time");
}

static void daemon_stop(struct daemon *d, int sig) {
        const struct timeval tv = {
                .tv_sec = (time_t) (DAEMON_STOP_TIMEOUT_USEC / 1000000),
                .tv_usec = (suseconds_t) (DAEMON_STOP_TIMEOUT_USEC % 1000000),
        };

        if (d->stopping) {
                log_info("Received %s again.", strsignal(sig));
                daemon_force_stop(d, "Asked to stop again");
                return;
        }
        log_info("Received %s, shutting down.", strsignal(sig));
        d->stopping = true;
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping");
        d->stop_deadline = evtimer_new(d->base, on_stop_deadline, d);
        if (!d->stop_deadline || evtimer_add(d->stop_deadline, &tv) < 0)
                log_oom();
        for (struct job *j = d->jobs; j; j = j->next)
                job_shutdown(j);
        bus_kick(d);
        daemon_stop_progress(d);
}

static void on_signal(evutil_socket_t sig, short what, void *userdata) {
        daemon_stop(userdata, (int) sig);
}

/* ---- watchdog ---------------------------------------------------------- */

static void on_watchdog(evutil_socket_t fd, short what, void *userdata) {
        (void) sd_notify(false, "WATCHDOG=1");
}

/* A timer on the loop itself: a loop that hangs stops the pings, and
 * systemd kills and restarts the daemon. */
static int daemon_watchdog_start(struct daemon *d) {
        uint64_t usec;
        struct timeval tv;
        int r;

        r = sd_watchdog_enabled(false, &usec);
        if (r < 0)
                return log_warning_errno(r, "Ignoring systemd's watchdog setting: %m");
        if (r == 0)
                return 0;
        usec /= 2;
        tv = (struct timeval) { .tv_sec = (time_t) (usec / 1000000), .tv_usec = (suseconds_t) (usec % 1000000) };
        d->watchdog_timer = event_new(d->base, -1, EV_PERSIST, on_watchdog, d);
        if (!d->watchdog_timer || evtimer_add(d->watchdog_timer, &tv) < 0)
                return log_error_errno(ENOMEM, "Cannot arm the watchdog timer: %m");
        log_debug("Pinging systemd's watchdog every %.1f s.", (double) usec / 1e6);
        (void) sd_notify(false, "WATCHDOG=1");
        return 0;
}

int daemon_run(struct daemon *d) {
        static const struct udev_discovery_callbacks udev_callbacks = {
                .tty_added = daemon_tty_added,
                .tty_removed = daemon_tty_removed,
                .usb_added = daemon_usb_added,
                .usb_removed = daemon_usb_removed,
        };
        struct udev_discovery_callbacks cb = udev_callbacks;
        int r;

        d->sigterm_event = evsignal_new(d->base, SIGTERM, on_signal, d);
        d->sigint_event = evsignal_new(d->base, SIGINT, on_signal, d);
        if (!d->sigterm_event || !d->sigint_event ||
            evsignal_add(d->sigterm_event, NULL) < 0 || evsignal_add(d->sigint_event, NULL) < 0)
                return log_error_errno(ENOMEM, "Cannot watch signals: %m");

        if (!daemon_wait_printercfg(d))
                return 0;

        r = bus_connect(d);
        if (r < 0)
                return r;
        r = daemon_jobs_observe(d);
        if (r < 0)
                return r;

        cb.userdata = d;
        r = udev_discovery_new(d->base, &cb, &d->udev);
        if (r < 0)
                return r;

        daemon_read_host_version(d);
        /* Before any port is opened: is Klipper running and whose are they? */
        r = daemon_host_start(d);
        if (r < 0)
                log_warning_errno(r, "Going on without klippy's API: %m");
        r = udev_discovery_enumerate(d->udev);
        if (r < 0)
                return r;
        r = daemon_linux_mcus_update(d);
        if (r < 0)
                return log_error_errno(r, "Cannot watch for Linux process MCUs: %m");
        r = daemon_can_start(d);
        if (r < 0)
                log_warning_errno(r, "Going on without CAN: %m");

        /* The name last: a client that sees it finds the objects ready. */
        r = bus_request_name(d);
        if (r < 0)
                return r;

        (void) sd_notify(false, "READY=1\nSTATUS=Watching for MCUs");
        log_info("mcuflashd " PACKAGE_VERSION " running.");
        r = daemon_watchdog_start(d);
        if (r < 0)
                return r;

        if (event_base_dispatch(d->base) < 0)
                return log_error_errno(EIO, "Event loop failed: %m");
        return 0;
}
