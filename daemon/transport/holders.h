/* Who else has a tty open?  Root bypasses TIOCEXCL and a flock() is only
 * advisory, so before opening a port the daemon looks through /proc for any
 * other process holding the same character device — a running Klipper, a
 * terminal program, a flasher — and leaves the port alone if there is one. */
#pragma once

#include <sys/types.h>

/* Returns 1 and the holder's pid (and its comm name in @comm, if given) when
 * another process has @path's device open, 0 when none does, -errno when
 * @path cannot be examined. */
int tty_find_holder(const char *path, pid_t *ret_pid, char *comm, size_t comm_size);
