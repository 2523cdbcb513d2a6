/* mcuflashctl bootloader MCU / reboot MCU: ask mcuflashd to move an MCU
 * into its bootloader (Mcu.RebootToBootloader) or back to its application
 * (Mcu.RebootToApplication), follow the job that the daemon returns and
 * say where the MCU ended up.  Starting and following the job is
 * job-wait.c's; this file only parses options, builds the method's
 * options and words the result.  It never talks to an MCU itself. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "client.h"
#include "job-wait.h"

typedef enum RebootTarget {
        TARGET_BOOTLOADER,
        TARGET_APPLICATION,
} RebootTarget;

typedef struct RebootVerb {
        RebootTarget target;
        const char *method;
        const char *usage;
} RebootVerb;

static const char bootloader_usage[] =
        "Usage: mcuflashctl bootloader MCU [--no-wait] [--json] [--keep-klipper]\n"
        "\n"
        "Reboot an MCU into its bootloader and wait until it is there.  If Klipper\n"
        "holds the MCU and the printer is idle, mcuflashd stops klipper.service for\n"
        "the job and starts it again afterwards.  Ctrl-C cancels the job; a second\n"
        "Ctrl-C stops waiting and leaves the job running.\n"
        "\n"
        "Options:\n"
        "      --no-wait        Print the job's object path and return at once\n"
        "      --json           Print the finished job as one JSON object\n"
        "      --keep-klipper   Never stop Klipper: fail if it holds the MCU\n"
        "  -h, --help           Show this help and exit\n";

static const char reboot_usage[] =
        "Usage: mcuflashctl reboot MCU [--no-wait] [--json] [--keep-klipper]\n"
        "\n"
        "Reboot an MCU into its application (e.g. out of its bootloader) and wait\n"
        "until it runs.  If Klipper holds the MCU and the printer is idle,\n"
        "mcuflashd stops klipper.service for the job and starts it again\n"
        "afterwards.  Ctrl-C cancels the job; a second Ctrl-C stops waiting and\n"
        "leaves the job running.\n"
        "\n"
        "Options:\n"
        "      --no-wait        Print the job's object path and return at once\n"
        "      --json           Print the finished job as one JSON object\n"
        "      --keep-klipper   Never stop Klipper: fail if it holds the MCU\n"
        "  -h, --help           Show this help and exit\n";

static const RebootVerb bootloader_verb = {
        .target = TARGET_BOOTLOADER,
        .method = "RebootToBootloader",
        .usage = bootloader_usage,
};

static const RebootVerb reboot_verb = {
        .target = TARGET_APPLICATION,
        .method = "RebootToApplication",
        .usage = reboot_usage,
};

/* The a{sv} options of RebootToBootloader/RebootToApplication. */
static int append_reboot_options(sd_bus_message *m, void *userdata) {
        const bool *stop_klipper = userdata;

        return sd_bus_message_append(m, "a{sv}", 1, "stop-klipper", "b", (int) *stop_klipper);
}

/* "mcu eddy" for a printer.cfg MCU, "MCU 0e0d81e4210c" for any other. */
static void print_mcu_label(const McuInfo *mcu) {
        if (!isempty(mcu->name))
                fputs(mcu->name, stdout);
        else
                printf("MCU %s", mcu->id);
}

/* Say where the MCU is now, from its properties after the job. */
static int print_outcome(sd_bus *bus, const char *mcu_path, RebootTarget target) {
        _cleanup_(mcu_info_donep) McuInfo mcu = {};
        const char *wanted = target == TARGET_BOOTLOADER ? "bootloader" : "application";
        int r;

        r = client_get_mcu_info(bus, mcu_path, &mcu);
        if (r == -ENXIO) {
                printf("The job succeeded; the MCU is gone from mcuflashd's list for now.\n");
                return 0;
        }
        if (r < 0)
                return r;

        print_mcu_label(&mcu);

        if (!streq(mcu.state, wanted)) {
                printf(": the job succeeded, its state is now %s\n", mcu.state);
                return 0;
        }

        if (target == TARGET_BOOTLOADER) {
                fputs(" is in its bootloader", stdout);
                if (!isempty(mcu.bootloader) && !streq(mcu.bootloader, "unknown"))
                        printf(" (%s)", mcu.bootloader);
        } else {
                fputs(" is running its application", stdout);
                if (!isempty(mcu.firmware) && !isempty(mcu.firmware_version))
                        printf(" (%s %s)", mcu.firmware, mcu.firmware_version);
                else if (!isempty(mcu.firmware) || !isempty(mcu.firmware_version))
                        printf(" (%s)", isempty(mcu.firmware) ? mcu.firmware_version : mcu.firmware);
        }
        putchar('\n');
        return 0;
}

static int run_reboot_verb(const RebootVerb *verb, int argc, char *argv[]) {
        enum {
                ARG_NO_WAIT = 0x100,
                ARG_JSON,
                ARG_KEEP_KLIPPER,
        };
        static const struct option options[] = {
                { "help",         no_argument, NULL, 'h'              },
                { "no-wait",      no_argument, NULL, ARG_NO_WAIT      },
                { "json",         no_argument, NULL, ARG_JSON         },
                { "keep-klipper", no_argument, NULL, ARG_KEEP_KLIPPER },
                {}
        };
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(job_info_donep) JobInfo job = {};
        _cleanup_free_ char *mcu_path = NULL;
        bool json = false, no_wait = false, stop_klipper = true;
        int c, r;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        fputs(verb->usage, stdout);
                        return EXIT_SUCCESS;
                case ARG_NO_WAIT:
                        no_wait = true;
                        break;
                case ARG_JSON:
                        json = true;
                        break;
                case ARG_KEEP_KLIPPER:
                        stop_klipper = false;
                        break;
                default:
                        return client_unknown_option(verb->usage, argv);
                }

        if (optind >= argc)
                return client_usage_error(verb->usage, "missing argument MCU");
        if (optind + 1 < argc)
                return client_usage_error(verb->usage, "unexpected argument '%s'", argv[optind + 1]);

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = client_resolve_mcu(bus, argv[optind], &mcu_path);
        if (r < 0)
                return EXIT_FAILURE;


        const JobCall call = {
                .object_path = mcu_path,
                .interface = MCUFLASH_MCU_INTERFACE,
                .method = verb->method,
                .append_arguments = append_reboot_options,
                .userdata = &stop_klipper,
        };

        r = job_run_verb(bus, &call, json, no_wait, &job);
        if (r >= 0)
                return r;

        if (!json && print_outcome(bus, mcu_path, verb->target) < 0)
                return EXIT_FAILURE;

        return EXIT_SUCCESS;
}

int verb_bootloader(int argc, char *argv[]) {
        return run_reboot_verb(&bootloader_verb, argc, argv);
}

int verb_reboot(int argc, char *argv[]) {
        return run_reboot_verb(&reboot_verb, argc, argv);
}
