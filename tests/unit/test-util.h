/* Helpers shared by the C unit tests that work on real files: a fresh
 * mkdtemp() directory per test (cmocka setup and teardown; teardown removes
 * it with everything in it), writing files into it, and capturing what
 * log.c writes to stderr so that a test can check its messages.
 *
 * Everything is static inline, so each test program takes what it uses and
 * tests/meson.build needs no extra source.  Failures end the running test
 * through cmocka's assertions instead of being returned.  Nothing here knows
 * about the daemon's modules. */
#pragma once

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shared/macro.h"

/* What tmpdir_setup() hands to each test as *state. */
struct fixture {
        char dir[64];                   /* "/tmp/<test program>-XXXXXX" */
        int saved_stderr;               /* the real stderr while captured, else -1 */
        char capture_path[128];         /* where captured stderr goes */
};

static inline int tmpdir_remove_entry(const char *path, const struct stat *st, int type,
                                      struct FTW *ftw) {
        return remove(path);
}

static inline int tmpdir_setup(void **state) {
        struct fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        snprintf(f->dir, sizeof(f->dir), "/tmp/%s-XXXXXX", program_invocation_short_name);
        assert_non_null(mkdtemp(f->dir));
        f->saved_stderr = -1;
        *state = f;
        return 0;
}

static inline int tmpdir_teardown(void **state) {
        struct fixture *f = *state;

        nftw(f->dir, tmpdir_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
        free(f);
        return 0;
}

/* A test that gets a struct fixture with its own directory. */
#define unit_test_in_tmpdir(test) cmocka_unit_test_setup_teardown(test, tmpdir_setup, tmpdir_teardown)

/* Write @content to @dir/@name (creating one level of sub-directory if @name
 * has one); returns the full path, to be freed. */
static inline char *write_file_at(const char *dir, const char *name, const char *content) {
        const char *slash = strchr(name, '/');
        char *path;
        FILE *file;

        if (slash) {
                char *subdir;

                assert_true(asprintf(&subdir, "%s/%.*s", dir, (int) (slash - name), name) > 0);
                (void) mkdir(subdir, 0755);
                free(subdir);
        }
        assert_true(asprintf(&path, "%s/%s", dir, name) > 0);
        file = fopen(path, "we");
        assert_non_null(file);
        fputs(content, file);
        assert_int_equal(fclose(file), 0);
        return path;
}

/* The same below the test's directory. */
static inline char *write_file(struct fixture *f, const char *name, const char *content) {
        return write_file_at(f->dir, name, content);
}

/* Redirect stderr (where log.c writes) into a file until capture_end(). */
static inline void capture_begin(struct fixture *f) {
        int fd;

        snprintf(f->capture_path, sizeof(f->capture_path), "%s/stderr.txt", f->dir);
        fd = open(f->capture_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        fflush(stderr);
        f->saved_stderr = dup(STDERR_FILENO);
        assert_true(f->saved_stderr >= 0);
        assert_true(dup2(fd, STDERR_FILENO) >= 0);
        close(fd);
}

/* Restore stderr; returns what was written meanwhile, to be freed.  The
 * text is repeated on the real stderr so that it shows in the test log. */
static inline char *capture_end(struct fixture *f) {
        char *text = NULL;
        size_t size = 0;
        FILE *file;

        fflush(stderr);
        assert_true(dup2(f->saved_stderr, STDERR_FILENO) >= 0);
        close(f->saved_stderr);
        f->saved_stderr = -1;

        file = fopen(f->capture_path, "re");
        assert_non_null(file);
        assert_true(getdelim(&text, &size, '\0', file) >= 0 || feof(file));
        fclose(file);
        if (!text)
                text = strdup("");
        fputs(text, stderr);
        return text;
}
