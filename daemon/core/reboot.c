/* Reboot jobs: into the bootloader and back to the application.
 *
 * Into the bootloader, by the entry method the MCU's link allows
 * (protocols.md §4): the 1200-baud touch on USB CDC, the magic string on a
 * hardware UART, CMD_REQUEST_BOOTLOADER on CAN.  The request runs in a
 * worker; then the job waits — on events, with a timeout — until discovery
 * has found the MCU in its bootloader: a new USB device or tty on the same
 * chip serial or port (tty.c, usbboot.c), or a Katapult answer on CAN
 * (can.c, which is asked to scan again every second, since CAN has no
 * hotplug).  The Mcu object stays the same throughout.
 *
 * Back to the application: Katapult's COMPLETE (tty or CAN), DfuSe's leave
 * request, PICOBOOT's REBOOT; then the job waits until Klipper answers
 * identify again.
 *
 * Where a job fails or is cancelled, its message says where the MCU is and
 * how to get it back. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/daemon-internal.h"
#include "core/identify.h"
#include "core/job.h"
#include "core/reboot.h"
#include "proto/canbus.h"
#include "proto/dfu.h"
#include "proto/katapult.h"
#include "proto/picoboot.h"
#include "shared/interrupt.h"
#include "shared/log.h"
#include "transport/can.h"
#include "transport/serial.h"
#include "transport/usb.h"

#define CAN_RESCAN_INTERVAL_USEC (1000 * 1000)
#define KATAPULT_TIMEOUT_MS 2000


void reboot_data_done(struct reboot *rb) {
        if (!rb)
                return;
        if (rb->rescan)
                event_free(rb->rescan);
        free(rb->device_path);
        free(rb->can_interface);
        free(rb->bootloader);
}

static void reboot_free(struct job *j) {
        reboot_data_done(j->data);
        free(j->data);
}

/* ---- worker bodies ----------------------------------------------------- */

static int request_bootloader_can(struct reboot *rb) {
        _cleanup_close_ int fd = -1;

        fd = can_socket_open(rb->can_interface, NULL, 0);
        if (fd < 0)
                return fd;
        return canbus_request_bootloader(fd, rb->uuid);
}

/* A UART has no re-enumeration: Katapult answers on the same tty. */
static int request_bootloader_uart(struct reboot *rb) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        r = serial_request_bootloader_uart(rb->device_path, rb->baud);
        if (r < 0)
                return r;
        /* Katapult's own flashtool waits a second for the reset. */
        r = interruptible_sleep_msec(1000);
        if (r < 0)
                return r;
        r = serial_transport_open(rb->device_path, rb->baud, &t);
        if (r < 0)
                return r;
        r = katapult_connect(t, KATAPULT_TIMEOUT_MS, &rb->katapult);
        if (r < 0)
                return r == -ETIMEDOUT ? -ENOMSG : r;
        rb->katapult_found = true;
        return 0;
}

static int reboot_to_application(struct reboot *rb) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        if (streq(rb->bootloader, "katapult")) {
                if (rb->transport == MCU_TRANSPORT_CAN)
                        r = can_stream_transport_open(rb->can_interface, rb->can_nodeid, &t);
                else
                        r = serial_transport_open(rb->device_path, rb->baud, &t);
                if (r < 0)
                        return r;
                return katapult_complete(t, KATAPULT_TIMEOUT_MS);
        }
        if (streq(rb->bootloader, "stm32-dfu"))
                return dfu_leave_to_application(rb->busnum, rb->devnum,
                                                (uint32_t) (rb->flash_start != MCU_FLASH_START_UNKNOWN ?
                                                            rb->flash_start : DFU_STM32_FLASH_BASE));
        if (streq(rb->bootloader, "picoboot"))
                return picoboot_reboot_to_application(rb->busnum, rb->devnum);
        return -EOPNOTSUPP;
}

static int reboot_run_worker(void *userdata) {
        struct job *j = userdata;
        struct reboot *rb = j->data;

        if (!rb->to_bootloader)
                return reboot_to_application(rb);
        switch (rb->transport) {
        case MCU_TRANSPORT_USB_SERIAL:
                return serial_request_bootloader_usb(rb->device_path);
        case MCU_TRANSPORT_SERIAL:
                return request_bootloader_uart(rb);
        case MCU_TRANSPORT_CAN:
                return request_bootloader_can(rb);
        default:
                return -EOPNOTSUPP;
        }
}

/* ---- main-loop part ---------------------------------------------------- */

static bool reboot_reached(struct job *j, struct mcu *m) {
        struct reboot *rb = j->data;

        if (rb->to_bootloader)
                return m->state_id == MCU_STATE_BOOTLOADER;
        return m->state_id == MCU_STATE_APPLICATION && klipper_dict_app_is_klipper(m->firmware);
}

/* A sentence on where the MCU is now, for failures. */
static void describe_mcu(struct mcu *m, char *buf, size_t size) {
        if (!m)
                snprintf(buf, size, "it is gone");
        else if (m->state_id == MCU_STATE_BOOTLOADER)
                snprintf(buf, size, "it is in its bootloader (%s); 'mcuflashctl reboot' starts its application",
                         m->bootloader);
        else if (m->state_id == MCU_STATE_OFFLINE)
                snprintf(buf, size, "it has not reappeared (%s); power-cycle it, or press its reset button twice "
                         "quickly to enter Katapult", m->state_reason);
        else
                snprintf(buf, size, "it is in state %s%s%s", m->state, isempty(m->state_reason) ? "" : ": ",
                         m->state_reason);
}

static void reboot_stop_rescans(struct reboot *rb) {
        if (rb->rescan) {
                event_free(rb->rescan);
                rb->rescan = NULL;
        }
}

static void reboot_succeed(struct job *j, struct mcu *m) {
        struct reboot *rb = j->data;
        char where[256];

        reboot_stop_rescans(rb);
        job_disarm_timeout(j);
        if (j->cancel_requested && rb->to_bootloader && rb->reached) {
                /* Cancelled on the way (the daemon stops): the bootloader is
                 * the safe point, nothing more is sent. */
                describe_mcu(m, where, sizeof(where));
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED,
                           "Cancelled once the MCU reached its bootloader; %s.", where);
                return;
        }
        if (rb->reached) {
                rb->reached(j);
                return;
        }
        job_set_fraction(j, 1.0);
        job_finish(j, JOB_STATE_SUCCEEDED, 0, "%s", "");
}

/* Sent back to the application, the MCU is (again) in its bootloader: the
 * application did not start — after a flash, the written image does not
 * run where it was written. */
static void reboot_stayed_in_bootloader(struct job *j, struct mcu *m) {
        struct reboot *rb = j->data;

        reboot_stop_rescans(rb);
        job_disarm_timeout(j);
        if (rb->after)
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL,
                           "The MCU stayed in its bootloader (%s) after %s: the application did not start "
                           "(is the image built for this MCU and its flash start?). Flash an image built for "
                           "it, or 'mcuflashctl reboot' tries to start it again.", m->bootloader, rb->after);
        else
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL,
                           "The MCU stayed in its bootloader (%s): its application did not start. Flash a "
                           "Klipper image built for it, or 'mcuflashctl reboot' tries again.", m->bootloader);
}

static void on_reboot_timeout(struct job *j) {
        struct reboot *rb = j->data;
        struct mcu *m = job_mcu(j);
        char where[256];

        if (!rb->to_bootloader && m && m->state_id == MCU_STATE_BOOTLOADER) {
                reboot_stayed_in_bootloader(j, m);
                return;
        }
        reboot_stop_rescans(rb);
        describe_mcu(m, where, sizeof(where));
        if (rb->to_bootloader)
                job_finish(j, j->cancel_requested ? JOB_STATE_CANCELLED : JOB_STATE_FAILED, MCUFLASH_ERROR_TIMEOUT,
                           "The MCU did not appear in a bootloader within %.0f s; %s.",
                           j->daemon->config->bootloader_timeout_usec / 1e6, where);
        else
                job_finish(j, j->cancel_requested ? JOB_STATE_CANCELLED : JOB_STATE_FAILED, MCUFLASH_ERROR_TIMEOUT,
                           "Klipper did not answer within %.0f s after leaving the bootloader; %s.",
                           j->daemon->config->bootloader_timeout_usec / 1e6, where);
}

/* Links without hotplug — a CAN bus, a UART whose MCU changes its mind on
 * the same tty — are asked again every second while the job waits. */
static void on_ask_again(evutil_socket_t fd, short what, void *userdata) {
        struct job *j = userdata;
        struct reboot *rb = j->data;
        struct timeval tv = { .tv_sec = CAN_RESCAN_INTERVAL_USEC / 1000000 };
        struct mcu *m = job_mcu(j);

        if (rb->transport == MCU_TRANSPORT_CAN)
                daemon_can_rescan(j->daemon, rb->can_interface);
        else if (m)
                daemon_start_identify(j->daemon, m);
        if (rb->rescan)
                (void) evtimer_add(rb->rescan, &tv);
}

static void reboot_wait(struct job *j) {
        struct reboot *rb = j->data;
        struct mcu *m = job_mcu(j);
        struct timeval tv = { .tv_sec = CAN_RESCAN_INTERVAL_USEC / 1000000 };

        if (m && reboot_reached(j, m)) {
                reboot_succeed(j, m);
                return;
        }
        if (job_arm_timeout(j, j->daemon->config->bootloader_timeout_usec, on_reboot_timeout) < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_TIMEOUT, "Out of memory while waiting.");
                return;
        }
        if (rb->transport == MCU_TRANSPORT_CAN ||
            (rb->transport == MCU_TRANSPORT_SERIAL && !rb->to_bootloader)) {
                /* Nothing announces a node on CAN: ask after a second, as
                 * Katapult's flashtool does, and again until it answers.  A
                 * UART MCU leaving Katapult stays on the same tty: identify
                 * it now and again until Klipper answers. */
                if (rb->transport == MCU_TRANSPORT_SERIAL && m) {
                        m->speaks_katapult = false;
                        daemon_start_identify(j->daemon, m);
                }
                rb->rescan = evtimer_new(j->daemon->base, on_ask_again, j);
                if (rb->rescan)
                        (void) evtimer_add(rb->rescan, &tv);
        }
}

static void reboot_worker_done(void *userdata, int result) {
        struct job *j = userdata;
        struct reboot *rb = j->data;
        struct mcu *m;
        char where[256];

        if (result == -ECANCELED && !j->cancel_requested)
                return;         /* the worker pool is going away */
        rb->worker_running = false;
        m = job_mcu(j);
        if (m)
                m->link_busy = false;

        if (result == -ECANCELED) {
                /* A cancel cut a pause in the request short. */
                describe_mcu(m, where, sizeof(where));
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED,
                           "Cancelled while %s; %s.", rb->to_bootloader ? "asking for the bootloader" :
                           "leaving the bootloader", where);
                return;
        }

        if (result < 0) {
                describe_mcu(m, where, sizeof(where));
                if (result == -EBUSY)
                        job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_BUSY,
                                   "The MCU's port is held by another process; nothing was sent. Stop that "
                                   "process (is Klipper running outside systemd?) and try again.");
                else if (result == -ENOMSG)
                        job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_TIMEOUT,
                                   "The bootloader request was sent but Katapult does not answer on %s; "
                                   "the MCU has no Katapult or did not reset. %s.", rb->device_path, where);
                else if (result == -EOPNOTSUPP)
                        job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_UNSUPPORTED,
                                   "mcuflashd cannot do this for a %s MCU in %s.",
                                   mcu_transport_to_string(rb->transport), rb->bootloader);
                else
                        job_finish(j, JOB_STATE_FAILED,
                                   result == -ENODEV ? MCUFLASH_ERROR_DISCONNECTED :
                                   result == -ETIMEDOUT ? MCUFLASH_ERROR_TIMEOUT : MCUFLASH_ERROR_PROTOCOL,
                                   "%s failed: %s; %s.",
                                   rb->to_bootloader ? "The bootloader request" : "Leaving the bootloader",
                                   strerror(-result), where);
                return;
        }

        if (rb->katapult_found && m) {
                /* UART: the job itself met Katapult on the same tty. */
                m->speaks_katapult = true;
                identify_apply_katapult(m, &rb->katapult, 0, rb->device_path, j->daemon->host_version);
                registry_commit(j->daemon->registry, m);
        }
        if (j->cancel_requested && !j->shutting_down) {
                describe_mcu(m, where, sizeof(where));
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED,
                           "Cancelled after the request was sent; %s.", where);
                return;
        }
        job_set_phase(j, rb->to_bootloader ? JOB_PHASE_ENTERING_BOOTLOADER : JOB_PHASE_REBOOTING);
        reboot_wait(j);
}

void reboot_step(struct job *j, bool to_bootloader, void (*reached)(struct job *j)) {
        struct reboot *rb = j->data;

        rb->to_bootloader = to_bootloader;
        rb->reached = reached;
        rb->left_bootloader = false;
        reboot_run(j);
}

void reboot_run(struct job *j) {
        struct reboot *rb = j->data;
        struct mcu *m = job_mcu(j);
        int r;

        if (!m) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_DISCONNECTED, "The MCU is gone.");
                return;
        }
        if (reboot_reached(j, m)) {
                reboot_succeed(j, m);
                return;
        }
        job_set_phase(j, rb->to_bootloader ? JOB_PHASE_ENTERING_BOOTLOADER : JOB_PHASE_REBOOTING);

        /* Snapshot what the worker needs; the MCU may change meanwhile. */
        rb->transport = m->transport_id;
        rb->baud = m->baud;
        rb->can_nodeid = m->can_nodeid;
        rb->flash_start = m->flash_start;
        rb->busnum = m->usb_busnum;
        rb->devnum = m->usb_devnum;
        if (free_and_strdup(&rb->device_path, m->device_path) < 0 ||
            free_and_strdup(&rb->can_interface, m->can_interface) < 0 ||
            free_and_strdup(&rb->bootloader, m->bootloader) < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Out of memory.");
                return;
        }
        if (m->transport_id == MCU_TRANSPORT_CAN)
                (void) canbus_uuid_from_string(m->can_uuid, rb->uuid);

        r = job_worker_start(j, reboot_run_worker, reboot_worker_done);
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Cannot start the job: %s.", strerror(-r));
                return;
        }
        rb->worker_running = true;
        m->link_busy = true;
}

void reboot_mcu_changed(struct job *j, struct mcu *m) {
        struct reboot *rb = j->data;

        if (!rb->to_bootloader && (m->state_id == MCU_STATE_OFFLINE || m->state_id == MCU_STATE_APPLICATION))
                rb->left_bootloader = true;
        if (rb->worker_running || !j->timer)
                return;
        if (reboot_reached(j, m))
                reboot_succeed(j, m);
        else if (!rb->to_bootloader && rb->left_bootloader && m->state_id == MCU_STATE_BOOTLOADER)
                reboot_stayed_in_bootloader(j, m);
}

#define REBOOT_SHUTDOWN_WAIT_USEC (5ULL * 1000 * 1000)

int reboot_cancel(struct job *j) {
        struct reboot *rb = j->data;
        struct mcu *m = job_mcu(j);
        char where[256];

        if (rb->worker_running)
                return -EBUSY;  /* the request is on its way; stops right after */
        /* When the daemon stops, an MCU that was sent somewhere is let to
         * arrive, so that where it is left is known: not cut off while it
         * re-enumerates.  But for a few seconds at most, not the whole
         * BootloaderTimeoutSec: a board that never comes is not worth
         * holding up a stop (or a restart) for; the log then says it was
         * not seen again. */
        if (j->shutting_down && j->timer) {
                if (j->daemon->config->bootloader_timeout_usec > REBOOT_SHUTDOWN_WAIT_USEC &&
                    job_arm_timeout(j, REBOOT_SHUTDOWN_WAIT_USEC, on_reboot_timeout) < 0)
                        log_oom();
                return -EBUSY;
        }
        reboot_stop_rescans(rb);
        describe_mcu(m, where, sizeof(where));
        job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED, "Cancelled while waiting; %s.", where);
        return 0;
}

static const struct job_ops reboot_ops = {
        .run = reboot_run,
        .mcu_changed = reboot_mcu_changed,
        .cancel = reboot_cancel,
        .free = reboot_free,
};

int reboot_check(struct daemon *d, struct mcu *m, bool to_bootloader, bool stop_klipper,
                 enum mcuflash_error *ret_error, char **ret_message) {
        const char *name = isempty(m->name) ? m->id : m->name;
        int r;

#define REFUSE(e, ...)                                                  \
        do {                                                            \
                *ret_error = (e);                                       \
                r = asprintf(ret_message, __VA_ARGS__);                 \
                if (r < 0)                                              \
                        *ret_message = NULL;                            \
                return r < 0 ? -ENOMEM : -EPERM;                        \
        } while (0)

        if (d->stopping)
                REFUSE(MCUFLASH_ERROR_BUSY, "mcuflashd is stopping; %s is left alone. Try again once it runs "
                       "again.", name);
        if (streq(d->printer_state, "printing") || streq(d->printer_state, "paused"))
                REFUSE(MCUFLASH_ERROR_PRINTING, "The printer is %s; %s is not rebooted during a print.",
                       d->printer_state, name);
        if (!streq(m->job, "/"))
                REFUSE(MCUFLASH_ERROR_BUSY, "%s already has a job running (%s).", name, m->job);
        if (m->state_id == MCU_STATE_OFFLINE)
                REFUSE(MCUFLASH_ERROR_DISCONNECTED, "%s is offline (%s).", name, m->state_reason);
        if (daemon_mcu_held_by_klipper(d, m) && !stop_klipper)
                REFUSE(MCUFLASH_ERROR_BUSY, "Klipper holds %s; stop Klipper first, or allow stopping it "
                       "(stop-klipper).", name);
        if (to_bootloader) {
                if (m->transport_id == MCU_TRANSPORT_LINUX)
                        REFUSE(MCUFLASH_ERROR_UNSUPPORTED, "%s is the Linux process MCU: it has no bootloader.",
                               name);
                if (m->state_id != MCU_STATE_BOOTLOADER && m->transport_id != MCU_TRANSPORT_USB_SERIAL &&
                    m->transport_id != MCU_TRANSPORT_SERIAL && m->transport_id != MCU_TRANSPORT_CAN)
                        REFUSE(MCUFLASH_ERROR_UNSUPPORTED, "mcuflashd knows no bootloader request for %s (%s).",
                               name, m->transport);
        } else if (m->state_id != MCU_STATE_BOOTLOADER && m->state_id != MCU_STATE_APPLICATION)
                REFUSE(MCUFLASH_ERROR_UNSUPPORTED, "%s is neither in its bootloader nor running Klipper "
                       "(state %s).", name, m->state);
        else if (m->state_id == MCU_STATE_BOOTLOADER && !streq(m->bootloader, "katapult") &&
                 !streq(m->bootloader, "stm32-dfu") && !streq(m->bootloader, "picoboot"))
                REFUSE(MCUFLASH_ERROR_UNSUPPORTED, "mcuflashd cannot start the application from %s yet; "
                       "power-cycle the MCU.", m->bootloader);
#undef REFUSE
        return 0;
}

int reboot_start(struct daemon *d, struct mcu *m, bool to_bootloader, struct job **ret) {
        struct reboot *rb;
        int r;

        rb = calloc(1, sizeof(*rb));
        if (!rb)
                return -ENOMEM;
        rb->to_bootloader = to_bootloader;
        r = job_start(d, m, JOB_KIND_REBOOT, &reboot_ops, rb, ret);
        if (r < 0)
                free(rb);
        return r;
}
