/* Implementation of fdwait.h: poll() one fd until a deadline.  It never
 * reads or writes the fd and maps nothing but a timeout and POLLNVAL. */
#include <errno.h>
#include <poll.h>
#include <stdint.h>

#include "shared/macro.h"
#include "shared/time-util.h"
#include "transport/fdwait.h"

uint64_t deadline_after_ms(int timeout_ms) {
        return timeout_ms < 0 ? UINT64_MAX : now_msec() + (uint64_t) timeout_ms;
}

int deadline_poll_timeout(uint64_t deadline) {
        uint64_t now;

        if (deadline == UINT64_MAX)
                return -1;
        now = now_msec();
        return deadline > now ? (int) MIN(deadline - now, (uint64_t) INT32_MAX) : 0;
}

int fd_wait_ready(int fd, short events, uint64_t deadline) {
        for (;;) {
                struct pollfd p = { .fd = fd, .events = events };
                int r;

                r = poll(&p, 1, deadline_poll_timeout(deadline));
                if (r < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (r == 0)
                        return -ETIMEDOUT;
                if (p.revents & POLLNVAL)
                        return -EBADF;
                return p.revents;
        }
}
