/* Implementation of job-wait.h.  The matches on the jobs' signals are in
 * place before the method that creates the job is called, so nothing the
 * job does can slip by; after the call the signals queued meanwhile are
 * dispatched and then the job's properties are read once (GetAll), which
 * also catches a job that finished before any signal could be seen.  A
 * signal whose cookie is older than that GetAll reply is already part of
 * what was read and is skipped.  From then on the loop sleeps in poll() on
 * the bus and a signalfd for SIGINT, and only wakes for messages, bus
 * timeouts or Ctrl-C.  It does not interpret what a job did to its MCU. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "job-wait.h"

/* "entering-bootloader" is the longest phase name. */
#define PHASE_COLUMN_WIDTH 19
#define PROGRESS_BAR_WIDTH 10

typedef struct JobWait {
        sd_bus *bus;
        JobWaitFlags flags;
        bool on_tty;

        char *job_path;
        JobInfo info;

        /* Cookie of the GetAll reply that info was read from; older
         * signals are already contained in it.  0: not read yet. */
        uint64_t snapshot_cookie;
        /* A PropertiesChanged invalidated properties: read them again. */
        bool reread_needed;

        /* Finished arrived, or the properties say the job is over. */
        bool finished;
        bool finished_by_signal;
        char *finished_state;
        char *finished_error;
        char *finished_message;

        bool daemon_gone;
        bool cancel_requested;
        /* Negative errno a callback could not return through sd-bus. */
        int callback_error;

        /* Plain output: the phase printed last. */
        char *printed_phase;
        /* Terminal output: the progress line on screen ("" = none) and
         * whether the cursor still stands at its end. */
        char *shown_line;
        bool line_open;
} JobWait;

static void job_wait_done(JobWait *w) {
        job_info_done(&w->info);
        free(w->job_path);
        free(w->finished_state);
        free(w->finished_error);
        free(w->finished_message);
        free(w->printed_phase);
        free(w->shown_line);
}

static bool message_is_for_job(JobWait *w, sd_bus_message *m) {
        return w->job_path && streq_ptr(sd_bus_message_get_path(m), w->job_path);
}

/* Skip signals that the GetAll snapshot already contains. */
static bool message_is_stale(JobWait *w, sd_bus_message *m) {
        uint64_t cookie;

        if (w->snapshot_cookie == 0)
                return false;
        if (sd_bus_message_get_cookie(m, &cookie) < 0)
                return false;
        return cookie < w->snapshot_cookie;
}

/* Terminal: end the progress line so that other output starts on its own. */
static void end_progress_line(JobWait *w) {
        if (!w->line_open)
                return;
        fputc('\n', stdout);
        fflush(stdout);
        w->line_open = false;
}

static void format_size(uint64_t bytes, char *buf, size_t size) {
        if (bytes < 1024)
                snprintf(buf, size, "%llu B", (unsigned long long) bytes);
        else if (bytes < 1024 * 1024)
                snprintf(buf, size, "%.1f KiB", (double) bytes / 1024);
        else
                snprintf(buf, size, "%.1f MiB", (double) bytes / (1024 * 1024));
}

/* "entering-bootloader  [####------]  40%", plus bytes when the job counts them. */
static int format_progress_line(const JobInfo *info, char **ret) {
        char bar[PROGRESS_BAR_WIDTH + 1], bytes[64] = "";
        unsigned percent = progress_percent(info->progress);
        size_t filled = (size_t) percent * PROGRESS_BAR_WIDTH / 100;
        const char *phase = isempty(info->phase) ? info->state : info->phase;

        memset(bar, '#', filled);
        memset(bar + filled, '-', PROGRESS_BAR_WIDTH - filled);
        bar[PROGRESS_BAR_WIDTH] = 0;

        if (info->bytes_total > 0) {
                char done[24], total[24];

                format_size(info->bytes_done, done, sizeof(done));
                format_size(info->bytes_total, total, sizeof(total));
                snprintf(bytes, sizeof(bytes), "  %s of %s", done, total);
        }

        if (asprintf(ret, "%-*s  [%s] %u%%%s", PHASE_COLUMN_WIDTH, strempty(phase), bar, percent, bytes) < 0)
                return -ENOMEM;
        return 0;
}

/* Terminal: rewrite the progress line in place when it changed. */
static int show_progress_line(JobWait *w) {
        _cleanup_free_ char *line = NULL;
        size_t old_width;
        int r;

        r = format_progress_line(&w->info, &line);
        if (r < 0)
                return client_error_errno(r, "Out of memory");

        if (w->line_open && streq_ptr(line, w->shown_line))
                return 0;

        /* Blank out whatever the old line had beyond the new one. */
        old_width = w->line_open && w->shown_line ? strlen(w->shown_line) : 0;
        printf("\r%s%*s", line, (int) (old_width > strlen(line) ? old_width - strlen(line) : 0), "");
        if (old_width > strlen(line))
                printf("\r%s", line);
        fflush(stdout);

        free(w->shown_line);
        w->shown_line = TAKE_PTR(line);
        w->line_open = true;
        return 0;
}

/* Plain output: one "phase: X" line per phase. */
static int show_phase_change(JobWait *w) {
        if (isempty(w->info.phase) || streq_ptr(w->info.phase, w->printed_phase))
                return 0;

        if (free_and_strdup(&w->printed_phase, w->info.phase) < 0)
                return client_error_errno(ENOMEM, "Out of memory");

        printf("phase: %s\n", w->info.phase);
        fflush(stdout);
        return 0;
}

/* Called after every change of w->info; the terminal line is drawn once the
 * queue is drained (see show_progress()), plain lines at once so that no
 * phase is skipped. */
static int note_change(JobWait *w) {
        /* The Finished signal is what ends a job: mcuflashd publishes a
         * failed state before it starts Klipper again and only then emits
         * Finished.  A final state in phase "done" is the same moment seen
         * through the properties, for the case the signal was missed. */
        if (job_state_is_final(w->info.state) && streq_ptr(w->info.phase, "done"))
                w->finished = true;

        if ((w->flags & JOB_WAIT_QUIET) || w->on_tty)
                return 0;
        return show_phase_change(w);
}

static int show_progress(JobWait *w) {
        if ((w->flags & JOB_WAIT_QUIET) || !w->on_tty)
                return 0;
        return show_progress_line(w);
}

static int on_properties_changed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        JobWait *w = userdata;
        _cleanup_(strv_freep) char **invalidated = NULL;
        const char *interface;
        int r;

        if (!message_is_for_job(w, m) || message_is_stale(w, m))
                return 0;

        r = sd_bus_message_read(m, "s", &interface);
        if (r < 0 || !streq(interface, MCUFLASH_JOB_INTERFACE))
                return 0;

        r = job_info_apply_changes(&w->info, m);
        if (r < 0) {
                w->callback_error = r;
                return 0;
        }

        r = sd_bus_message_read_strv(m, &invalidated);
        if (r < 0) {
                w->callback_error = client_error_errno(r, "Failed to parse PropertiesChanged: %m");
                return 0;
        }
        if (invalidated && invalidated[0])
                w->reread_needed = true;

        r = note_change(w);
        if (r < 0)
                w->callback_error = r;
        return 0;
}

static int on_finished(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        JobWait *w = userdata;
        const char *state, *error, *message;
        int r;

        if (!message_is_for_job(w, m))
                return 0;

        r = sd_bus_message_read(m, "sss", &state, &error, &message);
        if (r < 0) {
                w->callback_error = client_error_errno(r, "Failed to parse the Finished signal: %m");
                return 0;
        }

        if (free_and_strdup(&w->finished_state, state) < 0 ||
            free_and_strdup(&w->finished_error, error) < 0 ||
            free_and_strdup(&w->finished_message, message) < 0) {
                w->callback_error = client_error_errno(ENOMEM, "Out of memory");
                return 0;
        }

        w->finished = true;
        w->finished_by_signal = true;
        return 0;
}

static int on_daemon_gone(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        JobWait *w = userdata;

        w->daemon_gone = true;
        return 0;
}

/* Subscribe to every job's signals; the callbacks pick ours by path. */
static int install_matches(JobWait *w) {
        int r;

        /* Slots are floating: they live as long as the connection. */
        r = client_add_match(w->bus, NULL,
                             "type='signal',"
                             "sender='" MCUFLASH_BUS_NAME "',"
                             "interface='org.freedesktop.DBus.Properties',"
                             "member='PropertiesChanged',"
                             "path_namespace='/io/mcuflash1/job'",
                             on_properties_changed, w);
        if (r < 0)
                return r;

        r = client_add_match(w->bus, NULL,
                             "type='signal',"
                             "sender='" MCUFLASH_BUS_NAME "',"
                             "interface='" MCUFLASH_JOB_INTERFACE "',"
                             "member='Finished',"
                             "path_namespace='/io/mcuflash1/job'",
                             on_finished, w);
        if (r < 0)
                return r;

        return client_match_daemon_gone(w->bus, NULL, on_daemon_gone, w);
}

static int call_job_method(JobWait *w, const JobCall *call) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        const char *path;
        char what[128];
        int r;

        r = sd_bus_message_new_method_call(w->bus, &m, MCUFLASH_BUS_NAME, call->object_path,
                                           call->interface, call->method);
        if (r < 0)
                return client_error_errno(r, "Failed to create the %s call: %m", call->method);

        if (call->append_arguments) {
                r = call->append_arguments(m, call->userdata);
                if (r < 0)
                        return client_error_errno(r, "Failed to build the %s call: %m", call->method);
        }

        r = sd_bus_call(w->bus, m, 0, &error, &reply);
        if (r < 0) {
                snprintf(what, sizeof(what), "Failed to call %s", call->method);
                r = client_bus_error(&error, r, what);
                sd_bus_error_free(&error);
                return r;
        }

        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return client_error_errno(r, "Failed to parse the reply of %s: %m", call->method);

        w->job_path = strdup(path);
        if (!w->job_path)
                return client_error_errno(ENOMEM, "Out of memory");

        return 0;
}

/* Replace w->info by a fresh GetAll of the job. */
static int read_job(JobWait *w) {
        JobInfo fresh = {};
        uint64_t cookie;
        int r;

        r = client_get_job_info_with_cookie(w->bus, w->job_path, &fresh, &cookie);
        if (r == -ENXIO)
                return client_error_errno(r, "Job %s does not exist (any more)", w->job_path);
        if (r < 0)
                return r;

        job_info_done(&w->info);
        w->info = fresh;
        w->snapshot_cookie = cookie;
        w->reread_needed = false;
        return note_change(w);
}

/* Dispatch everything queued; 0 when the queue is empty. */
static int drain(JobWait *w) {
        int r;

        for (;;) {
                r = sd_bus_process(w->bus, NULL);
                if (r < 0)
                        return client_error_errno(r, "Lost the connection to the system bus: %m");
                if (w->callback_error < 0)
                        return w->callback_error;
                if (r == 0)
                        return 0;
        }
}

static void request_cancel(JobWait *w) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        end_progress_line(w);
        fputs("Cancelling the job; press Ctrl-C again to stop waiting (the job then goes on).\n", stderr);
        w->cancel_requested = true;

        r = sd_bus_call_method(w->bus, MCUFLASH_BUS_NAME, w->job_path, MCUFLASH_JOB_INTERFACE, "Cancel",
                               &error, NULL, NULL);
        if (r < 0)
                client_bus_error(&error, r, "Failed to cancel the job");
        sd_bus_error_free(&error);
}

/* The loop: drain the queue, draw, sleep until the bus or Ctrl-C wakes us.
 * The first Ctrl-C asks the daemon to cancel, the second stops waiting. */
static int follow_with_ctrl_c(JobWait *w) {
        static const int signals[] = { SIGINT };
        _cleanup_close_ int signal_fd = -1;
        sigset_t old_mask;
        int r;

        r = client_open_signal_fd(signals, ELEMENTSOF(signals), &old_mask, &signal_fd);
        if (r < 0)
                return r;

        /* Signals that arrived during the method call first, then one look
         * at the properties: the job may have finished before our matches
         * saw anything of it. */
        r = drain(w);
        if (r >= 0)
                r = read_job(w);

        while (r >= 0) {
                r = drain(w);
                if (r < 0)
                        break;

                if (w->daemon_gone) {
                        end_progress_line(w);
                        r = client_error_errno(ECONNRESET, "mcuflashd went away while following %s",
                                               w->job_path);
                        break;
                }

                if (w->reread_needed) {
                        r = read_job(w);
                        continue;
                }

                r = show_progress(w);
                if (r < 0 || w->finished)
                        break;

                r = client_wait_bus_or_signal(w->bus, signal_fd);
                if (r == SIGINT) {
                        if (w->cancel_requested) {
                                end_progress_line(w);
                                fprintf(stderr, "Stopped waiting; %s goes on in mcuflashd.\n", w->job_path);
                                r = -EINTR;
                                break;
                        }
                        request_cancel(w);
                        r = 0;
                }
        }

        (void) sigprocmask(SIG_SETMASK, &old_mask, NULL);
        return r;
}

/* After the job finished: its final properties, completed by what the
 * Finished signal said in case the object lags behind or is gone. */
static int collect_result(JobWait *w) {
        JobInfo final = {};
        int r;

        /* The object may be gone, or the whole daemon (it exits right
         * after its last job when it is stopped): Finished said enough. */
        r = client_get_job_info(w->bus, w->job_path, &final);
        if (r >= 0) {
                job_info_done(&w->info);
                w->info = final;
        } else if (r != -ENXIO && !w->finished_by_signal)
                return r;

        if (w->finished_by_signal && !job_state_is_final(w->info.state)) {
                if (free_and_strdup(&w->info.state, w->finished_state) < 0 ||
                    free_and_strdup(&w->info.error, w->finished_error) < 0 ||
                    free_and_strdup(&w->info.error_message, w->finished_message) < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
        }

        if (!w->info.object_path) {
                w->info.object_path = strdup(w->job_path);
                if (!w->info.object_path)
                        return client_error_errno(ENOMEM, "Out of memory");
        }

        return 0;
}

int job_start_and_wait(sd_bus *bus, const JobCall *call, JobWaitFlags flags, JobInfo *ret) {
        _cleanup_(job_wait_done) JobWait w = {
                .bus = bus,
                .flags = flags,
                .on_tty = isatty(STDOUT_FILENO),
        };
        int r;

        if (!(flags & JOB_WAIT_NO_WAIT)) {
                r = install_matches(&w);
                if (r < 0)
                        return r;
        }

        r = call_job_method(&w, call);
        if (r < 0)
                return r;

        if (!(flags & JOB_WAIT_QUIET)) {
                printf("Job %s\n", w.job_path);
                fflush(stdout);
        }

        if (flags & JOB_WAIT_NO_WAIT) {
                r = client_get_job_info(bus, w.job_path, &w.info);
                if (r == -ENXIO)
                        return client_error_errno(r, "Job %s does not exist (any more)", w.job_path);
                if (r < 0)
                        return r;
        } else {
                r = follow_with_ctrl_c(&w);
                if (r < 0) {
                        end_progress_line(&w);
                        return r;
                }

                r = show_progress(&w);
                end_progress_line(&w);
                if (r < 0)
                        return r;

                r = collect_result(&w);
                if (r < 0)
                        return r;
        }

        *ret = w.info;
        w.info = (JobInfo) {};
        return 0;
}

int job_report_failure(const JobInfo *info) {
        if (!isempty(info->error_message))
                client_error_errno(EIO, "%s", info->error_message);
        else if (streq_ptr(info->state, "cancelled"))
                client_error_errno(ECANCELED, "The job was cancelled.");
        else if (!isempty(info->error))
                client_error_errno(EIO, "The job failed: %s", info->error);
        else
                client_error_errno(EIO, "The job ended in state '%s'.", strempty(info->state));

        return EXIT_FAILURE;
}

int job_run_verb(sd_bus *bus, const JobCall *call, bool json, bool no_wait, JobInfo *job) {
        _cleanup_(json_object_putp) json_object *object = NULL;
        JobWaitFlags flags = (no_wait ? JOB_WAIT_NO_WAIT : 0) | (json ? JOB_WAIT_QUIET : 0);
        int r;

        r = job_start_and_wait(bus, call, flags, job);
        if (r == -EINTR)
                return EXIT_INTERRUPTED;
        if (r < 0)
                return EXIT_FAILURE;
        if (json) {
                r = job_info_to_json(job, &object);
                if (r < 0) {
                        client_error_errno(r, "Failed to build the JSON object: %m");
                        return EXIT_FAILURE;
                }
                if (client_print_json(object) < 0)
                        return EXIT_FAILURE;
        }
        if (no_wait)
                return EXIT_SUCCESS;
        if (!streq(job->state, "succeeded"))
                return job_report_failure(job);
        return -1;
}
