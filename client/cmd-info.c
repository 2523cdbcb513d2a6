/* mcuflashctl info MCU [--json]: every property of one MCU, picked by any
 * selector that Manager.GetMcu accepts, as aligned "Label: value" lines or
 * as the same JSON object that status --json prints per MCU.  Both outputs
 * are produced from that one JSON object so they cannot drift apart.  It
 * only reads; it does not ask the daemon to refresh the MCU. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"

static const char info_usage[] =
        "Usage: mcuflashctl info MCU [--json]\n"
        "\n"
        "Show every property of one MCU.  MCU is a printer.cfg name (mcu, eddy or\n"
        "\"mcu eddy\"), an MCU id, a device path, a CAN UUID or a USB serial number.\n"
        "\n"
        "Options:\n"
        "      --json           Print one JSON object instead of the list\n"
        "  -h, --help           Show this help and exit\n";

/* Human labels of the JSON keys, in the order mcu_info_to_json() adds them. */
static const struct {
        const char *key;
        const char *label;
} info_labels[] = {
        { "id",                   "Id"             },
        { "name",                 "Name"           },
        { "transport",            "Transport"      },
        { "device_path",          "Device path"    },
        { "can_interface",        "CAN interface"  },
        { "can_uuid",             "CAN UUID"       },
        { "usb_vid",              "USB vendor ID"  },
        { "usb_pid",              "USB product ID" },
        { "usb_serial",           "USB serial"     },
        { "usb_port",             "USB port"       },
        { "state",                "State"          },
        { "state_reason",         "State reason"   },
        { "bootloader",           "Bootloader"     },
        { "firmware",             "Firmware"       },
        { "version",              "Version"        },
        { "build_versions",       "Build versions" },
        { "build_config",         "Build config"   },
        { "mcu_type",             "MCU type"       },
        { "flash_start",          "Flash start"    },
        { "version_matches_host", "Matches host"   },
        { "job",                  "Job"            },
        { "object_path",          "Object path"    },
};

static const char *label_of(const char *key) {
        for (size_t i = 0; i < ELEMENTSOF(info_labels); i++)
                if (streq(info_labels[i].key, key))
                        return info_labels[i].label;
        return key;
}

/* The build config is many CONFIG_…=… lines: one per line below the label,
 * indented.  Klipper firmware without one says so (older than v0.13.0-753);
 * for anything else there is nothing to say. */
static void print_build_config(json_object *object, int width, const char *label, const char *text) {
        json_object *firmware;
        const char *app = NULL;

        if (json_object_object_get_ex(object, "firmware", &firmware))
                app = json_object_get_string(firmware);
        if (isempty(text)) {
                bool klipper = streq_ptr(app, "Klipper") || streq_ptr(app, "Kalico");

                printf("%*s: %s\n", width, label, klipper ? "(not embedded)" : "-");
                return;
        }

        printf("%*s:\n", width, label);
        for (const char *line = text; *line;) {
                size_t n = strcspn(line, "\n");

                if (n > 0)
                        printf("%*s  %.*s\n", width, "", (int) n, line);
                line += n;
                if (*line == '\n')
                        line++;
        }
}

static void print_info_text(json_object *object) {
        size_t width = 0;

        json_object_object_foreach(object, key, value) {
                width = MAX(width, strlen(label_of(key)));
        }

        json_object_object_foreach(object, key2, value2) {
                const char *text = json_object_get_string(value2);

                if (streq(key2, "build_config")) {
                        print_build_config(object, (int) width, label_of(key2), text);
                        continue;
                }
                printf("%*s: %s\n", (int) width, label_of(key2), isempty(text) ? "-" : text);
        }
}

int verb_info(int argc, char *argv[]) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(json_object_putp) json_object *object = NULL;
        _cleanup_(mcu_info_donep) McuInfo mcu = {};
        _cleanup_free_ char *path = NULL;
        const char *selector;
        bool json = false;
        int r;

        r = client_parse_json_verb(argc, argv, info_usage, 1, "MCU", &json);
        if (r >= 0)
                return r;
        selector = argv[optind];

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = client_resolve_mcu(bus, selector, &path);
        if (r < 0)
                return EXIT_FAILURE;

        r = client_get_mcu_info(bus, path, &mcu);
        if (r == -ENXIO) {
                client_error_errno(r, "MCU '%s' disappeared while reading it", selector);
                return EXIT_FAILURE;
        }
        if (r < 0)
                return EXIT_FAILURE;

        r = mcu_info_to_json(&mcu, &object);
        if (r < 0) {
                client_error_errno(r, "Failed to build the JSON object: %m");
                return EXIT_FAILURE;
        }

        if (json)
                return client_print_json(object) < 0 ? EXIT_FAILURE : EXIT_SUCCESS;

        print_info_text(object);
        return EXIT_SUCCESS;
}
