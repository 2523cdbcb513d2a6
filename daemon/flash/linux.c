/* "Flashing" the Linux process MCU (protocols.md §4.6, §17.3): Klipper's
 * scripts/flash-linux.sh copies out/klipper.elf over
 * /usr/local/bin/klipper_mcu and restarts the service.  This does the same
 * without a moment in which the program is missing or half written:
 *
 *   write the image to a new file next to the program (same file system),
 *   with the old program's mode and owner (0755 root without one), fsync,
 *   read it back and compare → hard-link the old program to PROGRAM.old
 *   (kept: the roll-back copy, and for a person who wants it back) →
 *   rename() the new file over PROGRAM → fsync the directory.
 *
 * A failure before the rename leaves PROGRAM as it was.  Restarting the
 * service and deciding whether the new program answers is the flash job's
 * (core/flash-linux.c); putting the old one back is
 * flasher_linux_restore(). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flash/flasher.h"
#include "shared/log.h"

/* Bytes per write() and per progress report. */
#define LINUX_INSTALL_CHUNK (64 * 1024)

static int path_with_suffix(const char *path, const char *suffix, char **ret) {
        return asprintf(ret, "%s%s", path, suffix) < 0 ? -ENOMEM : 0;
}

/* The directory of @path, for the temporary file and the final fsync. */
static int path_directory(const char *path, char **ret) {
        const char *slash = strrchr(path, '/');

        if (!slash)
                return -EINVAL;
        *ret = slash == path ? strdup("/") : strndup(path, (size_t) (slash - path));
        return *ret ? 0 : -ENOMEM;
}

static int fsync_directory_of(const char *path) {
        _cleanup_free_ char *dir = NULL;
        _cleanup_close_ int fd = -1;
        int r;

        r = path_directory(path, &dir);
        if (r < 0)
                return r;
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                return -errno;
        return 0;
}

static int write_image(struct flash_session *s, int fd) {
        for (size_t done = 0; done < s->size;) {
                size_t n = MIN((size_t) LINUX_INSTALL_CHUNK, s->size - done);
                ssize_t k;

                if (flash_session_cancelled(s))
                        return flash_session_fail(s, -ECANCELED, "Cancelled before %s was replaced",
                                                  s->install_path);
                k = write(fd, s->data + done, n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return flash_session_fail(s, k < 0 ? -errno : -EIO, "Cannot write the new program "
                                                  "next to %s: %s", s->install_path,
                                                  k < 0 ? strerror(errno) : "short write");
                done += (size_t) k;
                flash_session_progress(s, FLASH_PHASE_WRITING, done, s->size);
        }
        if (fsync(fd) < 0)
                return flash_session_fail(s, -errno, "Cannot write the new program next to %s: %m",
                                          s->install_path);
        return 0;
}

static int verify_image(struct flash_session *s, int fd) {
        _cleanup_free_ uint8_t *buf = malloc(LINUX_INSTALL_CHUNK);
        struct stat st;

        if (!buf)
                return flash_session_fail(s, -ENOMEM, "Out of memory");
        if (fstat(fd, &st) < 0)
                return flash_session_fail(s, -errno, "Cannot read back the new program: %m");
        if ((uint64_t) st.st_size != s->size)
                return flash_session_fail(s, -EIO, "The new program has %" PRIu64 " bytes on disk, not %zu",
                                          (uint64_t) st.st_size, s->size);
        for (size_t done = 0; done < s->size;) {
                size_t n = MIN((size_t) LINUX_INSTALL_CHUNK, s->size - done);
                ssize_t k = pread(fd, buf, n, (off_t) done), at;

                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return flash_session_fail(s, -EIO, "Cannot read back the new program: %s",
                                                  k < 0 ? strerror(errno) : "file ends early");
                at = flash_compare(buf, s->data + done, (size_t) k);
                if (at >= 0)
                        return flash_session_fail(s, -EIO, "The new program reads back different at byte %zu",
                                                  done + (size_t) at);
                done += (size_t) k;
                flash_session_progress(s, FLASH_PHASE_VERIFYING, done, s->size);
        }
        return 0;
}

/* Make @link_path another name of @path, replacing what it was, in one
 * step (link to a temporary name, rename over). */
static int link_replacing(const char *path, const char *link_path) {
        _cleanup_free_ char *tmp = NULL;

        if (path_with_suffix(link_path, ".mcuflashd-link", &tmp) < 0)
                return -ENOMEM;
        (void) unlink(tmp);
        if (link(path, tmp) < 0)
                return -errno;
        if (rename(tmp, link_path) < 0) {
                int r = -errno;

                (void) unlink(tmp);
                return r;
        }
        return 0;
}

static int linux_install(struct flash_session *s) {
        _cleanup_free_ char *dir = NULL, *tmp = NULL, *old = NULL;
        _cleanup_close_ int fd = -1;
        struct stat st;
        bool have_old;
        int r;

        if (isempty(s->install_path) || s->install_path[0] != '/')
                return flash_session_fail(s, -EINVAL, "No absolute path to install klipper_mcu at");
        if (!s->data || s->size == 0)
                return flash_session_fail(s, -EINVAL, "The image is empty");
        r = path_directory(s->install_path, &dir);
        if (r < 0)
                return flash_session_fail(s, r, "Cannot install at %s", s->install_path);
        if (asprintf(&tmp, "%s/.klipper_mcu.mcuflashd-XXXXXX", dir) < 0 ||
            path_with_suffix(s->install_path, ".old", &old) < 0)
                return flash_session_fail(s, -ENOMEM, "Out of memory");

        have_old = lstat(s->install_path, &st) >= 0;
        if (!have_old && errno != ENOENT)
                return flash_session_fail(s, -errno, "Cannot look at %s: %m", s->install_path);
        if (have_old && !S_ISREG(st.st_mode))
                return flash_session_fail(s, -EINVAL, "%s is not a regular file; not replaced",
                                          s->install_path);

        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return flash_session_fail(s, -errno, "Cannot create a file in %s: %m", dir);
        /* The old program's mode and owner, else what `make flash` leaves. */
        if (fchmod(fd, have_old ? (st.st_mode & 07755) : 0755) < 0 ||
            (have_old && fchown(fd, st.st_uid, st.st_gid) < 0)) {
                r = flash_session_fail(s, -errno, "Cannot set the mode of the new program: %m");
                goto fail;
        }
        flash_session_progress(s, FLASH_PHASE_WRITING, 0, s->size);
        r = write_image(s, fd);
        if (r < 0)
                goto fail;
        r = verify_image(s, fd);
        if (r < 0)
                goto fail;
        if (flash_session_cancelled(s)) {
                r = flash_session_fail(s, -ECANCELED, "Cancelled before %s was replaced", s->install_path);
                goto fail;
        }

        if (have_old) {
                r = link_replacing(s->install_path, old);
                if (r < 0) {
                        r = flash_session_fail(s, r, "Cannot keep the old program as %s: %s", old, strerror(-r));
                        goto fail;
                }
        }
        if (rename(tmp, s->install_path) < 0) {
                r = flash_session_fail(s, -errno, "Cannot put the new program at %s: %m", s->install_path);
                goto fail;
        }
        r = fsync_directory_of(s->install_path);
        if (r < 0)
                log_warning_errno(r, "Cannot sync the directory of %s: %m", s->install_path);
        log_info("Installed %zu bytes at %s%s%s.", s->size, s->install_path, have_old ? "; the old program is " : "",
                 have_old ? old : "");
        return 0;

fail:
        (void) unlink(tmp);
        return r;
}

int flasher_linux_restore(const char *path, char *message, size_t message_size) {
        _cleanup_free_ char *old = NULL;
        int r;

        if (path_with_suffix(path, ".old", &old) < 0)
                return -ENOMEM;
        if (access(old, F_OK) < 0) {
                r = -errno;
                snprintf(message, message_size, "there is no %s to go back to", old);
                return r;
        }
        /* A link, not a move: PROGRAM.old stays the copy to go back to. */
        r = link_replacing(old, path);
        if (r < 0) {
                snprintf(message, message_size, "cannot put %s back at %s: %s", old, path, strerror(-r));
                return r;
        }
        r = fsync_directory_of(path);
        if (r < 0)
                log_warning_errno(r, "Cannot sync the directory of %s: %m", path);
        log_info("Put the previous program back at %s (from %s).", path, old);
        message[0] = '\0';
        return 0;
}

const struct flasher flasher_linux = {
        .bootloader = "linux",
        .write = linux_install,
};
