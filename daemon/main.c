/* mcuflashd's entry point: command line, logging level, and the daemon's
 * lifetime.  Everything else is in core/ (what the daemon does) and bus/
 * (how it is reached).  The only place that exits the process. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/daemon.h"
#include "core/flash-internal.h"
#include "core/version.h"
#include "shared/log.h"
#include "build-config.h"

static void help(void) {
        printf("Usage: mcuflashd [OPTIONS]\n\n"
               "Find the microcontrollers of a Klipper printer and keep their firmware in step.\n\n"
               "  -c --config FILE   read FILE instead of " DEFAULT_CONFIG_FILE "\n"
               "  -v --verbose       log debug messages\n"
               "     --version       print the version and exit\n"
               "  -h --help          show this help and exit\n\n"
               "See mcuflashd(8) and mcuflashd.conf(5).\n");
}

int main(int argc, char *argv[]) {
        enum { ARG_VERSION = 0x100, ARG_INSTALL_PROGRAM, ARG_RESTORE_PROGRAM };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "verbose", no_argument, NULL, 'v' },
                { "version", no_argument, NULL, ARG_VERSION },
                /* Internal: the daemon runs these in a transient unit. */
                { "install-program", required_argument, NULL, ARG_INSTALL_PROGRAM },
                { "restore-program", required_argument, NULL, ARG_RESTORE_PROGRAM },
                { "help", no_argument, NULL, 'h' },
                {}
        };
        _cleanup_(daemon_freep) struct daemon *d = NULL;
        const char *config_path = NULL;
        int c, r;

        /* Internal: the child that reads the Klipper checkout (core/version-host.c). */
        if (argc == 3 && streq(argv[1], VERSION_DESCRIBE_ARG))
                version_describe_checkout_main(argv[2]);

        while ((c = getopt_long(argc, argv, "c:vh", options, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        config_path = optarg;
                        break;
                case 'v':
                        log_set_max_level(LOG_DEBUG);
                        break;
                case ARG_VERSION:
                        printf("mcuflashd %s\n", PACKAGE_VERSION);
                        return EXIT_SUCCESS;
                case 'h':
                        help();
                        return EXIT_SUCCESS;
                case ARG_INSTALL_PROGRAM:
                        return flash_linux_tool("install", optarg);
                case ARG_RESTORE_PROGRAM:
                        return flash_linux_tool("restore", optarg);
                default:
                        fprintf(stderr, "Try 'mcuflashd --help'.\n");
                        return 2;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "mcuflashd takes no arguments; try 'mcuflashd --help'.\n");
                return 2;
        }

        /* Writes to a client that went away must not kill the daemon. */
        (void) signal(SIGPIPE, SIG_IGN);

        r = daemon_new(config_path, &d);
        if (r < 0) {
                log_error_errno(r, "Cannot start: %m");
                return EXIT_FAILURE;
        }
        r = daemon_run(d);
        if (r < 0) {
                log_error_errno(r, "Exiting after a fatal error: %m");
                return EXIT_FAILURE;
        }
        if (d->forced_exit) {
                /* Jobs were cut short: their worker threads may still be
                 * talking to an MCU.  exit() ends them; freeing would wait. */
                TAKE_PTR(d);
                return EXIT_FAILURE;
        }
        return EXIT_SUCCESS;
}
