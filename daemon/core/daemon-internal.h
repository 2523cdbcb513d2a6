/* What the parts of the daemon glue (daemon.c, tty.c, linuxmcu.c,
 * identify.c) share with each other and nobody else. */
#pragma once

#include "core/daemon.h"
#include "discover/udev.h"

#define DEFAULT_UART_BAUD 250000
#define DAEMON_HELD_REASON "in use by Klipper; what is shown is what Klipper reports"

/* How long start-up waits for the first read of printer.cfg. */
#define PRINTERCFG_STARTUP_WAIT_SEC 5

/* Read printer.cfg again (in a worker) and give every MCU its name from it
 * when that is done. */
void daemon_reload_printercfg(struct daemon *d);

/* Name and UART speed as printer.cfg says. */
void daemon_apply_printercfg(struct daemon *d, struct mcu *m);

/* Identify @m in a worker thread unless that already runs or it is offline. */
void daemon_start_identify(struct daemon *d, struct mcu *m);

/* Offline bookkeeping: forget @m after OfflineTimeoutSec, or not. */
void daemon_arm_offline_timer(struct daemon *d, struct mcu *m);
void daemon_cancel_offline_timer(struct mcu *m);

/* @m's link is (back) in place: leave offline, take names from printer.cfg,
 * announce it (@is_new: add it to the registry) and identify it. */
void daemon_mcu_attached(struct daemon *d, struct mcu *m, bool is_new);

/* @m's link went away: state offline with @reason, pending calls answered. */
void daemon_mcu_gone(struct daemon *d, struct mcu *m, const char *reason);

/* udev callbacks (tty.c). */
void daemon_tty_added(void *userdata, const struct udev_tty_info *info);
void daemon_tty_removed(void *userdata, const char *syspath);

/* USB bootloader devices (usbboot.c). */
void daemon_usb_added(void *userdata, const struct udev_usb_info *info);
void daemon_usb_removed(void *userdata, const char *syspath);

/* Linux process MCU paths (linuxmcu.c): watch those printer.cfg names now;
 * stop watching at exit. */
int daemon_linux_mcus_update(struct daemon *d);
void daemon_linux_mcus_free(struct daemon *d);

/* CAN interfaces and nodes (can.c). */
int daemon_can_start(struct daemon *d);
void daemon_can_stop(struct daemon *d);
/* Scan @ifname again (NULL: every interface that is up). */
void daemon_can_rescan(struct daemon *d, const char *ifname);
bool daemon_can_interface_up(struct daemon *d, const char *ifname);

/* The running Klipper, through its API socket (host.c). */
int daemon_host_start(struct daemon *d);
void daemon_host_stop(struct daemon *d);
/* printer.cfg was (re)read: MCUs shown as Klipper's that are not are freed. */
void daemon_host_printercfg_changed(struct daemon *d);
/* Does a job own @m now?  Then only the job and the link's own hotplug
 * events touch it: never a Rescan or a Refresh. */
static inline bool daemon_mcu_has_job(const struct mcu *m) {
        return !streq(m->job, "/");
}

/* Is @m's link Klipper's now (Klipper runs and @m is in its printer.cfg)? */
bool daemon_mcu_held_by_klipper(struct daemon *d, const struct mcu *m);

/* HostVersion (daemon.c): "" or "?" mean unknown. */
void daemon_set_host_version(struct daemon *d, const char *version);
/* klippy's software_version while Klipper runs (it wins over the checkout);
 * NULL once Klipper does not run: the checkout is read again. */
void daemon_set_klippy_version(struct daemon *d, const char *version);

/* Shutdown (daemon.c): a job concluded while stopping; exit once none is
 * left, else say how many are (sd_notify STATUS=). */
void daemon_stop_progress(struct daemon *d);
