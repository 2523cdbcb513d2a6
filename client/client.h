/* Shared helpers of mcuflashctl: the system bus connection, reading the
 * properties of the Manager and of MCU objects into plain structs, turning
 * an MCU into the JSON object of the client contract, resolving an MCU
 * selector, and printing errors as "mcuflashctl: <message>"; likewise for
 * job objects, plus the small pieces that verbs following live events share
 * (signal fd, waiting on the bus, one-line JSON).  It knows nothing about
 * verbs, options or how a verb lays out its output. */
#pragma once

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>
#include <systemd/sd-bus.h>

#include "shared/macro.h"

#define MCUFLASH_BUS_NAME "io.mcuflash1"
#define MCUFLASH_MANAGER_PATH "/io/mcuflash1"
#define MCUFLASH_MANAGER_INTERFACE "io.mcuflash1.Manager"
#define MCUFLASH_MCU_INTERFACE "io.mcuflash1.Mcu"
#define MCUFLASH_JOB_INTERFACE "io.mcuflash1.Job"
#define MCUFLASH_JOB_PATH_PREFIX "/io/mcuflash1/job/"

/* Exit status of a verb whose command line was wrong. */
#define EXIT_USAGE 2

/* Exit status when the user stopped waiting with Ctrl-C (128 + SIGINT). */
#define EXIT_INTERRUPTED 130

/* The properties of io.mcuflash1.Manager that the client uses. */
typedef struct ManagerInfo {
        char *version;
        char *host_version;
        char *printer_state;
        bool auto_flash;
} ManagerInfo;

/* All properties of one io.mcuflash1.Mcu object; strings are never NULL
 * after client_get_mcu_info() succeeded (missing ones are ""). */
typedef struct McuInfo {
        char *object_path;
        char *id;
        char *name;
        char *transport;
        char *device_path;
        char *can_interface;
        char *can_uuid;
        uint64_t usb_vendor_id;
        uint64_t usb_product_id;
        char *usb_serial;
        char *usb_port;
        char *state;
        char *state_reason;
        char *bootloader;
        char *firmware;
        char *firmware_version;
        char *build_versions;
        char *build_config;
        char *mcu_type;
        uint64_t flash_start;
        char *version_matches_host;
        char *job;
} McuInfo;

/* All properties of one io.mcuflash1.Job object; strings are never NULL
 * after client_get_job_info() succeeded (missing ones are ""). */
typedef struct JobInfo {
        char *object_path;
        char *mcu;
        char *kind;
        char *state;
        char *phase;
        uint64_t bytes_done;
        uint64_t bytes_total;
        double progress;
        char *error;
        char *error_message;
} JobInfo;

void manager_info_done(ManagerInfo *info);
void mcu_info_done(McuInfo *info);
void mcu_info_array_free(McuInfo *infos, size_t n_infos);

static inline void manager_info_donep(ManagerInfo *info) {
        manager_info_done(info);
}
static inline void mcu_info_donep(McuInfo *info) {
        mcu_info_done(info);
}

void job_info_done(JobInfo *info);

static inline void job_info_donep(JobInfo *info) {
        job_info_done(info);
}

/* sd-bus.h itself provides sd_bus_flush_close_unrefp and sd_bus_message_unrefp. */
DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put);

void strv_free(char **strv);
DEFINE_TRIVIAL_CLEANUP_FUNC(char **, strv_free);

/* Print "mcuflashctl: <message>" on stderr.  %m in fmt prints strerror(-error).
 * Returns -abs(error), or -EIO when error is 0. */
int client_error_errno(int error, const char *fmt, ...) _printf_(2, 3);

/* Print a failed D-Bus call on stderr: the daemon's own message, or an
 * actionable hint when mcuflashd is not running.  Returns r (negative). */
int client_bus_error(const sd_bus_error *error, int r, const char *what);

/* Print "mcuflashctl: <message>" and the verb's usage on stderr; returns EXIT_USAGE. */
int client_usage_error(const char *usage, const char *fmt, ...) _printf_(2, 3);

/* Report the option getopt_long() just rejected ('?'); returns EXIT_USAGE. */
int client_unknown_option(const char *usage, char *argv[]);

/* Options of the verbs that take only --help and --json, and @n_args
 * arguments (named @arg_name in messages; at most one).  Returns -1 to go
 * on (the arguments start at optind), else the exit status to return. */
int client_parse_json_verb(int argc, char *argv[], const char *usage, unsigned n_args, const char *arg_name,
                           bool *json);

/* Connect to the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured). */
int client_open_bus(sd_bus **ret);

int client_get_manager_info(sd_bus *bus, ManagerInfo *ret);
int client_list_mcus(sd_bus *bus, char ***ret_paths);
int client_get_mcu_info(sd_bus *bus, const char *path, McuInfo *ret);

/* Ask Manager.GetMcu which object the selector names. */
int client_resolve_mcu(sd_bus *bus, const char *selector, char **ret_path);

/* "mcu" for the main MCU, "eddy" for "mcu eddy", "-" when it has no name. */
const char *mcu_info_short_name(const McuInfo *info);

/* The JSON object of one MCU as documented for status --json / info --json. */
int mcu_info_to_json(const McuInfo *info, json_object **ret);

/* Pretty-print a JSON value plus newline on stdout. */
int client_print_json(json_object *object);

/* Print a JSON value as one compact line on stdout and flush it at once,
 * for event streams read through a pipe. */
int client_print_json_line(json_object *object);

/* A JSON number for a double, written with the fewest digits that read
 * back as the same value (0.4, not 0.40000000000000002).  NULL: no memory. */
json_object *client_json_double(double value);

/* Add a string (NULL counts as "") to a JSON object; 0 or -ENOMEM. */
int client_json_add_string(json_object *object, const char *key, const char *value);

/* Read the a{sv} at the read pointer of m (GetAll reply, PropertiesChanged,
 * InterfacesAdded) into a JSON object keyed by the D-Bus property names:
 * strings and object paths as strings, integers and doubles as numbers,
 * booleans as booleans, containers as null.  Errors are printed. */
int client_read_properties_json(sd_bus_message *m, json_object **ret);

/* ListJobs on the Manager; the empty list comes back as an empty strv. */
int client_list_jobs(sd_bus *bus, char ***ret_paths);

/* GetAll on a job.  Returns -ENXIO without printing anything when the job
 * does not exist (any more); every other failure is printed. */
int client_get_job_info(sd_bus *bus, const char *path, JobInfo *ret);

/* Same, keeping the cookie (serial) of the GetAll reply: signals the daemon
 * sent with a smaller cookie are already reflected in what was read. */
int client_get_job_info_with_cookie(sd_bus *bus, const char *path, JobInfo *ret, uint64_t *ret_cookie);

/* Apply the changed properties (a{sv} at the read pointer of m, e.g. of a
 * PropertiesChanged signal) to info; unknown properties are skipped. */
int job_info_apply_changes(JobInfo *info, sd_bus_message *m);

/* Whether a job in this state has finished (succeeded, failed, cancelled). */
bool job_state_is_final(const char *state);

/* "3" for /io/mcuflash1/job/3; NULL for a path that is not a job's. */
const char *job_path_number(const char *path);

/* Progress 0..1 as a whole percentage 0..100, rounded down. */
unsigned progress_percent(double progress);

/* The JSON object of one job: path, mcu, kind, state, phase, bytes_done,
 * bytes_total, progress, error, error_message (numbers for the last three
 * numeric ones, strings otherwise). */
int job_info_to_json(const JobInfo *info, json_object **ret);

/* Block signals (those the process ignores are left alone, so a shell's
 * background job keeps ignoring SIGINT) and return a non-blocking signalfd
 * that reads them; *ret_old_mask receives the mask to restore. */
int client_open_signal_fd(const int *signals, size_t n_signals, sigset_t *ret_old_mask, int *ret_fd);

/* Sleep until the bus has something to process, its timeout passes or a
 * signal arrives on signal_fd (-1: none).  Returns the signal number, 0 for
 * the bus, or a negative errno (printed). */
int client_wait_bus_or_signal(sd_bus *bus, int signal_fd);

/* Install a match that calls callback when mcuflashd's bus name loses its
 * owner (NameOwnerChanged with an empty new owner).  Errors are printed. */
int client_match_daemon_gone(sd_bus *bus, sd_bus_slot **ret_slot,
                             sd_bus_message_handler_t callback, void *userdata);

/* Add a match rule, printing the failure.  Returns 0 or negative errno. */
int client_add_match(sd_bus *bus, sd_bus_slot **ret_slot, const char *rule,
                     sd_bus_message_handler_t callback, void *userdata);

/* Whether stdout is a terminal that wants colour (NO_COLOR, TERM=dumb honoured). */
bool client_use_color(void);

/* Verbs: each parses its own options and returns an exit status. */
int verb_status(int argc, char *argv[]);
int verb_info(int argc, char *argv[]);
int verb_bootloader(int argc, char *argv[]);
int verb_reboot(int argc, char *argv[]);
int verb_flash(int argc, char *argv[]);
int verb_jobs(int argc, char *argv[]);
int verb_cancel(int argc, char *argv[]);
int verb_monitor(int argc, char *argv[]);
