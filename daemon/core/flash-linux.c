/* Flash jobs for the Linux process MCU, which has no bootloader: its
 * "firmware" is the klipper_mcu program that a systemd service runs.
 *
 *   the service exists (else nothing is installed) → install the image at
 *   the program's path (flash/linux.c: new file, verified, the old one kept
 *   as PROGRAM.old, one rename) → restart the service → the MCU answers
 *   identify with the image's version within BootloaderTimeoutSec.
 *
 * If it does not — the program does not start, does not answer, or answers
 * with another version — the old program is put back, the service is
 * restarted once more and the job fails saying whether the old program
 * answers again.  The paths come from [Mcu ID] Program=/Service= in
 * mcuflashd.conf, by default Klipper's /usr/local/bin/klipper_mcu and
 * klipper-mcu.service. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "core/daemon-internal.h"
#include "core/flash-internal.h"
#include "core/job.h"
#include "core/units.h"
#include "shared/log.h"

/* How often the MCU is asked again while waiting for the restarted program. */
#define LINUX_RETRY_USEC (500 * 1000ULL)

static void restart_service(struct job *j);

void flash_linux_done(struct flash_linux *l) {
        l->unit_op = unit_op_free(l->unit_op);
        if (l->retry)
                event_free(l->retry);
        l->retry = NULL;
        free(l->program);
        free(l->service);
        free(l->failure);
}

static void stop_waiting(struct job *j) {
        struct flash *f = j->data;

        f->linux_mcu.waiting = false;
        if (f->linux_mcu.retry)
                evtimer_del(f->linux_mcu.retry);
        job_disarm_timeout(j);
}

/* The end of a roll-back: the job fails with the first failure's reason and
 * what became of the old program. */
static void finish_rolled_back(struct job *j, const char *outcome, ...) _printf_(2, 3);
static void finish_rolled_back(struct job *j, const char *outcome, ...) {
        struct flash *f = j->data;
        _cleanup_free_ char *how = NULL;
        va_list ap;
        int r;

        stop_waiting(j);
        va_start(ap, outcome);
        r = vasprintf(&how, outcome, ap);
        va_end(ap);
        job_finish(j, JOB_STATE_FAILED, f->linux_mcu.failure_error, "%s; %s.", f->linux_mcu.failure,
                   r < 0 ? "(out of memory)" : how);
}

/* The new program failed: put the old one back and restart once more. */
static void roll_back(struct job *j, enum mcuflash_error error, const char *reason, ...) _printf_(3, 4);
static void roll_back(struct job *j, enum mcuflash_error error, const char *reason, ...) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        char message[FLASH_MESSAGE_MAX];
        va_list ap;
        int r;

        stop_waiting(j);
        free(l->failure);
        va_start(ap, reason);
        r = vasprintf(&l->failure, reason, ap);
        va_end(ap);
        if (r < 0)
                l->failure = NULL;
        l->failure_error = error;
        l->rolling_back = true;
        log_warning("job %u: %s; putting the previous program back.", j->number, strempty(l->failure));

        r = flasher_linux_restore(l->program, message, sizeof(message));
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, error, "%s; the new program stays at %s, because %s: "
                           "install a working klipper_mcu there and restart %s.", strempty(l->failure),
                           l->program, message, l->service);
                return;
        }
        restart_service(j);
}

/* Has the restarted program answered, fresh, since the restart? */
static void check_answer(struct job *j, struct mcu *m) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;

        if (!l->waiting || !m || m->identify_count <= l->identify_base)
                return;
        if (m->state_id != MCU_STATE_APPLICATION)
                return;         /* not (yet) answering: wait, ask again */
        if (l->rolling_back) {
                finish_rolled_back(j, "the previous klipper_mcu was put back at %s and answers again "
                                   "(version %s)", l->program, strempty(m->firmware_version));
                return;
        }
        if (!streq(m->firmware_version, f->image_version)) {
                /* The old program may still have answered while systemd
                 * restarted: only a timeout decides against the new one. */
                log_debug("job %u: %s answers with %s, waiting for %s.", j->number, m->id,
                          strempty(m->firmware_version), f->image_version);
                return;
        }
        stop_waiting(j);
        log_info("job %u: %s runs %s from %s.", j->number, m->id, f->image_version, l->program);
        job_set_fraction(j, 1.0);
        job_finish(j, JOB_STATE_SUCCEEDED, 0, "%s", "");
}

void flash_linux_mcu_changed(struct job *j, struct mcu *m) {
        check_answer(j, m);
}

static void on_retry(evutil_socket_t fd, short what, void *userdata) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct mcu *m = job_mcu(j);
        const struct timeval tv = { 0, LINUX_RETRY_USEC };

        if (job_is_finished(j) || !f->linux_mcu.waiting)
                return;
        if (m && !m->identifying)
                daemon_start_identify(j->daemon, m);
        evtimer_add(f->linux_mcu.retry, &tv);
}

static void on_answer_timeout(struct job *j) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        struct mcu *m = job_mcu(j);
        double seconds = (double) j->daemon->config->bootloader_timeout_usec / 1e6;
        char seen[160];

        if (m && m->identify_count > l->identify_base && m->state_id == MCU_STATE_APPLICATION)
                snprintf(seen, sizeof(seen), "it answers with version %s", strempty(m->firmware_version));
        else if (m && !isempty(m->state_reason))
                snprintf(seen, sizeof(seen), "it does not answer (%s)", m->state_reason);
        else
                snprintf(seen, sizeof(seen), "it does not answer");
        if (l->rolling_back) {
                finish_rolled_back(j, "the previous klipper_mcu was put back at %s, but after restarting %s "
                                   "%s either: see 'systemctl status %s'", l->program, l->service,
                                   m && m->state_id == MCU_STATE_APPLICATION ? "it answers with another version" :
                                   "it does not answer", l->service);
                return;
        }
        roll_back(j, MCUFLASH_ERROR_TIMEOUT,
                  "The new klipper_mcu (version %s) was installed at %s, but %.0f s after restarting %s %s",
                  f->image_version, l->program, seconds, l->service, seen);
}

static void on_restarted(void *userdata, int r, const char *result) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        struct mcu *m = job_mcu(j);
        const struct timeval tv = { 0, LINUX_RETRY_USEC };
        char why[128];

        l->unit_op = NULL;
        if (job_is_finished(j))
                return;
        if (r < 0) {
                snprintf(why, sizeof(why), "%s", r == -EIO ? strempty(result) : strerror(-r));
                if (l->rolling_back)
                        finish_rolled_back(j, "the previous klipper_mcu was put back at %s, but restarting %s "
                                           "failed too (%s): see 'systemctl status %s'", l->program, l->service,
                                           why, l->service);
                else
                        roll_back(j, MCUFLASH_ERROR_PROTOCOL, "The new klipper_mcu (version %s) was installed at "
                                  "%s, but systemd could not restart %s (%s)", f->image_version, l->program,
                                  l->service, why);
                return;
        }
        log_info("job %u: restarted %s; waiting for %s to answer.", j->number, l->service, j->mcu_id);
        l->identify_base = m ? m->identify_count : 0;
        l->waiting = true;
        r = job_arm_timeout(j, j->daemon->config->bootloader_timeout_usec, on_answer_timeout);
        if (r >= 0 && !l->retry) {
                l->retry = evtimer_new(j->daemon->base, on_retry, j);
                if (!l->retry)
                        r = -ENOMEM;
        }
        if (r < 0) {
                finish_rolled_back(j, "cannot wait for it: %s", strerror(-r));
                return;
        }
        /* Ask at once (the restart may have been quick), then every retry. */
        if (m && !m->identifying)
                daemon_start_identify(j->daemon, m);
        evtimer_add(l->retry, &tv);
}

static void restart_service(struct job *j) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        int r;

        job_set_phase(j, JOB_PHASE_REBOOTING);
        r = unit_restart(j->daemon->bus, j->daemon->base, l->service, on_restarted, j, &l->unit_op);
        if (r < 0)
                on_restarted(j, r, NULL);
}

static void on_installed(void *userdata, int result) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        struct mcu *m = job_mcu(j);

        if (result == -ECANCELED && !j->cancel_requested)
                return;         /* daemon shutting down */
        f->flashing = false;
        if (m) {
                /* The old program runs on until the restart. */
                mcu_set_state(m, MCU_STATE_APPLICATION);
                registry_commit(j->daemon->registry, m);
        }
        if (result < 0) {
                job_finish(j, result == -ECANCELED ? JOB_STATE_CANCELLED : JOB_STATE_FAILED, flash_error_of(result),
                           "%s; %s is unchanged and the running klipper_mcu was left alone.",
                           isempty(f->session.message) ? strerror(-result) : f->session.message, l->program);
                return;
        }
        restart_service(j);
}

static void on_service_state(void *userdata, int r, const char *active_state) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        struct mcu *m = job_mcu(j);
        uint8_t *data;
        size_t size;

        l->unit_op = NULL;
        if (job_is_finished(j))
                return;
        if (r == -ENOENT) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_UNSUPPORTED,
                           "systemd has no %s to restart klipper_mcu with, so nothing was installed; name the "
                           "service and the program in mcuflashd.conf's [Mcu %s] section (Service=, Program=).",
                           l->service, j->mcu_id);
                return;
        }
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL,
                           "Cannot ask systemd about %s (%s), so nothing was installed.", l->service,
                           strerror(-r));
                return;
        }
        if (!m) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_DISCONNECTED, "The MCU is gone.");
                return;
        }
        if (j->cancel_requested) {
                job_finish(j, JOB_STATE_CANCELLED, MCUFLASH_ERROR_CANCELLED, "Cancelled; nothing was installed.");
                return;
        }
        log_debug("job %u: %s is %s.", j->number, l->service, strempty(active_state));

        /* The whole ELF file is the program. */
        r = image_flat(f->image, 0, &data, &size);
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_INVALID_IMAGE, "Cannot lay out the image: %s.",
                           strerror(-r));
                return;
        }
        free(f->data);
        f->data = data;
        f->size = size;
        f->flasher = &flasher_linux;
        f->session = (struct flash_session) {
                .link = FLASH_LINK_FILE,
                .install_path = l->program,
                .data = f->data,
                .size = f->size,
                .mcu_type = m->mcu_type,
        };
        job_set_phase(j, JOB_PHASE_WRITING);
        r = flash_run_flasher(j, on_installed);
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Cannot start installing: %s.",
                           strerror(-r));
                return;
        }
        f->flashing = true;
        mcu_set_state(m, MCU_STATE_FLASHING);
        registry_commit(j->daemon->registry, m);
}

void flash_linux_run(struct job *j) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        const struct config *c = j->daemon->config;
        int r;

        l->program = strdup(config_mcu_get(c, j->mcu_id, "Program") ?: DEFAULT_LINUX_MCU_PROGRAM);
        l->service = strdup(config_mcu_get(c, j->mcu_id, "Service") ?: DEFAULT_LINUX_MCU_SERVICE);
        if (!l->program || !l->service) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Out of memory.");
                return;
        }
        job_set_phase(j, JOB_PHASE_PREPARING);
        r = unit_get_state(j->daemon->bus, j->daemon->base, l->service, on_service_state, j, &l->unit_op);
        if (r < 0)
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL,
                           "Cannot ask systemd about %s (%s), so nothing was installed.", l->service,
                           strerror(-r));
}

int flash_linux_cancel(struct job *j) {
        struct flash *f = j->data;

        /* Before the install job.c cancels by itself (phase "preparing").
         * While installing, the installer stops before it replaces the
         * program.  Once the new program is in place it either answers or
         * is rolled back; neither is cut short. */
        return f->flashing ? -EBUSY : -EINPROGRESS;
}
