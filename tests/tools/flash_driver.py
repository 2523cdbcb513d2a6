"""The flash driver: a small C program, compiled with gcc from
daemon/flash/*.c and the protocol, transport and shared files they use,
that runs ONE flasher of daemon/flash/ against whatever answers on its link
(a simulator) and prints its progress, result and the wall time of the
flasher's write().  test_flashers.py runs it (with sanitizers) to check
the flashers; scripts/bench (tests/tools/bench.py) runs it (optimised,
without sanitizers) to time them.  This module only builds it, makes its
command lines and parses what it prints; what to flash and what to check
or measure is the caller's.
"""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SOURCES = ["daemon/flash/flasher.c", "daemon/flash/katapult.c", "daemon/flash/dfu.c",
           "daemon/flash/picoboot.c", "daemon/flash/linux.c",
           "daemon/proto/katapult.c", "daemon/proto/klipper.c",
           "daemon/proto/dfu.c", "daemon/proto/picoboot.c",
           "daemon/transport/serial.c", "daemon/transport/can.c", "daemon/transport/usb.c",
           "daemon/transport/holders.c", "daemon/transport/fdwait.c"]
# Helpers the protocol files may have split out (linked when present).
OPTIONAL_SOURCES = ["daemon/proto/stream.c"]
CFLAGS = ["-std=gnu11", "-g", "-Wall", "-Wextra", "-Wshadow", "-Wmissing-prototypes",
          "-Wstrict-prototypes", "-Werror", "-D_GNU_SOURCE"]
SANITIZE_CFLAGS = ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
# The daemon's own build is debugoptimized (-O2 -g).
BENCH_CFLAGS = ["-O2"]
# umockdev's preload comes before the ASan runtime.
ASAN_OPTIONS = "verify_asan_link_order=0:detect_leaks=1"

DRIVER = r"""
/* Runs one flasher of daemon/flash/ against a simulated bootloader and
 * prints its progress and result:
 *   driver BOOTLOADER LINK IMAGE START APP_START [mcu=NAME] [cancel-after=N]
 * LINK is serial:PATH, usb:BUS:DEV, can:IFACE:NODEID or file:PATH (where
 * the Linux process MCU's program goes).  Output lines:
 *   PROGRESS <phase> <done> <total>
 *   RESULT <errno or 0> <message>
 *   TIME <seconds>      (wall time of the flasher's write(), for scripts/bench)
 * cancel-after=N sets the cancel flag after the Nth progress report of the
 * writing phase. */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flash/flasher.h"
#include "shared/log.h"
#include "shared/time-util.h"

struct driver {
        atomic_bool cancel;
        unsigned cancel_after;
        unsigned writing_reports;
};

static void on_progress(void *userdata, enum flash_phase phase, uint64_t done, uint64_t total) {
        struct driver *d = userdata;

        printf("PROGRESS %s %llu %llu\n", flash_phase_to_string(phase), (unsigned long long) done,
               (unsigned long long) total);
        fflush(stdout);
        if (phase == FLASH_PHASE_WRITING && ++d->writing_reports == d->cancel_after)
                atomic_store(&d->cancel, true);
}

static uint8_t *read_image(const char *path, size_t *ret_size) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        uint8_t *buf = NULL;
        size_t size = 0, n;
        uint8_t chunk[4096];

        if (!f)
                return NULL;
        while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
                uint8_t *p = realloc(buf, size + n);

                if (!p) {
                        free(buf);
                        return NULL;
                }
                buf = p;
                memcpy(buf + size, chunk, n);
                size += n;
        }
        *ret_size = size;
        return buf;
}

int main(int argc, char **argv) {
        struct driver d = { .cancel = false };
        struct flash_session s = {};
        const struct flasher *f;
        _cleanup_free_ uint8_t *image = NULL;
        char link_arg[256], *p;
        size_t size = 0;
        uint64_t started;
        int r;

        if (argc < 6)
                return 1;
        log_set_max_level(LOG_DEBUG);
        f = flasher_find(argv[1]);
        if (!f) {
                printf("RESULT %d no flasher for %s\n", ENOENT, argv[1]);
                return 0;
        }

        snprintf(link_arg, sizeof(link_arg), "%s", argv[2]);
        if (startswith(link_arg, "serial:")) {
                s.link = FLASH_LINK_SERIAL;
                s.device_path = argv[2] + strlen("serial:");
        } else if (startswith(link_arg, "usb:")) {
                s.link = FLASH_LINK_USB;
                if (sscanf(link_arg + 4, "%u:%u", &s.usb_busnum, &s.usb_devnum) != 2)
                        return 1;
        } else if (startswith(link_arg, "can:")) {
                s.link = FLASH_LINK_CAN;
                p = strchr(link_arg + 4, ':');
                if (!p)
                        return 1;
                *p = '\0';
                s.can_interface = link_arg + 4;
                s.can_nodeid = (unsigned) strtoul(p + 1, NULL, 0);
        } else if (startswith(link_arg, "file:")) {
                s.link = FLASH_LINK_FILE;
                s.install_path = argv[2] + strlen("file:");
        } else
                return 1;

        image = read_image(argv[3], &size);
        if (!image)
                return 1;
        s.data = image;
        s.size = size;
        s.start = strtoull(argv[4], NULL, 0);
        s.app_start = strtoull(argv[5], NULL, 0);
        for (int i = 6; i < argc; i++) {
                if (startswith(argv[i], "mcu="))
                        s.mcu_type = argv[i] + 4;
                else if (startswith(argv[i], "cancel-after="))
                        d.cancel_after = (unsigned) strtoul(argv[i] + 13, NULL, 0);
                else
                        return 1;
        }
        s.progress = on_progress;
        s.userdata = &d;
        s.cancel = &d.cancel;

        started = now_usec();
        r = f->write(&s);
        printf("TIME %.6f\n", (double) (now_usec() - started) / 1e6);
        printf("RESULT %d %s\n", -r, s.message);
        return 0;
}
"""


class BuildError(RuntimeError):
    pass


def build(out_dir, sanitize=True, env=None):
    """Compile the driver into @out_dir; returns the executable's path.
    sanitize: ASan + UBSan at -O1 (tests), else -O2 as the daemon (bench).
    BuildError with gcc's output when it fails."""
    src = os.path.join(str(out_dir), "flash-driver.c")
    with open(src, "w") as f:
        f.write(DRIVER)
    exe = os.path.join(str(out_dir), "flash-driver")
    cflags = subprocess.run(["pkg-config", "--cflags", "libusb-1.0"], capture_output=True,
                            text=True, check=True).stdout.split()
    shared = sorted(os.path.join("daemon/shared", f)
                    for f in os.listdir(os.path.join(REPO, "daemon/shared")) if f.endswith(".c"))
    sources = SOURCES + shared + [s for s in OPTIONAL_SOURCES if os.path.exists(os.path.join(REPO, s))]
    cmd = ["gcc"] + CFLAGS + (SANITIZE_CFLAGS if sanitize else BENCH_CFLAGS) + \
        ["-I", os.path.join(REPO, "daemon")] + cflags + [src] + \
        [os.path.join(REPO, s) for s in sources] + ["-lusb-1.0", "-lz", "-ljson-c", "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BuildError("driver build failed:\n" + proc.stderr)
    return exe


def command(exe, bootloader, link, image_path, start, app_start, *options):
    """The driver's argv for one flash."""
    return [exe, bootloader, link, str(image_path), "%#x" % start, "%#x" % app_start] + \
        list(options)


class Output:
    """What one driver run printed: .errno (0 = success, None = no RESULT
    line), .message, .progress [(phase, done, total)], .seconds (wall
    time of write(), None if not printed)."""

    def __init__(self, stdout):
        self.progress = []
        self.errno = None
        self.message = ""
        self.seconds = None
        for line in stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "PROGRESS":
                phase, done, total = rest.split()
                self.progress.append((phase, int(done), int(total)))
            elif kind == "TIME":
                self.seconds = float(rest)
            elif kind == "RESULT":
                code, _, self.message = rest.partition(" ")
                self.errno = int(code)
