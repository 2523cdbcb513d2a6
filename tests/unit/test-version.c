/* Unit tests for daemon/core/version.c and version-host.c: parsing the
 * version strings of protocols.md §16, the MCU/host comparison table,
 * custom-build detection, and version_read_host() against klippy/.version
 * (and the files it must refuse) and real git repositories made with git
 * (passed with a note without git): the same text as `git describe --always
 * --tags --long --dirty` without tags, with tags, with git's abbreviation
 * length, a config that asks for programs (none runs), a FIFO in .git (the
 * timeout), no repository after all, and a checkout owned by another user,
 * whose .git/index must stay theirs. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/version.h"
#include "shared/macro.h"
#include "test-util.h"

/* write_file_at() with permissions: the fake git must be executable. */
static void write_file_mode(const char *dir, const char *name, const char *content, mode_t mode) {
        _cleanup_free_ char *path = write_file_at(dir, name, content);

        assert_int_equal(chmod(path, mode), 0);
}

_printf_(1, 2)
static int run(const char *fmt, ...) {
        _cleanup_free_ char *cmd = NULL;
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&cmd, fmt, ap);
        va_end(ap);
        assert_true(r > 0);
        return system(cmd);
}

/* First line of a command's output. */
_printf_(1, 2)
static char *run_output(const char *fmt, ...) {
        _cleanup_free_ char *cmd = NULL;
        char line[256] = "";
        va_list ap;
        FILE *p;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&cmd, fmt, ap);
        va_end(ap);
        assert_true(r > 0);
        p = popen(cmd, "re");
        assert_non_null(p);
        if (!fgets(line, sizeof(line), p))
                line[0] = '\0';
        assert_int_equal(pclose(p), 0);
        line[strcspn(line, "\n")] = '\0';
        return strdup(line);
}

static bool have_git(void) {
        return run("git --version >/dev/null 2>&1") == 0;
}

/* cmocka 1.1.5's skip() prints "not ok N # SKIP", which meson's TAP parser
 * counts as a failure: pass instead, with a TAP comment saying why. */
static void skip_because(const char *test, const char *reason) {
        print_message("# %s skipped: %s\n", test, reason);
}

static void test_parse_examples(void **state) {
        struct version v;

        assert_int_equal(version_parse("v0.12.0-123-gabcdef12", &v), 0);
        assert_string_equal(v.tag, "v0.12.0");
        assert_int_equal(v.commits, 123);
        assert_string_equal(v.sha, "abcdef12");
        assert_false(v.dirty);
        assert_null(v.build_stamp);
        version_done(&v);

        assert_int_equal(version_parse("v0.12.0-123-gabcdef12-dirty-20240101_120000-raspberrypi", &v), 0);
        assert_string_equal(v.tag, "v0.12.0");
        assert_int_equal(v.commits, 123);
        assert_string_equal(v.sha, "abcdef12");
        assert_true(v.dirty);
        assert_string_equal(v.build_stamp, "20240101_120000-raspberrypi");
        version_done(&v);

        /* A clean tree but unknown compiler versions: only the stamp. */
        assert_int_equal(version_parse("v0.12.0-7-g1234567-20240101_120000-my-host-2", &v), 0);
        assert_int_equal(v.commits, 7);
        assert_string_equal(v.sha, "1234567");
        assert_false(v.dirty);
        assert_string_equal(v.build_stamp, "20240101_120000-my-host-2");
        version_done(&v);

        assert_int_equal(version_parse("  0.12.0-0-g0123abcd-dirty\n", &v), 0);
        assert_string_equal(v.tag, "0.12.0");
        assert_int_equal(v.commits, 0);
        assert_string_equal(v.sha, "0123abcd");
        assert_true(v.dirty);
        version_done(&v);

        assert_int_equal(version_parse("v0.13.0", &v), 0);
        assert_string_equal(v.tag, "v0.13.0");
        assert_int_equal(v.commits, 0);
        assert_null(v.sha);
        version_done(&v);

        /* A tag with dashes of its own. */
        assert_int_equal(version_parse("v0.12.0-rc-1-3-gdeadbeef", &v), 0);
        assert_string_equal(v.tag, "v0.12.0-rc-1");
        assert_int_equal(v.commits, 3);
        assert_string_equal(v.sha, "deadbeef");
        version_done(&v);

        /* git describe --always in a clone without tags. */
        assert_int_equal(version_parse("abcdef1-dirty", &v), 0);
        assert_null(v.tag);
        assert_string_equal(v.sha, "abcdef1");
        assert_true(v.dirty);
        version_done(&v);

        assert_int_equal(version_parse("?", &v), -EINVAL);
        assert_int_equal(version_parse("", &v), -EINVAL);
        assert_int_equal(version_parse("  ", &v), -EINVAL);
        assert_int_equal(version_parse(NULL, &v), -EINVAL);
        assert_int_equal(version_parse("?-20240101_120000-host", &v), -EINVAL);
        assert_int_equal(version_parse("unknown", &v), -EINVAL);
        assert_int_equal(version_parse("v0.12 beta", &v), -EINVAL);
        assert_int_equal(version_parse("-3-gabcdef1", &v), -EINVAL);
        assert_int_equal(version_parse("v0.12.0-x-gabcdef1", &v), -EINVAL);
        assert_int_equal(version_parse("v0.12.0-1-gxyz", &v), -EINVAL);
        assert_int_equal(version_parse("-dirty", &v), -EINVAL);
        assert_int_equal(version_parse("v0.12.0-rc1", &v), -EINVAL);
}

static void test_compare(void **state) {
        static const struct {
                const char *mcu, *host;
                enum version_match expected;
        } cases[] = {
                { "v0.12.0-123-gabcdef12", "v0.12.0-123-gabcdef12", VERSION_MATCH_YES },
                /* dirty vs clean */
                { "v0.12.0-123-gabcdef12-dirty", "v0.12.0-123-gabcdef12", VERSION_MATCH_YES },
                { "v0.12.0-123-gabcdef12", "v0.12.0-123-gabcdef12-dirty", VERSION_MATCH_YES },
                /* build stamp */
                { "v0.12.0-123-gabcdef12-20240101_120000-raspberrypi", "v0.12.0-123-gabcdef12", VERSION_MATCH_YES },
                { "v0.12.0-123-gabcdef12-dirty-20240101_120000-raspberrypi", "v0.12.0-123-gabcdef12-dirty",
                  VERSION_MATCH_YES },
                /* git abbreviates to different lengths */
                { "v0.12.0-123-gabcdef1", "v0.12.0-123-gabcdef12", VERSION_MATCH_YES },
                { "v0.12.0-123-gabcdef1234", "v0.12.0-123-gABCDEF1", VERSION_MATCH_YES },
                { "v0.12.0-123-gabcdef1", "v0.12.0-123-gabcdef02", VERSION_MATCH_NO },
                /* a leading v does not matter */
                { "0.12.0-123-gabcdef12", "v0.12.0-123-gabcdef12", VERSION_MATCH_YES },
                /* different n, sha or tag */
                { "v0.12.0-122-gabcdef12", "v0.12.0-123-gabcdef12", VERSION_MATCH_NO },
                { "v0.12.0-123-g1234abcd", "v0.12.0-123-gabcdef12", VERSION_MATCH_NO },
                { "v0.11.0-123-gabcdef12", "v0.12.0-123-gabcdef12", VERSION_MATCH_NO },
                { "v0.12.0-123-g1234abcd-dirty", "v0.12.0-123-gabcdef12-dirty", VERSION_MATCH_NO },
                /* release tags */
                { "v0.13.0", "v0.13.0", VERSION_MATCH_YES },
                { "v0.13.0", "v0.13.0-0-gabcdef1", VERSION_MATCH_YES },
                { "v0.13.0-2-gabcdef1", "v0.13.0", VERSION_MATCH_NO },
                { "v0.12.0", "v0.13.0", VERSION_MATCH_NO },
                /* bare shas (clone without tags) */
                { "abcdef1", "v0.12.0-5-gabcdef12", VERSION_MATCH_YES },
                { "abcdef1-dirty", "1234567", VERSION_MATCH_NO },
                { "abcdef1", "v0.13.0", VERSION_MATCH_UNKNOWN },
                /* unknown */
                { "?", "v0.12.0-123-gabcdef12", VERSION_MATCH_UNKNOWN },
                { "v0.12.0-123-gabcdef12", "?", VERSION_MATCH_UNKNOWN },
                { "", "v0.12.0-123-gabcdef12", VERSION_MATCH_UNKNOWN },
                { "v0.12.0-123-gabcdef12", "", VERSION_MATCH_UNKNOWN },
                { NULL, "v0.12.0-123-gabcdef12", VERSION_MATCH_UNKNOWN },
                { "?", "?", VERSION_MATCH_UNKNOWN },
                { "?-20240101_120000-host", "?-20240101_120000-host", VERSION_MATCH_UNKNOWN },
                { "garbage here", "v0.12.0-123-gabcdef12", VERSION_MATCH_UNKNOWN },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                enum version_match m = version_compare(cases[i].mcu, cases[i].host);

                if (m != cases[i].expected)
                        fail_msg("version_compare(\"%s\", \"%s\") = %s, expected %s",
                                 strempty(cases[i].mcu), strempty(cases[i].host),
                                 version_match_to_string(m), version_match_to_string(cases[i].expected));
        }
}

static void test_custom_build(void **state) {
        assert_false(version_is_custom_build("v0.12.0-123-gabcdef12"));
        assert_true(version_is_custom_build("v0.12.0-123-gabcdef12-dirty"));
        assert_true(version_is_custom_build("v0.12.0-123-gabcdef12-20240101_120000-raspberrypi"));
        assert_true(version_is_custom_build("v0.12.0-123-gabcdef12-dirty-20240101_120000-raspberrypi"));
        assert_true(version_is_custom_build("?-20240101_120000-host"));
        assert_false(version_is_custom_build("v0.13.0"));
        assert_false(version_is_custom_build("?"));
        assert_false(version_is_custom_build(""));
        assert_false(version_is_custom_build(NULL));
}

static void test_match_to_string(void **state) {
        assert_string_equal(version_match_to_string(VERSION_MATCH_YES), "yes");
        assert_string_equal(version_match_to_string(VERSION_MATCH_NO), "no");
        assert_string_equal(version_match_to_string(VERSION_MATCH_UNKNOWN), "unknown");
}

static void test_read_host_version_file(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *klippy = NULL, *v = NULL;

        /* Nothing there yet. */
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "?");
        free(v);
        v = NULL;

        assert_true(asprintf(&klippy, "%s/klippy", f->dir) > 0);
        assert_int_equal(mkdir(klippy, 0755), 0);
        write_file_mode(klippy, ".version", "  v0.12.0-88-g0123456789  \nsecond line\n", 0644);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "v0.12.0-88-g0123456789");
        free(v);
        v = NULL;

        write_file_mode(klippy, ".version", "\n", 0644);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "?");
        free(v);
        v = NULL;

        assert_int_equal(version_read_host(NULL, &v), 0);
        assert_string_equal(v, "?");
}

static void test_read_host_git(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL, *expected = NULL, *sha = NULL;
        const char *git = "HOME=/nonexistent GIT_CONFIG_NOSYSTEM=1 git -c user.name=test "
                          "-c user.email=test@example.com -c init.defaultBranch=master";
        struct version parsed;

        if (!have_git()) {
                skip_because(__func__, "git is not installed");
                return;
        }

        assert_int_equal(run("%s init -q %s", git, f->dir), 0);
        write_file_mode(f->dir, "README", "one\n", 0644);
        assert_int_equal(run("%s -C %s add README && %s -C %s commit -q -m one", git, f->dir, git, f->dir), 0);
        assert_int_equal(run("%s -C %s tag v0.12.0", git, f->dir), 0);
        write_file_mode(f->dir, "README", "two\n", 0644);
        assert_int_equal(run("%s -C %s commit -q -a -m two", git, f->dir), 0);

        /* klippy/.version must lose against git. */
        assert_int_equal(run("mkdir %s/klippy && echo v0.0.0-1-g1111111 > %s/klippy/.version", f->dir, f->dir), 0);

        sha = run_output("%s -C %s rev-parse HEAD", git, f->dir);
        expected = run_output("%s -C %s describe --always --tags --long --dirty", git, f->dir);
        assert_int_equal(strncmp(expected, "v0.12.0-1-g", 11), 0);

        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, expected);
        assert_int_equal(version_parse(v, &parsed), 0);
        assert_string_equal(parsed.tag, "v0.12.0");
        assert_int_equal(parsed.commits, 1);
        assert_int_equal(strncmp(sha, parsed.sha, strlen(parsed.sha)), 0);
        assert_false(parsed.dirty);
        version_done(&parsed);
        free(v);
        v = NULL;

        /* An untracked file does not make it dirty, as with describe --dirty. */
        write_file_mode(f->dir, "untracked", "x\n", 0644);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, expected);
        free(v);
        v = NULL;

        /* A modified tracked file does: the same text as describe --dirty. */
        write_file_mode(f->dir, "README", "three\n", 0644);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        free(expected);
        expected = run_output("%s -C %s describe --always --tags --long --dirty", git, f->dir);
        assert_string_equal(v, expected);
        assert_true(strlen(v) > 6 && streq(v + strlen(v) - 6, "-dirty"));
        assert_true(version_is_custom_build(v));
        assert_int_equal(version_compare(v, expected), VERSION_MATCH_YES);
        free(v);
        v = NULL;

        /* So does a staged change. */
        assert_int_equal(run("%s -C %s add README", git, f->dir), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, expected);
}

#define GIT "HOME=/nonexistent GIT_CONFIG_NOSYSTEM=1 git -c user.name=test " \
            "-c user.email=test@example.com -c init.defaultBranch=master"

/* A repository in @dir with README committed once. */
static void make_repo(const char *dir) {
        assert_int_equal(run(GIT " init -q %s", dir), 0);
        write_file_mode(dir, "README", "one\n", 0644);
        assert_int_equal(run(GIT " -C %s add README && " GIT " -C %s commit -q -m one", dir, dir), 0);
}

static void commit_change(const char *dir, const char *text) {
        write_file_mode(dir, "README", text, 0644);
        assert_int_equal(run(GIT " -C %s commit -q -a -m '%s'", dir, text), 0);
}

/* version_read_host() must print what git describe --dirty prints. */
static void assert_same_as_git(const char *dir) {
        _cleanup_free_ char *v = NULL, *expected = NULL;

        expected = run_output(GIT " -C %s describe --always --tags --long --dirty", dir);
        assert_int_equal(version_read_host(dir, &v), 0);
        assert_string_equal(v, expected);
}

static void test_read_host_git_no_tags(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL, *sha = NULL;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        make_repo(f->dir);
        commit_change(f->dir, "two\n");
        sha = run_output(GIT " -C %s rev-parse HEAD", f->dir);

        /* --always: the abbreviated commit id alone. */
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_int_equal(strlen(v), 7);
        assert_int_equal(strncmp(v, sha, 7), 0);
        assert_same_as_git(f->dir);

        write_file_mode(f->dir, "README", "changed\n", 0644);
        assert_same_as_git(f->dir);
}

static void test_read_host_git_tags(void **state) {
        struct fixture *f = *state;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        make_repo(f->dir);
        /* An annotated tag, then a lightweight one further on: --tags takes
         * both, the nearest wins. */
        assert_int_equal(run(GIT " -C %s tag -a -m release v0.11.0", f->dir), 0);
        assert_same_as_git(f->dir);
        commit_change(f->dir, "two\n");
        commit_change(f->dir, "three\n");
        assert_same_as_git(f->dir);
        assert_int_equal(run(GIT " -C %s tag v0.12.0", f->dir), 0);
        /* On the tag itself: --long still says -0-g<sha>. */
        assert_same_as_git(f->dir);
        commit_change(f->dir, "four\n");
        assert_same_as_git(f->dir);
}

static void test_read_host_git_abbrev(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL;
        struct version parsed;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        make_repo(f->dir);
        /* 16400 packed objects: git's "auto" length is 8, not 7. */
        assert_int_equal(run("python3 -c 'import sys\n"
                             "for i in range(16400):\n"
                             "    d = b\"blob %%d\\n\" %% i\n"
                             "    sys.stdout.buffer.write(b\"blob\\ndata %%d\\n\" %% len(d) + d)\n'"
                             " | " GIT " -C %s fast-import --quiet", f->dir), 0);
        assert_int_equal(run(GIT " -C %s tag v0.12.0", f->dir), 0);
        commit_change(f->dir, "two\n");
        assert_same_as_git(f->dir);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_int_equal(version_parse(v, &parsed), 0);
        assert_int_equal(strlen(parsed.sha), 8);
        version_done(&parsed);

        /* core.abbrev wins. */
        assert_int_equal(run(GIT " -C %s config core.abbrev 12", f->dir), 0);
        assert_same_as_git(f->dir);
}

/* The repository's config asks for programs; none may run. */
static void test_read_host_git_runs_nothing(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *hook = NULL, *v = NULL, *expected = NULL, *marker = NULL;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        make_repo(f->dir);
        assert_int_equal(run(GIT " -C %s tag v0.12.0", f->dir), 0);
        write_file_mode(f->dir, ".gitattributes", "README filter=x\n", 0644);
        assert_int_equal(run(GIT " -C %s add .gitattributes && " GIT " -C %s commit -q -m attr",
                             f->dir, f->dir), 0);
        expected = run_output(GIT " -C %s describe --always --tags --long", f->dir);

        assert_true(asprintf(&hook, "%s/hook.sh", f->dir) > 0);
        assert_true(asprintf(&marker, "%s/marker", f->dir) > 0);
        {
                _cleanup_free_ char *script = NULL;
                assert_true(asprintf(&script, "#!/bin/sh\necho \"$1\" >> %s\ncat\n", marker) > 0);
                write_file_mode(f->dir, "hook.sh", script, 0755);
        }
        assert_int_equal(run(GIT " -C %s config core.fsmonitor '%s fsmonitor' && "
                             GIT " -C %s config filter.x.clean '%s clean' && "
                             GIT " -C %s config filter.x.process '%s process' && "
                             GIT " -C %s config core.hooksPath %s",
                             f->dir, hook, f->dir, hook, f->dir, hook, f->dir, f->dir), 0);
        write_file_mode(f->dir, "README", "changed\n", 0644);

        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_int_equal(strncmp(v, expected, strlen(expected)), 0);
        assert_string_equal(v + strlen(expected), "-dirty");
        assert_int_equal(access(marker, F_OK), -1);

        /* The programs are real: git runs them. */
        assert_int_equal(run(GIT " -C %s status --porcelain >/dev/null 2>&1", f->dir), 0);
        assert_int_equal(access(marker, F_OK), 0);
}

/* A FIFO where libgit2 reads blocks it: the child is killed at the timeout
 * and klippy/.version is taken. */
static void test_read_host_git_hangs(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL, *index = NULL;
        struct timespec start, end;
        long long elapsed_msec;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        make_repo(f->dir);
        assert_true(asprintf(&index, "%s/.git/index", f->dir) > 0);
        assert_int_equal(unlink(index), 0);
        assert_int_equal(mkfifo(index, 0644), 0);
        assert_int_equal(run("mkdir %s/klippy && echo v0.11.0-5-gfeedbee > %s/klippy/.version",
                             f->dir, f->dir), 0);

        clock_gettime(CLOCK_MONOTONIC, &start);
        assert_int_equal(version_read_host_with_timeout(f->dir, 300, &v), 0);
        clock_gettime(CLOCK_MONOTONIC, &end);

        assert_string_equal(v, "v0.11.0-5-gfeedbee");
        elapsed_msec = (end.tv_sec - start.tv_sec) * 1000LL + (end.tv_nsec - start.tv_nsec) / 1000000;
        assert_true(elapsed_msec >= 250);
        assert_true(elapsed_msec < 3000);
}

/* Not a repository after all, or one without a commit: klippy/.version. */
static void test_read_host_git_fails(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL;

        assert_int_equal(run("mkdir %s/.git %s/klippy && echo v0.11.0-5-gfeedbee > %s/klippy/.version",
                             f->dir, f->dir, f->dir), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "v0.11.0-5-gfeedbee");
        free(v);
        v = NULL;

        if (!have_git())
                return skip_because(__func__, "git is not installed");
        assert_int_equal(run("rmdir %s/.git && " GIT " init -q %s", f->dir, f->dir), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "v0.11.0-5-gfeedbee");
}

/* klippy/.version that is not a version, a FIFO, or a link to a file the
 * checkout's owner cannot read: "?", at once. */
static void test_read_host_version_file_refused(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *klippy = NULL, *file = NULL, *secret = NULL, *v = NULL;

        assert_true(asprintf(&klippy, "%s/klippy", f->dir) > 0);
        assert_true(asprintf(&file, "%s/klippy/.version", f->dir) > 0);
        assert_int_equal(mkdir(klippy, 0755), 0);

        write_file_mode(klippy, ".version", "root:$y$j9T$abc:19000:0:99999:7:::\n", 0644);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "?");
        free(v);
        v = NULL;

        assert_int_equal(unlink(file), 0);
        assert_int_equal(mkfifo(file, 0644), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "?");
        free(v);
        v = NULL;

        if (geteuid() != 0)
                return skip_because(__func__, "the foreign-owner part needs root (chown)");
        assert_int_equal(unlink(file), 0);
        write_file_mode(f->dir, "secret", "v1secret\n", 0600);
        assert_true(asprintf(&secret, "%s/secret", f->dir) > 0);
        assert_int_equal(symlink(secret, file), 0);
        /* Root's checkout: root can read it. */
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "v1secret");
        free(v);
        v = NULL;
        /* nobody's checkout: not on their behalf. */
        assert_int_equal(chown(f->dir, 65534, 65534), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "?");
        free(v);
        v = NULL;
        /* Their own file: yes. */
        assert_int_equal(chown(secret, 65534, 65534), 0);
        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_string_equal(v, "v1secret");
}

static void test_read_host_git_other_owner(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *v = NULL, *index = NULL;
        const char *git = "HOME=/nonexistent GIT_CONFIG_NOSYSTEM=1 git -c user.name=test "
                          "-c user.email=test@example.com -c init.defaultBranch=master";
        const unsigned nobody = 65534;
        struct stat st;

        if (geteuid() != 0 || !have_git()) {
                skip_because(__func__, "needs root (chown) and git");
                return;
        }

        assert_int_equal(chmod(f->dir, 0755), 0);
        assert_int_equal(run("%s init -q %s", git, f->dir), 0);
        write_file_mode(f->dir, "README", "one\n", 0644);
        assert_int_equal(run("%s -C %s add README && %s -C %s commit -q -m one && %s -C %s tag v1.0.0",
                             git, f->dir, git, f->dir, git, f->dir), 0);
        assert_int_equal(run("chown -R %u:%u %s", nobody, nobody, f->dir), 0);
        /* Touch the file so that describe --dirty has to refresh the index. */
        assert_int_equal(run("touch %s/README", f->dir), 0);

        assert_int_equal(version_read_host(f->dir, &v), 0);
        assert_int_equal(strncmp(v, "v1.0.0-0-g", 10), 0);
        /* Only the timestamps changed: not dirty. */
        assert_false(version_is_custom_build(v));

        /* Nothing was written: the index still belongs to its owner. */
        assert_true(asprintf(&index, "%s/.git/index", f->dir) > 0);
        assert_int_equal(stat(index, &st), 0);
        assert_int_equal(st.st_uid, nobody);
}

int main(int argc, char *argv[]) {
        /* version_read_host() runs this program again to read a checkout. */
        if (argc == 3 && strcmp(argv[1], VERSION_DESCRIBE_ARG) == 0)
                version_describe_checkout_main(argv[2]);

        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_parse_examples),
                cmocka_unit_test(test_compare),
                cmocka_unit_test(test_custom_build),
                cmocka_unit_test(test_match_to_string),
                unit_test_in_tmpdir(test_read_host_version_file),
                unit_test_in_tmpdir(test_read_host_git),
                unit_test_in_tmpdir(test_read_host_version_file_refused),
                unit_test_in_tmpdir(test_read_host_git_no_tags),
                unit_test_in_tmpdir(test_read_host_git_tags),
                unit_test_in_tmpdir(test_read_host_git_abbrev),
                unit_test_in_tmpdir(test_read_host_git_runs_nothing),
                unit_test_in_tmpdir(test_read_host_git_fails),
                unit_test_in_tmpdir(test_read_host_git_hangs),
                unit_test_in_tmpdir(test_read_host_git_other_owner),
        };

        return cmocka_run_group_tests_name("version", tests, NULL, NULL);
}
