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
 * klipper-mcu.service.
 *
 * The daemon cannot write there itself (its unit keeps the file system
 * read-only): installing and putting back run as `mcuflashd
 * --install-program=PATH` / `--restore-program=PATH` in a transient
 * systemd service that may write only the program's directory
 * (flash-linux-tool.c, unit_run_transient()); its stdout says why it
 * failed. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/config.h"
#include "core/daemon-internal.h"
#include "core/flash-internal.h"
#include "core/job.h"
#include "core/units.h"
#include "shared/log.h"

/* How often the MCU is asked again while waiting for the restarted program. */
#define LINUX_RETRY_USEC (500 * 1000ULL)

static void restart_service(struct job *j);

/* ---- the file step, in a transient service --------------------------- */

static int memfd_with(const char *name, const uint8_t *data, size_t size) {
        _cleanup_close_ int fd = -1;

        fd = memfd_create(name, MFD_CLOEXEC);
        if (fd < 0)
                return -errno;
        for (size_t done = 0; done < size;) {
                ssize_t n = write(fd, data + done, size - done);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                done += (size_t) n;
        }
        if (lseek(fd, 0, SEEK_SET) < 0)
                return -errno;
        return TAKE_FD(fd);
}

/* What the tool printed (its first line), into @buf. */
static void tool_output(struct flash_linux *l, char *buf, size_t size) {
        ssize_t n;
        char *nl;

        buf[0] = '\0';
        if (l->output_fd < 0)
                return;
        n = pread(l->output_fd, buf, size - 1, 0);
        if (n <= 0)
                return;
        buf[n] = '\0';
        nl = strchr(buf, '\n');
        if (nl)
                *nl = '\0';
}

/* Why the step failed, for a person: the tool's line, or systemd's. */
static void tool_failure(struct flash_linux *l, int r, const char *result, char *buf, size_t size) {
        tool_output(l, buf, size);
        if (!isempty(buf))
                return;
        snprintf(buf, size, "systemd could not run the installer (%s)",
                 r == -EIO ? strempty(result) : strerror(-r));
}

/* Run `mcuflashd --MODE-program=PROGRAM` as a transient service. */
static int run_tool(struct job *j, const char *mode, const uint8_t *data, size_t size, unit_job_fn done) {
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        _cleanup_free_ char *unit = NULL, *arg = NULL, *dir = NULL;
        _cleanup_close_ int in = -1;
        struct unit_transient spec;
        char self[PATH_MAX];
        char *argv[3];
        const char *slash;
        ssize_t n;
        int r;

        n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        if (n <= 0)
                return n < 0 ? -errno : -EIO;
        self[n] = '\0';
        /* Upgraded while running: the new binary at the same path speaks
         * the same two options. */
        if ((size_t) n > strlen(" (deleted)") && streq(self + n - strlen(" (deleted)"), " (deleted)"))
                self[n - strlen(" (deleted)")] = '\0';
        slash = strrchr(l->program, '/');
        if (!slash)
                return -EINVAL;
        dir = slash == l->program ? strdup("/") : strndup(l->program, (size_t) (slash - l->program));
        if (!dir || asprintf(&unit, "mcuflashd-%s-program-%d-%u.service", mode, (int) getpid(), j->number) < 0 ||
            asprintf(&arg, "--%s-program=%s", mode, l->program) < 0)
                return -ENOMEM;

        in = memfd_with("klipper_mcu", data, size);
        if (in < 0)
                return in;
        safe_close(l->output_fd);
        l->output_fd = memfd_create("mcuflashd-install-output", MFD_CLOEXEC);
        if (l->output_fd < 0)
                return -errno;

        argv[0] = self;
        argv[1] = arg;
        argv[2] = NULL;
        spec = (struct unit_transient) {
                .unit = unit,
                .description = streq(mode, "install") ? "mcuflashd: install the Linux MCU's klipper_mcu" :
                               "mcuflashd: put the previous klipper_mcu back",
                .argv = argv,
                .read_write_path = dir,
                .stdin_fd = in,
                .stdout_fd = l->output_fd,
        };
        r = unit_run_transient(j->daemon->bus, j->daemon->base, &spec, done, j, &l->unit_op);
        if (r < 0)
                return r;
        log_info("job %u: running %s in %s (may write %s only).", j->number, arg, unit, dir);
        return 0;
}

void flash_linux_done(struct flash_linux *l) {
        l->unit_op = unit_op_free(l->unit_op);
        if (l->retry)
                event_free(l->retry);
        l->retry = NULL;
        free(l->program);
        free(l->service);
        free(l->failure);
        l->output_fd = safe_close(l->output_fd);
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

static void on_restored(void *userdata, int r, const char *result) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        char message[FLASH_MESSAGE_MAX];

        l->unit_op = NULL;
        if (job_is_finished(j))
                return;
        if (r < 0) {
                tool_failure(l, r, result, message, sizeof(message));
                job_finish(j, JOB_STATE_FAILED, l->failure_error, "%s; the new program stays at %s, because %s: "
                           "install a working klipper_mcu there and restart %s.", strempty(l->failure),
                           l->program, message, l->service);
                return;
        }
        log_info("job %u: the previous program is back at %s.", j->number, l->program);
        restart_service(j);
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

        r = run_tool(j, "restore", NULL, 0, on_restored);
        if (r < 0) {
                snprintf(message, sizeof(message), "systemd could not run the installer (%s)", strerror(-r));
                job_finish(j, JOB_STATE_FAILED, error, "%s; the new program stays at %s, because %s: "
                           "install a working klipper_mcu there and restart %s.", strempty(l->failure),
                           l->program, message, l->service);
        }
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

static void on_installed(void *userdata, int r, const char *result) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct flash_linux *l = &f->linux_mcu;
        struct mcu *m = job_mcu(j);
        char message[FLASH_MESSAGE_MAX];

        l->unit_op = NULL;
        if (job_is_finished(j))
                return;
        f->flashing = false;
        if (m) {
                /* The old program runs on until the restart. */
                mcu_set_state(m, MCU_STATE_APPLICATION);
                registry_commit(j->daemon->registry, m);
        }
        if (r < 0) {
                tool_failure(l, r, result, message, sizeof(message));
                job_finish(j, JOB_STATE_FAILED, r == -EIO ? MCUFLASH_ERROR_PROTOCOL : flash_error_of(r),
                           "%s; %s is unchanged and the running klipper_mcu was left alone.", message, l->program);
                return;
        }
        job_set_progress(j, f->size, f->size);
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
        job_set_phase(j, JOB_PHASE_WRITING);
        job_set_progress(j, 0, f->size);
        r = run_tool(j, "install", f->data, f->size, on_installed);
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
         * Once systemd runs the installer, it runs to its end (a file copy,
         * seconds); then the new program either answers or is rolled back;
         * none of it is cut short. */
        (void) f;
        return -EINPROGRESS;
}
