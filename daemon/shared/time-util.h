/* CLOCK_MONOTONIC readings for deadlines and timeouts, in the units the
 * callers compute with. */
#pragma once

#include <stdint.h>
#include <time.h>

static inline uint64_t now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
}

static inline uint64_t now_msec(void) {
        return now_usec() / 1000;
}
