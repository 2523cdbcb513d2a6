/* Serial transport: a tty (USB CDC ACM, hardware UART or the Linux process
 * MCU's pty), opened non-blocking, raw, exclusively. */
#pragma once

#include "transport/transport.h"

/* Open @path raw at @baud (0 = leave the speed alone, e.g. for USB CDC and
 * ptys).  A port that another process holds open exclusively (TIOCEXCL or a
 * flock() as pyserial and Klipper take it) is never taken over: the call
 * fails with -EBUSY.  While we hold it we take both locks ourselves.
 * Returns 0 and a transport in *ret, or -errno. */
int serial_transport_open(const char *path, unsigned baud, struct transport **ret);
