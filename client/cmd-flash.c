/* mcuflashctl flash MCU IMAGE: open the image as the calling user, pass the
 * open file to Mcu.Flash (the daemon never opens a path it is given), and
 * follow the job with its phase, bytes and progress until the MCU runs the
 * new firmware. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "client.h"
#include "job-wait.h"

static const char flash_usage[] =
        "Usage: mcuflashctl flash MCU IMAGE [--force] [--no-wait] [--json] [--keep-klipper]\n"
        "\n"
        "Write a Klipper image (out/klipper.bin, klipper.elf, klipper.elf.hex or\n"
        "klipper.uf2) to an MCU: it is checked first (MCU type, flash start of the\n"
        "MCU's bootloader, size), the MCU goes into its bootloader, the image is\n"
        "written and verified, and the MCU starts it; done when Klipper answers\n"
        "with the image's version.  If Klipper holds the MCU and the printer is\n"
        "idle, mcuflashd stops klipper.service for the job and starts it again\n"
        "afterwards.  Ctrl-C cancels the job where that is safe.\n"
        "\n"
        "Options:\n"
        "      --force          Flash even if the MCU runs this version already\n"
        "      --no-wait        Print the job's object path and return at once\n"
        "      --json           Print the finished job as one JSON object\n"
        "      --keep-klipper   Never stop Klipper: fail if it holds the MCU\n"
        "  -h, --help           Show this help and exit\n";

struct flash_args {
        int fd;
        bool force;
        bool stop_klipper;
};

/* The daemon reads only regular files (a memfd is one): a pipe, FIFO or
 * terminal given as IMAGE (/dev/stdin, <(curl ...)) is read here, as the
 * caller, into a memfd first.  Returns the fd to pass, or -errno (told). */
#define IMAGE_MAX_SIZE (16 * 1024 * 1024)

static int image_as_regular_file(int fd, const char *name) {
        _cleanup_close_ int copy = -1;
        char buf[65536];
        size_t total = 0;
        struct stat st;
        ssize_t n;

        if (fstat(fd, &st) < 0)
                return client_error_errno(-errno, "Cannot read %s: %m", name);
        if (S_ISREG(st.st_mode))
                return fd;
        if (S_ISDIR(st.st_mode))
                return client_error_errno(-EISDIR, "%s is a directory, not an image.", name);
        copy = memfd_create("mcuflashctl-image", MFD_CLOEXEC);
        if (copy < 0)
                return client_error_errno(-errno, "Cannot copy %s: %m", name);
        while ((n = read(fd, buf, sizeof(buf))) != 0) {
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return client_error_errno(-errno, "Cannot read %s: %m", name);
                total += (size_t) n;
                if (total > IMAGE_MAX_SIZE)
                        return client_error_errno(-EFBIG, "%s is larger than %d bytes: not an image.", name,
                                                  IMAGE_MAX_SIZE);
                if (write(copy, buf, (size_t) n) != n)
                        return client_error_errno(errno ? -errno : -EIO, "Cannot copy %s: %m", name);
        }
        safe_close(fd);
        return TAKE_FD(copy);
}

static int append_flash_arguments(sd_bus_message *m, void *userdata) {
        const struct flash_args *a = userdata;

        return sd_bus_message_append(m, "ha{sv}", a->fd, 2,
                                     "force", "b", (int) a->force,
                                     "stop-klipper", "b", (int) a->stop_klipper);
}

int verb_flash(int argc, char *argv[]) {
        enum {
                ARG_FORCE = 0x100,
                ARG_NO_WAIT,
                ARG_JSON,
                ARG_KEEP_KLIPPER,
        };
        static const struct option options[] = {
                { "help",         no_argument, NULL, 'h'              },
                { "force",        no_argument, NULL, ARG_FORCE        },
                { "no-wait",      no_argument, NULL, ARG_NO_WAIT      },
                { "json",         no_argument, NULL, ARG_JSON         },
                { "keep-klipper", no_argument, NULL, ARG_KEEP_KLIPPER },
                {}
        };
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(job_info_donep) JobInfo job = {};
        _cleanup_free_ char *mcu_path = NULL;
        _cleanup_close_ int fd = -1;
        struct flash_args args = { .stop_klipper = true };
        bool json = false, no_wait = false;
        int c, r;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        fputs(flash_usage, stdout);
                        return EXIT_SUCCESS;
                case ARG_FORCE:
                        args.force = true;
                        break;
                case ARG_NO_WAIT:
                        no_wait = true;
                        break;
                case ARG_JSON:
                        json = true;
                        break;
                case ARG_KEEP_KLIPPER:
                        args.stop_klipper = false;
                        break;
                default:
                        return client_unknown_option(flash_usage, argv);
                }

        if (optind + 2 > argc)
                return client_usage_error(flash_usage, "missing argument %s", optind >= argc ? "MCU" : "IMAGE");
        if (optind + 2 < argc)
                return client_usage_error(flash_usage, "unexpected argument '%s'", argv[optind + 2]);

        /* Opened here, with the caller's rights. */
        fd = open(argv[optind + 1], O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
                client_error_errno(-errno, "Cannot open %s: %m", argv[optind + 1]);
                return EXIT_FAILURE;
        }
        fd = image_as_regular_file(fd, argv[optind + 1]);
        if (fd < 0)
                return EXIT_FAILURE;
        args.fd = fd;

        r = client_open_bus(&bus);
        if (r < 0)
                return EXIT_FAILURE;
        r = client_resolve_mcu(bus, argv[optind], &mcu_path);
        if (r < 0)
                return EXIT_FAILURE;

        const JobCall call = {
                .object_path = mcu_path,
                .interface = MCUFLASH_MCU_INTERFACE,
                .method = "Flash",
                .append_arguments = append_flash_arguments,
                .userdata = &args,
        };

        r = job_run_verb(bus, &call, json, no_wait, &job);
        if (r >= 0)
                return r;
        if (!json) {
                _cleanup_(mcu_info_donep) McuInfo mcu = {};

                /* Every flash moves bytes; a job without any found the MCU
                 * at the image's version already (only without --force). */
                if (client_get_mcu_info(bus, mcu_path, &mcu) >= 0)
                        printf("%s%s %s %s %s%s\n", isempty(mcu.name) ? "MCU " : "",
                               isempty(mcu.name) ? mcu.id : mcu.name,
                               job.bytes_total == 0 && !args.force ? "already runs" : "runs",
                               mcu.firmware, mcu.firmware_version,
                               job.bytes_total == 0 && !args.force ?
                               "; not flashed (--force flashes it anyway)" : "");
        }
        return EXIT_SUCCESS;
}
