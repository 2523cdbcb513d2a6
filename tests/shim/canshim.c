/* SPDX-License-Identifier: GPL-3.0-or-later */
/*
 * canshim: an LD_PRELOAD library that gives a program SocketCAN raw sockets
 * (socket(AF_CAN, SOCK_RAW, CAN_RAW)) on a machine whose kernel has no CAN
 * support, for mcuflashd's tests (testing.md §5).  A CAN socket becomes an
 * AF_UNIX datagram socket connected to the test hub (tests/sim/canhub.py),
 * which plays the CAN bus: every frame is one datagram of a 16-byte
 * NUL-padded interface name followed by a struct can_frame (16 bytes) or
 * struct canfd_frame (72 bytes).  Test-only: never installed.
 *
 * Environment:
 *   CANSHIM_HUB=<path> or @<abstract name>   hub socket; unset = the shim
 *                                            does nothing at all
 *   CANSHIM_IFACES=can0,can1                 interfaces known before the hub
 *                                            is asked (ifindex 1001, 1002, ...)
 *   CANSHIM_DEBUG=1                          log what the shim does to stderr
 *
 * Covered: socket, bind (ifindex 0 = all interfaces), close, setsockopt and
 * getsockopt SOL_CAN_RAW (CAN_RAW_FILTER with the kernel's matching rules
 * including inverted and joined filters, CAN_RAW_ERR_FILTER, CAN_RAW_FD_FRAMES;
 * CAN_RAW_LOOPBACK and CAN_RAW_RECV_OWN_MSGS are accepted and ignored: the
 * hub never echoes a frame to its sender), getsockname, read, write, readv,
 * writev, recv, send, recvfrom, sendto (an explicit sockaddr_can routes the
 * frame to that interface), recvmsg, sendmsg (control messages such as
 * SO_TIMESTAMP pass through; sockaddr_can is filled on receive), the
 * fortified __read_chk/__recv_chk/__recvfrom_chk, ioctl SIOCGIFINDEX,
 * SIOCGIFNAME, SIOCGIFMTU, SIOCGIFFLAGS, and if_nametoindex,
 * if_indextoname, if_nameindex.  SOL_SOCKET options and every non-CAN file
 * descriptor go straight to the next library.  Filters are applied here and
 * also handed to the hub, so that poll() does not wake up for frames the
 * filters drop; unlike the kernel, frames already queued when the filters
 * change are judged by the new set.
 *
 * Interfaces: which CAN interfaces exist and whether they are up is the
 * hub's knowledge.  The shim keeps a private "WATCH" subscription to the hub
 * (the same mini-protocol the daemon's test seam uses, see below), drains it
 * before every interface lookup and send, and so sees changes as soon as the
 * hub has made them: a send on a down interface fails with ENETDOWN, on a
 * missing one with ENXIO, bind to a missing one with ENODEV; a socket bound
 * to an interface that goes down reads ENETDOWN once, one whose interface
 * disappears reads ENODEV once and is unbound, as with the kernel.  Without
 * a reachable hub the CANSHIM_IFACES list counts as present and up.
 * Interface indexes are 1001 + position (CANSHIM_IFACES first, then names
 * in the order the hub reports them) and stay stable for a name.
 *
 * Not covered: rtnetlink (RTM_GETLINK shows no CAN interfaces, so
 * libsocketcan must not be used under the shim), CAN_BCM/ISO-TP/J1939,
 * recvmmsg/sendmmsg, CAN fds duplicated with dup()/dup2(), own-message
 * loopback, error frames from a controller.  A send whose hub queue is full
 * waits up to 2 s for room instead of failing with ENOBUFS at once.
 *
 * Hub mini-protocol (full text at the top of tests/sim/canhub.py): clients
 * autobind and connect() to the hub; client->hub "REG<ifname>" (receive that
 * interface, "REG" alone: all), "FLT <join> <id>:<mask>..." (filter set, hex),
 * "NAME <label>", "BYE", "WATCH", or a frame datagram; hub->client frame
 * datagrams and "ERR ENETDOWN" / "ERR ENODEV".
 *
 * Test seam for the daemon's CAN interface watcher: with
 * MCUFLASHD_CAN_TEST_HUB=<path> the daemon does not use rtnetlink but opens
 * an AF_UNIX SOCK_DGRAM socket, autobinds it, connect()s to the hub, sends
 * "WATCH" and then receives one ASCII event per datagram: first a snapshot
 * ("IFACE <name> up <bitrate>" or "IFACE <name> down" per interface, then
 * "SYNC"), later every change ("IFACE <name> up <bitrate>",
 * "IFACE <name> down", "IFACE <name> gone").
 *
 * Like every LD_PRELOAD interposer this file has process-global state (the
 * table of CAN sockets and interfaces), guarded by one mutex that is never
 * held across a blocking call on a CAN socket.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#undef _FORTIFY_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <linux/can.h>
#include <linux/can/raw.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if defined __cplusplus || !__GNUC_PREREQ(2, 7) || !defined __USE_GNU
#define SOCKADDR_PTR(a) (a)
#else
#define SOCKADDR_PTR(a) ((a).__sockaddr__)
#endif

#ifndef IFF_ECHO
#define IFF_ECHO (1 << 18)      /* linux/if.h, which conflicts with net/if.h */
#endif

#define IFINDEX_BASE 1001
#define MAX_IFACES 64
#define HEADER_SIZE IFNAMSIZ
#define CAN_NAMELEN_MIN (offsetof(struct sockaddr_can, can_ifindex) + sizeof(int))
#define HUB_SEND_TIMEOUT_MS 2000
#define HUB_SYNC_TIMEOUT_MS 2000
#define HUB_BYE_TIMEOUT_MS 200

/* The glibc entry points of the fortified wrappers (bits/unistd.h and
 * bits/socket2.h declare them only under _FORTIFY_SOURCE). */
ssize_t __read_chk(int fd, void *buf, size_t nbytes, size_t buflen);
ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags);
ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                       __SOCKADDR_ARG addr, socklen_t *addr_len);

struct can_socket {
        int fd;
        int ifindex;                    /* bound interface, 0 = all */
        bool bound;
        bool connected;                 /* autobound and connected to the hub */
        bool fd_frames;
        bool loopback;
        bool recv_own_msgs;
        bool join_filters;
        can_err_mask_t err_mask;
        size_t n_filters;
        struct can_filter *filters;
};

struct iface {
        char name[IFNAMSIZ];
        bool present;
        bool up;
        unsigned long bitrate;
};

static struct {
        int (*socket)(int, int, int);
        int (*bind)(int, __CONST_SOCKADDR_ARG, socklen_t);
        int (*close)(int);
        int (*ioctl)(int, unsigned long, ...);
        int (*setsockopt)(int, int, int, const void *, socklen_t);
        int (*getsockopt)(int, int, int, void *, socklen_t *);
        int (*getsockname)(int, __SOCKADDR_ARG, socklen_t *);
        ssize_t (*read)(int, void *, size_t);
        ssize_t (*write)(int, const void *, size_t);
        ssize_t (*readv)(int, const struct iovec *, int);
        ssize_t (*writev)(int, const struct iovec *, int);
        ssize_t (*recv)(int, void *, size_t, int);
        ssize_t (*send)(int, const void *, size_t, int);
        ssize_t (*recvfrom)(int, void *, size_t, int, __SOCKADDR_ARG, socklen_t *);
        ssize_t (*sendto)(int, const void *, size_t, int, __CONST_SOCKADDR_ARG, socklen_t);
        ssize_t (*recvmsg)(int, struct msghdr *, int);
        ssize_t (*sendmsg)(int, const struct msghdr *, int);
        ssize_t (*read_chk)(int, void *, size_t, size_t);
        ssize_t (*recv_chk)(int, void *, size_t, size_t, int);
        ssize_t (*recvfrom_chk)(int, void *, size_t, size_t, int, __SOCKADDR_ARG, socklen_t *);
        unsigned (*if_nametoindex)(const char *);
        char *(*if_indextoname)(unsigned, char *);
        struct if_nameindex *(*if_nameindex)(void);
        void (*if_freenameindex)(struct if_nameindex *);
} real;

static struct {
        pthread_mutex_t lock;
        bool enabled;
        bool debug;
        struct sockaddr_un hub_addr;
        socklen_t hub_addrlen;

        struct can_socket **sockets;
        size_t n_sockets;               /* read without the lock as a fast path */
        unsigned socket_serial;         /* numbers the sockets in their hub NAME */

        struct iface ifaces[MAX_IFACES];
        size_t n_ifaces;

        int watch_fd;                   /* private WATCH subscription, -1 = none */
        pid_t watch_pid;
        dev_t watch_dev;
        ino_t watch_ino;
} shim = {
        /* Recursive: nothing we call while holding it may deadlock by
         * landing in one of our own wrappers (stdio, sanitizer hooks). */
        .lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP,
        .watch_fd = -1,
};

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

__attribute__((format(printf, 1, 2)))
static void debug(const char *format, ...) {
        if (!shim.debug)
                return;
        int saved_errno = errno;
        char line[512];
        va_list ap;
        va_start(ap, format);
        vsnprintf(line, sizeof(line), format, ap);
        va_end(ap);
        fprintf(stderr, "canshim[%d]: %s\n", (int) getpid(), line);
        errno = saved_errno;
}

#define RESOLVE(field, symbol) \
        (real.field = (__typeof__(real.field)) dlsym(RTLD_NEXT, symbol))

/* Keep the lock consistent across fork(): the child continues with it free. */
static void before_fork(void) {
        pthread_mutex_lock(&shim.lock);
}

static void after_fork(void) {
        pthread_mutex_unlock(&shim.lock);
}

static void init(void) {
        pthread_atfork(before_fork, after_fork, after_fork);
        RESOLVE(socket, "socket");
        RESOLVE(bind, "bind");
        RESOLVE(close, "close");
        RESOLVE(ioctl, "ioctl");
        RESOLVE(setsockopt, "setsockopt");
        RESOLVE(getsockopt, "getsockopt");
        RESOLVE(getsockname, "getsockname");
        RESOLVE(read, "read");
        RESOLVE(write, "write");
        RESOLVE(readv, "readv");
        RESOLVE(writev, "writev");
        RESOLVE(recv, "recv");
        RESOLVE(send, "send");
        RESOLVE(recvfrom, "recvfrom");
        RESOLVE(sendto, "sendto");
        RESOLVE(recvmsg, "recvmsg");
        RESOLVE(sendmsg, "sendmsg");
        RESOLVE(read_chk, "__read_chk");
        RESOLVE(recv_chk, "__recv_chk");
        RESOLVE(recvfrom_chk, "__recvfrom_chk");
        RESOLVE(if_nametoindex, "if_nametoindex");
        RESOLVE(if_indextoname, "if_indextoname");
        RESOLVE(if_nameindex, "if_nameindex");
        RESOLVE(if_freenameindex, "if_freenameindex");

        const char *debug_env = getenv("CANSHIM_DEBUG");
        shim.debug = debug_env && *debug_env && strcmp(debug_env, "0") != 0;

        const char *hub = getenv("CANSHIM_HUB");
        if (!hub || !*hub)
                return;
        size_t len = strlen(hub);
        shim.hub_addr.sun_family = AF_UNIX;
        if (hub[0] == '@') {
                if (len > sizeof(shim.hub_addr.sun_path)) {
                        fprintf(stderr, "canshim: CANSHIM_HUB too long, shim disabled\n");
                        return;
                }
                memcpy(shim.hub_addr.sun_path + 1, hub + 1, len - 1);
                shim.hub_addrlen = offsetof(struct sockaddr_un, sun_path) + len;
        } else {
                if (len >= sizeof(shim.hub_addr.sun_path)) {
                        fprintf(stderr, "canshim: CANSHIM_HUB too long, shim disabled\n");
                        return;
                }
                memcpy(shim.hub_addr.sun_path, hub, len + 1);
                shim.hub_addrlen = offsetof(struct sockaddr_un, sun_path) + len + 1;
        }

        const char *list = getenv("CANSHIM_IFACES");
        while (list && *list) {
                size_t n = strcspn(list, ", ");
                if (n > 0 && n < IFNAMSIZ && shim.n_ifaces < MAX_IFACES) {
                        struct iface *iface = &shim.ifaces[shim.n_ifaces++];
                        memcpy(iface->name, list, n);
                        iface->present = true;
                        iface->up = true;
                }
                list += n;
                list += strspn(list, ", ");
        }
        shim.enabled = true;
        debug("hub %s, %zu interface(s) from CANSHIM_IFACES", hub, shim.n_ifaces);
}

__attribute__((constructor))
static void canshim_constructor(void) {
        pthread_once(&init_once, init);
}

static void ensure_init(void) {
        pthread_once(&init_once, init);
}

static size_t loaded_n_sockets(void) {
        return __atomic_load_n(&shim.n_sockets, __ATOMIC_ACQUIRE);
}

/* ---- socket table (caller holds the lock) ---------------------------- */

static struct can_socket *socket_find(int fd) {
        for (size_t i = 0; i < shim.n_sockets; i++)
                if (shim.sockets[i]->fd == fd)
                        return shim.sockets[i];
        return NULL;
}

static void socket_free(struct can_socket *s) {
        free(s->filters);
        free(s);
}

static void socket_remove(int fd) {
        for (size_t i = 0; i < shim.n_sockets; i++) {
                if (shim.sockets[i]->fd != fd)
                        continue;
                socket_free(shim.sockets[i]);
                shim.sockets[i] = shim.sockets[shim.n_sockets - 1];
                __atomic_store_n(&shim.n_sockets, shim.n_sockets - 1, __ATOMIC_RELEASE);
                return;
        }
}

static bool is_can_fd(int fd) {
        if (fd < 0 || loaded_n_sockets() == 0)
                return false;
        pthread_mutex_lock(&shim.lock);
        bool found = socket_find(fd) != NULL;
        pthread_mutex_unlock(&shim.lock);
        return found;
}

/* ---- talking to the hub ------------------------------------------------ */

static int autobind_and_connect(int fd) {
        struct sockaddr_un any = { .sun_family = AF_UNIX };
        if (real.bind(fd, (const struct sockaddr *) &any, sizeof(sa_family_t)) < 0 &&
            errno != EINVAL)    /* EINVAL: bound already */
                return -1;
        if (connect(fd, (const struct sockaddr *) &shim.hub_addr, shim.hub_addrlen) < 0)
                return -1;
        return 0;
}

static long ms_since(const struct timespec *start) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

static ssize_t hub_sendmsg(int fd, const struct msghdr *msg, int flags, int timeout_ms) {
        struct timespec start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (;;) {
                ssize_t n = real.sendmsg(fd, msg, flags | MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n >= 0)
                        return n;
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                        return -1;
                /* The hub's queue is full (net.unix.max_dgram_qlen): wait for room. */
                long elapsed = ms_since(&start);
                if (elapsed >= timeout_ms) {
                        errno = ENOBUFS;
                        return -1;
                }
                struct pollfd p = { .fd = fd, .events = POLLOUT };
                (void) poll(&p, 1, (int) (timeout_ms - elapsed));
        }
}

/* A control datagram; one that would be as long as a frame datagram gets a
 * trailing space, which the hub ignores. */
static int hub_send_text(int fd, const char *text, size_t len) {
        struct iovec iov[2] = {
                { .iov_base = (void *) text, .iov_len = len },
                { .iov_base = (void *) " ", .iov_len = 1 },
        };
        bool pad = len == HEADER_SIZE + CAN_MTU || len == HEADER_SIZE + CANFD_MTU;
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = pad ? 2 : 1 };
        return hub_sendmsg(fd, &msg, 0, HUB_SEND_TIMEOUT_MS) < 0 ? -1 : 0;
}

/* ---- interface table (caller holds the lock) ------------------------- */

static struct iface *iface_by_name(const char *name) {
        for (size_t i = 0; i < shim.n_ifaces; i++)
                if (strncmp(shim.ifaces[i].name, name, IFNAMSIZ) == 0)
                        return &shim.ifaces[i];
        return NULL;
}

static struct iface *iface_by_index(int ifindex) {
        if (ifindex < IFINDEX_BASE || (size_t) (ifindex - IFINDEX_BASE) >= shim.n_ifaces)
                return NULL;
        return &shim.ifaces[ifindex - IFINDEX_BASE];
}

static int iface_index(const struct iface *iface) {
        return IFINDEX_BASE + (int) (iface - shim.ifaces);
}

/* Find @name, adding it (absent) when it is new; NULL when the table is full. */
static struct iface *iface_get(const char *name) {
        struct iface *iface = iface_by_name(name);
        if (iface || shim.n_ifaces >= MAX_IFACES || strlen(name) >= IFNAMSIZ || !*name)
                return iface;
        iface = &shim.ifaces[shim.n_ifaces++];
        memset(iface, 0, sizeof(*iface));
        strcpy(iface->name, name);
        return iface;
}

static void iface_apply_event(const char *line) {
        char name[IFNAMSIZ + 1], state[16];
        unsigned long bitrate = 0;
        int n = sscanf(line, "IFACE %16s %15s %lu", name, state, &bitrate);
        if (n < 2 || strlen(name) >= IFNAMSIZ)
                return;
        struct iface *iface = iface_get(name);
        if (!iface)
                return;
        if (strcmp(state, "up") == 0) {
                iface->present = true;
                iface->up = true;
                iface->bitrate = n >= 3 ? bitrate : 0;
        } else if (strcmp(state, "down") == 0) {
                iface->present = true;
                iface->up = false;
        } else if (strcmp(state, "gone") == 0) {
                iface->present = false;
                iface->up = false;
        }
        debug("event: %s", line);
}

static bool watch_fd_is_ours(void) {
        struct stat st;
        if (shim.watch_pid != getpid())
                return false;
        if (fstat(shim.watch_fd, &st) < 0)
                return false;
        return st.st_dev == shim.watch_dev && st.st_ino == shim.watch_ino;
}

static void watch_forget(void) {
        /* In a forked child the descriptor is our own copy: close it.
         * Otherwise it was closed behind our back and its number may now
         * belong to the program: leave it alone. */
        if (shim.watch_pid != getpid()) {
                struct stat st;
                if (fstat(shim.watch_fd, &st) == 0 && st.st_dev == shim.watch_dev &&
                    st.st_ino == shim.watch_ino)
                        real.close(shim.watch_fd);
        }
        shim.watch_fd = -1;
}

/* Receive one WATCH datagram; returns its length, 0 when none is pending,
 * -1 when the subscription broke. */
static ssize_t watch_receive(char *buf, size_t size, int timeout_ms) {
        for (;;) {
                ssize_t n = real.recv(shim.watch_fd, buf, size - 1, MSG_DONTWAIT);
                if (n >= 0) {
                        buf[n] = 0;
                        return n;
                }
                if (errno == EINTR)
                        continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                        return -1;
                if (timeout_ms <= 0)
                        return 0;
                struct pollfd p = { .fd = shim.watch_fd, .events = POLLIN };
                int r = poll(&p, 1, timeout_ms);
                if (r < 0 && errno != EINTR)
                        return -1;
                if (r == 0)
                        return 0;
        }
}

static int watch_connect(void) {
        int fd = real.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return -1;
        struct stat st;
        char name[128];
        int len = snprintf(name, sizeof(name), "NAME canshim-watch pid=%d comm=%s", (int) getpid(),
                           program_invocation_short_name);
        if (autobind_and_connect(fd) < 0 || hub_send_text(fd, name, (size_t) len) < 0 ||
            hub_send_text(fd, "WATCH", 5) < 0 || fstat(fd, &st) < 0) {
                debug("cannot subscribe to the hub: %m");
                real.close(fd);
                return -1;
        }
        shim.watch_fd = fd;
        shim.watch_pid = getpid();
        shim.watch_dev = st.st_dev;
        shim.watch_ino = st.st_ino;

        /* The snapshot replaces what we knew. */
        for (size_t i = 0; i < shim.n_ifaces; i++)
                shim.ifaces[i].present = shim.ifaces[i].up = false;

        struct timespec start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (;;) {
                long elapsed = ms_since(&start);
                char line[128];
                ssize_t n = watch_receive(line, sizeof(line),
                                          (int) (HUB_SYNC_TIMEOUT_MS - elapsed));
                if (n < 0 || (n == 0 && elapsed >= HUB_SYNC_TIMEOUT_MS)) {
                        debug("no snapshot from the hub");
                        real.close(fd);
                        shim.watch_fd = -1;
                        return -1;
                }
                if (n == 0)
                        continue;
                if (strcmp(line, "SYNC") == 0)
                        return 0;
                iface_apply_event(line);
        }
}

/* Bring the interface table up to date with the hub. */
static void ifaces_refresh(void) {
        if (!shim.enabled)
                return;
        if (shim.watch_fd >= 0 && !watch_fd_is_ours())
                watch_forget();
        if (shim.watch_fd < 0) {
                (void) watch_connect();
                return;
        }
        for (;;) {
                char line[128];
                ssize_t n = watch_receive(line, sizeof(line), 0);
                if (n == 0)
                        return;
                if (n < 0) {
                        debug("hub subscription broke: %m");
                        real.close(shim.watch_fd);
                        shim.watch_fd = -1;
                        return;
                }
                iface_apply_event(line);
        }
}

static struct iface *present_iface_by_index(int ifindex) {
        ifaces_refresh();
        struct iface *iface = iface_by_index(ifindex);
        return iface && iface->present ? iface : NULL;
}

/* Let the hub forget our interface subscription right away. */
__attribute__((destructor))
static void canshim_destructor(void) {
        pthread_mutex_lock(&shim.lock);
        if (shim.watch_fd >= 0 && watch_fd_is_ours())
                (void) real.send(shim.watch_fd, "BYE", 3, MSG_DONTWAIT | MSG_NOSIGNAL);
        pthread_mutex_unlock(&shim.lock);
}

/* ---- filters ----------------------------------------------------------- */

/* The kernel's CAN_RAW rules (net/can/af_can.c, net/can/raw.c): a data frame
 * passes a filter when (id & mask) == (filter_id & mask), inverted by
 * CAN_INV_FILTER in the filter id; a mask with CAN_EFF_FLAG on a standard
 * filter id only compares the 11-bit part plus the EFF/RTR flags; error
 * frames pass only through the error mask (or filters whose mask carries
 * CAN_ERR_FLAG); with CAN_RAW_JOIN_FILTERS every filter must match. */
static bool filters_match(const struct can_socket *s, canid_t id) {
        if (s->n_filters == 0)
                return (id & CAN_ERR_FLAG) && (id & s->err_mask & CAN_ERR_MASK);

        size_t matches = 0;
        for (size_t i = 0; i < s->n_filters; i++) {
                canid_t filter_id = s->filters[i].can_id, mask = s->filters[i].can_mask;
                bool match;
                if (mask & CAN_ERR_FLAG) {
                        match = (id & CAN_ERR_FLAG) && (id & mask & CAN_ERR_MASK);
                } else if (id & CAN_ERR_FLAG) {
                        match = false;
                } else {
                        bool invert = filter_id & CAN_INV_FILTER;
                        if ((mask & CAN_EFF_FLAG) && !(filter_id & CAN_EFF_FLAG))
                                mask &= CAN_SFF_MASK | CAN_EFF_FLAG | CAN_RTR_FLAG;
                        filter_id &= mask;
                        match = invert ? (id & mask) != filter_id : (id & mask) == filter_id;
                }
                if (match)
                        matches++;
        }
        if (id & CAN_ERR_FLAG) {
                if (id & s->err_mask & CAN_ERR_MASK)
                        return true;
                return !s->join_filters && matches > 0;
        }
        return s->join_filters ? matches == s->n_filters : matches > 0;
}

/* ---- per-socket hub connection ----------------------------------------- */

/* "FLT <join> <id>:<mask> ..." for the socket's filters (caller holds the
 * lock); NULL on allocation failure. */
static char *filter_message(const struct can_socket *s, size_t *ret_len) {
        size_t size = 8 + s->n_filters * 18;
        char *text = malloc(size);
        if (!text)
                return NULL;
        size_t len = (size_t) snprintf(text, size, "FLT %d", s->join_filters ? 1 : 0);
        for (size_t i = 0; i < s->n_filters; i++)
                len += (size_t) snprintf(text + len, size - len, " %08x:%08x",
                                         s->filters[i].can_id, s->filters[i].can_mask);
        *ret_len = len;
        return text;
}

/* Autobind and connect @fd to the hub once, and introduce it. */
static int socket_connect(int fd) {
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        bool connected = s && s->connected;
        pthread_mutex_unlock(&shim.lock);
        if (!s) {
                errno = EBADF;
                return -1;
        }
        if (connected)
                return 0;
        if (autobind_and_connect(fd) < 0) {
                debug("fd %d: cannot connect to the hub: %m", fd);
                return -1;
        }
        char name[128];
        int len = snprintf(name, sizeof(name), "NAME pid=%d comm=%s fd=%d socket=%u",
                           (int) getpid(), program_invocation_short_name, fd,
                           __atomic_add_fetch(&shim.socket_serial, 1, __ATOMIC_RELAXED));
        (void) hub_send_text(fd, name, (size_t) len);

        pthread_mutex_lock(&shim.lock);
        s = socket_find(fd);
        if (s)
                s->connected = true;
        pthread_mutex_unlock(&shim.lock);
        return 0;
}

static int socket_send_filters(int fd) {
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        size_t len = 0;
        char *text = s && s->connected ? filter_message(s, &len) : NULL;
        pthread_mutex_unlock(&shim.lock);
        if (!text)
                return 0;
        int r = hub_send_text(fd, text, len);
        free(text);
        return r;
}

/* ---- send and receive -------------------------------------------------- */

static ssize_t can_sendmsg(int fd, const struct msghdr *msg, int flags) {
        unsigned char frame[CANFD_MTU];
        size_t len = 0;
        for (size_t i = 0; i < (size_t) msg->msg_iovlen; i++) {
                const struct iovec *v = &msg->msg_iov[i];
                if (len + v->iov_len > sizeof(frame)) {
                        errno = EINVAL;
                        return -1;
                }
                if (v->iov_len)
                        memcpy(frame + len, v->iov_base, v->iov_len);
                len += v->iov_len;
        }

        char ifname[HEADER_SIZE] = {};
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        int err = 0;
        if (!s) {
                err = EBADF;
                goto unlock;
        }
        if (len != CAN_MTU && !(len == CANFD_MTU && s->fd_frames)) {
                err = EINVAL;
                goto unlock;
        }
        int ifindex;
        if (msg->msg_name) {
                const struct sockaddr_can *addr = msg->msg_name;
                if (msg->msg_namelen < CAN_NAMELEN_MIN || addr->can_family != AF_CAN) {
                        err = EINVAL;
                        goto unlock;
                }
                ifindex = addr->can_ifindex;
        } else
                ifindex = s->bound ? s->ifindex : 0;
        if (ifindex == 0) {
                err = ENXIO;
                goto unlock;
        }
        struct iface *iface = present_iface_by_index(ifindex);
        if (!iface) {
                err = ENXIO;
                goto unlock;
        }
        if (!iface->up) {
                err = ENETDOWN;
                goto unlock;
        }
        if ((len == CAN_MTU && frame[offsetof(struct can_frame, len)] > CAN_MAX_DLEN) ||
            (len == CANFD_MTU && frame[offsetof(struct canfd_frame, len)] > CANFD_MAX_DLEN)) {
                err = EINVAL;
                goto unlock;
        }
        strncpy(ifname, iface->name, sizeof(ifname) - 1);
unlock:
        pthread_mutex_unlock(&shim.lock);
        if (err) {
                debug("fd %d: send refused: %s", fd, strerror(err));
                errno = err;
                return -1;
        }

        if (socket_connect(fd) < 0)
                return -1;
        struct iovec iov[2] = {
                { .iov_base = ifname, .iov_len = sizeof(ifname) },
                { .iov_base = frame, .iov_len = len },
        };
        struct msghdr out = { .msg_iov = iov, .msg_iovlen = 2 };
        if (hub_sendmsg(fd, &out, flags & ~(MSG_DONTWAIT | MSG_NOSIGNAL | MSG_CONFIRM),
                        HUB_SEND_TIMEOUT_MS) < 0)
                return -1;
        return (ssize_t) len;
}

static void scatter(const struct msghdr *msg, const unsigned char *data, size_t len,
                    size_t *ret_copied) {
        size_t copied = 0;
        for (size_t i = 0; i < (size_t) msg->msg_iovlen && copied < len; i++) {
                size_t n = msg->msg_iov[i].iov_len;
                if (n > len - copied)
                        n = len - copied;
                if (n)
                        memcpy(msg->msg_iov[i].iov_base, data + copied, n);
                copied += n;
        }
        *ret_copied = copied;
}

/* What to do with one datagram that arrived on a CAN socket. */
enum verdict { DELIVER, DROP, FAIL };

static enum verdict judge_datagram(int fd, const char *ifname, const unsigned char *frame,
                                   size_t frame_len, int *ret_ifindex, int *ret_errno) {
        enum verdict verdict = DROP;
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        if (!s) {
                *ret_errno = EBADF;
                verdict = FAIL;
        } else if (s->bound && (frame_len == CAN_MTU || s->fd_frames)) {
                char name[IFNAMSIZ];
                memcpy(name, ifname, IFNAMSIZ - 1);
                name[IFNAMSIZ - 1] = 0;
                struct iface *iface = iface_get(name);
                canid_t id;
                memcpy(&id, frame, sizeof(id));
                if (iface && (s->ifindex == 0 || s->ifindex == iface_index(iface)) &&
                    filters_match(s, id)) {
                        *ret_ifindex = iface_index(iface);
                        verdict = DELIVER;
                }
        }
        pthread_mutex_unlock(&shim.lock);
        return verdict;
}

/* A text datagram from the hub: "ERR ENETDOWN" or "ERR ENODEV". */
static int judge_notice(int fd, const char *text) {
        int err = 0;
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        if (strcmp(text, "ERR ENETDOWN") == 0)
                err = ENETDOWN;
        else if (strcmp(text, "ERR ENODEV") == 0) {
                err = ENODEV;
                if (s) {
                        /* The kernel unbinds a socket whose device went away. */
                        s->bound = false;
                        s->ifindex = 0;
                }
        }
        pthread_mutex_unlock(&shim.lock);
        if (err)
                debug("fd %d: hub notice %s", fd, text);
        return err;
}

static ssize_t can_recvmsg(int fd, struct msghdr *msg, int flags) {
        if (flags & MSG_ERRQUEUE)
                return real.recvmsg(fd, msg, flags);
        for (;;) {
                char head[HEADER_SIZE];
                unsigned char frame[CANFD_MTU];
                struct iovec iov[2] = {
                        { .iov_base = head, .iov_len = sizeof(head) },
                        { .iov_base = frame, .iov_len = sizeof(frame) },
                };
                struct msghdr in = {
                        .msg_iov = iov,
                        .msg_iovlen = 2,
                        .msg_control = msg->msg_control,
                        .msg_controllen = msg->msg_controllen,
                };
                ssize_t n = real.recvmsg(fd, &in, flags & ~MSG_TRUNC);
                if (n < 0)
                        return n;
                /* With MSG_PEEK, a datagram that is dropped or is a notice
                 * is consumed below so that it does not stay queued. */
                size_t frame_len = (size_t) n > HEADER_SIZE ? (size_t) n - HEADER_SIZE : 0;
                if (frame_len != CAN_MTU && frame_len != CANFD_MTU) {
                        char text[HEADER_SIZE + CANFD_MTU + 1];
                        memcpy(text, head, (size_t) n < HEADER_SIZE ? (size_t) n : HEADER_SIZE);
                        if ((size_t) n > HEADER_SIZE)
                                memcpy(text + HEADER_SIZE, frame, (size_t) n - HEADER_SIZE);
                        text[n] = 0;
                        if (flags & MSG_PEEK)
                                (void) real.recv(fd, NULL, 0, MSG_DONTWAIT);
                        int err = judge_notice(fd, text);
                        if (err) {
                                errno = err;
                                return -1;
                        }
                        continue;
                }
                int ifindex = 0, err = 0;
                enum verdict verdict = judge_datagram(fd, head, frame, frame_len, &ifindex, &err);
                if (verdict == FAIL) {
                        errno = err;
                        return -1;
                }
                if (verdict == DROP) {
                        if (flags & MSG_PEEK)
                                (void) real.recv(fd, NULL, 0, MSG_DONTWAIT);
                        continue;
                }

                size_t copied;
                scatter(msg, frame, frame_len, &copied);
                msg->msg_controllen = in.msg_controllen;
                msg->msg_flags = in.msg_flags & ~MSG_TRUNC;
                if (copied < frame_len)
                        msg->msg_flags |= MSG_TRUNC;
                if (msg->msg_name && msg->msg_namelen > 0) {
                        struct sockaddr_can addr = { .can_family = AF_CAN, .can_ifindex = ifindex };
                        memcpy(msg->msg_name, &addr,
                               msg->msg_namelen < sizeof(addr) ? msg->msg_namelen : sizeof(addr));
                        msg->msg_namelen = sizeof(addr);
                }
                return (ssize_t) copied;
        }
}

static ssize_t can_recv_simple(int fd, void *buf, size_t len, int flags,
                               struct sockaddr *addr, socklen_t *addr_len) {
        struct iovec iov = { .iov_base = buf, .iov_len = len };
        struct msghdr msg = {
                .msg_name = addr,
                .msg_namelen = addr && addr_len ? *addr_len : 0,
                .msg_iov = &iov,
                .msg_iovlen = 1,
        };
        ssize_t n = can_recvmsg(fd, &msg, flags);
        if (n >= 0 && addr && addr_len)
                *addr_len = msg.msg_namelen;
        return n;
}

static ssize_t can_send_simple(int fd, const void *buf, size_t len, int flags,
                               const struct sockaddr *addr, socklen_t addr_len) {
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
        struct msghdr msg = {
                .msg_name = (void *) addr,
                .msg_namelen = addr ? addr_len : 0,
                .msg_iov = &iov,
                .msg_iovlen = 1,
        };
        return can_sendmsg(fd, &msg, flags);
}

/* ---- intercepted: sockets ---------------------------------------------- */

int socket(int domain, int type, int protocol) {
        ensure_init();
        int flags = type & (SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (!shim.enabled || domain != AF_CAN || (type & ~flags) != SOCK_RAW || protocol != CAN_RAW)
                return real.socket(domain, type, protocol);

        struct can_socket *s = calloc(1, sizeof(*s));
        struct can_filter *everything = calloc(1, sizeof(*everything));
        if (!s || !everything) {
                free(s);
                free(everything);
                errno = ENOMEM;
                return -1;
        }
        int fd = real.socket(AF_UNIX, SOCK_DGRAM | flags, 0);
        if (fd < 0) {
                free(s);
                free(everything);
                return -1;
        }
        s->fd = fd;
        s->loopback = true;
        s->filters = everything;        /* the kernel's default: one filter 0:0 */
        s->n_filters = 1;

        pthread_mutex_lock(&shim.lock);
        socket_remove(fd);              /* stale entry of a descriptor closed behind our back */
        struct can_socket **sockets = realloc(shim.sockets,
                                              (shim.n_sockets + 1) * sizeof(*sockets));
        if (!sockets) {
                pthread_mutex_unlock(&shim.lock);
                socket_free(s);
                real.close(fd);
                errno = ENOMEM;
                return -1;
        }
        shim.sockets = sockets;
        shim.sockets[shim.n_sockets] = s;
        __atomic_store_n(&shim.n_sockets, shim.n_sockets + 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&shim.lock);
        debug("socket(AF_CAN) = %d", fd);
        return fd;
}

int bind(int fd, __CONST_SOCKADDR_ARG addr_arg, socklen_t len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.bind(fd, addr_arg, len);

        const struct sockaddr_can *addr = (const struct sockaddr_can *) SOCKADDR_PTR(addr_arg);
        if (!addr || len < CAN_NAMELEN_MIN || addr->can_family != AF_CAN) {
                errno = EINVAL;
                return -1;
        }
        char reg[3 + IFNAMSIZ + 1] = "REG";
        pthread_mutex_lock(&shim.lock);
        struct iface *iface = addr->can_ifindex ? present_iface_by_index(addr->can_ifindex) : NULL;
        struct can_socket *s = socket_find(fd);
        int err = 0;
        if (!s)
                err = EBADF;
        else if (addr->can_ifindex && !iface)
                err = ENODEV;
        else if (iface)
                strncpy(reg + 3, iface->name, IFNAMSIZ);
        pthread_mutex_unlock(&shim.lock);
        if (err) {
                debug("bind(%d, ifindex %d): %s", fd, addr->can_ifindex, strerror(err));
                errno = err;
                return -1;
        }
        if (socket_connect(fd) < 0 || hub_send_text(fd, reg, strlen(reg)) < 0)
                return -1;

        pthread_mutex_lock(&shim.lock);
        s = socket_find(fd);
        if (s) {
                s->bound = true;
                s->ifindex = addr->can_ifindex;
        }
        pthread_mutex_unlock(&shim.lock);
        debug("bind(%d) to %s", fd, reg[3] ? reg + 3 : "all interfaces");
        return socket_send_filters(fd);
}

int close(int fd) {
        ensure_init();
        bool say_bye = false;
        if (fd >= 0 && (loaded_n_sockets() > 0 ||
                        __atomic_load_n(&shim.watch_fd, __ATOMIC_RELAXED) == fd)) {
                pthread_mutex_lock(&shim.lock);
                struct can_socket *s = socket_find(fd);
                if (s) {
                        say_bye = s->connected;
                        socket_remove(fd);
                        debug("close(%d)", fd);
                }
                if (fd == shim.watch_fd)
                        shim.watch_fd = -1;
                pthread_mutex_unlock(&shim.lock);
        }
        if (say_bye) {
                /* Let the hub forget the socket now; wait briefly if its
                 * queue is full rather than leave it registered. */
                struct iovec iov = { .iov_base = (void *) "BYE", .iov_len = 3 };
                struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
                (void) hub_sendmsg(fd, &msg, 0, HUB_BYE_TIMEOUT_MS);
        }
        return real.close(fd);
}

static int set_int_option(bool *option, const void *value, socklen_t len) {
        if (!value || len != sizeof(int)) {
                errno = EINVAL;
                return -1;
        }
        int v;
        memcpy(&v, value, sizeof(v));
        *option = v != 0;
        return 0;
}

int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
        ensure_init();
        if (level != SOL_CAN_RAW || !is_can_fd(fd))
                return real.setsockopt(fd, level, name, value, len);

        bool filters_changed = false;
        int r = 0;
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        if (!s) {
                errno = EBADF;
                r = -1;
                goto unlock;
        }
        switch (name) {
        case CAN_RAW_FILTER: {
                if (len % sizeof(struct can_filter) != 0 ||
                    len / sizeof(struct can_filter) > CAN_RAW_FILTER_MAX || (len && !value)) {
                        errno = EINVAL;
                        r = -1;
                        break;
                }
                size_t n = len / sizeof(struct can_filter);
                struct can_filter *filters = NULL;
                if (n) {
                        filters = malloc(len);
                        if (!filters) {
                                errno = ENOMEM;
                                r = -1;
                                break;
                        }
                        memcpy(filters, value, len);
                }
                free(s->filters);
                s->filters = filters;
                s->n_filters = n;
                filters_changed = true;
                break;
        }
        case CAN_RAW_ERR_FILTER:
                if (!value || len != sizeof(can_err_mask_t)) {
                        errno = EINVAL;
                        r = -1;
                        break;
                }
                memcpy(&s->err_mask, value, sizeof(s->err_mask));
                s->err_mask &= CAN_ERR_MASK;
                break;
        case CAN_RAW_LOOPBACK:
                r = set_int_option(&s->loopback, value, len);
                break;
        case CAN_RAW_RECV_OWN_MSGS:
                r = set_int_option(&s->recv_own_msgs, value, len);
                break;
        case CAN_RAW_FD_FRAMES:
                r = set_int_option(&s->fd_frames, value, len);
                break;
        case CAN_RAW_JOIN_FILTERS:
                r = set_int_option(&s->join_filters, value, len);
                filters_changed = r == 0;
                break;
        default:
                errno = ENOPROTOOPT;
                r = -1;
        }
unlock:
        pthread_mutex_unlock(&shim.lock);
        debug("setsockopt(%d, SOL_CAN_RAW, %d) = %d", fd, name, r);
        if (r == 0 && filters_changed)
                r = socket_send_filters(fd);
        return r;
}

static int get_int_option(bool option, void *value, socklen_t *len) {
        int v = option;
        if (!len || !value || *len < sizeof(int)) {
                errno = EINVAL;
                return -1;
        }
        memcpy(value, &v, sizeof(v));
        *len = sizeof(int);
        return 0;
}

int getsockopt(int fd, int level, int name, void *value, socklen_t *len) {
        ensure_init();
        if (level != SOL_CAN_RAW || !is_can_fd(fd))
                return real.getsockopt(fd, level, name, value, len);

        int r = 0;
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        if (!s) {
                errno = EBADF;
                r = -1;
        } else if (!len) {
                errno = EFAULT;
                r = -1;
        } else if (name == CAN_RAW_FILTER) {
                socklen_t size = (socklen_t) (s->n_filters * sizeof(struct can_filter));
                if (*len < size) {
                        *len = size;
                        errno = ERANGE;
                        r = -1;
                } else if (size && !value) {
                        errno = EFAULT;
                        r = -1;
                } else {
                        if (size)
                                memcpy(value, s->filters, size);
                        *len = size;
                }
        } else if (name == CAN_RAW_ERR_FILTER) {
                if (*len < sizeof(can_err_mask_t) || !value) {
                        errno = EINVAL;
                        r = -1;
                } else {
                        memcpy(value, &s->err_mask, sizeof(s->err_mask));
                        *len = sizeof(can_err_mask_t);
                }
        } else if (name == CAN_RAW_LOOPBACK)
                r = get_int_option(s->loopback, value, len);
        else if (name == CAN_RAW_RECV_OWN_MSGS)
                r = get_int_option(s->recv_own_msgs, value, len);
        else if (name == CAN_RAW_FD_FRAMES)
                r = get_int_option(s->fd_frames, value, len);
        else if (name == CAN_RAW_JOIN_FILTERS)
                r = get_int_option(s->join_filters, value, len);
        else {
                errno = ENOPROTOOPT;
                r = -1;
        }
        pthread_mutex_unlock(&shim.lock);
        return r;
}

int getsockname(int fd, __SOCKADDR_ARG addr_arg, socklen_t *len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.getsockname(fd, addr_arg, len);
        struct sockaddr *addr = SOCKADDR_PTR(addr_arg);
        struct sockaddr_can can = { .can_family = AF_CAN };
        pthread_mutex_lock(&shim.lock);
        struct can_socket *s = socket_find(fd);
        if (s && s->bound)
                can.can_ifindex = s->ifindex;
        pthread_mutex_unlock(&shim.lock);
        if (!addr || !len) {
                errno = EFAULT;
                return -1;
        }
        memcpy(addr, &can, *len < sizeof(can) ? *len : sizeof(can));
        *len = sizeof(can);
        return 0;
}

/* ---- intercepted: I/O -------------------------------------------------- */

ssize_t read(int fd, void *buf, size_t len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.read(fd, buf, len);
        return can_recv_simple(fd, buf, len, 0, NULL, NULL);
}

ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.read_chk(fd, buf, len, buflen);
        if (len > buflen)
                abort();
        return can_recv_simple(fd, buf, len, 0, NULL, NULL);
}

ssize_t write(int fd, const void *buf, size_t len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.write(fd, buf, len);
        return can_send_simple(fd, buf, len, 0, NULL, 0);
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.readv(fd, iov, iovcnt);
        struct msghdr msg = { .msg_iov = (struct iovec *) iov, .msg_iovlen = (size_t) iovcnt };
        return can_recvmsg(fd, &msg, 0);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.writev(fd, iov, iovcnt);
        struct msghdr msg = { .msg_iov = (struct iovec *) iov, .msg_iovlen = (size_t) iovcnt };
        return can_sendmsg(fd, &msg, 0);
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.recv(fd, buf, len, flags);
        return can_recv_simple(fd, buf, len, flags, NULL, NULL);
}

ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.recv_chk(fd, buf, len, buflen, flags);
        if (len > buflen)
                abort();
        return can_recv_simple(fd, buf, len, flags, NULL, NULL);
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.send(fd, buf, len, flags);
        return can_send_simple(fd, buf, len, flags, NULL, 0);
}

ssize_t recvfrom(int fd, void *buf, size_t len, int flags, __SOCKADDR_ARG addr,
                 socklen_t *addr_len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.recvfrom(fd, buf, len, flags, addr, addr_len);
        return can_recv_simple(fd, buf, len, flags, SOCKADDR_PTR(addr), addr_len);
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                       __SOCKADDR_ARG addr, socklen_t *addr_len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.recvfrom_chk(fd, buf, len, buflen, flags, addr, addr_len);
        if (len > buflen)
                abort();
        return can_recv_simple(fd, buf, len, flags, SOCKADDR_PTR(addr), addr_len);
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, __CONST_SOCKADDR_ARG addr,
               socklen_t addr_len) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.sendto(fd, buf, len, flags, addr, addr_len);
        return can_send_simple(fd, buf, len, flags, SOCKADDR_PTR(addr), addr_len);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.recvmsg(fd, msg, flags);
        return can_recvmsg(fd, msg, flags);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
        ensure_init();
        if (!is_can_fd(fd))
                return real.sendmsg(fd, msg, flags);
        return can_sendmsg(fd, msg, flags);
}

/* ---- intercepted: interfaces ------------------------------------------- */

int ioctl(int fd, unsigned long request, ...) {
        va_list ap;
        va_start(ap, request);
        void *arg = va_arg(ap, void *);
        va_end(ap);
        ensure_init();

        if (!shim.enabled || !arg ||
            (request != SIOCGIFINDEX && request != SIOCGIFNAME && request != SIOCGIFMTU &&
             request != SIOCGIFFLAGS))
                return real.ioctl(fd, request, arg);

        struct ifreq *ifr = arg;
        int r = 1;              /* 1 = not one of ours */
        int err = 0;
        pthread_mutex_lock(&shim.lock);
        ifaces_refresh();
        if (request == SIOCGIFNAME) {
                struct iface *iface = iface_by_index(ifr->ifr_ifindex);
                if (iface && iface->present) {
                        memcpy(ifr->ifr_name, iface->name, IFNAMSIZ);
                        r = 0;
                } else if (iface) {
                        err = ENODEV;
                        r = -1;
                }
        } else {
                char name[IFNAMSIZ];
                memcpy(name, ifr->ifr_name, IFNAMSIZ);
                name[IFNAMSIZ - 1] = 0;
                struct iface *iface = iface_by_name(name);
                if (iface && !iface->present) {
                        err = ENODEV;
                        r = -1;
                } else if (iface) {
                        r = 0;
                        if (request == SIOCGIFINDEX)
                                ifr->ifr_ifindex = iface_index(iface);
                        else if (request == SIOCGIFMTU)
                                ifr->ifr_mtu = CAN_MTU;
                        else
                                ifr->ifr_flags = (short) (IFF_NOARP | IFF_ECHO |
                                                          (iface->up ? IFF_UP | IFF_RUNNING : 0));
                }
        }
        pthread_mutex_unlock(&shim.lock);
        if (r > 0)
                return real.ioctl(fd, request, arg);
        if (r < 0)
                errno = err;
        return r;
}

unsigned if_nametoindex(const char *name) {
        ensure_init();
        if (!shim.enabled || !name)
                return real.if_nametoindex(name);
        pthread_mutex_lock(&shim.lock);
        ifaces_refresh();
        struct iface *iface = iface_by_name(name);
        int present = iface ? iface->present : -1;
        int ifindex = iface ? iface_index(iface) : 0;
        pthread_mutex_unlock(&shim.lock);
        if (present < 0)
                return real.if_nametoindex(name);
        if (!present) {
                errno = ENODEV;
                return 0;
        }
        return (unsigned) ifindex;
}

char *if_indextoname(unsigned ifindex, char name[IF_NAMESIZE]) {
        ensure_init();
        if (!shim.enabled || ifindex < IFINDEX_BASE || ifindex >= IFINDEX_BASE + MAX_IFACES)
                return real.if_indextoname(ifindex, name);
        pthread_mutex_lock(&shim.lock);
        ifaces_refresh();
        struct iface *iface = iface_by_index((int) ifindex);
        bool found = iface && iface->present;
        if (found)
                memcpy(name, iface->name, IFNAMSIZ);
        pthread_mutex_unlock(&shim.lock);
        if (!iface)
                return real.if_indextoname(ifindex, name);
        if (!found) {
                errno = ENXIO;
                return NULL;
        }
        return name;
}

struct if_nameindex *if_nameindex(void) {
        ensure_init();
        if (!shim.enabled)
                return real.if_nameindex();
        struct if_nameindex *system = real.if_nameindex();
        if (!system)
                return NULL;
        size_t n_system = 0;
        while (system[n_system].if_index || system[n_system].if_name)
                n_system++;

        /* if_freenameindex() frees every name and then the array, so
         * everything in the result is allocated separately. */
        pthread_mutex_lock(&shim.lock);
        ifaces_refresh();
        struct if_nameindex *list = calloc(n_system + shim.n_ifaces + 1, sizeof(*list));
        size_t n = 0;
        bool failed = !list;
        for (size_t i = 0; !failed && i < n_system; i++, n++) {
                list[n].if_index = system[i].if_index;
                list[n].if_name = strdup(system[i].if_name);
                failed = !list[n].if_name;
        }
        for (size_t i = 0; !failed && i < shim.n_ifaces; i++) {
                if (!shim.ifaces[i].present)
                        continue;
                list[n].if_index = (unsigned) iface_index(&shim.ifaces[i]);
                list[n].if_name = strdup(shim.ifaces[i].name);
                failed = !list[n++].if_name;
        }
        pthread_mutex_unlock(&shim.lock);
        real.if_freenameindex(system);
        if (failed) {
                if (list)
                        real.if_freenameindex(list);
                errno = ENOBUFS;
                return NULL;
        }
        return list;
}
