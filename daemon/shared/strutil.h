/* String helpers of the daemon that more than one file needs: trimming and
 * lower-casing in place, and "strv" lists (NULL-terminated arrays of
 * malloc'd strings, NULL standing for the empty list).  They only work on
 * memory the caller owns and keep no state.  The one-line helpers that
 * mcuflashctl shares too (streq, startswith, free_and_strdup, …) stay in
 * macro.h; this file is part of the daemon library only.
 *
 * utf8_sanitize() is the gate for every string from outside (printer.cfg,
 * klippy, MCU dictionaries, udev) before it becomes daemon state that D-Bus
 * or JSON carries: both refuse invalid UTF-8, and one bad string would make
 * every GetAll/GetManagedObjects fail. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "shared/macro.h"

/* Cut leading and trailing whitespace off @s in place; returns the new start
 * (inside @s, not to be freed on its own). */
char *strstrip(char *s);

/* Lower-case @s in place; returns @s. */
char *ascii_strlower(char *s);

/* Free every string and the array; always returns NULL. */
char **strv_free(char **l);
DEFINE_TRIVIAL_CLEANUP_FUNC(char **, strv_free);

size_t strv_length(char * const *l);
bool strv_contains(char * const *l, const char *s);

/* Append a copy of @s to *@l (which may be NULL).  Returns 0 or -ENOMEM;
 * *@l is unchanged on failure. */
int strv_extend(char ***l, const char *s);

/* A deep copy of @l into *@ret (NULL for NULL).  Returns 0 or -ENOMEM. */
int strv_copy(char * const *l, char ***ret);

/* Is @s (NUL-terminated) valid UTF-8: no overlong forms, no surrogates, no
 * code point above U+10FFFF, no truncated sequence? */
bool utf8_is_valid(const char *s);

/* A copy of @s that is valid UTF-8 and free of control characters: each
 * ill-formed sequence becomes one U+FFFD per "maximal subpart" (Unicode
 * §3.9: a lead byte with the continuation bytes still acceptable after it); C0 controls other than tab and newline,
 * and DEL, are dropped.  NULL for NULL.  Returns NULL only for NULL input or
 * when out of memory (errno ENOMEM). */
char *utf8_sanitize(const char *s);

/* free_and_strdup() of utf8_sanitize(@s): 1 if *@p changed, 0 if not,
 * -ENOMEM. */
int free_and_strdup_utf8(char **p, const char *s);
