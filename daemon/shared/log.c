/* Implementation of log.h: formats one line per call and writes it with a
 * single write(2), so lines from worker threads never interleave. */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

static atomic_int max_level = LOG_INFO;

void log_set_max_level(int level) {
        max_level = level;
}

int log_get_max_level(void) {
        return max_level;
}

int log_internal(int level, int error, const char *file, int line, const char *fmt, ...) {
        char buf[2048];
        va_list ap;
        int n;

        if (error < 0)
                error = -error;

        if (level > max_level)
                return -error;

        n = snprintf(buf, sizeof(buf), "<%d>", level);
        errno = error;
        va_start(ap, fmt);
        n += vsnprintf(buf + n, sizeof(buf) - (size_t) n - 1, fmt, ap);
        va_end(ap);
        if (n > (int) sizeof(buf) - 2)
                n = (int) sizeof(buf) - 2;
        if (max_level >= LOG_DEBUG && file)
                n += snprintf(buf + n, sizeof(buf) - (size_t) n - 1, " (%s:%d)", file, line);
        if (n > (int) sizeof(buf) - 2)
                n = (int) sizeof(buf) - 2;
        buf[n++] = '\n';
        (void) !write(STDERR_FILENO, buf, (size_t) n);
        return -error;
}
