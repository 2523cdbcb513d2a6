/* Implementation of errors.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "bus/errors.h"
#include "shared/strutil.h"

static const char *const error_names[_MCUFLASH_ERROR_MAX] = {
        [MCUFLASH_ERROR_NOT_AUTHORIZED] = "io.mcuflash1.Error.NotAuthorized",
        [MCUFLASH_ERROR_NOT_FOUND] = "io.mcuflash1.Error.NotFound",
        [MCUFLASH_ERROR_BUSY] = "io.mcuflash1.Error.Busy",
        [MCUFLASH_ERROR_PRINTING] = "io.mcuflash1.Error.Printing",
        [MCUFLASH_ERROR_INVALID_IMAGE] = "io.mcuflash1.Error.InvalidImage",
        [MCUFLASH_ERROR_IMAGE_MISMATCH] = "io.mcuflash1.Error.ImageMismatch",
        [MCUFLASH_ERROR_UNSUPPORTED] = "io.mcuflash1.Error.Unsupported",
        [MCUFLASH_ERROR_TIMEOUT] = "io.mcuflash1.Error.Timeout",
        [MCUFLASH_ERROR_PROTOCOL] = "io.mcuflash1.Error.Protocol",
        [MCUFLASH_ERROR_DISCONNECTED] = "io.mcuflash1.Error.Disconnected",
        [MCUFLASH_ERROR_CANCELLED] = "io.mcuflash1.Error.Cancelled",
};

const char *mcuflash_error_name(enum mcuflash_error e) {
        return e < _MCUFLASH_ERROR_MAX ? error_names[e] : NULL;
}

int bus_error_setf(sd_bus_error *error, enum mcuflash_error e, const char *fmt, ...) {
        _cleanup_free_ char *text = NULL, *clean = NULL;
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&text, fmt, ap);
        va_end(ap);
        /* Messages may quote an MCU's or an image's text; a reply with
         * invalid UTF-8 could not be sent at all. */
        clean = r < 0 ? NULL : utf8_sanitize(text);
        return sd_bus_error_set(error, mcuflash_error_name(e), clean ?: "Out of memory.");
}

int bus_error_from_errno(sd_bus_error *error, int r, const char *message) {
        enum mcuflash_error e;

        switch (r) {
        case -ETIMEDOUT: e = MCUFLASH_ERROR_TIMEOUT; break;
        case -ENODEV: e = MCUFLASH_ERROR_DISCONNECTED; break;
        case -EBUSY: e = MCUFLASH_ERROR_BUSY; break;
        case -EBADMSG:
        case -EPROTO:
        case -E2BIG: e = MCUFLASH_ERROR_PROTOCOL; break;
        case -ECANCELED: e = MCUFLASH_ERROR_CANCELLED; break;
        case -EOPNOTSUPP: e = MCUFLASH_ERROR_UNSUPPORTED; break;
        default:
                return sd_bus_error_set_errnof(error, -r, "%s", message);
        }
        return bus_error_setf(error, e, "%s", message);
}
