/* mcuflashctl status [--json]: the host's Klipper version, the printer's
 * state and one line per MCU, as an aligned table (coloured MATCH column on
 * a terminal) or as one JSON object.  It only reads; it never asks the
 * daemon to rescan or refresh. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "client.h"
#include "table.h"

#define ANSI_GREEN "\x1b[0;32m"
#define ANSI_RED "\x1b[0;31m"

static const char status_usage[] =
        "Usage: mcuflashctl status [--json]\n"
        "\n"
        "Show the host's Klipper version, the printer's state and every MCU that\n"
        "mcuflashd knows: name in printer.cfg, state, firmware and version, whether\n"
        "the version matches the host, chip, transport, device (CAN interface for a\n"
        "CAN MCU), CAN UUID and id.\n"
        "\n"
        "Options:\n"
        "      --json           Print one JSON object instead of the table\n"
        "  -h, --help           Show this help and exit\n";

enum {
        COLUMN_NAME,
        COLUMN_STATE,
        COLUMN_FIRMWARE,
        COLUMN_VERSION,
        COLUMN_MATCH,
        COLUMN_MCU_TYPE,
        COLUMN_TRANSPORT,
        COLUMN_DEVICE,
        COLUMN_UUID,
        COLUMN_ID,
        _COLUMN_MAX,
};

static const char *const column_titles[_COLUMN_MAX] = {
        [COLUMN_NAME] = "NAME",
        [COLUMN_STATE] = "STATE",
        [COLUMN_FIRMWARE] = "FIRMWARE",
        [COLUMN_VERSION] = "VERSION",
        [COLUMN_MATCH] = "MATCH",
        [COLUMN_MCU_TYPE] = "MCU TYPE",
        [COLUMN_TRANSPORT] = "TRANSPORT",
        [COLUMN_DEVICE] = "DEVICE",
        [COLUMN_UUID] = "UUID",
        [COLUMN_ID] = "ID",
};

typedef struct StatusData {
        ManagerInfo manager;
        McuInfo *mcus;
        size_t n_mcus;
} StatusData;

static void status_data_done(StatusData *data) {
        manager_info_done(&data->manager);
        mcu_info_array_free(data->mcus, data->n_mcus);
        data->mcus = NULL;
        data->n_mcus = 0;
}

/* 0: the main MCU "mcu", 1: other printer.cfg names, 2: not in printer.cfg. */
static int mcu_rank(const McuInfo *mcu) {
        if (isempty(mcu->name))
                return 2;
        if (streq(mcu->name, "mcu"))
                return 0;
        return 1;
}

static int compare_mcus(const void *a, const void *b) {
        const McuInfo *x = a, *y = b;
        int rank_x = mcu_rank(x), rank_y = mcu_rank(y), r;

        if (rank_x != rank_y)
                return rank_x < rank_y ? -1 : 1;

        if (rank_x == 1) {
                r = strcasecmp(mcu_info_short_name(x), mcu_info_short_name(y));
                if (r != 0)
                        return r;
                r = strcmp(x->name, y->name);
                if (r != 0)
                        return r;
        }

        r = strcmp(x->id, y->id);
        if (r != 0)
                return r;
        return strcmp(x->object_path, y->object_path);
}

static int load_status(sd_bus *bus, StatusData *data) {
        _cleanup_(strv_freep) char **paths = NULL;
        size_t n_paths = 0;
        int r;

        r = client_get_manager_info(bus, &data->manager);
        if (r < 0)
                return r;

        r = client_list_mcus(bus, &paths);
        if (r < 0)
                return r;

        while (paths[n_paths])
                n_paths++;

        data->mcus = calloc(n_paths + 1, sizeof(McuInfo));
        if (!data->mcus)
                return client_error_errno(ENOMEM, "Out of memory");

        for (size_t i = 0; i < n_paths; i++) {
                r = client_get_mcu_info(bus, paths[i], &data->mcus[data->n_mcus]);
                if (r == -ENXIO)
                        continue; /* removed between ListMcus and GetAll */
                if (r < 0)
                        return r;
                data->n_mcus++;
        }

        qsort(data->mcus, data->n_mcus, sizeof(McuInfo), compare_mcus);
        return 0;
}

static int print_status_json(const StatusData *data) {
        _cleanup_(json_object_putp) json_object *root = NULL;
        json_object *mcus, *value;
        int r;

        root = json_object_new_object();
        if (!root)
                return client_error_errno(ENOMEM, "Out of memory");

        value = json_object_new_string(data->manager.host_version);
        if (!value || json_object_object_add(root, "host_version", value) < 0)
                goto oom;

        value = json_object_new_string(data->manager.printer_state);
        if (!value || json_object_object_add(root, "printer_state", value) < 0)
                goto oom;

        mcus = json_object_new_array();
        if (!mcus || json_object_object_add(root, "mcus", mcus) < 0)
                goto oom;

        for (size_t i = 0; i < data->n_mcus; i++) {
                r = mcu_info_to_json(&data->mcus[i], &value);
                if (r < 0)
                        goto oom;
                if (json_object_array_add(mcus, value) < 0) {
                        json_object_put(value);
                        goto oom;
                }
        }

        return client_print_json(root);

oom:
        return client_error_errno(ENOMEM, "Out of memory");
}

static const char *match_color(const char *match) {
        if (streq(match, "yes"))
                return ANSI_GREEN;
        if (streq(match, "no"))
                return ANSI_RED;
        return NULL;
}

/* What a user plugs or configures: the CAN interface of a CAN MCU, the
 * device node or socket of every other one. */
static const char *device_text(const McuInfo *mcu) {
        if (streq(mcu->transport, "can"))
                return mcu->can_interface;
        return mcu->device_path;
}

static const char *cell_color(size_t column, const char *text) {
        return column == COLUMN_MATCH ? match_color(text) : NULL;
}

static int print_status_table(const StatusData *data) {
        Table table;
        bool any_reason = false;
        int r;

        printf("Host Klipper version: %s   Printer: %s\n\n",
               isempty(data->manager.host_version) ? "unknown" : data->manager.host_version,
               isempty(data->manager.printer_state) ? "unknown" : data->manager.printer_state);

        if (data->n_mcus == 0) {
                puts("No MCUs found.");
                return 0;
        }

        r = table_init(&table, column_titles, _COLUMN_MAX, data->n_mcus);
        if (r < 0)
                return r;

        for (size_t i = 0; i < data->n_mcus; i++) {
                const McuInfo *mcu = &data->mcus[i];
                const char *texts[_COLUMN_MAX] = {
                        [COLUMN_NAME] = mcu_info_short_name(mcu),
                        [COLUMN_STATE] = mcu->state,
                        [COLUMN_FIRMWARE] = mcu->firmware,
                        [COLUMN_VERSION] = mcu->firmware_version,
                        [COLUMN_MATCH] = mcu->version_matches_host,
                        [COLUMN_MCU_TYPE] = mcu->mcu_type,
                        [COLUMN_TRANSPORT] = mcu->transport,
                        [COLUMN_DEVICE] = device_text(mcu),
                        [COLUMN_UUID] = mcu->can_uuid,
                        [COLUMN_ID] = mcu->id,
                };

                r = table_add_row(&table, texts);
                if (r < 0) {
                        table_done(&table);
                        return r;
                }

                if (!isempty(mcu->state_reason))
                        any_reason = true;
        }

        table_print(&table, client_use_color() ? cell_color : NULL);
        table_done(&table);

        if (any_reason) {
                putchar('\n');
                for (size_t i = 0; i < data->n_mcus; i++) {
                        const McuInfo *mcu = &data->mcus[i];

                        if (isempty(mcu->state_reason))
                                continue;
                        printf("%s: %s\n", isempty(mcu->name) ? mcu->id : mcu_info_short_name(mcu),
                               mcu->state_reason);
                }
        }

        return 0;
}

int verb_status(int argc, char *argv[]) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        StatusData data = {};
        bool json = false;
        int r;

        r = client_parse_json_verb(argc, argv, status_usage, 0, "", &json);
        if (r >= 0)
                return r;

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = load_status(bus, &data);
        if (r >= 0)
                r = json ? print_status_json(&data) : print_status_table(&data);

        status_data_done(&data);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
