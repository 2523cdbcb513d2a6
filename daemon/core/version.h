/* Klipper version strings (protocols.md §16): parsing "v0.12.0-123-gabcdef12"
 * with its optional -dirty and -<date>_<time>-<host> suffixes, comparing an
 * MCU's version with the host's (version.c), and deriving the host version
 * from a Klipper checkout the way klippy does (git describe, else
 * klippy/.version; version-host.c). */
#pragma once

#include "shared/macro.h"

#include <stdbool.h>

enum version_match {
        VERSION_MATCH_UNKNOWN,
        VERSION_MATCH_YES,
        VERSION_MATCH_NO,
};

const char *version_match_to_string(enum version_match m); /* "yes" "no" "unknown" */

/* A version string taken apart.  The forms understood are
 *   <tag>-<n>-g<sha>   "v0.12.0-123-gabcdef12" (git describe --long)
 *   <tag>              "v0.13.0" (a release without dashes: treated as
 *                      <tag>-0-g<unknown>)
 *   <sha>              "abcdef12" (git describe --always without any tag)
 * each optionally followed by "-dirty" and then by a build stamp
 * "-<YYYYmmdd>_<HHMMSS>-<hostname>". */
struct version {
        char *tag;              /* "v0.12.0"; NULL for a bare sha */
        unsigned commits;       /* commits since the tag; 0 for a bare tag or sha */
        char *sha;              /* abbreviated commit id (4-40 hex digits); NULL for a bare tag */
        bool dirty;             /* "-dirty" */
        char *build_stamp;      /* "20240101_120000-raspberrypi", or NULL */
};

/* Parse @s (surrounding whitespace ignored) into @ret.  Returns -EINVAL for
 * "", "?" and anything not of the forms above, -ENOMEM. */
int version_parse(const char *s, struct version *ret);
void version_done(struct version *v);

/* Compare by the "<tag>-<n>-g<sha>" core: suffixes (-dirty, build stamp)
 * are ignored; an empty, "?" or unparsable version on either side gives
 * UNKNOWN.  Details: a leading "v" of the tag is ignored; two shas are
 * equal when one is a prefix of the other (git picks the abbreviation
 * length per repository, so "gabcdef1" and "gabcdef12" name one commit);
 * a bare sha is compared with the other side's sha only, a bare tag with
 * the other side's tag and commit count (which must then be 0); a bare tag
 * against a bare sha is UNKNOWN. */
enum version_match version_compare(const char *mcu_version, const char *host_version);

/* True if the version carries -dirty or a build-stamp suffix. */
bool version_is_custom_build(const char *version);

/* Host version of the Klipper checkout at @klipper_path (version-host.c):
 * if it has a .git, what `git describe --always --tags --long --dirty`
 * prints there, read with libgit2 in a child process killed after a 5 s
 * timeout; no program is run and nothing is written.  Else the first line
 * of klippy/.version if it is a version; else "?".  Blocking: call from a
 * worker thread.  Returns 0 with a malloc()ed string, or -ENOMEM. */
int version_read_host(const char *klipper_path, char **ret);

/* The same with another timeout for reading the repository (version_read_host
 * uses 5 s). */
int version_read_host_with_timeout(const char *klipper_path, unsigned timeout_msec, char **ret);

/* The checkout is read by a child that runs the reading program again with
 * VERSION_DESCRIBE_ARG PATH: its main() must hand those to
 * version_describe_checkout_main(), which prints "ok <version>" or
 * "error <message>" on stdout and exits. */
#define VERSION_DESCRIBE_ARG "--describe-checkout"
_noreturn_ int version_describe_checkout_main(const char *path);
