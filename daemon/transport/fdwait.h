/* Waiting on one fd against a deadline, for the transports (serial.c,
 * can.c): deadlines are CLOCK_MONOTONIC milliseconds (now_msec()), and
 * UINT64_MAX means "wait forever".  What a caller makes of a timeout or of
 * POLLHUP/POLLERR (-ETIMEDOUT, a gone device, …) stays with the caller. */
#pragma once

#include <stdint.h>

/* The deadline @timeout_ms from now; a negative timeout means forever. */
uint64_t deadline_after_ms(int timeout_ms);

/* The poll() timeout left until @deadline: -1 for forever, 0 once passed. */
int deadline_poll_timeout(uint64_t deadline);

/* Wait until @fd is ready for @events (POLLIN or POLLOUT) or @deadline has
 * passed, retrying after signals.  Returns the revents (> 0), -ETIMEDOUT,
 * -EBADF for a closed fd, or -errno. */
int fd_wait_ready(int fd, short events, uint64_t deadline);
