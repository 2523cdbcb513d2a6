/* mcuflashctl monitor [--json]: a live stream of what mcuflashd reports —
 * MCUs appearing, changing and going away, jobs being created, making
 * progress and finishing, the Manager's properties changing — one line per
 * event as it happens (or one JSON object per line), flushed at once so a
 * pipe reader sees it immediately.  It runs until SIGINT/SIGTERM (exit 0)
 * or until mcuflashd leaves the bus (exit 1).  It keeps a small cache of
 * MCU names and of each job's MCU so that lines can name them, even for an
 * MCU that is already gone; it never changes anything in the daemon. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"

static const char monitor_usage[] =
        "Usage: mcuflashctl monitor [--json]\n"
        "\n"
        "Print mcuflashd's events as they happen, one line each: MCUs added,\n"
        "removed or changed, jobs added, progressing, finished or removed, and\n"
        "changes of the daemon's own properties.  Runs until Ctrl-C.\n"
        "\n"
        "Options:\n"
        "      --json           Print one JSON object per line instead\n"
        "  -h, --help           Show this help and exit\n";

#define MCU_PATH_PREFIX MCUFLASH_MANAGER_PATH "/mcu/"

typedef struct KnownMcu {
        char *path;
        char *id;
        char *name;
} KnownMcu;

typedef struct KnownJob {
        char *path;
        char *mcu;
        /* Whole percentage of the last text line, -1 before any. */
        int shown_percent;
} KnownJob;

typedef struct Monitor {
        sd_bus *bus;
        bool json;

        KnownMcu *mcus;
        size_t n_mcus;
        KnownJob *jobs;
        size_t n_jobs;

        bool daemon_gone;
        /* Negative errno a callback could not return through sd-bus. */
        int error;
} Monitor;

static void monitor_done(Monitor *monitor) {
        for (size_t i = 0; i < monitor->n_mcus; i++) {
                free(monitor->mcus[i].path);
                free(monitor->mcus[i].id);
                free(monitor->mcus[i].name);
        }
        free(monitor->mcus);

        for (size_t i = 0; i < monitor->n_jobs; i++) {
                free(monitor->jobs[i].path);
                free(monitor->jobs[i].mcu);
        }
        free(monitor->jobs);
}

static KnownMcu *find_mcu(Monitor *monitor, const char *path) {
        for (size_t i = 0; i < monitor->n_mcus; i++)
                if (streq_ptr(monitor->mcus[i].path, path))
                        return &monitor->mcus[i];
        return NULL;
}

static KnownJob *find_job(Monitor *monitor, const char *path) {
        for (size_t i = 0; i < monitor->n_jobs; i++)
                if (streq_ptr(monitor->jobs[i].path, path))
                        return &monitor->jobs[i];
        return NULL;
}

/* The last part of an object path: an MCU's escaped id when nothing else is known. */
static const char *path_tail(const char *path) {
        const char *slash = strrchr(path, '/');

        return slash ? slash + 1 : path;
}

/* Add or update an MCU in the cache. */
static int remember_mcu(Monitor *monitor, const char *path, const char *id, const char *name) {
        KnownMcu *mcu = find_mcu(monitor, path);

        if (!mcu) {
                KnownMcu *grown = reallocarray(monitor->mcus, monitor->n_mcus + 1, sizeof(KnownMcu));

                if (!grown)
                        return client_error_errno(ENOMEM, "Out of memory");
                monitor->mcus = grown;
                mcu = &monitor->mcus[monitor->n_mcus];
                *mcu = (KnownMcu) { .path = strdup(path) };
                if (!mcu->path)
                        return client_error_errno(ENOMEM, "Out of memory");
                monitor->n_mcus++;
        }

        if ((id && free_and_strdup(&mcu->id, id) < 0) || (name && free_and_strdup(&mcu->name, name) < 0))
                return client_error_errno(ENOMEM, "Out of memory");
        return 0;
}

static void forget_mcu(Monitor *monitor, const char *path) {
        KnownMcu *mcu = find_mcu(monitor, path);

        if (!mcu)
                return;
        free(mcu->path);
        free(mcu->id);
        free(mcu->name);
        *mcu = monitor->mcus[--monitor->n_mcus];
}

static int remember_job(Monitor *monitor, const char *path, const char *mcu_path) {
        KnownJob *job = find_job(monitor, path);

        if (!job) {
                KnownJob *grown = reallocarray(monitor->jobs, monitor->n_jobs + 1, sizeof(KnownJob));

                if (!grown)
                        return client_error_errno(ENOMEM, "Out of memory");
                monitor->jobs = grown;
                job = &monitor->jobs[monitor->n_jobs];
                *job = (KnownJob) { .path = strdup(path), .shown_percent = -1 };
                if (!job->path)
                        return client_error_errno(ENOMEM, "Out of memory");
                monitor->n_jobs++;
        }

        if (mcu_path && free_and_strdup(&job->mcu, mcu_path) < 0)
                return client_error_errno(ENOMEM, "Out of memory");
        return 0;
}

static void forget_job(Monitor *monitor, const char *path) {
        KnownJob *job = find_job(monitor, path);

        if (!job)
                return;
        free(job->path);
        free(job->mcu);
        *job = monitor->jobs[--monitor->n_jobs];
}

/* "mcu eddy" for a printer.cfg MCU, "mcu <id>" for another; NULL if unknown. */
static char *mcu_label(Monitor *monitor, const char *path) {
        KnownMcu *mcu;
        char *label;

        if (isempty(path) || streq(path, "/"))
                return NULL;

        mcu = find_mcu(monitor, path);
        if (mcu && !isempty(mcu->name))
                return strdup(mcu->name);

        if (asprintf(&label, "mcu %s", mcu && !isempty(mcu->id) ? mcu->id : path_tail(path)) < 0)
                return NULL;
        return label;
}

/* "job 3 (mcu eddy)", or "job 3" when its MCU is unknown. */
static char *job_label(Monitor *monitor, const char *path) {
        _cleanup_free_ char *mcu = NULL;
        KnownJob *job = find_job(monitor, path);
        const char *number = job_path_number(path);
        char *label;
        int r;

        if (job)
                mcu = mcu_label(monitor, job->mcu);

        if (mcu)
                r = asprintf(&label, "job %s (%s)", number ?: path, mcu);
        else
                r = asprintf(&label, "job %s", number ?: path);
        return r < 0 ? NULL : label;
}

/* Print a text event line and flush it at once. */
static int emit_line(const char *line) {
        puts(line);
        if (fflush(stdout) != 0)
                return client_error_errno(errno, "Failed to write output: %m");
        return 0;
}

/* A JSON event object with its "event" and "path" keys. */
static int new_event(const char *event, const char *path, json_object **ret) {
        json_object *object;

        object = json_object_new_object();
        if (!object)
                return -ENOMEM;

        if (client_json_add_string(object, "event", event) < 0 ||
            client_json_add_string(object, "path", path) < 0) {
                json_object_put(object);
                return -ENOMEM;
        }

        *ret = object;
        return 0;
}

/* Append one value to a text line: strings bare when they are one word,
 * quoted otherwise; numbers and booleans as JSON writes them. */
static int append_value(FILE *f, json_object *value) {
        const char *s;

        if (!value)
                return fputs("?", f) < 0 ? -EIO : 0;

        if (!json_object_is_type(value, json_type_string)) {
                s = json_object_to_json_string_ext(value, JSON_C_TO_STRING_PLAIN);
                return fputs(strempty(s), f) < 0 ? -EIO : 0;
        }

        s = json_object_get_string(value);
        if (!isempty(s) && !strpbrk(s, " \t\n\"\\"))
                return fputs(s, f) < 0 ? -EIO : 0;

        s = json_object_to_json_string_ext(value, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        return fputs(strempty(s), f) < 0 ? -EIO : 0;
}

/* "phase" for Phase, "bytes_done" for BytesDone. */
static void snake_case(const char *name, char *buf, size_t size) {
        size_t n = 0;

        for (const char *p = name; *p && n + 2 < size; p++) {
                if (*p >= 'A' && *p <= 'Z') {
                        if (p != name)
                                buf[n++] = '_';
                        buf[n++] = (char) (*p - 'A' + 'a');
                } else
                        buf[n++] = *p;
        }
        buf[n] = 0;
}

/* Job properties in a fixed, readable order; the rest after them. */
static const char *const job_property_order[] = {
        "State", "Phase", "Progress", "BytesDone", "BytesTotal", "Error", "ErrorMessage",
};

static bool is_ordered_job_property(const char *key) {
        for (size_t i = 0; i < ELEMENTSOF(job_property_order); i++)
                if (streq(job_property_order[i], key))
                        return true;
        return false;
}

static int append_job_property(FILE *f, const char *key, json_object *value, bool *first) {
        char snake[64];

        if (!*first)
                fputc(' ', f);
        *first = false;

        if (streq(key, "Progress") && value)
                return fprintf(f, "%u%%", progress_percent(json_object_get_double(value))) < 0 ? -EIO : 0;

        snake_case(key, snake, sizeof(snake));
        fprintf(f, "%s=", snake);
        return append_value(f, value);
}

/* "label: " followed by the changed properties. */
static int format_changes(const char *label, json_object *properties, bool job, char **ret) {
        _cleanup_free_ char *text = NULL;
        size_t size = 0;
        bool first = true;
        FILE *f;

        f = open_memstream(&text, &size);
        if (!f)
                return -ENOMEM;

        fprintf(f, "%s: ", label);

        if (job) {
                for (size_t i = 0; i < ELEMENTSOF(job_property_order); i++) {
                        json_object *ordered;

                        if (json_object_object_get_ex(properties, job_property_order[i], &ordered))
                                append_job_property(f, job_property_order[i], ordered, &first);
                }
                json_object_object_foreach(properties, key, value)
                        if (!is_ordered_job_property(key))
                                append_job_property(f, key, value, &first);
        } else {
                json_object_object_foreach(properties, key, value) {
                        if (!first)
                                fputc(' ', f);
                        first = false;
                        fprintf(f, "%s=", key);
                        append_value(f, value);
                }
        }

        if (fclose(f) != 0)
                return -ENOMEM;

        *ret = TAKE_PTR(text);
        return 0;
}

static int print_mcu_added(Monitor *monitor, const McuInfo *mcu) {
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *line = NULL;
        json_object *object;
        int r;

        if (!monitor->json) {
                if (!isempty(mcu->name))
                        r = asprintf(&line, "+ mcu %s (%s)", mcu->id, mcu->name);
                else
                        r = asprintf(&line, "+ mcu %s", mcu->id);
                if (r < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
                return emit_line(line);
        }

        if (new_event("mcu-added", mcu->object_path, &event) < 0 ||
            client_json_add_string(event, "id", mcu->id) < 0 ||
            client_json_add_string(event, "name", mcu->name) < 0 ||
            mcu_info_to_json(mcu, &object) < 0)
                return client_error_errno(ENOMEM, "Out of memory");
        if (json_object_object_add(event, "mcu", object) < 0) {
                json_object_put(object);
                return client_error_errno(ENOMEM, "Out of memory");
        }

        return client_print_json_line(event);
}

static int on_mcu_added(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(mcu_info_donep) McuInfo mcu = {};
        const char *path;
        int r;

        r = sd_bus_message_read(m, "o", &path);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse McuAdded: %m");
                return 0;
        }

        r = client_get_mcu_info(monitor->bus, path, &mcu);
        if (r == -ENXIO) {
                /* Gone again before we could look: say what we know. */
                mcu_info_done(&mcu);
                mcu = (McuInfo) {
                        .object_path = strdup(path),
                        .id = strdup(path_tail(path)),
                        .name = strdup(""),
                };
                if (!mcu.object_path || !mcu.id || !mcu.name)
                        r = client_error_errno(ENOMEM, "Out of memory");
                else
                        r = 0;
        }
        if (r >= 0)
                r = remember_mcu(monitor, path, mcu.id, mcu.name);
        if (r >= 0)
                r = print_mcu_added(monitor, &mcu);
        if (r < 0)
                monitor->error = r;
        return 0;
}

static int on_mcu_removed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *line = NULL;
        const char *path, *id = NULL, *name = NULL;
        KnownMcu *known;
        int r;

        r = sd_bus_message_read(m, "o", &path);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse McuRemoved: %m");
                return 0;
        }

        known = find_mcu(monitor, path);
        if (known) {
                id = known->id;
                name = known->name;
        }
        if (isempty(id))
                id = path_tail(path);

        if (monitor->json) {
                if (new_event("mcu-removed", path, &event) < 0 ||
                    client_json_add_string(event, "id", id) < 0 ||
                    client_json_add_string(event, "name", name) < 0)
                        r = client_error_errno(ENOMEM, "Out of memory");
                else
                        r = client_print_json_line(event);
        } else {
                if (!isempty(name))
                        r = asprintf(&line, "- mcu %s (%s)", id, name);
                else
                        r = asprintf(&line, "- mcu %s", id);
                r = r < 0 ? client_error_errno(ENOMEM, "Out of memory") : emit_line(line);
        }

        forget_mcu(monitor, path);
        if (r < 0)
                monitor->error = r;
        return 0;
}

static int print_job_added(Monitor *monitor, const JobInfo *job) {
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *label = NULL, *line = NULL, *mcu = NULL;
        json_object *object;
        KnownMcu *known;

        if (!monitor->json) {
                label = job_label(monitor, job->object_path);
                if (!label || asprintf(&line, "+ %s: %s", label, isempty(job->kind) ? "job" : job->kind) < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
                return emit_line(line);
        }

        known = find_mcu(monitor, job->mcu);
        if (new_event("job-added", job->object_path, &event) < 0 ||
            client_json_add_string(event, "mcu", job->mcu) < 0 ||
            client_json_add_string(event, "mcu_name", known ? known->name : "") < 0 ||
            job_info_to_json(job, &object) < 0)
                return client_error_errno(ENOMEM, "Out of memory");
        if (json_object_object_add(event, "job", object) < 0) {
                json_object_put(object);
                return client_error_errno(ENOMEM, "Out of memory");
        }

        return client_print_json_line(event);
}

/* The io.mcuflash1.Job properties inside InterfacesAdded's a{sa{sv}};
 * 0 when the object is not a job. */
static int read_added_job(sd_bus_message *m, JobInfo *job) {
        bool found = false;
        int r;

        r = sd_bus_message_enter_container(m, SD_BUS_TYPE_ARRAY, "{sa{sv}}");
        if (r < 0)
                return r;

        for (;;) {
                const char *interface;

                r = sd_bus_message_enter_container(m, SD_BUS_TYPE_DICT_ENTRY, "sa{sv}");
                if (r < 0)
                        return r;
                if (r == 0)
                        break;

                r = sd_bus_message_read(m, "s", &interface);
                if (r < 0)
                        return r;

                if (streq(interface, MCUFLASH_JOB_INTERFACE)) {
                        r = job_info_apply_changes(job, m);
                        found = true;
                } else
                        r = sd_bus_message_skip(m, "a{sv}");
                if (r < 0)
                        return r;

                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }

        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return r;

        return found;
}

static int on_interfaces_added(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(job_info_donep) JobInfo job = {};
        const char *path;
        int r;

        r = sd_bus_message_read(m, "o", &path);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse InterfacesAdded: %m");
                return 0;
        }

        /* MCUs are reported through McuAdded; only jobs are taken from here. */
        if (!job_path_number(path))
                return 0;

        r = read_added_job(m, &job);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse InterfacesAdded: %m");
                return 0;
        }
        if (r == 0)
                return 0;

        job.object_path = strdup(path);
        if (!job.object_path) {
                monitor->error = client_error_errno(ENOMEM, "Out of memory");
                return 0;
        }

        r = remember_job(monitor, path, job.mcu);
        if (r >= 0)
                r = print_job_added(monitor, &job);
        if (r < 0)
                monitor->error = r;
        return 0;
}

static int on_interfaces_removed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_(strv_freep) char **interfaces = NULL;
        _cleanup_free_ char *line = NULL;
        const char *path;
        bool is_job = false;
        int r;

        r = sd_bus_message_read(m, "o", &path);
        if (r >= 0)
                r = sd_bus_message_read_strv(m, &interfaces);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse InterfacesRemoved: %m");
                return 0;
        }

        for (char **i = interfaces; i && *i; i++)
                if (streq(*i, MCUFLASH_JOB_INTERFACE))
                        is_job = true;
        if (!is_job || !job_path_number(path))
                return 0;

        if (monitor->json) {
                if (new_event("job-removed", path, &event) < 0)
                        r = client_error_errno(ENOMEM, "Out of memory");
                else
                        r = client_print_json_line(event);
        } else if (asprintf(&line, "- job %s", job_path_number(path)) < 0)
                r = client_error_errno(ENOMEM, "Out of memory");
        else
                r = emit_line(line);

        forget_job(monitor, path);
        if (r < 0)
                monitor->error = r;
        return 0;
}

/* Read the properties a PropertiesChanged signal invalidated (sent without
 * their values) with one GetAll and add them to changed. */
static int add_invalidated(Monitor *monitor, const char *path, const char *interface,
                           char **invalidated, json_object *changed) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_(json_object_putp) json_object *all = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        r = sd_bus_call_method(monitor->bus, MCUFLASH_BUS_NAME, path, "org.freedesktop.DBus.Properties",
                               "GetAll", &error, &reply, "s", interface);
        sd_bus_error_free(&error);
        if (r < 0)
                return 0; /* gone meanwhile: report the names without values */

        r = client_read_properties_json(reply, &all);
        if (r < 0)
                return r;

        for (char **name = invalidated; *name; name++) {
                json_object *value = NULL;

                json_object_object_get_ex(all, *name, &value);
                if (json_object_object_add(changed, *name, json_object_get(value)) < 0) {
                        json_object_put(value);
                        return client_error_errno(ENOMEM, "Out of memory");
                }
        }
        return 0;
}

static const char *json_string_or_null(json_object *object, const char *key) {
        json_object *value;

        if (!json_object_object_get_ex(object, key, &value) || !json_object_is_type(value, json_type_string))
                return NULL;
        return json_object_get_string(value);
}

static int print_mcu_changed(Monitor *monitor, const char *path, json_object *changed) {
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *label = NULL, *line = NULL;
        KnownMcu *known;
        int r;

        /* Named as it was before this change; the new name is in the line. */
        label = mcu_label(monitor, path);
        if (!label)
                return client_error_errno(ENOMEM, "Out of memory");

        r = remember_mcu(monitor, path, json_string_or_null(changed, "Id"), json_string_or_null(changed, "Name"));
        if (r < 0)
                return r;

        if (!monitor->json) {
                if (format_changes(label, changed, false, &line) < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
                return emit_line(line);
        }

        known = find_mcu(monitor, path);
        if (new_event("mcu-changed", path, &event) < 0 ||
            client_json_add_string(event, "id", known->id) < 0 ||
            client_json_add_string(event, "name", known->name) < 0 ||
            json_object_object_add(event, "properties", json_object_get(changed)) < 0)
                return client_error_errno(ENOMEM, "Out of memory");

        return client_print_json_line(event);
}

/* Text output: whether a change only moved the progress within the whole
 * percentage printed last (a flash reports progress far more often than
 * a line per percent is worth); notes the percentage otherwise. */
static bool progress_only_unchanged(KnownJob *job, json_object *changed) {
        json_object *progress;
        int percent;

        if (!json_object_object_get_ex(changed, "Progress", &progress) || !progress)
                return false;
        percent = (int) progress_percent(json_object_get_double(progress));

        json_object_object_foreach(changed, key, value)
                if (!streq(key, "Progress") && !streq(key, "BytesDone")) {
                        job->shown_percent = percent;
                        return false;
                }

        if (percent == job->shown_percent)
                return true;
        job->shown_percent = percent;
        return false;
}

static int print_job_changed(Monitor *monitor, const char *path, json_object *changed) {
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *label = NULL, *line = NULL;
        KnownMcu *mcu;
        KnownJob *job;
        int r;

        r = remember_job(monitor, path, json_string_or_null(changed, "Mcu"));
        if (r < 0)
                return r;

        if (!monitor->json) {
                if (progress_only_unchanged(find_job(monitor, path), changed))
                        return 0;

                label = job_label(monitor, path);
                if (!label || format_changes(label, changed, true, &line) < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
                return emit_line(line);
        }

        job = find_job(monitor, path);
        mcu = find_mcu(monitor, job->mcu);
        if (new_event("job-changed", path, &event) < 0 ||
            client_json_add_string(event, "mcu", job->mcu) < 0 ||
            client_json_add_string(event, "mcu_name", mcu ? mcu->name : "") < 0 ||
            json_object_object_add(event, "properties", json_object_get(changed)) < 0)
                return client_error_errno(ENOMEM, "Out of memory");

        return client_print_json_line(event);
}

static int print_manager_changed(Monitor *monitor, const char *path, json_object *changed) {
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *line = NULL;

        if (!monitor->json) {
                if (format_changes("manager", changed, false, &line) < 0)
                        return client_error_errno(ENOMEM, "Out of memory");
                return emit_line(line);
        }

        if (new_event("manager-changed", path, &event) < 0 ||
            json_object_object_add(event, "properties", json_object_get(changed)) < 0)
                return client_error_errno(ENOMEM, "Out of memory");

        return client_print_json_line(event);
}

static int on_properties_changed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(json_object_putp) json_object *changed = NULL;
        _cleanup_(strv_freep) char **invalidated = NULL;
        const char *path = sd_bus_message_get_path(m), *interface;
        int r;

        r = sd_bus_message_read(m, "s", &interface);
        if (r >= 0)
                r = client_read_properties_json(m, &changed);
        if (r >= 0)
                r = sd_bus_message_read_strv(m, &invalidated);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse PropertiesChanged: %m");
                return 0;
        }

        if (invalidated && invalidated[0]) {
                r = add_invalidated(monitor, path, interface, invalidated, changed);
                if (r < 0) {
                        monitor->error = r;
                        return 0;
                }
        }

        if (json_object_object_length(changed) == 0)
                return 0;

        if (streq(interface, MCUFLASH_MCU_INTERFACE) && startswith(path, MCU_PATH_PREFIX))
                r = print_mcu_changed(monitor, path, changed);
        else if (streq(interface, MCUFLASH_JOB_INTERFACE) && job_path_number(path))
                r = print_job_changed(monitor, path, changed);
        else if (streq(interface, MCUFLASH_MANAGER_INTERFACE) && streq(path, MCUFLASH_MANAGER_PATH))
                r = print_manager_changed(monitor, path, changed);
        else
                r = 0;

        if (r < 0)
                monitor->error = r;
        return 0;
}

static int on_job_finished(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;
        _cleanup_(json_object_putp) json_object *event = NULL;
        _cleanup_free_ char *line = NULL;
        const char *path = sd_bus_message_get_path(m), *state, *error, *message, *why;
        KnownJob *job;
        KnownMcu *mcu;
        int r;

        r = sd_bus_message_read(m, "sss", &state, &error, &message);
        if (r < 0) {
                monitor->error = client_error_errno(r, "Failed to parse Finished: %m");
                return 0;
        }

        if (monitor->json) {
                job = find_job(monitor, path);
                mcu = job ? find_mcu(monitor, job->mcu) : NULL;
                if (new_event("job-finished", path, &event) < 0 ||
                    client_json_add_string(event, "mcu", job ? job->mcu : "") < 0 ||
                    client_json_add_string(event, "mcu_name", mcu ? mcu->name : "") < 0 ||
                    client_json_add_string(event, "state", state) < 0 ||
                    client_json_add_string(event, "error", error) < 0 ||
                    client_json_add_string(event, "message", message) < 0)
                        r = client_error_errno(ENOMEM, "Out of memory");
                else
                        r = client_print_json_line(event);
        } else {
                why = !isempty(message) ? message : error;
                if (streq(state, "succeeded") || isempty(why))
                        r = asprintf(&line, "job %s finished: %s", job_path_number(path) ?: path, state);
                else
                        r = asprintf(&line, "job %s finished: %s: %s", job_path_number(path) ?: path, state, why);
                r = r < 0 ? client_error_errno(ENOMEM, "Out of memory") : emit_line(line);
        }

        if (r < 0)
                monitor->error = r;
        return 0;
}

static int on_daemon_gone(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Monitor *monitor = userdata;

        monitor->daemon_gone = true;
        return 0;
}

static int install_matches(Monitor *monitor) {
        static const struct {
                const char *rule;
                sd_bus_message_handler_t callback;
        } matches[] = {
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path='" MCUFLASH_MANAGER_PATH "',"
                  "interface='" MCUFLASH_MANAGER_INTERFACE "',member='McuAdded'",
                  on_mcu_added },
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path='" MCUFLASH_MANAGER_PATH "',"
                  "interface='" MCUFLASH_MANAGER_INTERFACE "',member='McuRemoved'",
                  on_mcu_removed },
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path='" MCUFLASH_MANAGER_PATH "',"
                  "interface='org.freedesktop.DBus.ObjectManager',member='InterfacesAdded'",
                  on_interfaces_added },
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path='" MCUFLASH_MANAGER_PATH "',"
                  "interface='org.freedesktop.DBus.ObjectManager',member='InterfacesRemoved'",
                  on_interfaces_removed },
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path_namespace='" MCUFLASH_MANAGER_PATH "',"
                  "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'",
                  on_properties_changed },
                { "type='signal',sender='" MCUFLASH_BUS_NAME "',path_namespace='/io/mcuflash1/job',"
                  "interface='" MCUFLASH_JOB_INTERFACE "',member='Finished'",
                  on_job_finished },
        };
        int r;

        for (size_t i = 0; i < ELEMENTSOF(matches); i++) {
                /* Floating slots: they live as long as the connection. */
                r = client_add_match(monitor->bus, NULL, matches[i].rule, matches[i].callback, monitor);
                if (r < 0)
                        return r;
        }

        return client_match_daemon_gone(monitor->bus, NULL, on_daemon_gone, monitor);
}

/* Learn the names of the MCUs and the MCU of every job that exist now,
 * so that later lines can name them. */
static int load_known_objects(Monitor *monitor) {
        _cleanup_(strv_freep) char **mcu_paths = NULL, **job_paths = NULL;
        int r;

        r = client_list_mcus(monitor->bus, &mcu_paths);
        if (r < 0)
                return r;

        for (char **path = mcu_paths; *path; path++) {
                _cleanup_(mcu_info_donep) McuInfo mcu = {};

                r = client_get_mcu_info(monitor->bus, *path, &mcu);
                if (r == -ENXIO)
                        continue;
                if (r < 0)
                        return r;

                r = remember_mcu(monitor, *path, mcu.id, mcu.name);
                if (r < 0)
                        return r;
        }

        r = client_list_jobs(monitor->bus, &job_paths);
        if (r < 0)
                return r;

        for (char **path = job_paths; *path; path++) {
                _cleanup_(job_info_donep) JobInfo job = {};

                r = client_get_job_info(monitor->bus, *path, &job);
                if (r == -ENXIO)
                        continue;
                if (r < 0)
                        return r;

                r = remember_job(monitor, *path, job.mcu);
                if (r < 0)
                        return r;
        }

        return 0;
}

static int run_monitor(Monitor *monitor, int signal_fd) {
        int r;

        for (;;) {
                r = sd_bus_process(monitor->bus, NULL);
                if (r < 0)
                        return client_error_errno(r, "Lost the connection to the system bus: %m");
                if (monitor->error < 0)
                        return monitor->error;
                if (monitor->daemon_gone)
                        return client_error_errno(ECONNRESET, "mcuflashd went away");
                if (r > 0)
                        continue;

                r = client_wait_bus_or_signal(monitor->bus, signal_fd);
                if (r < 0)
                        return r;
                if (r == SIGINT || r == SIGTERM)
                        return 0;
        }
}

int verb_monitor(int argc, char *argv[]) {
        enum {
                ARG_JSON = 0x100,
        };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h'      },
                { "json", no_argument, NULL, ARG_JSON },
                {}
        };
        static const int signals[] = { SIGINT, SIGTERM };
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_close_ int signal_fd = -1;
        Monitor monitor = {};
        sigset_t old_mask;
        int c, r;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        fputs(monitor_usage, stdout);
                        return EXIT_SUCCESS;
                case ARG_JSON:
                        monitor.json = true;
                        break;
                default:
                        return client_unknown_option(monitor_usage, argv);
                }

        if (optind < argc)
                return client_usage_error(monitor_usage, "unexpected argument '%s'", argv[optind]);

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;
        monitor.bus = bus;

        r = client_open_signal_fd(signals, ELEMENTSOF(signals), &old_mask, &signal_fd);
        if (r < 0)
                return EXIT_FAILURE;

        /* Subscribe first, then look: nothing can fall between the two. */
        r = install_matches(&monitor);
        if (r >= 0)
                r = load_known_objects(&monitor);
        if (r >= 0) {
                fputs("Watching mcuflashd; press Ctrl-C to stop.\n", stderr);
                r = run_monitor(&monitor, signal_fd);
        }

        monitor_done(&monitor);
        (void) sigprocmask(SIG_SETMASK, &old_mask, NULL);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
