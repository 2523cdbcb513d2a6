/* Serial transport: a tty (USB CDC ACM, hardware UART or the Linux process
 * MCU's pty), opened non-blocking, raw, exclusively; and the bootloader
 * requests that go over a tty. */
#pragma once

#include <sys/types.h>

#include "transport/transport.h"

/* Open @path raw at @baud (0 = leave the speed alone, e.g. for USB CDC and
 * ptys).  A port that another process holds open exclusively (TIOCEXCL or a
 * flock() as pyserial and Klipper take it) is never taken over: the call
 * fails with -EBUSY.  While we hold it we take both locks ourselves.
 * Returns 0 and a transport in *ret, or -errno. */
int serial_transport_open(const char *path, unsigned baud, struct transport **ret);

/* The same for the Linux process MCU's pty: @path must lead to the pty
 * slave /dev/pts/@index whose master process @owner holds (the program it
 * was verified to be), when looked at before the open and, by the opened
 * fd, right after it, before anything is done with the terminal.  Else
 * -ESTALE, and the terminal was not touched (at most opened and closed).
 * @owner -1: none is known, -ESTALE at once; 0: no such check, as
 * serial_transport_open(). */
int serial_transport_open_pty(const char *path, unsigned baud, pid_t owner, int index, struct transport **ret);

/* The USB CDC "1200 baud touch" (protocols.md §4.1): open @path, raise DTR,
 * set 1200 baud, drop DTR, close; a Klipper MCU then reboots into its
 * bootloader.  A port another process holds is never touched (-EBUSY, as
 * serial_transport_open() decides it).  The device vanishing during the
 * touch (EIO, ENODEV, ENXIO) is the expected outcome and counts as success.
 * Waiting for the bootloader to enumerate is the caller's business.
 * Returns 0 or -errno (-ENOENT for a missing device). */
int serial_request_bootloader_usb(const char *path);

/* The hardware UART bootloader request (protocols.md §4.2): open @path at
 * @baud like serial_transport_open() (-EBUSY for a held port), send 0x7e and
 * the 32-byte magic string " \x1c Request Serial Bootloader!! ~", wait until
 * it has gone out, close.  Katapult needs about a second afterwards. */
int serial_request_bootloader_uart(const char *path, unsigned baud);

/* The bytes serial_request_bootloader_uart() sends: 0x7e + the magic string. */
#define SERIAL_BOOTLOADER_REQUEST "~ \x1c Request Serial Bootloader!! ~"
#define SERIAL_BOOTLOADER_REQUEST_LEN 33
