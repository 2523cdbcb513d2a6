/* mcuflashctl jobs [--json] and mcuflashctl cancel JOB: list the jobs that
 * mcuflashd runs or finished recently (Manager.ListJobs, one GetAll per
 * job, the MCU's name for each) as a table or a JSON array, and ask the
 * daemon to cancel one job (Job.Cancel).  Neither waits for anything:
 * following a job is job-wait.c's, watching all of them cmd-monitor.c's. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "table.h"

static const char jobs_usage[] =
        "Usage: mcuflashctl jobs [--json]\n"
        "\n"
        "List the jobs of mcuflashd: the running ones and those that finished in\n"
        "the last minutes, with their MCU, kind, state, phase, progress and error.\n"
        "\n"
        "Options:\n"
        "      --json           Print a JSON array of job objects instead of the table\n"
        "  -h, --help           Show this help and exit\n";

static const char cancel_usage[] =
        "Usage: mcuflashctl cancel JOB\n"
        "\n"
        "Ask mcuflashd to cancel a job.  JOB is the job's number as 'mcuflashctl\n"
        "jobs' shows it, or its object path (/io/mcuflash1/job/N).\n"
        "\n"
        "Options:\n"
        "  -h, --help           Show this help and exit\n";

enum {
        COLUMN_JOB,
        COLUMN_MCU,
        COLUMN_KIND,
        COLUMN_STATE,
        COLUMN_PHASE,
        COLUMN_PROGRESS,
        COLUMN_ERROR,
        _COLUMN_MAX,
};

static const char *const column_titles[_COLUMN_MAX] = {
        [COLUMN_JOB] = "JOB",
        [COLUMN_MCU] = "MCU",
        [COLUMN_KIND] = "KIND",
        [COLUMN_STATE] = "STATE",
        [COLUMN_PHASE] = "PHASE",
        [COLUMN_PROGRESS] = "PROGRESS",
        [COLUMN_ERROR] = "ERROR",
};

typedef struct JobRow {
        JobInfo job;
        char *mcu_label;
} JobRow;

typedef struct JobList {
        JobRow *rows;
        size_t n_rows;
} JobList;

static void job_list_done(JobList *list) {
        for (size_t i = 0; i < list->n_rows; i++) {
                job_info_done(&list->rows[i].job);
                free(list->rows[i].mcu_label);
        }
        free(list->rows);
        *list = (JobList) {};
}

/* Order by job number; paths without one go last. */
static int compare_rows(const void *a, const void *b) {
        const JobRow *x = a, *y = b;
        const char *nx = job_path_number(x->job.object_path), *ny = job_path_number(y->job.object_path);
        size_t lx, ly;

        if (!nx || !ny) {
                if (nx || ny)
                        return nx ? -1 : 1;
                return strcmp(x->job.object_path, y->job.object_path);
        }

        lx = strspn(nx, "0123456789");
        ly = strspn(ny, "0123456789");
        if (lx != ly)
                return lx < ly ? -1 : 1;
        return strcmp(nx, ny);
}

/* The MCU as the status table names it: "eddy", "mcu", else its id; for
 * an MCU that is gone, the last part of its object path. */
static int mcu_label(sd_bus *bus, const char *mcu_path, char **ret) {
        _cleanup_(mcu_info_donep) McuInfo mcu = {};
        const char *label, *slash;
        int r;

        if (isempty(mcu_path) || streq(mcu_path, "/"))
                label = "-";
        else {
                r = client_get_mcu_info(bus, mcu_path, &mcu);
                if (r == -ENXIO) {
                        slash = strrchr(mcu_path, '/');
                        label = slash ? slash + 1 : mcu_path;
                } else if (r < 0)
                        return r;
                else {
                        label = mcu_info_short_name(&mcu);
                        if (streq(label, "-") && !isempty(mcu.id))
                                label = mcu.id;
                }
        }

        *ret = strdup(label);
        if (!*ret)
                return client_error_errno(ENOMEM, "Out of memory");
        return 0;
}

static int load_jobs(sd_bus *bus, bool with_labels, JobList *list) {
        _cleanup_(strv_freep) char **paths = NULL;
        size_t n_paths = 0;
        int r;

        r = client_list_jobs(bus, &paths);
        if (r < 0)
                return r;

        while (paths[n_paths])
                n_paths++;

        list->rows = calloc(n_paths + 1, sizeof(JobRow));
        if (!list->rows)
                return client_error_errno(ENOMEM, "Out of memory");

        for (size_t i = 0; i < n_paths; i++) {
                JobRow *row = &list->rows[list->n_rows];

                r = client_get_job_info(bus, paths[i], &row->job);
                if (r == -ENXIO)
                        continue; /* forgotten between ListJobs and GetAll */
                if (r < 0)
                        return r;
                list->n_rows++;

                if (with_labels) {
                        /* Jobs of one MCU share its label. */
                        for (size_t j = 0; j + 1 < list->n_rows && !row->mcu_label; j++)
                                if (streq(list->rows[j].job.mcu, row->job.mcu)) {
                                        row->mcu_label = strdup(list->rows[j].mcu_label);
                                        if (!row->mcu_label)
                                                return client_error_errno(ENOMEM, "Out of memory");
                                }

                        if (!row->mcu_label) {
                                r = mcu_label(bus, row->job.mcu, &row->mcu_label);
                                if (r < 0)
                                        return r;
                        }
                }
        }

        qsort(list->rows, list->n_rows, sizeof(JobRow), compare_rows);
        return 0;
}

static int print_jobs_json(const JobList *list) {
        _cleanup_(json_object_putp) json_object *array = NULL;
        json_object *object;
        int r;

        array = json_object_new_array();
        if (!array)
                return client_error_errno(ENOMEM, "Out of memory");

        for (size_t i = 0; i < list->n_rows; i++) {
                r = job_info_to_json(&list->rows[i].job, &object);
                if (r < 0)
                        return client_error_errno(r, "Failed to build the JSON object: %m");
                if (json_object_array_add(array, object) < 0) {
                        json_object_put(object);
                        return client_error_errno(ENOMEM, "Out of memory");
                }
        }

        return client_print_json(array);
}

/* The error column: the daemon's message, else the error's short name. */
static const char *error_text(const JobInfo *job) {
        const char *name;

        if (!isempty(job->error_message))
                return job->error_message;
        if (isempty(job->error))
                return "";
        name = startswith(job->error, "io.mcuflash1.Error.");
        return name ?: job->error;
}

static int print_jobs_table(const JobList *list) {
        Table table;
        int r;

        if (list->n_rows == 0) {
                puts("No jobs.");
                return 0;
        }

        r = table_init(&table, column_titles, _COLUMN_MAX, list->n_rows);
        if (r < 0)
                return r;

        for (size_t i = 0; i < list->n_rows; i++) {
                const JobInfo *job = &list->rows[i].job;
                const char *number = job_path_number(job->object_path);
                char percent[8];

                snprintf(percent, sizeof(percent), "%u%%", progress_percent(job->progress));

                const char *texts[_COLUMN_MAX] = {
                        [COLUMN_JOB] = number ?: job->object_path,
                        [COLUMN_MCU] = list->rows[i].mcu_label,
                        [COLUMN_KIND] = job->kind,
                        [COLUMN_STATE] = job->state,
                        [COLUMN_PHASE] = job->phase,
                        [COLUMN_PROGRESS] = percent,
                        [COLUMN_ERROR] = error_text(job),
                };

                r = table_add_row(&table, texts);
                if (r < 0) {
                        table_done(&table);
                        return r;
                }
        }

        table_print(&table, NULL);
        table_done(&table);
        return 0;
}

int verb_jobs(int argc, char *argv[]) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        JobList list = {};
        bool json = false;
        int r;

        r = client_parse_json_verb(argc, argv, jobs_usage, 0, "", &json);
        if (r >= 0)
                return r;

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = load_jobs(bus, !json, &list);
        if (r >= 0)
                r = json ? print_jobs_json(&list) : print_jobs_table(&list);

        job_list_done(&list);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* "3" or "/io/mcuflash1/job/3" → the job's object path.  Returns 0,
 * -EINVAL for anything else or -ENOMEM. */
static int job_path_from_argument(const char *argument, char **ret) {
        char *path;

        if (job_path_number(argument))
                path = strdup(argument);
        else if (isempty(argument) || argument[strspn(argument, "0123456789")] != 0)
                return -EINVAL;
        else if (asprintf(&path, MCUFLASH_JOB_PATH_PREFIX "%s", argument) < 0)
                path = NULL;

        if (!path)
                return -ENOMEM;

        *ret = path;
        return 0;
}

int verb_cancel(int argc, char *argv[]) {
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                {}
        };
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_free_ char *path = NULL;
        int c, r;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        fputs(cancel_usage, stdout);
                        return EXIT_SUCCESS;
                default:
                        return client_unknown_option(cancel_usage, argv);
                }

        if (optind >= argc)
                return client_usage_error(cancel_usage, "missing argument JOB");
        if (optind + 1 < argc)
                return client_usage_error(cancel_usage, "unexpected argument '%s'", argv[optind + 1]);

        r = job_path_from_argument(argv[optind], &path);
        if (r == -EINVAL)
                return client_usage_error(cancel_usage,
                                          "'%s' is neither a job number nor a job's object path",
                                          argv[optind]);
        if (r < 0) {
                client_error_errno(r, "Out of memory");
                return EXIT_FAILURE;
        }

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = sd_bus_call_method(bus, MCUFLASH_BUS_NAME, path, MCUFLASH_JOB_INTERFACE, "Cancel",
                               &error, NULL, NULL);
        if (r < 0) {
                /* sd-bus answers UnknownObject for a path it does not
                 * export, other bindings UnknownInterface or UnknownMethod. */
                if (sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_OBJECT) ||
                    sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_INTERFACE) ||
                    sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_METHOD))
                        client_error_errno(r, "No job %s (finished jobs are forgotten after a while)",
                                           job_path_number(path));
                else
                        client_bus_error(&error, r, "Failed to cancel the job");
                sd_bus_error_free(&error);
                return EXIT_FAILURE;
        }

        return EXIT_SUCCESS;
}
