/* Who owns a pseudo terminal: the process that holds its master side.
 *
 * A pty slave /dev/pts/N says nothing about who created it, and a symlink
 * to it (the Linux process MCU's /tmp/klipper_host_mcu) outlives the
 * program that made it: pty numbers are reused within seconds, so a
 * leftover link may lead to anybody's terminal.  The kernel names the slave
 * of every /dev/ptmx fd in /proc/PID/fdinfo/FD ("tty-index: N"); this module
 * reads that to find the master's holders, and tells the Klipper Linux MCU
 * program from anything else by its executable and name.  It only reads
 * /proc; it opens no terminal and keeps no state. */
#pragma once

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <dirent.h>
#include <sys/types.h>

/* The index N of the pty slave device /dev/pts/N with device number @rdev,
 * or -1 when @rdev is no pty slave. */
int pty_slave_index(dev_t rdev);

/* Is @rdev the pty multiplexer /dev/ptmx (also /dev/pts/ptmx)? */
bool pty_is_ptmx(dev_t rdev);

/* The "tty-index:" value in the text of a /proc/PID/fdinfo/FD file: >= 0,
 * or -ENOENT when there is none (not a pty master, or a kernel that does
 * not tell), -EBADMSG when the value is not a number. */
int pty_fdinfo_tty_index(const char *text);

/* The pts index of the pty master that @pid has open as fd @fd_name (a
 * decimal string, as in /proc/PID/fd), or -errno. */
int pty_master_index(pid_t pid, const char *fd_name);

/* Does @pid hold the master of /dev/pts/@index?  1, 0, or -errno when its
 * fds cannot be read (-ESRCH: it has exited). */
int pty_process_holds_master(pid_t pid, int index);

/* Every process holding the master of /dev/pts/@index: up to @max pids in
 * @pids.  Returns how many there are (which may exceed @max), or -errno. */
int pty_find_master_holders(int index, pid_t *pids, size_t max);

/* The next process id in an opendir("/proc") listing, skipping what is
 * not a process; 0 at the end. */
pid_t proc_next_pid(DIR *proc);

struct process_identity {
        char exe[PATH_MAX];     /* /proc/PID/exe without " (deleted)"; "" if unknown */
        bool exe_deleted;       /* the file it runs was replaced or removed since */
        char comm[16];          /* /proc/PID/comm: the name the kernel gave it */
        uid_t uid;              /* its effective user */
};

/* Read @pid's executable, name and user.  -errno (-ESRCH: exited). */
int process_identity_read(pid_t pid, struct process_identity *ret);

/* Is a process with identity @id the Klipper Linux MCU program installed
 * at @program (an absolute path) and owned by @program_owner ((uid_t) -1
 * when there is no such file)?  Yes when it runs @program (also after a
 * new program was installed over the one it started from).  Else when its
 * name is that of @program's file or "klipper_mcu" (as the kernel names a
 * program started from such a file, the first 15 bytes) — a name anybody
 * can take, so only for a process of root or of @program_owner. */
bool process_is_program(const struct process_identity *id, const char *program, uid_t program_owner);
