/* Serial transport: one tty (USB CDC ACM, a hardware UART, the Linux process
 * MCU's pty) as a struct transport.  The port is opened non-blocking, raw
 * and exclusively: a port that Klipper (pyserial with exclusive=True takes a
 * flock) or another TIOCEXCL holder has open is reported busy, never shared.
 *
 * Emulated ttys (umockdev) refuse some ioctls with ENOTTY; termios and baud
 * problems of that kind are logged at debug level and do not fail the open.
 * Device paths are used exactly as given: never canonicalised (realpath()
 * crashes on umockdev nodes, and udev's devnode is what callers compare).
 *
 * Besides the transport, this file sends the two bootloader requests that
 * go over a tty (protocols.md §4.1/§4.2): the USB CDC 1200 baud touch (the
 * only place that touches DTR) and the UART magic string.  Other modem
 * line tricks (AVR DTR resets) are not handled here. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "shared/interrupt.h"
#include "shared/log.h"
#include "transport/fdwait.h"
#include "transport/holders.h"
#include "transport/ptyowner.h"
#include "transport/serial.h"
#include "shared/time-util.h"

struct serial_transport {
        struct transport transport;     /* first member: the ops cast back to us */
        int fd;
};

static int serial_set_custom_baud(int fd, unsigned baud);

static struct serial_transport *serial_from_transport(struct transport *t) {
        return (struct serial_transport *) t;
}

/* Errors by which a tty tells that the device behind it is gone. */
static bool errno_is_gone(int error) {
        return error == EIO || error == ENXIO || error == ENODEV || error == EPIPE;
}

static ssize_t serial_read(struct transport *t, void *buf, size_t len, int timeout_ms) {
        struct serial_transport *s = serial_from_transport(t);
        uint64_t deadline = deadline_after_ms(timeout_ms);

        for (;;) {
                ssize_t n;
                int revents;

                revents = fd_wait_ready(s->fd, POLLIN, deadline);
                if (revents < 0)
                        return revents;

                /* Read even on POLLHUP: bytes sent just before the hangup
                 * are still there. */
                n = read(s->fd, buf, len);
                if (n > 0)
                        return n;
                if (n == 0)
                        return -ENODEV;         /* hung up (we run with VMIN=1) */
                if (errno_is_gone(errno))
                        return -ENODEV;
                if (errno != EAGAIN && errno != EINTR)
                        return -errno;
                if (revents & (POLLHUP | POLLERR))
                        return -ENODEV;
        }
}

static int serial_write(struct transport *t, const void *buf, size_t len, int timeout_ms) {
        struct serial_transport *s = serial_from_transport(t);
        uint64_t deadline = deadline_after_ms(timeout_ms);
        const uint8_t *p = buf;
        size_t done = 0;

        while (done < len) {
                ssize_t n;
                int revents;

                n = write(s->fd, p + done, len - done);
                if (n > 0) {
                        done += (size_t) n;
                        continue;
                }
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno_is_gone(errno))
                                return -ENODEV;
                        if (errno != EAGAIN)
                                return -errno;
                }

                revents = fd_wait_ready(s->fd, POLLOUT, deadline);
                if (revents < 0)
                        return revents;
                if (revents & (POLLHUP | POLLERR))
                        return -ENODEV;
        }

        return 0;
}

static int serial_flush(struct transport *t) {
        struct serial_transport *s = serial_from_transport(t);

        if (tcflush(s->fd, TCIOFLUSH) < 0) {
                if (errno == ENOTTY || errno == EINVAL)
                        return 0;
                return -errno;
        }
        return 0;
}

static void serial_free(struct transport *t) {
        struct serial_transport *s = serial_from_transport(t);

        /* A pty slave keeps TIOCEXCL for as long as its master lives, so
         * clear it explicitly or our own next open would find it busy.
         * Closing drops the flock. */
        if (ioctl(s->fd, TIOCNXCL) < 0 && errno != ENOTTY && !errno_is_gone(errno))
                log_debug_errno(errno, "%s: TIOCNXCL failed: %m", strempty(s->transport.description));
        safe_close(s->fd);
        free(s->transport.description);
        free(s);
}

static const struct transport_ops serial_ops = {
        .name = "serial",
        .read = serial_read,
        .write = serial_write,
        .flush = serial_flush,
        .free = serial_free,
};

/* The termios constant for a standard rate, B0 for any other. */
static speed_t baud_to_speed(unsigned baud) {
        switch (baud) {
        case 50: return B50;
        case 75: return B75;
        case 110: return B110;
        case 134: return B134;
        case 150: return B150;
        case 200: return B200;
        case 300: return B300;
        case 600: return B600;
        case 1200: return B1200;
        case 1800: return B1800;
        case 2400: return B2400;
        case 4800: return B4800;
        case 9600: return B9600;
        case 19200: return B19200;
        case 38400: return B38400;
        case 57600: return B57600;
        case 115200: return B115200;
        case 230400: return B230400;
#ifdef B460800
        case 460800: return B460800;
#endif
#ifdef B500000
        case 500000: return B500000;
#endif
#ifdef B576000
        case 576000: return B576000;
#endif
#ifdef B921600
        case 921600: return B921600;
#endif
#ifdef B1000000
        case 1000000: return B1000000;
#endif
#ifdef B1152000
        case 1152000: return B1152000;
#endif
#ifdef B1500000
        case 1500000: return B1500000;
#endif
#ifdef B2000000
        case 2000000: return B2000000;
#endif
#ifdef B2500000
        case 2500000: return B2500000;
#endif
#ifdef B3000000
        case 3000000: return B3000000;
#endif
#ifdef B3500000
        case 3500000: return B3500000;
#endif
#ifdef B4000000
        case 4000000: return B4000000;
#endif
        default: return B0;
        }
}

/* Make the tty raw (8N1, no echo, no flow control, VMIN=1 so that a
 * non-blocking read returns EAGAIN rather than 0) and set the speed. */
static int serial_configure(int fd, const char *path, unsigned baud) {
        struct termios tio;
        speed_t speed = baud_to_speed(baud);
        int r;

        if (tcgetattr(fd, &tio) < 0) {
                if (errno != ENOTTY && errno != EINVAL)
                        return log_debug_errno(errno ?: EIO, "%s: tcgetattr failed: %m", path);
                log_debug_errno(errno, "%s: tcgetattr failed, using the port as it is: %m", path);
                return 0;
        }

        cfmakeraw(&tio);
        tio.c_cflag |= CLOCAL | CREAD;
        tio.c_cflag &= ~(tcflag_t) CRTSCTS;
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        if (baud > 0 && speed != B0)
                (void) cfsetspeed(&tio, speed);

        if (tcsetattr(fd, TCSANOW, &tio) < 0) {
                if (errno != ENOTTY && errno != EINVAL)
                        return log_debug_errno(errno ?: EIO, "%s: tcsetattr failed: %m", path);
                log_debug_errno(errno, "%s: tcsetattr refused, using the port as it is: %m", path);
        }

        if (baud > 0 && speed == B0) {
                r = serial_set_custom_baud(fd, baud);
                if (r == -ENOTTY)
                        log_debug("%s: setting %u baud is not supported here (emulated tty?), continuing",
                                  path, baud);
                else if (r < 0)
                        return log_debug_errno(r, "%s: failed to set %u baud: %m", path, baud);
        }

        return 0;
}

/* Is the terminal @fd (or, with @fd < 0, the one @path leads to) the pty
 * slave /dev/pts/@index whose master @owner holds?  0 or -ESTALE. */
static int check_pty_owner(const char *path, int fd, pid_t owner, int index) {
        struct stat st;

        if ((fd >= 0 ? fstat(fd, &st) : stat(path, &st)) < 0 || !S_ISCHR(st.st_mode) ||
            pty_slave_index(st.st_rdev) != index)
                return log_debug_errno(ESTALE, "%s: no longer leads to /dev/pts/%d", path, index);
        if (pty_process_holds_master(owner, index) <= 0)
                return log_debug_errno(ESTALE, "%s: process %d no longer holds the master of /dev/pts/%d",
                                       path, (int) owner, index);
        return 0;
}

int serial_transport_open(const char *path, unsigned baud, struct transport **ret) {
        return serial_transport_open_pty(path, baud, 0, -1, ret);
}

int serial_transport_open_pty(const char *path, unsigned baud, pid_t owner, int index, struct transport **ret) {
        _cleanup_close_ int fd = -1;
        struct serial_transport *s;
        char comm[32] = "";
        pid_t holder = 0;
        int exclusive = 0, r;

        if (owner < 0)
                return log_debug_errno(ESTALE, "%s: no program is known to own this pty", path);
        if (owner > 0) {
                r = check_pty_owner(path, -1, owner, index);
                if (r < 0)
                        return r;
        }

        /* Root ignores TIOCEXCL and flock() is advisory: look for any other
         * holder first, so that a port Klipper (or anyone) uses is never
         * touched, not even by an open() that could toggle DTR. */
        r = tty_find_holder(path, &holder, comm, sizeof(comm));
        if (r > 0)
                return log_debug_errno(EBUSY, "%s: port is open in process %d (%s)", path,
                                       (int) holder, comm);
        if (r < 0 && r != -ENOTTY)
                return log_debug_errno(r, "%s: cannot examine port: %m", path);

        fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
                if (errno == EBUSY)
                        return log_debug_errno(EBUSY, "%s: port is held exclusively by another process", path);
                return log_debug_errno(errno ?: EIO, "%s: failed to open: %m", path);
        }
        /* The link may have changed between the look and the open: what was
         * opened is checked before anything is done with it. */
        if (owner > 0) {
                r = check_pty_owner(path, fd, owner, index);
                if (r < 0)
                        return r;
        }

        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                if (errno == EWOULDBLOCK)
                        return log_debug_errno(EBUSY, "%s: port is locked by another process", path);
                log_debug_errno(errno, "%s: flock failed, continuing without it: %m", path);
        }

#ifdef TIOCGEXCL
        /* root opens a TIOCEXCL port anyway; ask instead of taking it over. */
        if (ioctl(fd, TIOCGEXCL, &exclusive) >= 0 && exclusive)
                return log_debug_errno(EBUSY, "%s: port is held exclusively by another process", path);
#endif

        if (ioctl(fd, TIOCEXCL) < 0 && errno != ENOTTY)
                log_debug_errno(errno, "%s: TIOCEXCL failed, continuing: %m", path);

        r = serial_configure(fd, path, baud);
        if (r < 0)
                return r;

        /* Whatever arrived before we owned the port is not an answer to us. */
        if (tcflush(fd, TCIFLUSH) < 0 && errno != ENOTTY && errno != EINVAL)
                log_debug_errno(errno, "%s: tcflush failed, continuing: %m", path);

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->transport.ops = &serial_ops;
        s->transport.description = strdup(path);
        if (!s->transport.description) {
                free(s);
                return -ENOMEM;
        }
        s->fd = TAKE_FD(fd);

        *ret = &s->transport;
        return 0;
}

/* A failed tty call during the 1200 baud touch: the device resetting under
 * us (what the touch is for) is success, ENOTTY/EINVAL (ptys, emulated
 * ttys) are skipped when @optional, anything else fails the touch. */
static int touch_error(const char *path, const char *what, int error, bool optional, bool *gone) {
        if (errno_is_gone(error)) {
                log_debug_errno(error, "%s: device went away at %s, taking that as the reboot: %m", path, what);
                *gone = true;
                return 0;
        }
        if (optional && (error == ENOTTY || error == EINVAL)) {
                log_debug_errno(error, "%s: %s not supported here, continuing: %m", path, what);
                return 0;
        }
        return log_debug_errno(error ?: EIO, "%s: %s failed: %m", path, what);
}

int serial_request_bootloader_usb(const char *path) {
        _cleanup_close_ int fd = -1;
        struct termios tio;
        char comm[32] = "";
        pid_t holder = 0;
        int exclusive = 0, dtr = TIOCM_DTR, r;
        bool gone = false;

        if (!path)
                return -EINVAL;

        /* The same refusals as serial_transport_open(): a port in use is
         * never touched, not even opened (an open may toggle DTR). */
        r = tty_find_holder(path, &holder, comm, sizeof(comm));
        if (r > 0)
                return log_debug_errno(EBUSY, "%s: port is open in process %d (%s), not touching it", path,
                                       (int) holder, comm);
        if (r < 0 && r != -ENOTTY)
                return log_debug_errno(r, "%s: cannot examine port: %m", path);

        fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
                if (errno == EBUSY)
                        return log_debug_errno(EBUSY, "%s: port is held exclusively by another process", path);
                return log_debug_errno(errno ?: EIO, "%s: failed to open: %m", path);
        }

        if (flock(fd, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK)
                return log_debug_errno(EBUSY, "%s: port is locked by another process", path);
#ifdef TIOCGEXCL
        if (ioctl(fd, TIOCGEXCL, &exclusive) >= 0 && exclusive)
                return log_debug_errno(EBUSY, "%s: port is held exclusively by another process", path);
#endif

        /* DTR up, 1200 baud, DTR down: the MCU reboots on the last step,
         * seeing 1200 baud with DTR clear. */
        if (ioctl(fd, TIOCMBIS, &dtr) < 0) {
                r = touch_error(path, "raising DTR", errno, true, &gone);
                if (r < 0 || gone)
                        return r;
        }

        if (tcgetattr(fd, &tio) < 0) {
                r = touch_error(path, "tcgetattr", errno, false, &gone);
                if (r < 0 || gone)
                        return r;
        }
        (void) cfsetispeed(&tio, B1200);
        (void) cfsetospeed(&tio, B1200);
        if (tcsetattr(fd, TCSANOW, &tio) < 0) {
                r = touch_error(path, "setting 1200 baud", errno, false, &gone);
                if (r < 0 || gone)
                        return r;
        }

        if (ioctl(fd, TIOCMBIC, &dtr) < 0) {
                r = touch_error(path, "dropping DTR", errno, true, &gone);
                if (r < 0 || gone)
                        return r;
        }

        log_debug("%s: sent the 1200 baud touch", path);
        return 0;
}

/* Wait until the tty's output queue is empty, at most @timeout_ms.  Closing
 * a UART waits for its last bytes anyway; this only bounds how long that can
 * take.  0, -ETIMEDOUT, -ENODEV; ttys that cannot tell count as drained. */
static int wait_output_drained(int fd, int timeout_ms) {
        uint64_t deadline = deadline_after_ms(timeout_ms);

        for (;;) {
                int queued = 0;

                if (ioctl(fd, TIOCOUTQ, &queued) < 0) {
                        if (errno_is_gone(errno))
                                return -ENODEV;
                        return 0;
                }
                if (queued <= 0)
                        return 0;
                if (now_msec() >= deadline)
                        return -ETIMEDOUT;
                if (interruptible_sleep_msec(1) < 0)
                        return -ECANCELED;
        }
}

/* How long writing and draining the UART bootloader request may take: 33
 * bytes need 1.3 ms at 250000 baud and 280 ms at 1200. */
#define UART_REQUEST_TIMEOUT_MS 1000

int serial_request_bootloader_uart(const char *path, unsigned baud) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        if (!path)
                return -EINVAL;

        r = serial_transport_open(path, baud, &t);
        if (r < 0)
                return r;

        r = transport_write(t, SERIAL_BOOTLOADER_REQUEST, SERIAL_BOOTLOADER_REQUEST_LEN, UART_REQUEST_TIMEOUT_MS);
        if (r < 0)
                return log_debug_errno(r, "%s: failed to send the bootloader request: %m", path);

        r = wait_output_drained(serial_from_transport(t)->fd, UART_REQUEST_TIMEOUT_MS);
        if (r < 0)
                return log_debug_errno(r, "%s: bootloader request did not go out: %m", path);

        log_debug("%s: sent the serial bootloader request at %u baud", path, baud);
        return 0;
}

/* Arbitrary baud rates (250000 is common for Klipper UARTs) need the
 * kernel's termios2, which only the kernel header declares, and that header's
 * struct termios clashes with glibc's.  It is therefore included here, after
 * everything that uses glibc's termios, with the clashing names renamed. */
#define termios kernel_termios
#define termio kernel_termio
#define winsize kernel_winsize
#include <asm/termbits.h>
#undef termios
#undef termio
#undef winsize

static int serial_set_custom_baud(int fd, unsigned baud) {
#if defined(TCGETS2) && defined(TCSETS2) && defined(BOTHER)
        struct termios2 tio2;

        if (ioctl(fd, TCGETS2, &tio2) < 0)
                return -errno;

        tio2.c_cflag &= ~(tcflag_t) CBAUD;
        tio2.c_cflag |= BOTHER;
#ifdef IBSHIFT
        tio2.c_cflag &= ~((tcflag_t) CBAUD << IBSHIFT);
        tio2.c_cflag |= (tcflag_t) BOTHER << IBSHIFT;
#endif
        tio2.c_ispeed = baud;
        tio2.c_ospeed = baud;

        if (ioctl(fd, TCSETS2, &tio2) < 0)
                return -errno;
        return 0;
#else
        (void) fd;
        (void) baud;
        return -EOPNOTSUPP;
#endif
}
