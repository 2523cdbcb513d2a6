/* Starting a job and following it until it finishes, shared by every verb
 * whose method returns an io.mcuflash1.Job (bootloader, reboot, later flash
 * and update-all).  Following is driven by the job's signals
 * (PropertiesChanged, Finished), never by polling its properties; the
 * display is a live progress line on a terminal and one line per phase
 * otherwise.  Ctrl-C asks the daemon to cancel the job, a second Ctrl-C
 * stops waiting.  What a verb prints once the job succeeded is the verb's
 * business, not this file's. */
#pragma once

#include "client.h"

/* Appends the arguments of the method that creates the job. */
typedef int (*JobAppendArguments)(sd_bus_message *m, void *userdata);

/* The method that creates the job and returns its object path. */
typedef struct JobCall {
        const char *object_path;
        const char *interface;
        const char *method;
        JobAppendArguments append_arguments; /* NULL: the method takes none */
        void *userdata;
} JobCall;

typedef enum JobWaitFlags {
        /* Return as soon as the job exists, with its properties as they are. */
        JOB_WAIT_NO_WAIT = 1 << 0,
        /* Print neither the job path nor progress on stdout (for --json). */
        JOB_WAIT_QUIET   = 1 << 1,
} JobWaitFlags;

/* Call the method, print "Job <path>" and follow the job until it finished
 * (unless JOB_WAIT_NO_WAIT).  Returns 0 with the job's last properties in
 * *ret — the job may have failed or been cancelled, look at ret->state —,
 * -EINTR when the user stopped waiting with a second Ctrl-C (the job goes
 * on), or another negative errno after printing what went wrong. */
int job_start_and_wait(sd_bus *bus, const JobCall *call, JobWaitFlags flags, JobInfo *ret);

/* What the job verbs share: start the job, follow it (unless @no_wait),
 * print it as JSON when @json.  Returns an exit status to return as it is
 * (failure, interruption, --no-wait, a job that did not succeed), or -1
 * when the job succeeded and the verb prints its own outcome. */
int job_run_verb(sd_bus *bus, const JobCall *call, bool json, bool no_wait, JobInfo *job);

/* Print why a finished job did not succeed as "mcuflashctl: <message>" on
 * stderr.  Returns EXIT_FAILURE. */
int job_report_failure(const JobInfo *info);
