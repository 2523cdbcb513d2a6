/* Implementation of holders.h: stat the device, then compare st_rdev with
 * every fd of every other process.  Processes we may not inspect are
 * skipped (the daemon runs as root, so in practice none are).
 *
 * A pseudo terminal (the Linux process MCU's /tmp/klipper_host_mcu) is held
 * open on its slave side by the process that created it — klipper_mcu keeps
 * both ends so that it never sees a hangup.  That process also holds the
 * matching master (a /dev/ptmx fd whose fdinfo names the same "tty-index"),
 * and it is the MCU itself, not a competing user: it does not count
 * (transport/ptyowner.c reads that). */
#include <dirent.h>
#include <limits.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shared/macro.h"
#include "transport/holders.h"
#include "transport/ptyowner.h"

static void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

/* Does @pid hold @rdev, other than as the owner of that pty (see above)? */
static bool process_holds(pid_t pid, dev_t rdev) {
        _cleanup_(closedirp) DIR *fds = NULL;
        int pts = pty_slave_index(rdev);
        bool holds = false, owns_master = false;
        char path[64];
        struct dirent *e;

        snprintf(path, sizeof(path), "/proc/%d/fd", (int) pid);
        fds = opendir(path);
        if (!fds)
                return false;
        while ((e = readdir(fds))) {
                struct stat st;

                if (e->d_name[0] == '.')
                        continue;
                if (fstatat(dirfd(fds), e->d_name, &st, 0) < 0 || !S_ISCHR(st.st_mode))
                        continue;
                if (st.st_rdev == rdev)
                        holds = true;
                else if (pts >= 0 && pty_is_ptmx(st.st_rdev) && pty_master_index(pid, e->d_name) == pts)
                        owns_master = true;
        }
        return holds && !owns_master;
}

static void read_comm(pid_t pid, char *comm, size_t size) {
        char path[64];
        _cleanup_close_ int fd = -1;
        ssize_t n;

        if (!comm || size == 0)
                return;
        comm[0] = 0;
        snprintf(path, sizeof(path), "/proc/%d/comm", (int) pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return;
        n = read(fd, comm, size - 1);
        if (n <= 0)
                return;
        comm[n] = 0;
        comm[strcspn(comm, "\n")] = 0;
}

int tty_find_holder(const char *path, pid_t *ret_pid, char *comm, size_t comm_size) {
        _cleanup_(closedirp) DIR *proc = NULL;
        pid_t self = getpid(), pid;
        struct stat st;

        if (stat(path, &st) < 0)
                return -errno;
        if (!S_ISCHR(st.st_mode))
                return -ENOTTY;
        proc = opendir("/proc");
        if (!proc)
                return -errno;
        while ((pid = proc_next_pid(proc)) > 0) {
                if (pid == self)
                        continue;
                if (process_holds(pid, st.st_rdev)) {
                        if (ret_pid)
                                *ret_pid = (pid_t) pid;
                        read_comm((pid_t) pid, comm, comm_size);
                        return 1;
                }
        }
        return 0;
}
