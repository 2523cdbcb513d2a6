/* String helpers of the daemon that more than one file needs: trimming and
 * lower-casing in place, and "strv" lists (NULL-terminated arrays of
 * malloc'd strings, NULL standing for the empty list).  They only work on
 * memory the caller owns and keep no state.  The one-line helpers that
 * mcuflashctl shares too (streq, startswith, free_and_strdup, …) stay in
 * macro.h; this file is part of the daemon library only. */
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
