/* The host version from a Klipper checkout, as klippy/util.py
 * get_git_version() derives it (protocols.md §16): what
 * `git describe --always --tags --long --dirty` prints there, else the first
 * line of klippy/.version, else "?".  (While Klipper runs, the daemon takes
 * klippy's own `software_version` instead and does not come here.)
 *
 * The checkout belongs to another user (the Klipper user, often the web UI's
 * user) and the daemon is root, so no program is run on it: git would run
 * commands from the checkout's own config (core.fsmonitor, filter.<x>.clean,
 * …) as root.  The repository is read with libgit2 instead, which executes
 * nothing:
 *  - it has no fsmonitor support and runs no hooks;
 *  - git_status_list_new() hashes modified work-tree files through the
 *    filters registered in this process only.  libgit2 registers "crlf" and
 *    "ident" (both in-process code); a `filter=x` attribute names no
 *    registered filter and is skipped, and the filter.<x>.clean/smudge/
 *    process commands of the config are never read.  So a file under such a
 *    filter is compared byte for byte: modified means dirty, as git says
 *    when the filter passes content through (a filter that rewrites content
 *    could make git and this code disagree about "dirty"; Klipper has none);
 *  - git_describe_workdir() is not used: it is git_describe_commit() plus
 *    that same status call, and doing the two here keeps the status options
 *    in view: no untracked or ignored files (describe --dirty ignores
 *    them), and no GIT_STATUS_OPT_UPDATE_INDEX, so the index is only read,
 *    never written (a root-owned .git/index would lock its owner out).
 * libgit2 ≥ 1.4 refuses a repository owned by another user, like git's
 * safe.directory.  That check exists to stop a foreign config from running
 * programs; libgit2 runs none, so it is switched off
 * (GIT_OPT_SET_OWNER_VALIDATION, a process-wide libgit2 setting).  What
 * leaves the child is the describe text alone, so a config pointing
 * elsewhere (core.worktree, a "gitdir:" file) reveals no more than a tag
 * name and whether files differ.
 *
 * All of it happens in a child process started for the purpose (the
 * daemon's own program again, VERSION_DESCRIBE_ARG: a plain fork() of a
 * threaded daemon can inherit a held lock), killed after
 * a timeout: libgit2 cannot be interrupted, and the owner of the checkout
 * could make any file in .git a FIFO that blocks a read forever.  Setting the
 * libgit2 option in the child also keeps it out of the daemon itself.
 *
 * The abbreviation length follows git's: core.abbrev if set, else "auto" —
 * one hex digit per two bits of the number of packed objects (the sum over
 * the objects/pack/ indexes), at least 7 — then lengthened until unique.  Packs
 * of alternates and a multi-pack-index are not counted.
 *
 * klippy/.version is read directly (no child), non-blocking and only if it
 * is a regular file the checkout's owner could read; a first line that is
 * not a version (protocols.md §16 forms) is not shown either.  So a link to
 * a root-only file cannot put its first line on the bus. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <git2.h>

#include "core/version.h"
#include "shared/log.h"
#include "shared/macro.h"
#include "shared/strutil.h"
#include "shared/time-util.h"

#define GIT_TIMEOUT_MSEC 5000
#define CHILD_OUTPUT_MAX 1024
#define VERSION_FILE_MAX 4096
#define ABBREV_FALLBACK 7
#define ABBREV_MIN 4
#define ABBREV_FULL 40

/* ---- in the child: libgit2 ------------------------------------------- */

static unsigned msb(unsigned long x) {
        unsigned r = 0;

        while (x >>= 1)
                r++;
        return r;
}

static uint32_t be32(const unsigned char *p) {
        return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

/* Objects in one pack index: the last fanout entry.  Version 2 starts with
 * "\377tOc", 2; version 1 with the fanout table itself. */
static unsigned long pack_index_objects(int dir_fd, const char *name) {
        unsigned char head[8 + 256 * 4];
        _cleanup_close_ int fd = -1;
        struct stat st;
        size_t off = 0, need;
        ssize_t n;

        fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                return 0;
        while (off < sizeof(head)) {
                n = read(fd, head + off, sizeof(head) - off);
                if (n <= 0)
                        break;
                off += (size_t) n;
        }
        if (off >= 8 && memcmp(head, "\377tOc", 4) == 0) {
                if (be32(head + 4) != 2)
                        return 0;
                need = 8 + 256 * 4;
                return off >= need ? be32(head + need - 4) : 0;
        }
        need = 256 * 4;
        return off >= need ? be32(head + need - 4) : 0;
}

/* git's repo_approximate_object_count(): objects in the packs whose .pack
 * exists beside the .idx. */
static unsigned long packed_object_count(git_repository *repo) {
        _cleanup_free_ char *dir = NULL;
        unsigned long count = 0;
        struct dirent *de;
        DIR *d;

        if (asprintf(&dir, "%sobjects/pack", git_repository_commondir(repo)) < 0)
                return 0;
        d = opendir(dir);
        if (!d)
                return 0;
        while ((de = readdir(d))) {
                size_t len = strlen(de->d_name);
                char pack[NAME_MAX + 1];

                if (len <= 4 || !streq(de->d_name + len - 4, ".idx") || len >= sizeof(pack))
                        continue;
                memcpy(pack, de->d_name, len - 4);
                strcpy(pack + len - 4, ".pack");
                if (faccessat(dirfd(d), pack, F_OK, AT_SYMLINK_NOFOLLOW) < 0)
                        continue;
                count += pack_index_objects(dirfd(d), de->d_name);
        }
        closedir(d);
        return count;
}

/* git's default abbreviation length for this repository. */
static unsigned abbrev_length(git_repository *repo) {
        git_config *config = NULL;
        git_buf value = {};
        unsigned len = 0;

        if (git_repository_config_snapshot(&config, repo) == 0 &&
            git_config_get_string_buf(&value, config, "core.abbrev") == 0) {
                const char *v = value.ptr;
                char *end;
                long n;

                if (strcaseeq_ptr(v, "false") || strcaseeq_ptr(v, "no") || strcaseeq_ptr(v, "off"))
                        len = ABBREV_FULL;
                else if (!strcaseeq_ptr(v, "auto")) {
                        errno = 0;
                        n = strtol(v, &end, 10);
                        if (errno == 0 && end != v && !*end)
                                len = (unsigned) MIN(MAX(n, ABBREV_MIN), ABBREV_FULL);
                }
        }
        git_buf_dispose(&value);
        git_config_free(config);
        if (len > 0)
                return len;

        len = (msb(packed_object_count(repo)) + 2) / 2;
        return MAX(len, (unsigned) ABBREV_FALLBACK);
}

/* True if a tracked file differs from HEAD, staged or not: what makes
 * describe --dirty say "-dirty".  Untracked and ignored files do not count;
 * the index is read, not written. */
static int workdir_is_dirty(git_repository *repo, bool *ret) {
        git_status_list *status = NULL;
        git_status_options opts;
        int r;

        r = git_status_options_init(&opts, GIT_STATUS_OPTIONS_VERSION);
        if (r < 0)
                return r;
        opts.show = GIT_STATUS_SHOW_INDEX_AND_WORKDIR;
        opts.flags = 0;
        r = git_status_list_new(&status, repo, &opts);
        if (r < 0)
                return r;
        *ret = git_status_list_entrycount(status) > 0;
        git_status_list_free(status);
        return 0;
}

/* describe --always --tags --long [--dirty] of the checkout at @path, into
 * @out (malloc()ed).  Returns a libgit2 error code (< 0, git_error_last()
 * says why) or 0. */
static int libgit2_describe(const char *path, char **out) {
        git_describe_format_options format;
        git_describe_options opts;
        git_describe_result *result = NULL;
        git_repository *repo = NULL;
        git_buf text = {};
        git_object *head = NULL;
        bool dirty = false;
        int r;

        r = git_libgit2_opts(GIT_OPT_SET_OWNER_VALIDATION, 0);
        if (r >= 0)
                r = git_describe_options_init(&opts, GIT_DESCRIBE_OPTIONS_VERSION);
        if (r >= 0)
                r = git_describe_format_options_init(&format, GIT_DESCRIBE_FORMAT_OPTIONS_VERSION);
        if (r < 0)
                return r;
        r = git_repository_open_ext(&repo, path, GIT_REPOSITORY_OPEN_NO_SEARCH, NULL);
        if (r < 0)
                return r;
        if (git_repository_is_bare(repo)) {
                git_error_set_str(GIT_ERROR_REPOSITORY, "the repository has no work tree");
                r = -1;
                goto out;
        }
        r = git_revparse_single(&head, repo, "HEAD^{commit}");
        if (r < 0)
                goto out;

        opts.describe_strategy = GIT_DESCRIBE_TAGS;
        opts.show_commit_oid_as_fallback = 1;
        r = git_describe_commit(&result, head, &opts);
        if (r < 0)
                goto out;
        r = workdir_is_dirty(repo, &dirty);
        if (r < 0)
                goto out;

        format.abbreviated_size = abbrev_length(repo);
        format.always_use_long_format = 1;
        r = git_describe_format(&text, result, &format);
        if (r < 0)
                goto out;
        if (asprintf(out, "%s%s", text.ptr, dirty ? "-dirty" : "") < 0) {
                git_error_set_oom();
                r = -1;
        }
out:
        git_buf_dispose(&text);
        git_describe_result_free(result);
        git_object_free(head);
        git_repository_free(repo);
        return r;
}

static void write_all(int fd, const char *s) {
        size_t n = strlen(s);

        while (n > 0) {
                ssize_t k = write(fd, s, n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return;
                s += k;
                n -= (size_t) k;
        }
}

/* The child's whole life: "ok <version>\n" or "error <message>\n" on @fd. */
_noreturn_
static void describe_child(const char *path, int fd);

int version_describe_checkout_main(const char *path) {
        describe_child(path, STDOUT_FILENO);
}

_noreturn_
static void describe_child(const char *path, int fd) {
        const git_error *e;
        char *out = NULL;
        int r;

        r = git_libgit2_init();
        if (r >= 0)
                r = libgit2_describe(path, &out);
        if (r >= 0) {
                write_all(fd, "ok ");
                write_all(fd, out);
                write_all(fd, "\n");
                _exit(EXIT_SUCCESS);
        }
        e = git_error_last();
        write_all(fd, "error ");
        write_all(fd, e && e->message ? e->message : "libgit2 failed");
        write_all(fd, "\n");
        _exit(EXIT_FAILURE);
}

/* ---- in the daemon: the child and its deadline ----------------------- */

static void kill_and_reap(pid_t pid) {
        (void) kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
}

/* Read the child's report from @fd until EOF or @deadline (CLOCK_MONOTONIC
 * msec); keeps the first @size - 1 bytes.  Returns 0, -ETIMEDOUT, -errno. */
static int read_report(int fd, long long deadline, char *buf, size_t size) {
        size_t fill = 0;

        for (;;) {
                struct pollfd pfd = { .fd = fd, .events = POLLIN };
                long long left = deadline - (long long) now_msec();
                char discard[256];
                ssize_t n;
                int r;

                if (left <= 0)
                        return -ETIMEDOUT;
                r = poll(&pfd, 1, (int) MIN(left, 1000));
                if (r < 0 && errno != EINTR)
                        return -errno;
                if (r <= 0)
                        continue;
                if (fill + 1 < size)
                        n = read(fd, buf + fill, size - 1 - fill);
                else
                        n = read(fd, discard, sizeof(discard));
                if (n < 0) {
                        if (errno == EINTR || errno == EAGAIN)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        break;
                if (fill + 1 < size)
                        fill += (size_t) n;
        }
        buf[fill] = '\0';
        return 0;
}

/* Wait for @pid until @deadline.  Returns its wait status, or -ECHILD if
 * the kernel reaped it (SIGCHLD ignored), -ETIMEDOUT (killed), -errno. */
static int wait_child(pid_t pid, long long deadline) {
        int status;

        for (;;) {
                pid_t w = waitpid(pid, &status, WNOHANG);

                if (w == pid)
                        return status;
                if (w < 0 && errno != EINTR)
                        return -errno;
                if ((long long) now_msec() >= deadline) {
                        kill_and_reap(pid);
                        return -ETIMEDOUT;
                }
                (void) poll(NULL, 0, 10);
        }
}

/* The describe of @path, done by a child killed at the timeout.  Returns 0
 * with the version, -ETIMEDOUT, -EIO (libgit2 failed, logged), -errno. */
static int describe_checkout(const char *path, unsigned timeout_msec, char **ret) {
        long long deadline = (long long) now_msec() + timeout_msec;
        _cleanup_close_ int devnull = -1, out_read = -1, out_write = -1;
        char report[CHILD_OUTPUT_MAX];
        sigset_t empty_mask;
        int pipefd[2], r, status;
        const char *v;
        pid_t pid;

        devnull = open("/dev/null", O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (devnull < 0)
                return -errno;
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        out_read = pipefd[0];
        out_write = pipefd[1];
        sigemptyset(&empty_mask);

        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                if (dup2(devnull, STDIN_FILENO) < 0 || dup2(out_write, STDOUT_FILENO) < 0 ||
                    dup2(devnull, STDERR_FILENO) < 0)
                        _exit(EXIT_FAILURE);
                (void) close_range(3, ~0U, 0);
                (void) sigprocmask(SIG_SETMASK, &empty_mask, NULL);
                (void) signal(SIGPIPE, SIG_DFL);
                /* A fresh program, not this fork: the daemon has threads,
                 * and a lock one of them held at fork() (seen: libgit2
                 * hung in such a child) stays held in the copy for ever.
                 * The running program's own file, which answers
                 * VERSION_DESCRIBE_ARG (mcuflashd's main(), test-version). */
                execl("/proc/self/exe", "mcuflashd", VERSION_DESCRIBE_ARG, path, (char *) NULL);
                _exit(EXIT_FAILURE);
        }
        out_write = safe_close(out_write);

        r = read_report(out_read, deadline, report, sizeof(report));
        if (r < 0) {
                kill_and_reap(pid);
                if (r == -ETIMEDOUT)
                        log_warning("Reading the Klipper checkout %s took longer than %u ms, gave up.",
                                    path, timeout_msec);
                return r;
        }
        status = wait_child(pid, deadline);
        if (status < 0 && status != -ECHILD)
                return status;
        /* With -ECHILD the exit status is lost: the report says it all. */

        report[strcspn(report, "\n")] = '\0';
        if ((v = startswith(report, "error "))) {
                log_debug("libgit2 cannot describe %s: %s", path, v);
                return -EIO;
        }
        v = startswith(report, "ok ");
        if (!v || (status >= 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)))
                return -EIO;
        v = strstrip((char *) v);
        if (!*v)
                return -ENODATA;
        *ret = strdup(v);
        return *ret ? 0 : -ENOMEM;
}

/* ---- klippy/.version --------------------------------------------------- */

/* Could the owner of the checkout @path read the file @st?  (Group access
 * is judged by the checkout's group.)  A link to a root-only file is not
 * read on their behalf. */
static bool owner_can_read(const char *path, const struct stat *st) {
        struct stat dir;

        if (stat(path, &dir) < 0)
                return false;
        if (dir.st_uid == 0 || (st->st_mode & S_IROTH))
                return true;
        if (st->st_uid == dir.st_uid)
                return st->st_mode & S_IRUSR;
        return st->st_gid == dir.st_gid && (st->st_mode & S_IRGRP);
}

/* First line of @path/klippy/.version, trimmed, if it is a version. */
static int read_version_file(const char *path, char **ret) {
        _cleanup_free_ char *file = NULL;
        _cleanup_close_ int fd = -1;
        char buf[VERSION_FILE_MAX];
        struct version parsed;
        struct stat st;
        size_t fill = 0;
        char *line;
        int r;

        if (asprintf(&file, "%s/klippy/.version", path) < 0)
                return -ENOMEM;
        /* Non-blocking: the owner could make it a FIFO. */
        fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;
        if (!owner_can_read(path, &st))
                return -EACCES;
        while (fill + 1 < sizeof(buf)) {
                ssize_t n = read(fd, buf + fill, sizeof(buf) - 1 - fill);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        break;
                fill += (size_t) n;
        }
        buf[fill] = '\0';
        buf[strcspn(buf, "\n")] = '\0';
        line = strstrip(buf);
        if (!*line)
                return -ENODATA;
        r = version_parse(line, &parsed);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                return -EBADMSG;
        version_done(&parsed);
        *ret = strdup(line);
        return *ret ? 0 : -ENOMEM;
}

/* ---- together ---------------------------------------------------------- */

int version_read_host_with_timeout(const char *klipper_path, unsigned timeout_msec, char **ret) {
        _cleanup_free_ char *git_dir = NULL;
        char *v = NULL;
        int r;

        if (isempty(klipper_path))
                goto unknown;

        if (asprintf(&git_dir, "%s/.git", klipper_path) < 0)
                return -ENOMEM;
        if (access(git_dir, F_OK) == 0) {
                r = describe_checkout(klipper_path, timeout_msec, &v);
                if (r == -ENOMEM)
                        return r;
                if (r >= 0) {
                        *ret = v;
                        return 0;
                }
                log_debug_errno(r, "Cannot describe the git checkout %s: %m", klipper_path);
        }

        r = read_version_file(klipper_path, &v);
        if (r == -ENOMEM)
                return r;
        if (r >= 0) {
                *ret = v;
                return 0;
        }
        if (r == -EBADMSG)
                log_warning("%s/klippy/.version does not start with a version; host version unknown.",
                            klipper_path);
        else if (r == -EACCES)
                log_warning("%s/klippy/.version is not readable by the checkout's owner, not read; "
                            "host version unknown.", klipper_path);
        else
                log_debug_errno(r, "Cannot read %s/klippy/.version: %m", klipper_path);

unknown:
        v = strdup("?");
        if (!v)
                return -ENOMEM;
        *ret = v;
        return 0;
}

int version_read_host(const char *klipper_path, char **ret) {
        return version_read_host_with_timeout(klipper_path, GIT_TIMEOUT_MSEC, ret);
}
