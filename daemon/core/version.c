/* Klipper version strings (protocols.md §16).  Parses what Klipper's
 * scripts/buildcommands.py embeds in firmware and what klippy reports as its
 * own version, and decides whether an MCU runs the host's version
 * (mcuflashd's rule: equal "<tag>-<n>-g<sha>" core, suffixes ignored).
 * Reading the host version from a checkout is version-host.c's job.  It does
 * not look at build_versions (compiler versions). */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/version.h"
#include "shared/macro.h"
#include "shared/strutil.h"

#define SHA_MIN 4
#define SHA_MAX 40

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
