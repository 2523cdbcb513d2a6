/* mcuflashctl: the shell front end of mcuflashd.  This file holds main(),
 * the table of verbs and the global options (--help, --version); it picks
 * the verb and hands it the rest of the command line.  Each verb lives in
 * its own cmd-<verb>.c, parses its own options and talks to the daemon
 * through client.c; nothing here touches D-Bus. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "build-config.h"
#include "client.h"

typedef struct Verb {
        const char *name;
        const char *arguments;
        int (*run)(int argc, char *argv[]);
        const char *help;
} Verb;

static const Verb verbs[] = {
        { "status",     "[--json]",     verb_status,     "Show the host's Klipper version and every MCU" },
        { "info",       "MCU [--json]", verb_info,       "Show every property of one MCU"               },
        { "bootloader", "MCU",          verb_bootloader, "Reboot an MCU into its bootloader and wait"   },
        { "reboot",     "MCU",          verb_reboot,     "Reboot an MCU into its application and wait"  },
        { "flash",      "MCU IMAGE",    verb_flash,      "Write a Klipper image to an MCU and wait"     },
        { "jobs",       "[--json]",     verb_jobs,       "List running and recently finished jobs"      },
        { "cancel",     "JOB",          verb_cancel,     "Cancel a job"                                 },
        { "monitor",    "[--json]",     verb_monitor,    "Print the daemon's events as they happen"     },
};

/* Run when no verb is given, like boltctl and systemctl. */
#define DEFAULT_VERB "status"

static void print_usage(FILE *f) {
        fputs("Usage: mcuflashctl [OPTIONS] [COMMAND [ARGS...]]\n"
              "\n"
              "Show and control the Klipper MCUs that mcuflashd knows about.\n"
              "\n"
              "Commands:\n", f);
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++) {
                char synopsis[64];

                snprintf(synopsis, sizeof(synopsis), "%s %s", verbs[i].name, verbs[i].arguments);
                fprintf(f, "  %-20s %s%s\n", synopsis, verbs[i].help,
                        streq(verbs[i].name, DEFAULT_VERB) ? " (default)" : "");
        }
        fputs("\n"
              "MCU is a printer.cfg name (mcu, eddy or \"mcu eddy\"), an MCU id, a device\n"
              "path, a CAN UUID or a USB serial number.\n"
              "\n"
              "Options:\n"
              "  -h, --help           Show this help and exit\n"
              "  -V, --version        Show the version and exit\n"
              "\n"
              "'mcuflashctl COMMAND --help' shows the help of one command.\n"
              "mcuflashd is reached on the system bus; DBUS_SYSTEM_BUS_ADDRESS overrides it.\n", f);
}

static const Verb *find_verb(const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                if (streq(verbs[i].name, name))
                        return &verbs[i];
        return NULL;
}

int main(int argc, char *argv[]) {
        static const struct option options[] = {
                { "help",    no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                {}
        };
        char *default_argv[] = { (char *) DEFAULT_VERB, NULL };
        const Verb *verb;
        int c, status;

        opterr = 0;
        /* "+": stop at the verb, whose options belong to the verb. */
        while ((c = getopt_long(argc, argv, "+hV", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        print_usage(stdout);
                        return EXIT_SUCCESS;
                case 'V':
                        printf("mcuflashctl %s\n", PACKAGE_VERSION);
                        return EXIT_SUCCESS;
                default:
                        fprintf(stderr, "mcuflashctl: unknown option '%s'\n\n", argv[optind - 1]);
                        print_usage(stderr);
                        return EXIT_USAGE;
                }

        if (optind >= argc) {
                argc = 1;
                argv = default_argv;
        } else {
                argc -= optind;
                argv += optind;
        }

        verb = find_verb(argv[0]);
        if (!verb) {
                fprintf(stderr, "mcuflashctl: unknown command '%s'\n\n", argv[0]);
                print_usage(stderr);
                return EXIT_USAGE;
        }

        /* Let the verb run getopt_long() from a clean state. */
        optind = 0;
        status = verb->run(argc, argv);

        if (fflush(stdout) != 0 || ferror(stdout)) {
                fprintf(stderr, "mcuflashctl: failed to write output: %m\n");
                return EXIT_FAILURE;
        }

        return status;
}
