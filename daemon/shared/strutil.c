/* Implementation of strutil.h.  Nothing here logs: callers turn -ENOMEM into
 * their own message. */
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "shared/strutil.h"

char *strstrip(char *s) {
        char *end;

        while (isspace((unsigned char) *s))
                s++;
        end = s + strlen(s);
        while (end > s && isspace((unsigned char) end[-1]))
                end--;
        *end = '\0';
        return s;
}

char *ascii_strlower(char *s) {
        for (char *c = s; *c; c++)
                *c = (char) tolower((unsigned char) *c);
        return s;
}

char **strv_free(char **l) {
        if (!l)
                return NULL;
        for (char **i = l; *i; i++)
                free(*i);
        free(l);
        return NULL;
}

size_t strv_length(char * const *l) {
        size_t n = 0;

        if (l)
                while (l[n])
                        n++;
        return n;
}

bool strv_contains(char * const *l, const char *s) {
        if (l)
                for (char * const *i = l; *i; i++)
                        if (streq(*i, s))
                                return true;
        return false;
}

int strv_extend(char ***l, const char *s) {
        size_t n = strv_length(*l);
        char **grown;
        char *copy;

        copy = strdup(s);
        if (!copy)
                return -ENOMEM;
        grown = realloc(*l, (n + 2) * sizeof(char *));
        if (!grown) {
                free(copy);
                return -ENOMEM;
        }
        grown[n] = copy;
        grown[n + 1] = NULL;
        *l = grown;
        return 0;
}

int strv_copy(char * const *l, char ***ret) {
        _cleanup_(strv_freep) char **copy = NULL;
        int r;

        if (l)
                for (char * const *i = l; *i; i++) {
                        r = strv_extend(&copy, *i);
                        if (r < 0)
                                return r;
                }
        *ret = TAKE_PTR(copy);
        return 0;
}

/* The UTF-8 sequence at @s: returns its length (1…4) if it is valid, else
 * 0 with the length of its "maximal subpart" (the lead byte and the
 * continuation bytes that were still acceptable, at least 1) in *@bad.
 * Follows RFC 3629's table: the second byte's range depends on the first,
 * which rules out overlong forms, surrogates and code points > U+10FFFF. */
static size_t utf8_sequence(const unsigned char *s, size_t *bad) {
        unsigned char c = s[0], lo = 0x80, hi = 0xBF;
        size_t n;

        *bad = 1;
        if (c < 0x80)
                return 1;
        if (c >= 0xC2 && c <= 0xDF)
                n = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
                n = 3;
                if (c == 0xE0)
                        lo = 0xA0;      /* overlong below U+0800 */
                else if (c == 0xED)
                        hi = 0x9F;      /* U+D800…U+DFFF */
        } else if (c >= 0xF0 && c <= 0xF4) {
                n = 4;
                if (c == 0xF0)
                        lo = 0x90;      /* overlong below U+10000 */
                else if (c == 0xF4)
                        hi = 0x8F;      /* above U+10FFFF */
        } else
                return 0;               /* 0x80…0xC1 (continuation, overlong lead), 0xF5… */

        for (size_t i = 1; i < n; i++) {
                /* A NUL ends the string: a truncated sequence stops there. */
                if (s[i] < lo || s[i] > hi) {
                        *bad = i;
                        return 0;
                }
                lo = 0x80;
                hi = 0xBF;
        }
        return n;
}

bool utf8_is_valid(const char *s) {
        const unsigned char *p = (const unsigned char *) s;

        while (*p) {
                size_t bad, n = utf8_sequence(p, &bad);
                if (n == 0)
                        return false;
                p += n;
        }
        return true;
}

static bool is_dropped_control(unsigned char c) {
        return (c < 0x20 && c != '\t' && c != '\n') || c == 0x7F;
}

char *utf8_sanitize(const char *s) {
        const unsigned char *p;
        char *out, *o;

        if (!s)
                return NULL;
        /* Each input byte becomes at most three output bytes (U+FFFD). */
        out = malloc(strlen(s) * 3 + 1);
        if (!out)
                return NULL;
        o = out;
        for (p = (const unsigned char *) s; *p;) {
                size_t bad, n = utf8_sequence(p, &bad);

                if (n == 0) {
                        /* One U+FFFD per maximal subpart of an ill-formed
                         * sequence (Unicode §3.9's recommended practice). */
                        *o++ = (char) 0xEF;
                        *o++ = (char) 0xBF;
                        *o++ = (char) 0xBD;
                        p += bad;
                        continue;
                }
                if (n == 1 && is_dropped_control(*p)) {
                        p++;
                        continue;
                }
                memcpy(o, p, n);
                o += n;
                p += n;
        }
        *o = '\0';
        return out;
}

int free_and_strdup_utf8(char **p, const char *s) {
        _cleanup_free_ char *clean = NULL;

        if (s) {
                clean = utf8_sanitize(s);
                if (!clean)
                        return -ENOMEM;
        }
        return free_and_strdup(p, clean);
}
