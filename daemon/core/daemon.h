/* The daemon as a whole: configuration, the printer.cfg view, the host's
 * Klipper version, the registry, discovery, worker threads and the D-Bus
 * connection, all on one libevent loop.  This is the glue that decides what
 * a discovered device means (is it an MCU? which one? what is its name?)
 * and starts identification; the pieces it glues know nothing of each
 * other. */
#pragma once

#include <event2/event.h>
#include <stdbool.h>

#include <systemd/sd-bus.h>

#include "core/config.h"
#include "core/printercfg.h"
#include "core/registry.h"
#include "core/worker.h"
#include "discover/can.h"
#include "discover/pathwatch.h"
#include "discover/udev.h"

struct bus_loop;
struct printercfg_read;
struct rescan_waiter;
struct can_iface;
struct klippy_client;
struct job;
struct linux_links;

struct daemon {
        struct event_base *base;
        struct config *config;
        char *config_path;
        struct printercfg *printercfg;  /* NULL when none configured or readable */
        struct printercfg_read *printercfg_read;        /* the read in progress (daemon.c), or NULL */
        struct rescan_waiter *rescan_waiters;           /* Rescans waiting for that read (daemon.c) */
        char *host_version;             /* "" while unknown */
        bool host_version_pending;
        bool host_version_reread;       /* asked again while a read ran */
        bool host_version_from_klippy;  /* host_version is klippy's software_version */
        char *printer_state;            /* Manager.PrinterState; "unknown" without the klippy API */
        int auto_flash;                 /* Manager.AutoFlash (an int for sd-bus's "b") */
        struct registry *registry;
        struct worker_pool *workers;
        struct udev_discovery *udev;
        struct path_watch *path_watch;  /* Linux process MCU ptys */
        struct linux_links *linux_links; /* linuxmcu.c: the klipper_mcu behind each */
        struct can_watch *can_watch;
        struct can_iface *can_ifaces;   /* core/can.c's list */
        struct klippy_client *klippy;   /* NULL without ApiSocket= */
        char *klippy_config_file;       /* printer.cfg as klippy names it */
        uid_t klippy_uid;               /* klippy's user (SO_PEERCRED), if klippy_uid_known */
        bool klippy_uid_known;
        struct event *klippy_settle_timer;
        bool klipper_running;           /* the klippy API is connected */
        bool klippy_says_stopped;       /* the klippy API is configured and no Klipper runs */

        sd_bus *bus;
        struct bus_loop *bus_loop;
        sd_bus_slot *manager_slot;
        sd_bus_slot *object_manager_slot;
        sd_bus_slot *mcu_slot;
        sd_bus_slot *mcu_enumerator_slot;
        sd_bus_slot *job_slot;
        sd_bus_slot *job_enumerator_slot;
        struct job *jobs;               /* core/job.c's list, newest first */
        unsigned n_jobs_started;
        unsigned n_image_loads;         /* Flash() images being read by workers (bus/mcu.c) */
        bool rescanning;                /* inside daemon_rescan(): MCUs with a job are left alone */
        struct bus_rescans *rescans;    /* bus/manager.c's waiting Rescan calls */

        struct event *sigterm_event;
        struct event *sigint_event;
        int exit_code;
        bool stopping;                  /* SIGTERM/SIGINT: jobs end at their next safe point, then exit */
        bool forced_exit;               /* exited before every job ended (second signal, deadline) */
        struct event *stop_deadline;
        struct event *watchdog_timer;   /* WATCHDOG=1 at half of systemd's WatchdogSec= */
};

/* Read the configuration, create the loop and the registry, start reading
 * printer.cfg in a worker (daemon_run() waits a few seconds for it).
 * No device is touched and no bus is connected yet. */
int daemon_new(const char *config_path, struct daemon **ret);
struct daemon *daemon_free(struct daemon *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct daemon *, daemon_free);

/* How long SIGTERM/SIGINT waits for jobs to reach a safe point and for
 * Klipper to be started again before the daemon exits anyway; the unit's
 * TimeoutStopSec= is longer. */
#define DAEMON_STOP_TIMEOUT_USEC (90ULL * 1000000ULL)

/* Connect to the system bus, export the objects, take the name, start
 * discovery, tell systemd we are ready, and run until SIGTERM/SIGINT.  Then
 * every job stops at its next safe point, Klipper is started again where a
 * job stopped it, and only then does it return (at the latest after
 * DAEMON_STOP_TIMEOUT_USEC or a second signal: then d->forced_exit, and
 * the daemon must not wait for its worker threads). */
int daemon_run(struct daemon *d);

/* Rescan: re-read printer.cfg and the host version, drop offline MCUs,
 * enumerate devices again and re-identify MCUs whose state is unknown.
 * An MCU with a job is left alone (not dropped, re-added or identified).
 * printer.cfg is read in a worker: @done(@d, 0, @userdata) follows on the
 * loop once the names from it are in place (at once, from within this
 * call, when there is no printer.cfg), or with -ESHUTDOWN when the daemon
 * stops first.  A negative return is an error and @done is not called. */
typedef void (*daemon_rescan_done_fn)(struct daemon *d, int result, void *userdata);
int daemon_rescan(struct daemon *d, daemon_rescan_done_fn done, void *userdata);

/* Re-identify @m (Refresh).  Returns 0 when an identify runs (the answer
 * follows through bus_mcu_complete_refresh()), 1 when there is nothing to
 * ask (a USB bootloader device), -ENODEV when the MCU is offline, -EBUSY
 * when Klipper holds it, -EALREADY when a job has it (nothing is touched). */
int daemon_refresh_mcu(struct daemon *d, struct mcu *m);
