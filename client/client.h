/* Shared helpers of mcuflashctl: the system bus connection, reading the
 * properties of the Manager and of MCU objects into plain structs, turning
 * an MCU into the JSON object of the client contract, resolving an MCU
 * selector, and printing errors as "mcuflashctl: <message>".  It knows
 * nothing about verbs, options or how a verb lays out its output. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <json-c/json.h>
#include <systemd/sd-bus.h>

#include "shared/macro.h"

#define MCUFLASH_BUS_NAME "io.mcuflash1"
#define MCUFLASH_MANAGER_PATH "/io/mcuflash1"
#define MCUFLASH_MANAGER_INTERFACE "io.mcuflash1.Manager"
#define MCUFLASH_MCU_INTERFACE "io.mcuflash1.Mcu"

/* Exit status of a verb whose command line was wrong. */
#define EXIT_USAGE 2

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
        char *mcu_type;
        uint64_t flash_start;
        char *version_matches_host;
        char *job;
} McuInfo;

void manager_info_done(ManagerInfo *info);
void mcu_info_done(McuInfo *info);
void mcu_info_array_free(McuInfo *infos, size_t n_infos);

static inline void manager_info_donep(ManagerInfo *info) {
        manager_info_done(info);
}
static inline void mcu_info_donep(McuInfo *info) {
        mcu_info_done(info);
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

/* Whether stdout is a terminal that wants colour (NO_COLOR, TERM=dumb honoured). */
bool client_use_color(void);

/* Verbs: each parses its own options and returns an exit status. */
int verb_status(int argc, char *argv[]);
int verb_info(int argc, char *argv[]);
