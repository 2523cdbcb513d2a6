/* Implementation of client.h: one sd-bus connection per run, properties read
 * with a single org.freedesktop.DBus.Properties.GetAll call per object and
 * stored into ManagerInfo/McuInfo through small field tables (unknown
 * properties are skipped, so a newer daemon works with an older client),
 * JSON building with json-c and error printing.  It does not parse command
 * lines or format tables; the cmd-*.c files do. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"

typedef enum PropertyKind {
        PROPERTY_STRING,
        PROPERTY_UINT64,
        PROPERTY_BOOL,
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
        { "McuType",            PROPERTY_STRING, offsetof(McuInfo, mcu_type)             },
        { "FlashStart",         PROPERTY_UINT64, offsetof(McuInfo, flash_start)          },
        { "VersionMatchesHost", PROPERTY_STRING, offsetof(McuInfo, version_matches_host) },
        { "Job",                PROPERTY_STRING, offsetof(McuInfo, job)                  },
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
 * object does not exist (any more); every other failure is printed. */
static int get_all_properties(sd_bus *bus, const char *path, const char *interface,
                              const PropertyField *fields, size_t n_fields, void *base) {
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

        return parse_properties(reply, interface, fields, n_fields, base);
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

int client_list_mcus(sd_bus *bus, char ***ret_paths) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        char **paths = NULL;
        int r;

        r = sd_bus_call_method(bus, MCUFLASH_BUS_NAME, MCUFLASH_MANAGER_PATH,
                               MCUFLASH_MANAGER_INTERFACE, "ListMcus",
                               &error, &reply, NULL);
        if (r < 0) {
                r = client_bus_error(&error, r, "Failed to list MCUs");
                sd_bus_error_free(&error);
                return r;
        }

        r = sd_bus_message_read_strv(reply, &paths);
        if (r < 0)
                return client_error_errno(r, "Failed to parse the reply of ListMcus: %m");

        if (!paths) {
                /* An empty array reads as NULL; callers get an empty list instead. */
                paths = calloc(1, sizeof(char *));
                if (!paths)
                        return client_error_errno(ENOMEM, "Out of memory");
        }

        *ret_paths = paths;
        return 0;
}

int client_get_mcu_info(sd_bus *bus, const char *path, McuInfo *ret) {
        _cleanup_(mcu_info_donep) McuInfo info = {};
        int r;

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

static int json_add_string(json_object *object, const char *key, const char *value) {
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

int mcu_info_to_json(const McuInfo *info, json_object **ret) {
        _cleanup_(json_object_putp) json_object *object = NULL;
        char vid[8] = "", pid[8] = "", flash_start[24] = "";
        int r = 0;

        if (info->usb_vendor_id > 0 && info->usb_vendor_id <= 0xffff)
                snprintf(vid, sizeof(vid), "%04" PRIx64, info->usb_vendor_id);
        if (info->usb_product_id > 0 && info->usb_product_id <= 0xffff)
                snprintf(pid, sizeof(pid), "%04" PRIx64, info->usb_product_id);
        if (info->flash_start > 0)
                snprintf(flash_start, sizeof(flash_start), "0x%08" PRIx64, info->flash_start);

        object = json_object_new_object();
        if (!object)
                return -ENOMEM;

        const struct {
                const char *key;
                const char *value;
        } entries[] = {
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
                { "mcu_type",             info->mcu_type             },
                { "flash_start",          flash_start                },
                { "version_matches_host", info->version_matches_host },
                { "job",                  streq_ptr(info->job, "/") ? "" : info->job },
                { "object_path",          info->object_path          },
        };

        for (size_t i = 0; i < ELEMENTSOF(entries) && r >= 0; i++)
                r = json_add_string(object, entries[i].key, entries[i].value);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(object);
        return 0;
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
