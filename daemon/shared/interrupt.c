/* Implementation of interrupt.h: a thread-local pointer to the running
 * job's cancel flag and a sleep in INTERRUPT_CHECK_MSEC slices. */
#include <errno.h>
#include <time.h>

#include "shared/interrupt.h"
#include "shared/macro.h"
#include "shared/time-util.h"

/* Per thread, like errno: which job's flag the running task watches. */
static _Thread_local const atomic_bool *thread_cancel_flag;

void interrupt_set_flag(const atomic_bool *flag) {
        thread_cancel_flag = flag;
}

bool interrupt_requested(void) {
        return thread_cancel_flag && atomic_load(thread_cancel_flag);
}

int interruptible_sleep_msec(unsigned ms) {
        uint64_t deadline = now_msec() + ms;

        for (;;) {
                uint64_t now = now_msec();
                uint64_t slice;
                struct timespec ts;

                if (interrupt_requested())
                        return -ECANCELED;
                if (now >= deadline)
                        return 0;
                slice = MIN(deadline - now, (uint64_t) INTERRUPT_CHECK_MSEC);
                ts = (struct timespec) { .tv_sec = 0, .tv_nsec = (long) slice * 1000000L };
                /* EINTR: look at the flag and the clock again. */
                (void) nanosleep(&ts, NULL);
        }
}
