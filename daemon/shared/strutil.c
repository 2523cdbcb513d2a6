/* Implementation of strutil.h.  Nothing here logs: callers turn -ENOMEM into
 * their own message. */
#include <ctype.h>
#include <errno.h>
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
