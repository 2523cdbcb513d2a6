/* Klipper version strings (protocols.md §16).  Parses what Klipper's
 * scripts/buildcommands.py embeds in firmware and what klippy reports as its
 * own version, decides whether an MCU runs the host's version (mcuflashd's
 * rule: equal "<tag>-<n>-g<sha>" core, suffixes ignored) and reads the host
 * version from a Klipper checkout the way klippy/util.py get_git_version()
 * does: what `git describe --always --tags --long --dirty` prints (obtained
 * without letting git write to the checkout), else klippy/.version, else "?".
 * It does not look at build_versions (compiler versions). */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/version.h"
#include "shared/log.h"
#include "shared/macro.h"
#include "shared/strutil.h"
#include "shared/time-util.h"

#define GIT_TIMEOUT_MSEC 5000
#define MAX_VERSION_OUTPUT 1024
#define SHA_MIN 4
#define SHA_MAX 40

extern char **environ;

const char *version_match_to_string(enum version_match m) {
        switch (m) {
        case VERSION_MATCH_YES:
                return "yes";
        case VERSION_MATCH_NO:
                return "no";
        case VERSION_MATCH_UNKNOWN:
                break;
        }
        return "unknown";
}

static bool all_digits(const char *s, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (!isdigit((unsigned char) s[i]))
                        return false;
        return true;
}

static bool is_sha(const char *s) {
        size_t n = strlen(s);

        if (n < SHA_MIN || n > SHA_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isxdigit((unsigned char) s[i]))
                        return false;
        return true;
}

/* Cut "-dirty" and "-YYYYmmdd_HHMMSS-host" off @s (modified in place);
 * @ret_stamp points into @s. */
static void split_suffixes(char *s, bool *ret_dirty, char **ret_stamp) {
        size_t n;

        *ret_stamp = NULL;
        *ret_dirty = false;

        /* The first "-<8 digits>_<6 digits>-": the hostname after it may
         * contain anything, even dashes and digits. */
        for (char *p = strchr(s, '-'); p; p = strchr(p + 1, '-'))
                if (strlen(p) >= 17 && all_digits(p + 1, 8) && p[9] == '_' &&
                    all_digits(p + 10, 6) && p[16] == '-') {
                        *p = '\0';
                        *ret_stamp = p + 1;
                        break;
                }

        n = strlen(s);
        if (n >= 6 && streq(s + n - 6, "-dirty")) {
                s[n - 6] = '\0';
                *ret_dirty = true;
        }
}

static bool tag_is_valid(const char *tag) {
        if (!*tag)
                return false;
        for (const char *p = tag; *p; p++)
                if (isspace((unsigned char) *p) || iscntrl((unsigned char) *p))
                        return false;
        return true;
}

/* A tag standing alone must look like a release: "v0.13.0", "0.13.0".
 * Dashes are not allowed, so that a mangled "<tag>-<n>-g<sha>" is not taken
 * for a tag. */
static bool bare_tag_is_valid(const char *tag) {
        const char *p = tag;

        if (*p == 'v' || *p == 'V')
                p++;
        if (!isdigit((unsigned char) *p))
                return false;
        for (; *p; p++)
                if (!isalnum((unsigned char) *p) && !strchr(".+_~", *p))
                        return false;
        return true;
}

void version_done(struct version *v) {
        free(v->tag);
        free(v->sha);
        free(v->build_stamp);
        *v = (struct version) {};
}

int version_parse(const char *s, struct version *ret) {
        _cleanup_free_ char *copy = NULL;
        struct version v = {};
        char *core, *stamp, *g, *dash;
        bool dirty;

        if (!s)
                return -EINVAL;
        copy = strdup(s);
        if (!copy)
                return -ENOMEM;
        core = strstrip(copy);
        split_suffixes(core, &dirty, &stamp);
        if (!*core || streq(core, "?"))
                return -EINVAL;

        /* <tag>-<n>-g<sha> */
        g = strrchr(core, '-');
        if (g && g[1] == 'g' && is_sha(g + 2) && g > core) {
                *g = '\0';
                dash = strrchr(core, '-');
                if (dash && dash > core && dash[1] && all_digits(dash + 1, strlen(dash + 1)) &&
                    strlen(dash + 1) <= 9) {
                        *dash = '\0';
                        if (!tag_is_valid(core))
                                return -EINVAL;
                        v.commits = (unsigned) strtoul(dash + 1, NULL, 10);
                        v.tag = strdup(core);
                        v.sha = strdup(g + 2);
                        if (!v.tag || !v.sha)
                                goto oom;
                        goto suffixes;
                }
                *g = '-';
        }

        if (is_sha(core)) {
                v.sha = strdup(core);
                if (!v.sha)
                        goto oom;
        } else if (bare_tag_is_valid(core)) {
                v.tag = strdup(core);
                if (!v.tag)
                        goto oom;
        } else
                return -EINVAL;

suffixes:
        v.dirty = dirty;
        if (stamp) {
                v.build_stamp = strdup(stamp);
                if (!v.build_stamp)
                        goto oom;
        }
        *ret = v;
        return 0;

oom:
        version_done(&v);
        return -ENOMEM;
}

static bool sha_equal(const char *a, const char *b) {
        size_t n = MIN(strlen(a), strlen(b));

        return strncasecmp(a, b, n) == 0;
}

static bool tag_equal(const char *a, const char *b) {
        if (*a == 'v' || *a == 'V')
                a++;
        if (*b == 'v' || *b == 'V')
                b++;
        return streq(a, b);
}

enum version_match version_compare(const char *mcu_version, const char *host_version) {
        struct version a = {}, b = {};
        enum version_match m;

        if (version_parse(mcu_version, &a) < 0)
                return VERSION_MATCH_UNKNOWN;
        if (version_parse(host_version, &b) < 0) {
                version_done(&a);
                return VERSION_MATCH_UNKNOWN;
        }

        if ((!a.tag && !b.sha) || (!a.sha && !b.tag))
                /* A bare sha against a bare tag: nothing to compare. */
                m = VERSION_MATCH_UNKNOWN;
        else if (a.sha && b.sha && !sha_equal(a.sha, b.sha))
                m = VERSION_MATCH_NO;
        else if (a.tag && b.tag && (!tag_equal(a.tag, b.tag) || a.commits != b.commits))
                m = VERSION_MATCH_NO;
        else
                m = VERSION_MATCH_YES;

        version_done(&a);
        version_done(&b);
        return m;
}

bool version_is_custom_build(const char *version) {
        _cleanup_free_ char *copy = NULL;
        char *stamp;
        bool dirty;

        if (!version)
                return false;
        copy = strdup(version);
        if (!copy)
                return false;
        split_suffixes(strstrip(copy), &dirty, &stamp);
        return dirty || stamp;
}

/* The environment for git: ours without GIT_* variables (GIT_DIR and friends
 * would override -C), plus GIT_OPTIONAL_LOCKS=0 so that git status does not
 * write the refreshed index back. */
static char **git_environment(void) {
        size_t n = 0, k = 0;
        char **env;

        for (char **e = environ; e && *e; e++)
                n++;
        env = calloc(n + 2, sizeof(char *));
        if (!env)
                return NULL;
        for (char **e = environ; e && *e; e++) {
                if (startswith(*e, "GIT_"))
                        continue;
                env[k] = strdup(*e);
                if (!env[k])
                        goto oom;
                k++;
        }
        env[k] = strdup("GIT_OPTIONAL_LOCKS=0");
        if (!env[k])
                goto oom;
        return env;
oom:
        strv_free(env);
        return NULL;
}

static void kill_and_reap(pid_t pid) {
        (void) kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
}

/* Run `git -c safe.directory=* -C @path @args…` with stdout captured (the
 * first @out_size - 1 bytes kept in @out, NUL-terminated, the rest read and
 * dropped) and stdin/stderr on /dev/null.  Kills it at @deadline
 * (CLOCK_MONOTONIC msec).  Returns 0 if it exited with status 0, -EIO if it
 * failed, -ETIMEDOUT, or -errno. */
static int run_git(const char *path, const char *const *args, long long deadline,
                   char *out, size_t out_size) {
        const char *argv[16] = { "git", "-c", "safe.directory=*", "-C", path };
        _cleanup_close_ int devnull = -1, out_read = -1, out_write = -1;
        size_t n_argv = 5, size = 0;
        sigset_t empty_mask;
        char **env;
        int pipefd[2], status = 0, r;
        pid_t pid;

        for (const char *const *a = args; *a; a++) {
                if (n_argv + 1 >= ELEMENTSOF(argv))
                        return -E2BIG;
                argv[n_argv++] = *a;
        }
        argv[n_argv] = NULL;

        devnull = open("/dev/null", O_RDWR | O_CLOEXEC | O_NOCTTY);
        if (devnull < 0)
                return -errno;
        if (pipe2(pipefd, O_CLOEXEC) < 0)
                return -errno;
        out_read = pipefd[0];
        out_write = pipefd[1];

        env = git_environment();
        if (!env)
                return -ENOMEM;
        sigemptyset(&empty_mask);

        pid = fork();
        if (pid < 0) {
                r = -errno;
                strv_free(env);
                return r;
        }
        if (pid == 0) {
                /* Only async-signal-safe calls from here on. */
                if (dup2(devnull, STDIN_FILENO) < 0 || dup2(out_write, STDOUT_FILENO) < 0 ||
                    dup2(devnull, STDERR_FILENO) < 0)
                        _exit(EXIT_FAILURE);
                (void) close_range(3, ~0U, 0);
                (void) sigprocmask(SIG_SETMASK, &empty_mask, NULL);
                (void) signal(SIGPIPE, SIG_DFL);
                execvpe(argv[0], (char **) argv, env);
                _exit(127);
        }

        strv_free(env);
        out_write = safe_close(out_write);

        for (;;) {
                struct pollfd pfd = { .fd = out_read, .events = POLLIN };
                long long left = deadline - (long long) now_msec();
                char discard[512];
                ssize_t n;

                if (left <= 0) {
                        kill_and_reap(pid);
                        return -ETIMEDOUT;
                }
                r = poll(&pfd, 1, (int) MIN(left, 1000));
                if (r < 0 && errno != EINTR) {
                        r = -errno;
                        kill_and_reap(pid);
                        return r;
                }
                if (r <= 0)
                        continue;

                if (size + 1 < out_size)
                        n = read(out_read, out + size, out_size - 1 - size);
                else
                        n = read(out_read, discard, sizeof(discard));
                if (n < 0) {
                        if (errno == EINTR || errno == EAGAIN)
                                continue;
                        break;
                }
                if (n == 0)
                        break;
                if (size + 1 < out_size)
                        size += (size_t) n;
        }
        out[size] = '\0';

        /* stdout is closed; wait for the exit, still within the deadline. */
        for (;;) {
                pid_t w = waitpid(pid, &status, WNOHANG);

                if (w == pid)
                        break;
                if (w < 0 && errno == ECHILD)
                        /* SIGCHLD is ignored: the kernel reaped it, the exit
                         * status is lost; trust the output. */
                        return 0;
                if (w < 0 && errno != EINTR)
                        return -errno;
                if ((long long) now_msec() >= deadline) {
                        kill_and_reap(pid);
                        return -ETIMEDOUT;
                }
                (void) poll(NULL, 0, 10);
        }

        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                return -EIO;
        return 0;
}

/* What `git describe --always --tags --long --dirty` prints, obtained with
 * two commands that never write to the repository: describe --dirty
 * refreshes and rewrites .git/index, which run as root would leave the
 * checkout with a root-owned index that its owner can no longer update.
 * `git status` with GIT_OPTIONAL_LOCKS=0 does the same refresh in memory
 * only; a tracked file with changes (staged or not) makes the tree dirty,
 * exactly as for describe --dirty. */
static int git_describe(const char *path, unsigned timeout_msec, char **ret) {
        static const char *const describe[] = { "describe", "--always", "--tags", "--long", NULL };
        static const char *const status[] = { "status", "--porcelain", "--untracked-files=no", NULL };
        long long deadline = (long long) now_msec() + timeout_msec;
        char output[MAX_VERSION_OUTPUT], changes[2];
        char *version;
        int r;

        r = run_git(path, describe, deadline, output, sizeof(output));
        if (r == -ETIMEDOUT)
                log_warning("git describe in %s did not finish within %u ms, killed it.", path, timeout_msec);
        if (r < 0)
                return r;

        output[strcspn(output, "\n")] = '\0';
        version = strstrip(output);
        if (!*version)
                return -ENODATA;

        r = run_git(path, status, deadline, changes, sizeof(changes));
        if (r == -ETIMEDOUT)
                log_warning("git status in %s did not finish within %u ms, killed it.", path, timeout_msec);
        if (r < 0)
                return r;

        if (asprintf(ret, "%s%s", version, changes[0] ? "-dirty" : "") < 0)
                return -ENOMEM;
        return 0;
}

/* First line of @path/klippy/.version, trimmed. */
static int read_version_file(const char *path, char **ret) {
        _cleanup_free_ char *file = NULL, *line = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        size_t allocated = 0;
        char *s;

        if (asprintf(&file, "%s/klippy/.version", path) < 0)
                return -ENOMEM;
        f = fopen(file, "re");
        if (!f)
                return -errno;
        if (getline(&line, &allocated, f) < 0)
                return ferror(f) ? -EIO : -ENODATA;
        s = strstrip(line);
        if (!*s)
                return -ENODATA;
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

int version_read_host_with_timeout(const char *klipper_path, unsigned timeout_msec, char **ret) {
        _cleanup_free_ char *git_dir = NULL;
        char *v = NULL;
        int r;

        if (isempty(klipper_path))
                goto unknown;

        if (asprintf(&git_dir, "%s/.git", klipper_path) < 0)
                return -ENOMEM;
        if (access(git_dir, F_OK) == 0) {
                r = git_describe(klipper_path, timeout_msec, &v);
                if (r == -ENOMEM)
                        return r;
                if (r >= 0) {
                        *ret = v;
                        return 0;
                }
                log_debug_errno(r, "Cannot get the version of %s from git: %m", klipper_path);
        }

        r = read_version_file(klipper_path, &v);
        if (r == -ENOMEM)
                return r;
        if (r >= 0) {
                *ret = v;
                return 0;
        }
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
