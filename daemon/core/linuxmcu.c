/* The Linux process MCU: klipper_mcu on the host itself, reached through
 * the pty it creates (printer.cfg "serial: /tmp/klipper_host_mcu", changed
 * with its -I option).  Such paths are not udev devices: every printer.cfg
 * serial: outside /dev is watched with discover/pathwatch.c.
 *
 * The link says nothing about liveness: klipper_mcu replaces a stale link
 * when it starts and never removes it, and pty numbers are reused within
 * seconds, so a leftover link soon leads to somebody else's terminal.  What
 * counts is the process that holds the pty's master side
 * (transport/ptyowner.c): there is an MCU with transport "linux" behind the
 * link while that process is the Klipper Linux MCU program — it runs
 * [Mcu ID] Program= (default /usr/local/bin/klipper_mcu), or its name is
 * klipper_mcu or Program='s file name and it runs as root or as Program='s
 * owner (process_is_program()).  That process is watched with a
 * pidfd on the loop: when it exits the MCU is offline at once.  A pty whose
 * master anything else holds is never opened (the MCU is offline, or not
 * there, and the log says why, once); identify checks the owner again
 * around its open (serial_transport_open_pty()).  A new klipper_mcu makes a
 * new link, which the path watch reports. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core/config.h"
#include "core/daemon-internal.h"
#include "shared/log.h"
#include "transport/ptyowner.h"

#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif

/* How many holders of one pty master are looked at; more is refused. */
#define HOLDERS_MAX 8

/* One watched printer.cfg path and the klipper_mcu behind it, if any. */
struct linux_link {
        struct daemon *daemon;
        char *path;
        char *mcu_id;
        pid_t pid;                      /* the program holding the pty's master; 0: none */
        int index;                      /* its pty: /dev/pts/index */
        int pidfd;
        struct event *exit_event;
        char *told;                     /* the last refusal logged, so that it is logged once */
};

struct linux_links {
        struct linux_link **links;
        size_t n;
};

/* The id of a Linux process MCU: "linux-" and the basename of its path, so
 * that /tmp/klipper_host_mcu is "linux-klipper_host_mcu". */
static int linux_mcu_id(const char *path, char **ret) {
        const char *base = strrchr(path, '/');

        return asprintf(ret, "linux-%s", base ? base + 1 : path) < 0 ? -ENOMEM : 0;
}

static struct mcu *find_linux_mcu(struct daemon *d, const char *path) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                if (m->transport_id == MCU_TRANSPORT_LINUX && streq(m->device_path, path))
                        return m;
        }
        return NULL;
}

static void link_unwatch(struct linux_link *l) {
        if (l->exit_event)
                event_free(l->exit_event);
        l->exit_event = NULL;
        l->pidfd = safe_close(l->pidfd);
        l->pid = 0;
        l->index = 0;
}

static struct linux_link *link_free(struct linux_link *l) {
        if (!l)
                return NULL;
        link_unwatch(l);
        free(l->path);
        free(l->mcu_id);
        free(l->told);
        free(l);
        return NULL;
}

/* Who is behind @path?  1 with the program's pid and pty number when it is
 * the Linux MCU program @program; 0 with the reason in @why when not. */
static int link_owner(const char *path, const char *program, pid_t *ret_pid, int *ret_index,
                      char *why, size_t why_size) {
        struct process_identity id;
        pid_t pids[HOLDERS_MAX], program_pid = 0;
        struct stat st;
        uid_t program_owner;
        int index, n;

        program_owner = stat(program, &st) >= 0 ? st.st_uid : (uid_t) -1;
        if (lstat(path, &st) < 0) {
                snprintf(why, why_size, "there is no %s: klipper_mcu is not running", path);
                return 0;
        }
        if (stat(path, &st) < 0 || !S_ISCHR(st.st_mode)) {
                snprintf(why, why_size, "%s leads nowhere: klipper_mcu is not running (it leaves its link "
                         "behind)", path);
                return 0;
        }
        index = pty_slave_index(st.st_rdev);
        if (index < 0) {
                snprintf(why, why_size, "%s is no pseudo terminal, so it is not klipper_mcu's; not opened", path);
                return 0;
        }
        n = pty_find_master_holders(index, pids, ELEMENTSOF(pids));
        if (n < 0)
                return n;
        if (n > HOLDERS_MAX) {
                snprintf(why, why_size, "the pty behind %s (/dev/pts/%d) is held by %d processes, not by "
                         "klipper_mcu alone; not opened", path, index, n);
                return 0;
        }
        for (int i = 0; i < n; i++) {
                if (process_identity_read(pids[i], &id) < 0)
                        continue;       /* exited meanwhile: it holds nothing now */
                if (!process_is_program(&id, program, program_owner)) {
                        snprintf(why, why_size, "%s leads to /dev/pts/%d, a terminal of %s (pid %d, user %u%s%.300s), "
                                 "not of klipper_mcu (%.300s): a link left behind by a klipper_mcu that stopped, or "
                                 "made by another program; not opened", path, index, id.comm, (int) pids[i],
                                 (unsigned) id.uid, isempty(id.exe) ? "" : ", ", id.exe, program);
                        return 0;
                }
                if (program_pid == 0)
                        program_pid = pids[i];
        }
        if (program_pid == 0) {
                snprintf(why, why_size, "nothing holds the pty behind %s (/dev/pts/%d): klipper_mcu is not "
                         "running (it leaves its link behind)", path, index);
                return 0;
        }
        *ret_pid = program_pid;
        *ret_index = index;
        return 1;
}

static void link_update(struct linux_link *l);

/* Stop watching the program, saying so when it has exited: its exit and
 * a new klipper_mcu's link may come in the same turn of the loop, the
 * link first. */
static void link_forget(struct linux_link *l) {
        struct pollfd exited = { .fd = l->pidfd, .events = POLLIN };

        if (l->pid > 0 && l->pidfd >= 0 && poll(&exited, 1, 0) > 0)
                log_info("%s: klipper_mcu (pid %d) behind %s exited.", l->mcu_id, (int) l->pid, l->path);
        link_unwatch(l);
}

static void on_program_exit(evutil_socket_t fd, short what, void *userdata) {
        struct linux_link *l = userdata;

        link_forget(l);
        link_update(l);
}

/* Watch @pid, which held the master of /dev/pts/@index when looked at.
 * 0, or -ESRCH when it is gone (or no longer that) by now. */
static int link_watch(struct linux_link *l, pid_t pid, int index, const char *program) {
        struct process_identity id;
        struct stat st;
        int fd;

        link_forget(l);
        fd = (int) syscall(__NR_pidfd_open, pid, 0);
        if (fd < 0) {
                if (errno == ESRCH)
                        return -ESRCH;
                log_warning_errno(errno, "%s: cannot watch klipper_mcu (pid %d) for its exit: %m; it is only "
                                  "checked when identified.", l->mcu_id, (int) pid);
        }
        /* The pid may have been reused between the look and pidfd_open():
         * the pidfd's process must still be the program holding the pty. */
        if (pty_process_holds_master(pid, index) <= 0 || process_identity_read(pid, &id) < 0 ||
            !process_is_program(&id, program, stat(program, &st) >= 0 ? st.st_uid : (uid_t) -1)) {
                safe_close(fd);
                return -ESRCH;
        }
        l->pid = pid;
        l->index = index;
        l->pidfd = fd;
        if (fd >= 0) {
                l->exit_event = event_new(l->daemon->base, fd, EV_READ, on_program_exit, l);
                if (!l->exit_event || event_add(l->exit_event, NULL) < 0)
                        log_oom();
        }
        return 0;
}

/* The program is behind the link: show the MCU and identify it. */
static void link_attach(struct linux_link *l) {
        struct daemon *d = l->daemon;
        struct mcu *m = find_linux_mcu(d, l->path);
        bool is_new = !m;

        if (m && m->pty_owner == l->pid && m->state_id != MCU_STATE_OFFLINE)
                return;         /* the same klipper_mcu as before */
        if (m && m->pty_owner > 0 && m->state_id != MCU_STATE_OFFLINE)
                /* Another klipper_mcu than the one identified: start over. */
                daemon_mcu_gone(d, m, "klipper_mcu was restarted");
        if (!m) {
                if (mcu_new(l->mcu_id, &m) < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
        }
        log_info("%s: %s leads to /dev/pts/%d of klipper_mcu (pid %d).", l->mcu_id, l->path, l->index,
                 (int) l->pid);
        free(l->told);
        l->told = NULL;
        m->pty_owner = l->pid;
        m->pty_index = l->index;
        daemon_cancel_offline_timer(m);
        mcu_set_transport(m, MCU_TRANSPORT_LINUX);
        (void) mcu_set_string(m, MCU_PROP_DEVICE_PATH, l->path);
        /* "Flashing" a Linux process MCU means installing a new klipper_mcu. */
        (void) mcu_set_string(m, MCU_PROP_BOOTLOADER, "linux");
        daemon_mcu_attached(d, m, is_new);
}

/* Nobody, or not the program, is behind the link: offline, said once. */
static void link_refuse(struct linux_link *l, const char *why) {
        struct daemon *d = l->daemon;
        struct mcu *m = find_linux_mcu(d, l->path);

        link_forget(l);
        if (!streq_ptr(l->told, why)) {
                log_info("%s: %s.", l->mcu_id, why);
                (void) free_and_strdup(&l->told, why);
        }
        if (!m)
                return;
        m->pty_owner = 0;
        m->pty_index = 0;
        if (m->state_id != MCU_STATE_OFFLINE)
                daemon_mcu_gone(d, m, why);
        else if (mcu_set_string(m, MCU_PROP_STATE_REASON, why) > 0)
                registry_commit(d->registry, m);
}

/* Look at the link again and act on what is behind it now. */
static void link_update(struct linux_link *l) {
        const char *program = config_mcu_get(l->daemon->config, l->mcu_id, "Program") ?: DEFAULT_LINUX_MCU_PROGRAM;
        char why[2048];
        pid_t pid = 0;
        int index = 0, r;

        r = link_owner(l->path, program, &pid, &index, why, sizeof(why));
        if (r < 0)
                snprintf(why, sizeof(why), "cannot tell who holds the pty behind %s (%s); not opened", l->path,
                         strerror(-r));
        if (r > 0 && (pid != l->pid || index != l->index || !l->exit_event) &&
            link_watch(l, pid, index, program) < 0) {
                snprintf(why, sizeof(why), "klipper_mcu (pid %d) behind %s exited", (int) pid, l->path);
                r = 0;
        }
        if (r > 0)
                link_attach(l);
        else
                link_refuse(l, why);
}

static struct linux_link *find_link(struct daemon *d, const char *path) {
        for (size_t i = 0; d->linux_links && i < d->linux_links->n; i++)
                if (streq(d->linux_links->links[i]->path, path))
                        return d->linux_links->links[i];
        return NULL;
}

static void linux_path_changed(void *userdata, const char *path) {
        struct linux_link *l = find_link(userdata, path);

        if (l)
                link_update(l);
}

static int link_new(struct daemon *d, const char *path, struct linux_link **ret) {
        struct linux_link *l = calloc(1, sizeof(*l));

        if (!l)
                return -ENOMEM;
        l->daemon = d;
        l->pidfd = -1;
        l->path = strdup(path);
        if (!l->path || linux_mcu_id(path, &l->mcu_id) < 0) {
                link_free(l);
                return -ENOMEM;
        }
        *ret = l;
        return 0;
}

static bool link_in(struct linux_link **links, size_t n, const char *path) {
        for (size_t i = 0; i < n; i++)
                if (streq(links[i]->path, path))
                        return true;
        return false;
}

/* Keep exactly the links of @paths: new ones are added (looked at when the
 * path watch reports them), dropped ones forgotten, their MCU offline. */
static int links_sync(struct daemon *d, char **paths, size_t n_paths) {
        struct linux_links *ls = d->linux_links;
        struct linux_link **next;
        size_t n = 0;

        next = calloc(n_paths + 1, sizeof(*next));
        if (!next)
                return -ENOMEM;
        for (size_t i = 0; i < n_paths; i++) {
                struct linux_link *l;
                int r;

                if (link_in(next, n, paths[i]))
                        continue;       /* named twice */
                l = find_link(d, paths[i]);
                if (!l) {
                        r = link_new(d, paths[i], &l);
                        if (r < 0) {
                                for (size_t j = 0; j < n; j++)
                                        if (!find_link(d, next[j]->path))
                                                link_free(next[j]);
                                free(next);
                                return r;
                        }
                }
                next[n++] = l;
        }
        for (size_t i = 0; i < ls->n; i++) {
                struct linux_link *l = ls->links[i];
                struct mcu *m;

                if (link_in(next, n, l->path))
                        continue;
                m = find_linux_mcu(d, l->path);
                if (m && m->state_id != MCU_STATE_OFFLINE) {
                        m->pty_owner = 0;
                        daemon_mcu_gone(d, m, "printer.cfg no longer names it");
                }
                link_free(l);
        }
        free(ls->links);
        ls->links = next;
        ls->n = n;
        return 0;
}

/* Watch every printer.cfg serial: path outside /dev (see above). */
int daemon_linux_mcus_update(struct daemon *d) {
        static const struct path_watch_callbacks callbacks = {
                .appeared = linux_path_changed,
                .vanished = linux_path_changed,
        };
        _cleanup_free_ char **paths = NULL;
        size_t n = 0;
        int r;

        if (!d->linux_links) {
                d->linux_links = calloc(1, sizeof(*d->linux_links));
                if (!d->linux_links)
                        return -ENOMEM;
        }
        if (!d->path_watch) {
                struct path_watch_callbacks cb = callbacks;

                cb.userdata = d;
                r = path_watch_new(d->base, &cb, &d->path_watch);
                if (r < 0)
                        return r;
        }
        paths = calloc((d->printercfg ? d->printercfg->n_mcus : 0) + 1, sizeof(char *));
        if (!paths)
                return -ENOMEM;
        for (size_t i = 0; d->printercfg && i < d->printercfg->n_mcus; i++) {
                const char *serial = d->printercfg->mcus[i].serial;

                if (!isempty(serial) && serial[0] == '/' && !startswith(serial, "/dev/"))
                        paths[n++] = (char *) serial;
        }
        r = links_sync(d, paths, n);
        if (r < 0)
                return r;
        return path_watch_set(d->path_watch, paths);
}

void daemon_linux_mcus_free(struct daemon *d) {
        if (!d->linux_links)
                return;
        for (size_t i = 0; i < d->linux_links->n; i++)
                link_free(d->linux_links->links[i]);
        free(d->linux_links->links);
        free(d->linux_links);
        d->linux_links = NULL;
}
