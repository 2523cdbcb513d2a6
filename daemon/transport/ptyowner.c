/* Implementation of ptyowner.h.  Finding the holders of a pty master walks
 * every /proc/PID/fd, reads each fd's link and the fdinfo of those that are
 * /dev/ptmx: a few thousand system calls on a busy host, so callers do it
 * when something changed, not on a timer.  Processes we may not inspect
 * are skipped (the daemon runs as root, so in practice none are). */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "shared/macro.h"
#include "transport/ptyowner.h"

#define PTY_SLAVE_MAJOR_FIRST 136    /* UNIX98_PTY_SLAVE_MAJOR */
#define PTY_SLAVE_MAJORS 8
#define PTMX_MAJOR 5
#define PTMX_MINOR 2
#define FDINFO_MAX 4096

static void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

int pty_slave_index(dev_t rdev) {
        unsigned maj = major(rdev);

        if (maj < PTY_SLAVE_MAJOR_FIRST || maj >= PTY_SLAVE_MAJOR_FIRST + PTY_SLAVE_MAJORS)
                return -1;
        return (int) ((maj - PTY_SLAVE_MAJOR_FIRST) * 256 + minor(rdev));
}

bool pty_is_ptmx(dev_t rdev) {
        return major(rdev) == PTMX_MAJOR && minor(rdev) == PTMX_MINOR;
}

int pty_fdinfo_tty_index(const char *text) {
        static const char key[] = "tty-index:";

        const char *line = text;

        while (line && *line) {
                const char *p;
                char *end;
                long v;

                if (strncmp(line, key, sizeof(key) - 1) != 0) {
                        line = strchr(line, '\n');
                        line = line ? line + 1 : NULL;
                        continue;
                }
                p = line + sizeof(key) - 1;
                p += strspn(p, " \t");
                if (*p < '0' || *p > '9')
                        return -EBADMSG;
                errno = 0;
                v = strtol(p, &end, 10);
                if (errno != 0 || v > INT_MAX || (*end != '\n' && *end != '\0'))
                        return -EBADMSG;
                return (int) v;
        }
        return -ENOENT;
}

int pty_master_index(pid_t pid, const char *fd_name) {
        char path[64], text[FDINFO_MAX];
        _cleanup_close_ int fd = -1;
        size_t len = 0;
        ssize_t n = 0;

        snprintf(path, sizeof(path), "/proc/%d/fdinfo/%s", (int) pid, fd_name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        while (len < sizeof(text) - 1 && (n = read(fd, text + len, sizeof(text) - 1 - len)) > 0)
                len += (size_t) n;
        if (n < 0)
                return -errno;
        text[len] = 0;
        return pty_fdinfo_tty_index(text);
}

/* Is fd @name in the /proc/PID/fd directory @dir a /dev/ptmx?  The link's
 * text is looked at first: a stat() of every fd's file could hang on a
 * dead network mount, a stat() of a device node cannot. */
static bool fd_is_ptmx(DIR *dir, const char *name) {
        char target[64];
        struct stat st;
        ssize_t n;

        n = readlinkat(dirfd(dir), name, target, sizeof(target) - 1);
        if (n < 0)
                return false;
        target[n] = 0;
        if (!startswith(target, "/dev/") || n < 5 || !streq(target + n - 5, "/ptmx"))
                return false;
        return fstatat(dirfd(dir), name, &st, 0) >= 0 && S_ISCHR(st.st_mode) && pty_is_ptmx(st.st_rdev);
}

int pty_process_holds_master(pid_t pid, int index) {
        _cleanup_(closedirp) DIR *fds = NULL;
        char path[64];
        struct dirent *e;

        snprintf(path, sizeof(path), "/proc/%d/fd", (int) pid);
        fds = opendir(path);
        if (!fds)
                return errno == ENOENT ? -ESRCH : -errno;
        while ((e = readdir(fds))) {
                if (e->d_name[0] == '.' || !fd_is_ptmx(fds, e->d_name))
                        continue;
                if (pty_master_index(pid, e->d_name) == index)
                        return 1;
        }
        return 0;
}

pid_t proc_next_pid(DIR *proc) {
        struct dirent *e;

        while ((e = readdir(proc))) {
                char *end;
                long pid = strtol(e->d_name, &end, 10);

                if (!*end && pid > 0 && pid <= INT_MAX)
                        return (pid_t) pid;
        }
        return 0;
}

int pty_find_master_holders(int index, pid_t *pids, size_t max) {
        _cleanup_(closedirp) DIR *proc = NULL;
        pid_t pid;
        int n = 0;

        if (index < 0)
                return -EINVAL;
        proc = opendir("/proc");
        if (!proc)
                return -errno;
        while ((pid = proc_next_pid(proc)) > 0)
                if (pty_process_holds_master(pid, index) > 0) {
                        if ((size_t) n < max)
                                pids[n] = pid;
                        n++;
                }
        return n;
}

/* The effective user of @pid, from the "Uid:" line of /proc/PID/status
 * (real, effective, saved, fs); the owner of /proc/PID is root for a
 * process that dropped root's rights, so it does not tell. */
static int process_euid(pid_t pid, uid_t *ret) {
        char path[64], text[FDINFO_MAX];
        _cleanup_close_ int fd = -1;
        unsigned long real, effective;
        size_t len = 0;
        ssize_t n = 0;
        const char *line;

        snprintf(path, sizeof(path), "/proc/%d/status", (int) pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return errno == ENOENT ? -ESRCH : -errno;
        while (len < sizeof(text) - 1 && (n = read(fd, text + len, sizeof(text) - 1 - len)) > 0)
                len += (size_t) n;
        if (n < 0)
                return errno == ESRCH ? -ESRCH : -errno;
        text[len] = 0;
        line = strstr(text, "\nUid:");
        if (!line || sscanf(line + 5, "%lu %lu", &real, &effective) != 2)
                return -EBADMSG;
        *ret = (uid_t) effective;
        return 0;
}

int process_identity_read(pid_t pid, struct process_identity *ret) {
        static const char deleted[] = " (deleted)";
        char path[64];
        _cleanup_close_ int fd = -1;
        ssize_t n;

        int r;

        *ret = (struct process_identity) {};
        r = process_euid(pid, &ret->uid);
        if (r < 0)
                return r;
        snprintf(path, sizeof(path), "/proc/%d/comm", (int) pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return errno == ENOENT ? -ESRCH : -errno;
        n = read(fd, ret->comm, sizeof(ret->comm) - 1);
        if (n < 0)
                return -errno;
        ret->comm[n] = 0;
        ret->comm[strcspn(ret->comm, "\n")] = 0;

        /* Kernel threads and zombies have no executable: "" then. */
        snprintf(path, sizeof(path), "/proc/%d/exe", (int) pid);
        n = readlink(path, ret->exe, sizeof(ret->exe) - 1);
        if (n < 0) {
                ret->exe[0] = 0;
                return 0;
        }
        ret->exe[n] = 0;
        if ((size_t) n > sizeof(deleted) - 1 && streq(ret->exe + n - (sizeof(deleted) - 1), deleted)) {
                ret->exe[n - (sizeof(deleted) - 1)] = 0;
                ret->exe_deleted = true;
        }
        return 0;
}

/* Does the name the kernel gives a program started from a file called
 * @file (its first 15 bytes) equal @comm? */
static bool comm_names_file(const char *comm, const char *file) {
        size_t len = strlen(file);

        if (len > 15)
                len = 15;
        return len > 0 && strlen(comm) == len && strncmp(comm, file, len) == 0;
}

bool process_is_program(const struct process_identity *id, const char *program, uid_t program_owner) {
        const char *base;

        if (!isempty(program) && streq(id->exe, program))
                return true;
        if (id->uid != 0 && (program_owner == (uid_t) -1 || id->uid != program_owner))
                return false;
        base = program ? strrchr(program, '/') : NULL;
        base = base ? base + 1 : program;
        return comm_names_file(id->comm, "klipper_mcu") || (!isempty(base) && comm_names_file(id->comm, base));
}
