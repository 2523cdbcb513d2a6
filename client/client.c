/* Implementation of client.h: one sd-bus connection per run, properties read
 * with a single org.freedesktop.DBus.Properties.GetAll call per object and
 * stored into ManagerInfo/McuInfo through small field tables (unknown
 * properties are skipped, so a newer daemon works with an older client),
 * JSON building with json-c and error printing, the same for Job objects,
 * and the plumbing that event-following verbs share: a signalfd for Ctrl-C,
 * waiting on the bus fd and that fd together, match rules.  It does not
 * parse command lines, format tables or decide what an event means; the
 * cmd-*.c files and job-wait.c do. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "client.h"

typedef enum PropertyKind {
        PROPERTY_STRING,
        PROPERTY_UINT64,
        PROPERTY_BOOL,
        PROPERTY_DOUBLE,
} PropertyKind;

/* Where a D-Bus property lands in a struct. */
typedef struct PropertyField {
        const char *name;
        PropertyKind kind;
        size_t offset;
} PropertyField;

/* One variant read from the wire, whatever its basic type. */
typedef struct PropertyValue {
        char type;              /* D-Bus type character, 0 for containers */
        const char *string;     /* s, o, g */
        uint64_t unsigned_number; /* y, q, u, t */
        int64_t signed_number;  /* n, i, x, h */
        bool boolean;           /* b */
        double number;          /* d */
} PropertyValue;

static const PropertyField manager_fields[] = {
        { "Version",      PROPERTY_STRING, offsetof(ManagerInfo, version)       },
        { "HostVersion",  PROPERTY_STRING, offsetof(ManagerInfo, host_version)  },
        { "PrinterState", PROPERTY_STRING, offsetof(ManagerInfo, printer_state) },
        { "AutoFlash",    PROPERTY_BOOL,   offsetof(ManagerInfo, auto_flash)    },
};

static const PropertyField mcu_fields[] = {
        { "Id",                 PROPERTY_STRING, offsetof(McuInfo, id)                   },
        { "Name",               PROPERTY_STRING, offsetof(McuInfo, name)                 },
        { "Transport",          PROPERTY_STRING, offsetof(McuInfo, transport)            },
        { "DevicePath",         PROPERTY_STRING, offsetof(McuInfo, device_path)          },
        { "CanInterface",       PROPERTY_STRING, offsetof(McuInfo, can_interface)        },
        { "CanUuid",            PROPERTY_STRING, offsetof(McuInfo, can_uuid)             },
        { "UsbVendorId",        PROPERTY_UINT64, offsetof(McuInfo, usb_vendor_id)        },
        { "UsbProductId",       PROPERTY_UINT64, offsetof(McuInfo, usb_product_id)       },
        { "UsbSerial",          PROPERTY_STRING, offsetof(McuInfo, usb_serial)           },
        { "UsbPort",            PROPERTY_STRING, offsetof(McuInfo, usb_port)             },
        { "State",              PROPERTY_STRING, offsetof(McuInfo, state)                },
        { "StateReason",        PROPERTY_STRING, offsetof(McuInfo, state_reason)         },
        { "Bootloader",         PROPERTY_STRING, offsetof(McuInfo, bootloader)           },
        { "Firmware",           PROPERTY_STRING, offsetof(McuInfo, firmware)             },
        { "FirmwareVersion",    PROPERTY_STRING, offsetof(McuInfo, firmware_version)     },
        { "BuildVersions",      PROPERTY_STRING, offsetof(McuInfo, build_versions)       },
        { "BuildConfig",        PROPERTY_STRING, offsetof(McuInfo, build_config)         },
        { "McuType",            PROPERTY_STRING, offsetof(McuInfo, mcu_type)             },
        { "FlashStart",         PROPERTY_UINT64, offsetof(McuInfo, flash_start)          },
        { "VersionMatchesHost", PROPERTY_STRING, offsetof(McuInfo, version_matches_host) },
        { "Job",                PROPERTY_STRING, offsetof(McuInfo, job)                  },
};

static const PropertyField job_fields[] = {
        { "Mcu",          PROPERTY_STRING, offsetof(JobInfo, mcu)           },
        { "Kind",         PROPERTY_STRING, offsetof(JobInfo, kind)          },
        { "State",        PROPERTY_STRING, offsetof(JobInfo, state)         },
        { "Phase",        PROPERTY_STRING, offsetof(JobInfo, phase)         },
        { "BytesDone",    PROPERTY_UINT64, offsetof(JobInfo, bytes_done)    },
        { "BytesTotal",   PROPERTY_UINT64, offsetof(JobInfo, bytes_total)   },
        { "Progress",     PROPERTY_DOUBLE, offsetof(JobInfo, progress)      },
        { "Error",        PROPERTY_STRING, offsetof(JobInfo, error)         },
        { "ErrorMessage", PROPERTY_STRING, offsetof(JobInfo, error_message) },
};

void strv_free(char **strv) {
        if (!strv)
                return;
        for (char **s = strv; *s; s++)
                free(*s);
        free(strv);
}

int client_error_errno(int error, const char *fmt, ...) {
        va_list ap;

        error = error < 0 ? -error : error;
        if (error == 0)
                error = EIO;

        fputs("mcuflashctl: ", stderr);
        errno = error;
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);

        return -error;
}

int client_bus_error(const sd_bus_error *error, int r, const char *what) {
        if (r >= 0)
                r = -EIO;

        if (sd_bus_error_has_name(error, SD_BUS_ERROR_SERVICE_UNKNOWN) ||
            sd_bus_error_has_name(error, SD_BUS_ERROR_NAME_HAS_NO_OWNER))
                return client_error_errno(r, "mcuflashd is not running (systemctl start mcuflashd)");

        if (sd_bus_error_is_set(error) && startswith(error->name, "org.freedesktop.DBus.Error.Spawn."))
                return client_error_errno(r, "mcuflashd could not be started: %s",
                                          isempty(error->message) ? error->name : error->message);

        if (sd_bus_error_is_set(error))
                return client_error_errno(r, "%s", isempty(error->message) ? error->name : error->message);

        return client_error_errno(r, "%s: %m", what);
}

int client_usage_error(const char *usage, const char *fmt, ...) {
        va_list ap;

        fputs("mcuflashctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputs("\n\n", stderr);
        fputs(usage, stderr);

        return EXIT_USAGE;
}

int client_unknown_option(const char *usage, char *argv[]) {
        const char *arg = optind > 0 ? argv[optind - 1] : "";
        const char *equals;

        /* A long option has always been consumed; optopt is its value or 0. */
        if (optopt == 0 || optopt >= 0x100 || startswith(arg, "--")) {
                equals = strchr(arg, '=');
                if (optopt == 0)
                        return client_usage_error(usage, "unknown option '%s'", arg);
                if (equals)
                        return client_usage_error(usage, "option '%.*s' takes no argument",
                                                  (int) (equals - arg), arg);
                return client_usage_error(usage, "option '%s' needs an argument", arg);
        }

        return client_usage_error(usage, "unknown option '-%c'", optopt);
}

int client_open_bus(sd_bus **ret) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        const char *address;
        int r;

        r = sd_bus_open_system(&bus);
        if (r < 0) {
                address = getenv("DBUS_SYSTEM_BUS_ADDRESS");
                if (!isempty(address))
                        return client_error_errno(r, "Failed to connect to the system bus at %s: %m", address);
                return client_error_errno(r, "Failed to connect to the system bus: %m");
        }

        *ret = TAKE_PTR(bus);
        return 0;
}

/* Read the variant at the read pointer.  Basic types land in *ret; a
 * container is skipped and reported as type 0. */
static int read_variant(sd_bus_message *m, PropertyValue *ret) {
        const char *contents;
        uint8_t u8;
        uint16_t u16;
        uint32_t u32;
        int16_t i16;
        int32_t i32;
        int boolean;
        int r;

        *ret = (PropertyValue) {};

        r = sd_bus_message_peek_type(m, NULL, &contents);
        if (r < 0)
                return r;

        r = sd_bus_message_enter_container(m, SD_BUS_TYPE_VARIANT, contents);
        if (r < 0)
                return r;

        if (strlen(contents) != 1) {
                r = sd_bus_message_skip(m, contents);
                if (r < 0)
                        return r;
                return sd_bus_message_exit_container(m);
        }

        ret->type = contents[0];
        switch (ret->type) {
        case SD_BUS_TYPE_STRING:
        case SD_BUS_TYPE_OBJECT_PATH:
        case SD_BUS_TYPE_SIGNATURE:
                r = sd_bus_message_read_basic(m, ret->type, &ret->string);
                break;
        case SD_BUS_TYPE_BYTE:
                r = sd_bus_message_read_basic(m, ret->type, &u8);
                ret->unsigned_number = u8;
                break;
        case SD_BUS_TYPE_UINT16:
                r = sd_bus_message_read_basic(m, ret->type, &u16);
                ret->unsigned_number = u16;
                break;
        case SD_BUS_TYPE_UINT32:
                r = sd_bus_message_read_basic(m, ret->type, &u32);
                ret->unsigned_number = u32;
                break;
        case SD_BUS_TYPE_UINT64:
                r = sd_bus_message_read_basic(m, ret->type, &ret->unsigned_number);
                break;
        case SD_BUS_TYPE_INT16:
                r = sd_bus_message_read_basic(m, ret->type, &i16);
                ret->signed_number = i16;
                break;
        case SD_BUS_TYPE_INT32:
                r = sd_bus_message_read_basic(m, ret->type, &i32);
                ret->signed_number = i32;
                break;
        case SD_BUS_TYPE_INT64:
                r = sd_bus_message_read_basic(m, ret->type, &ret->signed_number);
                break;
        case SD_BUS_TYPE_BOOLEAN:
                r = sd_bus_message_read_basic(m, ret->type, &boolean);
                ret->boolean = boolean;
                break;
        case SD_BUS_TYPE_DOUBLE:
                r = sd_bus_message_read_basic(m, ret->type, &ret->number);
                break;
        default:
                /* Unix fds and anything else a property has no business carrying. */
                r = sd_bus_message_skip(m, contents);
                ret->type = 0;
                break;
        }
        if (r < 0)
                return r;

        return sd_bus_message_exit_container(m);
}

/* Store a value into the field, converting between compatible types.
 * Returns -EBADMSG when the daemon sent a type the field cannot hold. */
static int store_property(const PropertyField *field, const PropertyValue *value, void *base) {
        uint8_t *p = (uint8_t *) base + field->offset;

        switch (field->kind) {
        case PROPERTY_STRING:
                if (!value->string)
                        return -EBADMSG;
                return free_and_strdup((char **) p, value->string) < 0 ? -ENOMEM : 0;

        case PROPERTY_UINT64:
                if (value->type && strchr("yqut", value->type))
                        *(uint64_t *) p = value->unsigned_number;
                else if (value->type && strchr("nix", value->type) && value->signed_number >= 0)
                        *(uint64_t *) p = (uint64_t) value->signed_number;
                else
                        return -EBADMSG;
                return 0;

        case PROPERTY_BOOL:
                if (value->type != SD_BUS_TYPE_BOOLEAN)
                        return -EBADMSG;
                *(bool *) p = value->boolean;
                return 0;

        case PROPERTY_DOUBLE:
                if (value->type != SD_BUS_TYPE_DOUBLE)
                        return -EBADMSG;
                *(double *) p = value->number;
                return 0;
        }

        return -EBADMSG;
}

static void free_property_strings(const PropertyField *fields, size_t n_fields, void *base) {
        for (size_t i = 0; i < n_fields; i++)
                if (fields[i].kind == PROPERTY_STRING) {
                        char **s = (char **) ((uint8_t *) base + fields[i].offset);
                        free(*s);
                        *s = NULL;
                }
}

static int fill_missing_strings(const PropertyField *fields, size_t n_fields, void *base) {
        for (size_t i = 0; i < n_fields; i++)
                if (fields[i].kind == PROPERTY_STRING) {
                        char **s = (char **) ((uint8_t *) base + fields[i].offset);
                        if (!*s) {
                                *s = strdup("");
                                if (!*s)
                                        return -ENOMEM;
                        }
                }
        return 0;
}

/* Parse the a{sv} of a GetAll reply into base through the field table. */
static int parse_properties(sd_bus_message *reply, const char *interface,
                            const PropertyField *fields, size_t n_fields, void *base) {
        int r;

        r = sd_bus_message_enter_container(reply, SD_BUS_TYPE_ARRAY, "{sv}");
        if (r < 0)
                return client_error_errno(r, "Failed to parse properties of %s: %m", interface);

        for (;;) {
                const PropertyField *field = NULL;
                PropertyValue value;
                const char *name;

                r = sd_bus_message_enter_container(reply, SD_BUS_TYPE_DICT_ENTRY, "sv");
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties of %s: %m", interface);
                if (r == 0)
                        break;

                r = sd_bus_message_read_basic(reply, SD_BUS_TYPE_STRING, &name);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties of %s: %m", interface);

                r = read_variant(reply, &value);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse property %s.%s: %m", interface, name);

                for (size_t i = 0; i < n_fields; i++)
                        if (streq(fields[i].name, name)) {
                                field = &fields[i];
                                break;
                        }

                if (field) {
                        r = store_property(field, &value, base);
                        if (r == -EBADMSG)
                                return client_error_errno(r, "Property %s.%s has unexpected type '%c'",
                                                          interface, name, value.type ? value.type : '?');
                        if (r < 0)
                                return client_error_errno(r, "Failed to store property %s.%s: %m",
                                                          interface, name);
                }

                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties of %s: %m", interface);
        }

        r = sd_bus_message_exit_container(reply);
        if (r < 0)
                return client_error_errno(r, "Failed to parse properties of %s: %m", interface);

        r = fill_missing_strings(fields, n_fields, base);
        if (r < 0)
                return client_error_errno(r, "Out of memory");

        return 0;
}

static bool bus_error_is_missing_object(const sd_bus_error *error) {
        return sd_bus_error_has_name(error, SD_BUS_ERROR_UNKNOWN_OBJECT) ||
               sd_bus_error_has_name(error, SD_BUS_ERROR_UNKNOWN_INTERFACE) ||
               sd_bus_error_has_name(error, SD_BUS_ERROR_UNKNOWN_METHOD);
}

/* GetAll on one object.  Returns -ENXIO without printing anything when the
 * object does not exist (any more); every other failure is printed.  The
 * reply's cookie goes to *ret_cookie when that is not NULL. */
static int get_all_properties_with_cookie(sd_bus *bus, const char *path, const char *interface,
                                          const PropertyField *fields, size_t n_fields, void *base,
                                          uint64_t *ret_cookie) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        r = sd_bus_call_method(bus, MCUFLASH_BUS_NAME, path,
                               "org.freedesktop.DBus.Properties", "GetAll",
                               &error, &reply, "s", interface);
        if (r < 0) {
                if (bus_error_is_missing_object(&error))
                        r = -ENXIO;
                else
                        r = client_bus_error(&error, r, "Failed to read properties");
                sd_bus_error_free(&error);
                return r;
        }

        if (ret_cookie) {
                r = sd_bus_message_get_cookie(reply, ret_cookie);
                if (r < 0)
                        return client_error_errno(r, "Reply to GetAll has no cookie: %m");
        }

        return parse_properties(reply, interface, fields, n_fields, base);
}

static int get_all_properties(sd_bus *bus, const char *path, const char *interface,
                              const PropertyField *fields, size_t n_fields, void *base) {
        return get_all_properties_with_cookie(bus, path, interface, fields, n_fields, base, NULL);
}

void manager_info_done(ManagerInfo *info) {
        free_property_strings(manager_fields, ELEMENTSOF(manager_fields), info);
}

void mcu_info_done(McuInfo *info) {
        free_property_strings(mcu_fields, ELEMENTSOF(mcu_fields), info);
        free(info->object_path);
        info->object_path = NULL;
}

void mcu_info_array_free(McuInfo *infos, size_t n_infos) {
        if (!infos)
                return;
        for (size_t i = 0; i < n_infos; i++)
                mcu_info_done(&infos[i]);
        free(infos);
}

int client_get_manager_info(sd_bus *bus, ManagerInfo *ret) {
        _cleanup_(manager_info_donep) ManagerInfo info = {};
        int r;

        r = get_all_properties(bus, MCUFLASH_MANAGER_PATH, MCUFLASH_MANAGER_INTERFACE,
                               manager_fields, ELEMENTSOF(manager_fields), &info);
        if (r == -ENXIO)
                return client_error_errno(r, "mcuflashd does not export %s on %s",
                                          MCUFLASH_MANAGER_INTERFACE, MCUFLASH_MANAGER_PATH);
        if (r < 0)
                return r;

        *ret = info;
        info = (ManagerInfo) {};
        return 0;
}

/* Call a Manager method that returns "ao"; the empty array comes back as
 * an empty strv rather than NULL. */
static int call_list_method(sd_bus *bus, const char *method, char ***ret_paths) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        char **paths = NULL;
        int r;

        r = sd_bus_call_method(bus, MCUFLASH_BUS_NAME, MCUFLASH_MANAGER_PATH,
                               MCUFLASH_MANAGER_INTERFACE, method,
                               &error, &reply, NULL);
        if (r < 0) {
                char what[64];

                snprintf(what, sizeof(what), "Failed to call %s", method);
                r = client_bus_error(&error, r, what);
                sd_bus_error_free(&error);
                return r;
        }

        r = sd_bus_message_read_strv(reply, &paths);
        if (r < 0)
                return client_error_errno(r, "Failed to parse the reply of %s: %m", method);

        if (!paths) {
                paths = calloc(1, sizeof(char *));
                if (!paths)
                        return client_error_errno(ENOMEM, "Out of memory");
        }

        *ret_paths = paths;
        return 0;
}

int client_list_mcus(sd_bus *bus, char ***ret_paths) {
        return call_list_method(bus, "ListMcus", ret_paths);
}

int client_list_jobs(sd_bus *bus, char ***ret_paths) {
        return call_list_method(bus, "ListJobs", ret_paths);
}

int client_get_mcu_info(sd_bus *bus, const char *path, McuInfo *ret) {
        _cleanup_(mcu_info_donep) McuInfo info = {};
        int r;

        info.flash_start = UINT64_MAX;  /* "unknown" unless the daemon says */
        info.object_path = strdup(path);
        if (!info.object_path)
                return client_error_errno(ENOMEM, "Out of memory");

        r = get_all_properties(bus, path, MCUFLASH_MCU_INTERFACE,
                               mcu_fields, ELEMENTSOF(mcu_fields), &info);
        if (r < 0)
                return r;

        *ret = info;
        info = (McuInfo) {};
        return 0;
}

int client_resolve_mcu(sd_bus *bus, const char *selector, char **ret_path) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        const char *path;
        char *copy;
        int r;

        r = sd_bus_call_method(bus, MCUFLASH_BUS_NAME, MCUFLASH_MANAGER_PATH,
                               MCUFLASH_MANAGER_INTERFACE, "GetMcu",
                               &error, &reply, "s", selector);
        if (r < 0) {
                r = client_bus_error(&error, r, "Failed to look up the MCU");
                sd_bus_error_free(&error);
                return r;
        }

        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0)
                return client_error_errno(r, "Failed to parse the reply of GetMcu: %m");

        copy = strdup(path);
        if (!copy)
                return client_error_errno(ENOMEM, "Out of memory");

        *ret_path = copy;
        return 0;
}

const char *mcu_info_short_name(const McuInfo *info) {
        const char *rest;

        if (isempty(info->name))
                return "-";

        rest = startswith(info->name, "mcu ");
        if (!rest)
                return info->name;

        rest += strspn(rest, " ");
        return isempty(rest) ? info->name : rest;
}

int client_json_add_string(json_object *object, const char *key, const char *value) {
        json_object *s;

        s = json_object_new_string(strempty(value));
        if (!s)
                return -ENOMEM;

        if (json_object_object_add(object, key, s) < 0) {
                json_object_put(s);
                return -ENOMEM;
        }
        return 0;
}

typedef struct JsonString {
        const char *key;
        const char *value;
} JsonString;

/* A new JSON object of @n string members (NULL values as "").  Returns 0 or
 * -ENOMEM. */
static int json_object_new_strings(const JsonString *strings, size_t n, json_object **ret) {
        _cleanup_(json_object_putp) json_object *object = NULL;
        int r;

        object = json_object_new_object();
        if (!object)
                return -ENOMEM;

        for (size_t i = 0; i < n; i++) {
                r = client_json_add_string(object, strings[i].key, strings[i].value);
                if (r < 0)
                        return r;
        }

        *ret = TAKE_PTR(object);
        return 0;
}

int mcu_info_to_json(const McuInfo *info, json_object **ret) {
        char vid[8] = "", pid[8] = "", flash_start[24] = "";

        if (info->usb_vendor_id > 0 && info->usb_vendor_id <= 0xffff)
                snprintf(vid, sizeof(vid), "%04" PRIx64, info->usb_vendor_id);
        if (info->usb_product_id > 0 && info->usb_product_id <= 0xffff)
                snprintf(pid, sizeof(pid), "%04" PRIx64, info->usb_product_id);
        if (info->flash_start != UINT64_MAX)
                snprintf(flash_start, sizeof(flash_start), "0x%08" PRIx64, info->flash_start);

        const JsonString entries[] = {
                { "id",                   info->id                   },
                { "name",                 info->name                 },
                { "transport",            info->transport            },
                { "device_path",          info->device_path          },
                { "can_interface",        info->can_interface        },
                { "can_uuid",             info->can_uuid             },
                { "usb_vid",              vid                        },
                { "usb_pid",              pid                        },
                { "usb_serial",           info->usb_serial           },
                { "usb_port",             info->usb_port             },
                { "state",                info->state                },
                { "state_reason",         info->state_reason         },
                { "bootloader",           info->bootloader           },
                { "firmware",             info->firmware             },
                { "version",              info->firmware_version     },
                { "build_versions",       info->build_versions       },
                { "build_config",         info->build_config         },
                { "mcu_type",             info->mcu_type             },
                { "flash_start",          flash_start                },
                { "version_matches_host", info->version_matches_host },
                { "job",                  streq_ptr(info->job, "/") ? "" : info->job },
                { "object_path",          info->object_path          },
        };

        return json_object_new_strings(entries, ELEMENTSOF(entries), ret);
}

int client_print_json(json_object *object) {
        const char *text;

        text = json_object_to_json_string_ext(object, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                                              JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return client_error_errno(ENOMEM, "Failed to format JSON");

        fputs(text, stdout);
        fputc('\n', stdout);
        return 0;
}

bool client_use_color(void) {
        const char *e;

        if (!isatty(STDOUT_FILENO))
                return false;

        e = getenv("NO_COLOR");
        if (!isempty(e))
                return false;

        e = getenv("TERM");
        if (streq_ptr(e, "dumb"))
                return false;

        return true;
}

void job_info_done(JobInfo *info) {
        free_property_strings(job_fields, ELEMENTSOF(job_fields), info);
        free(info->object_path);
        info->object_path = NULL;
}

int client_get_job_info_with_cookie(sd_bus *bus, const char *path, JobInfo *ret, uint64_t *ret_cookie) {
        _cleanup_(job_info_donep) JobInfo info = {};
        int r;

        info.object_path = strdup(path);
        if (!info.object_path)
                return client_error_errno(ENOMEM, "Out of memory");

        r = get_all_properties_with_cookie(bus, path, MCUFLASH_JOB_INTERFACE,
                                           job_fields, ELEMENTSOF(job_fields), &info, ret_cookie);
        if (r < 0)
                return r;

        *ret = info;
        info = (JobInfo) {};
        return 0;
}

int client_get_job_info(sd_bus *bus, const char *path, JobInfo *ret) {
        return client_get_job_info_with_cookie(bus, path, ret, NULL);
}

int job_info_apply_changes(JobInfo *info, sd_bus_message *m) {
        return parse_properties(m, MCUFLASH_JOB_INTERFACE, job_fields, ELEMENTSOF(job_fields), info);
}

bool job_state_is_final(const char *state) {
        return streq_ptr(state, "succeeded") || streq_ptr(state, "failed") || streq_ptr(state, "cancelled");
}

const char *job_path_number(const char *path) {
        const char *number;

        if (!path)
                return NULL;

        number = startswith(path, MCUFLASH_JOB_PATH_PREFIX);
        if (isempty(number) || strchr(number, '/'))
                return NULL;

        return number;
}

unsigned progress_percent(double progress) {
        if (!(progress > 0)) /* also NaN */
                return 0;
        if (progress >= 1)
                return 100;

        /* Truncation rounds down; the epsilon keeps 0.29 at 29 % although
         * 0.29 * 100 is 28.999…. */
        return (unsigned) (progress * 100 + 1e-9);
}

json_object *client_json_double(double value) {
        char text[40];

        if (!isfinite(value))
                value = 0;

        for (int precision = 1; precision <= 17; precision++) {
                snprintf(text, sizeof(text), "%.*g", precision, value);
                if (strtod(text, NULL) == value)
                        break;
        }

        /* Keep it recognisably a fraction: 1.0, not 1. */
        if (!strpbrk(text, ".e"))
                strncat(text, ".0", sizeof(text) - strlen(text) - 1);

        return json_object_new_double_s(value, text);
}

int job_info_to_json(const JobInfo *info, json_object **ret) {
        _cleanup_(json_object_putp) json_object *object = NULL;
        json_object *number;
        int r;

        const JsonString strings[] = {
                { "path",  info->object_path },
                { "mcu",   info->mcu         },
                { "kind",  info->kind        },
                { "state", info->state       },
                { "phase", info->phase       },
        };

        r = json_object_new_strings(strings, ELEMENTSOF(strings), &object);
        if (r < 0)
                return r;

        const struct {
                const char *key;
                json_object *value;
        } numbers[] = {
                { "bytes_done",  json_object_new_uint64(info->bytes_done)  },
                { "bytes_total", json_object_new_uint64(info->bytes_total) },
                { "progress",    client_json_double(info->progress)        },
        };

        for (size_t i = 0; i < ELEMENTSOF(numbers); i++) {
                number = numbers[i].value;
                if (r >= 0 && (!number || json_object_object_add(object, numbers[i].key, number) < 0))
                        r = -ENOMEM;
                if (r < 0)
                        json_object_put(number);
        }
        if (r < 0)
                return r;

        r = client_json_add_string(object, "error", info->error);
        if (r >= 0)
                r = client_json_add_string(object, "error_message", info->error_message);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(object);
        return 0;
}

/* A JSON value for a variant read by read_variant(); NULL (JSON null) for
 * containers.  Returns 0 or -ENOMEM. */
static int property_value_to_json(const PropertyValue *value, json_object **ret) {
        json_object *v;

        switch (value->type) {
        case 0:
                *ret = NULL;
                return 0;
        case SD_BUS_TYPE_STRING:
        case SD_BUS_TYPE_OBJECT_PATH:
        case SD_BUS_TYPE_SIGNATURE:
                v = json_object_new_string(strempty(value->string));
                break;
        case SD_BUS_TYPE_BYTE:
        case SD_BUS_TYPE_UINT16:
        case SD_BUS_TYPE_UINT32:
        case SD_BUS_TYPE_UINT64:
                v = json_object_new_uint64(value->unsigned_number);
                break;
        case SD_BUS_TYPE_INT16:
        case SD_BUS_TYPE_INT32:
        case SD_BUS_TYPE_INT64:
                v = json_object_new_int64(value->signed_number);
                break;
        case SD_BUS_TYPE_BOOLEAN:
                v = json_object_new_boolean(value->boolean);
                break;
        case SD_BUS_TYPE_DOUBLE:
                v = client_json_double(value->number);
                break;
        default:
                *ret = NULL;
                return 0;
        }

        if (!v)
                return -ENOMEM;

        *ret = v;
        return 0;
}

int client_read_properties_json(sd_bus_message *m, json_object **ret) {
        _cleanup_(json_object_putp) json_object *object = NULL;
        int r;

        object = json_object_new_object();
        if (!object)
                return client_error_errno(ENOMEM, "Out of memory");

        r = sd_bus_message_enter_container(m, SD_BUS_TYPE_ARRAY, "{sv}");
        if (r < 0)
                return client_error_errno(r, "Failed to parse properties: %m");

        for (;;) {
                PropertyValue value;
                json_object *v = NULL;
                const char *name;

                r = sd_bus_message_enter_container(m, SD_BUS_TYPE_DICT_ENTRY, "sv");
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties: %m");
                if (r == 0)
                        break;

                r = sd_bus_message_read_basic(m, SD_BUS_TYPE_STRING, &name);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties: %m");

                r = read_variant(m, &value);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse property %s: %m", name);

                r = property_value_to_json(&value, &v);
                if (r < 0 || json_object_object_add(object, name, v) < 0) {
                        json_object_put(v);
                        return client_error_errno(ENOMEM, "Out of memory");
                }

                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return client_error_errno(r, "Failed to parse properties: %m");
        }

        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return client_error_errno(r, "Failed to parse properties: %m");

        *ret = TAKE_PTR(object);
        return 0;
}

int client_print_json_line(json_object *object) {
        const char *text;

        text = json_object_to_json_string_ext(object, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return client_error_errno(ENOMEM, "Failed to format JSON");

        fputs(text, stdout);
        fputc('\n', stdout);
        if (fflush(stdout) != 0)
                return client_error_errno(errno, "Failed to write output: %m");
        return 0;
}

int client_open_signal_fd(const int *signals, size_t n_signals, sigset_t *ret_old_mask, int *ret_fd) {
        sigset_t mask, old_mask;
        int fd, saved;

        sigemptyset(&mask);
        for (size_t i = 0; i < n_signals; i++) {
                struct sigaction current;

                if (sigaction(signals[i], NULL, &current) < 0)
                        return client_error_errno(errno, "Failed to query signal %d: %m", signals[i]);
                if (current.sa_handler == SIG_IGN)
                        continue;
                sigaddset(&mask, signals[i]);
        }

        if (sigprocmask(SIG_BLOCK, &mask, &old_mask) < 0)
                return client_error_errno(errno, "Failed to block signals: %m");

        fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
        if (fd < 0) {
                saved = errno;
                (void) sigprocmask(SIG_SETMASK, &old_mask, NULL);
                return client_error_errno(saved, "Failed to create a signalfd: %m");
        }

        *ret_old_mask = old_mask;
        *ret_fd = fd;
        return 0;
}

int client_wait_bus_or_signal(sd_bus *bus, int signal_fd) {
        struct pollfd fds[2] = {};
        uint64_t timeout_usec;
        int bus_fd, events, timeout_ms = -1, r;

        bus_fd = sd_bus_get_fd(bus);
        if (bus_fd < 0)
                return client_error_errno(bus_fd, "Failed to get the bus fd: %m");

        events = sd_bus_get_events(bus);
        if (events < 0)
                return client_error_errno(events, "Failed to get the bus events: %m");

        r = sd_bus_get_timeout(bus, &timeout_usec);
        if (r < 0)
                return client_error_errno(r, "Failed to get the bus timeout: %m");

        if (timeout_usec != UINT64_MAX) {
                struct timespec now;
                uint64_t now_usec;

                /* sd-bus hands out an absolute CLOCK_MONOTONIC time. */
                clock_gettime(CLOCK_MONOTONIC, &now);
                now_usec = (uint64_t) now.tv_sec * 1000000 + (uint64_t) now.tv_nsec / 1000;
                if (timeout_usec <= now_usec)
                        timeout_ms = 0;
                else
                        timeout_ms = (int) MIN((timeout_usec - now_usec + 999) / 1000, (uint64_t) INT32_MAX);
        }

        fds[0] = (struct pollfd) { .fd = bus_fd, .events = (short) events };
        fds[1] = (struct pollfd) { .fd = signal_fd, .events = POLLIN };

        r = poll(fds, signal_fd >= 0 ? 2 : 1, timeout_ms);
        if (r < 0) {
                if (errno == EINTR)
                        return 0;
                return client_error_errno(errno, "Failed to wait for the bus: %m");
        }

        if (signal_fd >= 0 && (fds[1].revents & POLLIN)) {
                struct signalfd_siginfo info;
                ssize_t n;

                n = read(signal_fd, &info, sizeof(info));
                if (n == (ssize_t) sizeof(info))
                        return (int) info.ssi_signo;
                if (n < 0 && errno != EAGAIN && errno != EINTR)
                        return client_error_errno(errno, "Failed to read the signalfd: %m");
        }

        return 0;
}

int client_add_match(sd_bus *bus, sd_bus_slot **ret_slot, const char *rule,
                     sd_bus_message_handler_t callback, void *userdata) {
        int r;

        r = sd_bus_add_match(bus, ret_slot, rule, callback, userdata);
        if (r < 0)
                return client_error_errno(r, "Failed to subscribe to the signals of mcuflashd: %m");
        return 0;
}

int client_match_daemon_gone(sd_bus *bus, sd_bus_slot **ret_slot,
                             sd_bus_message_handler_t callback, void *userdata) {
        /* arg2='' matches only when the name is left without an owner. */
        return client_add_match(bus, ret_slot,
                                "type='signal',"
                                "sender='org.freedesktop.DBus',"
                                "path='/org/freedesktop/DBus',"
                                "interface='org.freedesktop.DBus',"
                                "member='NameOwnerChanged',"
                                "arg0='" MCUFLASH_BUS_NAME "',"
                                "arg2=''",
                                callback, userdata);
}

int client_parse_json_verb(int argc, char *argv[], const char *usage, unsigned n_args, const char *arg_name,
                           bool *json) {
        enum {
                ARG_JSON = 0x100,
        };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h'      },
                { "json", no_argument, NULL, ARG_JSON },
                {}
        };
        int c;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        fputs(usage, stdout);
                        return EXIT_SUCCESS;
                case ARG_JSON:
                        *json = true;
                        break;
                default:
                        return client_unknown_option(usage, argv);
                }

        if ((unsigned) (argc - optind) < n_args)
                return client_usage_error(usage, "missing argument %s", arg_name);
        if ((unsigned) (argc - optind) > n_args)
                return client_usage_error(usage, "unexpected argument '%s'", argv[optind + n_args]);
        return -1;
}
