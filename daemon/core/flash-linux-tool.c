/* The Linux process MCU's file step as its own process: `mcuflashd
 * --install-program=PATH` (the image on stdin) and `mcuflashd
 * --restore-program=PATH` (PATH.old back at PATH).  The daemon runs these
 * through systemd as a transient service (core/flash-linux.c,
 * unit_run_transient()) that may write only PATH's directory, so that the
 * daemon itself never needs root's PATH (/usr/local/bin) writable.
 *
 * It prints one line for a person on stdout — what went wrong, or nothing —
 * and exits 0 on success.  SIGTERM before the new program is in place
 * cancels (nothing replaced).  The file work itself is flash/linux.c's. */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/flash-internal.h"
#include "flash/flasher.h"
#include "shared/log.h"

/* The most a klipper_mcu program may be: real ones are ~200 KiB. */
#define LINUX_PROGRAM_MAX (64ULL * 1024 * 1024)

static atomic_bool tool_cancelled;

static void on_sigterm(int sig) {
        atomic_store(&tool_cancelled, true);
}

static int read_stdin(uint8_t **ret, size_t *ret_size) {
        _cleanup_free_ uint8_t *buf = NULL;
        struct stat st;
        size_t size = 0;

        if (fstat(STDIN_FILENO, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || (uint64_t) st.st_size > LINUX_PROGRAM_MAX || st.st_size == 0)
                return -EINVAL;
        buf = malloc((size_t) st.st_size);
        if (!buf)
                return -ENOMEM;
        while (size < (size_t) st.st_size) {
                ssize_t n = pread(STDIN_FILENO, buf + size, (size_t) st.st_size - size, (off_t) size);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                size += (size_t) n;
        }
        *ret = TAKE_PTR(buf);
        *ret_size = size;
        return 0;
}

int flash_linux_tool(const char *mode, const char *path) {
        struct flash_session s = { .link = FLASH_LINK_FILE, .install_path = path, .cancel = &tool_cancelled };
        _cleanup_free_ uint8_t *data = NULL;
        struct sigaction sa = { .sa_handler = on_sigterm };
        int r;

        (void) sigaction(SIGTERM, &sa, NULL);
        if (streq(mode, "restore")) {
                r = flasher_linux_restore(path, s.message, sizeof(s.message));
        } else {
                r = read_stdin(&data, &s.size);
                if (r < 0)
                        snprintf(s.message, sizeof(s.message), "Cannot read the new program from stdin: %s",
                                 strerror(-r));
                else {
                        s.data = data;
                        r = flasher_linux.write(&s);
                }
        }
        if (r < 0) {
                printf("%s\n", isempty(s.message) ? strerror(-r) : s.message);
                return r == -ECANCELED ? 2 : EXIT_FAILURE;
        }
        return EXIT_SUCCESS;
}
