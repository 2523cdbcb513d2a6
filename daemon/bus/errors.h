/* Every D-Bus error the daemon returns is made here: the io.mcuflash1.Error.*
 * names of design.md §3 and the mapping from negative errno values.
 * Handlers never spell an error name themselves. */
#pragma once

#include <systemd/sd-bus.h>

#include "shared/macro.h"

enum mcuflash_error {
        MCUFLASH_ERROR_NOT_AUTHORIZED,
        MCUFLASH_ERROR_NOT_FOUND,
        MCUFLASH_ERROR_BUSY,
        MCUFLASH_ERROR_PRINTING,
        MCUFLASH_ERROR_INVALID_IMAGE,
        MCUFLASH_ERROR_IMAGE_MISMATCH,
        MCUFLASH_ERROR_UNSUPPORTED,
        MCUFLASH_ERROR_TIMEOUT,
        MCUFLASH_ERROR_PROTOCOL,
        MCUFLASH_ERROR_DISCONNECTED,
        MCUFLASH_ERROR_CANCELLED,
        _MCUFLASH_ERROR_MAX,
};

const char *mcuflash_error_name(enum mcuflash_error e);

/* Set @error to the named error with a formatted message (made valid
 * UTF-8); returns the negative value sd-bus handlers return for it. */
int bus_error_setf(sd_bus_error *error, enum mcuflash_error e, const char *fmt, ...) _printf_(3, 4);

/* Map a negative errno from core code to the matching io.mcuflash1 error
 * (-ETIMEDOUT → Timeout, -ENODEV → Disconnected, -EBUSY → Busy, -EBADMSG and
 * -EPROTO → Protocol, -ECANCELED → Cancelled, -EOPNOTSUPP → Unsupported),
 * with @message; other values become the generic errno error. */
int bus_error_from_errno(sd_bus_error *error, int r, const char *message);
