/* Reader for Klipper's printer.cfg, following klippy/configfile.py and
 * Python's configparser as klippy configures it (strict=False, inline
 * comment prefixes ; and #):
 *
 *  - '#' starts a comment anywhere on a line (klippy cuts lines there before
 *    configparser sees them); ';' starts one at the beginning of a line or
 *    after whitespace;
 *  - "[section]" headers; "key: value" or "key = value" options, split at the
 *    first ':' or '=', key lower-cased; a line indented deeper than its
 *    option line continues the value; a section seen twice is merged and a
 *    repeated key replaces the earlier value;
 *  - "[include GLOB]" at the start of a line reads the matching files (sorted,
 *    relative to the including file's directory) in place, recursively; a
 *    file that includes itself (directly or not) is skipped with a warning;
 *  - the SAVE_CONFIG block at the end of the top file ("#*# " lines after
 *    klippy's three-line header) is parsed as configuration too, except for
 *    options the regular configuration already sets (klippy comments those
 *    out as duplicates).
 *
 * Only [mcu] and [mcu NAME] sections are kept, and of them only the options
 * the daemon uses.  Problems in the content are logged as warnings and
 * counted; parsing continues.
 *
 * The daemon runs as root, but printer.cfg and what it includes belong to
 * the Klipper user, so the reader trusts none of it:
 *
 *  - Whose files: the owner of the top file (after following symlinks) is
 *    taken to be the Klipper user; for the path klippy reports, the uid of
 *    klippy's process (SO_PEERCRED of its API socket), who must be able to
 *    read the top file too.  Unless that is root, a file is used only
 *    if that user could read it by its mode bits — owner, group (primary
 *    and supplementary groups from the user database) or other — and could
 *    search every directory above it (checked on the real path of the
 *    opened file, so symlinks cannot hide a root-only directory).  POSIX
 *    ACLs are not consulted: their mask shows in the group bits, so a file
 *    readable only through a named ACL entry is refused, never the other
 *    way round.  Switching credentials (setfsuid) is not used: the unit
 *    keeps no CAP_SETUID and filters the @privileged system calls.  A file
 *    the user cannot read is skipped with a warning, like a missing one.
 *  - Only regular files: stat() before open() (a FIFO or device is never
 *    opened), then open with O_NONBLOCK and check fstat() of the result is
 *    the same regular file.  Symlinks are followed: a linked printer.cfg is
 *    normal in Klipper installs.  Anything else makes printer.cfg unusable.
 *  - Bounds: see the PRINTERCFG_MAX_* values in the header; exceeding any of
 *    them makes printer.cfg unusable (an error naming file and line), as
 *    does an include loop's exponential cousin (each file including the
 *    next twice) through the file count.  Include cycles are skipped with a
 *    warning, as before.
 *  - Messages name files and line numbers, never what a line contains.
 *  - A read can be cancelled between files (a newer read supersedes it).
 *
 * Paths are never
 * canonicalised with realpath(): /dev paths are compared as written (after
 * removing "//" and "/./"), because realpath() on emulated device nodes
 * crashes under umockdev and symlinks under /dev change with hotplug. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/printercfg.h"
#include "shared/log.h"
#include "shared/macro.h"
#include "shared/strutil.h"

/* The options of an [mcu] section the daemon uses; others are not kept. */
static const char *const kept_keys[] = { "serial", "baud", "canbus_uuid", "canbus_interface" };

static const char *const autosave_header[3] = {
        "#*# <---------------------- SAVE_CONFIG ---------------------->",
        "#*# DO NOT EDIT THIS BLOCK OR BELOW. The contents are auto-generated.",
        "#*#",
};

struct option {
        char *key;              /* lower-cased */
        char *value;            /* continuation lines joined with '\n' */
        bool regular;           /* set outside the SAVE_CONFIG block */
        char *file;             /* where it was set, for messages */
        unsigned lineno;
};

struct section {
        char *name;             /* "mcu" or "mcu NAME" */
        struct option *options;
        size_t n_options;
};

struct open_file {
        dev_t dev;
        ino_t ino;
};

/* The Klipper user, as far as file access goes. */
struct reader {
        bool set;               /* known before the top file is opened */
        bool unrestricted;      /* the owner is root (or whoever this process is) */
        uid_t uid;
        gid_t *groups;          /* primary and supplementary groups */
        int n_groups;
};

struct parser {
        struct section *sections;       /* [mcu …] sections in order of appearance */
        size_t n_sections;
        unsigned n_warnings;
        struct open_file stack[PRINTERCFG_MAX_DEPTH + 1];       /* files being read, for loop detection */
        size_t depth;
        struct reader reader;
        const atomic_bool *cancel;
        /* Totals against the bounds. */
        unsigned n_files;
        size_t n_bytes;
        size_t n_lines;
        size_t n_section_headers;
};

/* What configparser remembers between lines of one chunk of text (klippy
 * parses the text between two includes as a separate chunk). */
struct chunk_state {
        bool in_section;        /* any section header seen */
        ssize_t section;        /* index into parser.sections, -1 if not an MCU section */
        bool in_option;         /* an option line was seen, continuation lines may follow */
        ssize_t option;         /* index of that option in the section, -1 if not kept */
        size_t indent;          /* indentation of the last option/header line */
        bool autosave;          /* lines come from the SAVE_CONFIG block */
};

static void chunk_state_reset(struct chunk_state *st) {
        *st = (struct chunk_state) { .section = -1, .option = -1, .autosave = st->autosave };
}

_printf_(2, 3)
static void parser_warn(struct parser *p, const char *fmt, ...) {
        char buf[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        log_warning("%s", buf);
        p->n_warnings++;
}

_printf_(2, 3)
static void parser_error(struct parser *p, const char *fmt, ...) {
        char buf[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        log_error("%s", buf);
}

static void section_done(struct section *s) {
        for (size_t i = 0; i < s->n_options; i++) {
                free(s->options[i].key);
                free(s->options[i].value);
                free(s->options[i].file);
        }
        free(s->options);
        free(s->name);
}

static void parser_done(struct parser *p) {
        for (size_t i = 0; i < p->n_sections; i++)
                section_done(&p->sections[i]);
        free(p->sections);
        free(p->reader.groups);
}

static char *strndup_stripped(const char *s, size_t len) {
        while (len > 0 && isspace((unsigned char) *s)) {
                s++;
                len--;
        }
        while (len > 0 && isspace((unsigned char) s[len - 1]))
                len--;
        return strndup(s, len);
}

/* "mcu", "MCU  eddy " → "mcu", "mcu eddy"; other sections → NULL in *ret.
 * Returns -ENOMEM or 0. */
static int mcu_section_name(const char *header, size_t len, char **ret) {
        _cleanup_free_ char *name = NULL;
        char *out;
        bool space = false;

        name = strndup_stripped(header, len);
        if (!name)
                return -ENOMEM;
        if (strncasecmp(name, "mcu", 3) != 0 || (name[3] != '\0' && !isspace((unsigned char) name[3]))) {
                *ret = NULL;
                return 0;
        }

        memcpy(name, "mcu", 3);
        out = name + 3;
        for (const char *in = name + 3; *in; in++) {
                if (isspace((unsigned char) *in)) {
                        space = true;
                        continue;
                }
                if (space)
                        *out++ = ' ';
                space = false;
                *out++ = *in;
        }
        *out = '\0';

        *ret = TAKE_PTR(name);
        return 0;
}

static ssize_t parser_find_or_add_section(struct parser *p, char *name) {
        struct section *grown;

        /* Names go to D-Bus as valid UTF-8.  Cleaned here, before sections
         * of one name are merged: two headers that differ only in invalid
         * bytes are one section, as their names on the bus are one. */
        if (!utf8_is_valid(name)) {
                char *clean = utf8_sanitize(name);

                free(name);
                if (!clean)
                        return -ENOMEM;
                name = clean;
        }
        for (size_t i = 0; i < p->n_sections; i++)
                if (streq(p->sections[i].name, name)) {
                        free(name);
                        return (ssize_t) i;
                }

        grown = realloc(p->sections, (p->n_sections + 1) * sizeof(struct section));
        if (!grown) {
                free(name);
                return -ENOMEM;
        }
        p->sections = grown;
        p->sections[p->n_sections] = (struct section) { .name = name };
        return (ssize_t) p->n_sections++;
}

static ssize_t section_find_option(const struct section *s, const char *key) {
        for (size_t i = 0; i < s->n_options; i++)
                if (streq(s->options[i].key, key))
                        return (ssize_t) i;
        return -1;
}

/* Set @key to @value in @s (taking ownership of both); returns the index. */
static ssize_t section_set_option(struct section *s, char *key, char *value, bool regular,
                                  const char *file, unsigned lineno) {
        struct option *grown;
        char *where;
        ssize_t i;

        where = strdup(file);
        if (!where) {
                free(key);
                free(value);
                return -ENOMEM;
        }

        i = section_find_option(s, key);
        if (i >= 0) {
                free(key);
                free(s->options[i].value);
                free(s->options[i].file);
                s->options[i].value = value;
                s->options[i].regular = regular;
                s->options[i].file = where;
                s->options[i].lineno = lineno;
                return i;
        }

        grown = realloc(s->options, (s->n_options + 1) * sizeof(struct option));
        if (!grown) {
                free(key);
                free(value);
                free(where);
                return -ENOMEM;
        }
        s->options = grown;
        s->options[s->n_options] = (struct option) {
                .key = key, .value = value, .regular = regular, .file = where, .lineno = lineno,
        };
        return (ssize_t) s->n_options++;
}

static bool key_is_kept(const char *key) {
        for (size_t i = 0; i < ELEMENTSOF(kept_keys); i++)
                if (streq(key, kept_keys[i]))
                        return true;
        return false;
}

static int option_append(struct parser *p, struct option *o, const char *file, unsigned lineno,
                         const char *text, size_t len) {
        size_t old = strlen(o->value);
        char *grown;

        if (old + 1 + len > PRINTERCFG_MAX_VALUE) {
                parser_error(p, "%s:%u: Value longer than %u bytes.", file, lineno, PRINTERCFG_MAX_VALUE);
                return -E2BIG;
        }
        grown = realloc(o->value, old + 1 + len + 1);
        if (!grown)
                return -ENOMEM;
        grown[old] = '\n';
        memcpy(grown + old + 1, text, len);
        grown[old + 1 + len] = '\0';
        o->value = grown;
        return 0;
}

/* configparser's SECTCRE "\[(?P<header>.+)\]" applied with match(): '[' at
 * the start, the header runs to the last ']'. */
static bool match_section_header(const char *s, size_t len, const char **ret_header, size_t *ret_len) {
        const char *close;

        if (len < 3 || s[0] != '[')
                return false;
        close = NULL;
        for (const char *c = s + 1; c < s + len; c++)
                if (*c == ']')
                        close = c;
        if (!close || close == s + 1)
                return false;
        *ret_header = s + 1;
        *ret_len = (size_t) (close - s - 1);
        return true;
}

/* One line of configparser input (klippy has already cut it at '#'). */
static int parse_line(struct parser *p, struct chunk_state *st, const char *file, unsigned lineno,
                      char *line) {
        const char *header, *value, *delim;
        size_t len, indent, header_len;
        _cleanup_free_ char *key = NULL;
        char *val;
        int r;

        /* Inline ';' comments need whitespace (or nothing) in front. */
        for (char *c = line; (c = strchr(c, ';')); c++)
                if (c == line || isspace((unsigned char) c[-1])) {
                        *c = '\0';
                        break;
                }

        indent = 0;
        while (isspace((unsigned char) line[indent]))
                indent++;
        value = line + indent;
        len = strlen(value);
        while (len > 0 && isspace((unsigned char) value[len - 1]))
                len--;
        if (len == 0)
                return 0;

        if (st->in_section && st->in_option && indent > st->indent) {
                if (st->section >= 0 && st->option >= 0)
                        return option_append(p, &p->sections[st->section].options[st->option], file, lineno,
                                             value, len);
                return 0;
        }

        st->indent = indent;
        st->in_option = false;
        st->option = -1;

        if (match_section_header(value, len, &header, &header_len)) {
                char *name;

                if (++p->n_section_headers > PRINTERCFG_MAX_SECTIONS) {
                        parser_error(p, "%s:%u: More than %u section headers.", file, lineno,
                                     PRINTERCFG_MAX_SECTIONS);
                        return -E2BIG;
                }
                r = mcu_section_name(header, header_len, &name);
                if (r < 0)
                        return r;
                st->in_section = true;
                st->section = -1;
                if (name) {
                        ssize_t i = parser_find_or_add_section(p, name);
                        if (i < 0)
                                return (int) i;
                        st->section = i;
                }
                return 0;
        }

        if (!st->in_section) {
                parser_warn(p, "%s:%u: Option outside of any section, ignoring.", file, lineno);
                return 0;
        }

        delim = NULL;
        for (const char *c = value; c < value + len; c++)
                if (*c == ':' || *c == '=') {
                        delim = c;
                        break;
                }
        if (!delim || delim == value) {
                parser_warn(p, "%s:%u: Malformed line, ignoring.", file, lineno);
                return 0;
        }

        st->in_option = true;
        if (st->section < 0)
                return 0;

        key = strndup_stripped(value, (size_t) (delim - value));
        if (!key)
                return -ENOMEM;
        ascii_strlower(key);
        if (!key_is_kept(key))
                return 0;

        if (st->autosave) {
                ssize_t existing = section_find_option(&p->sections[st->section], key);

                /* klippy comments out SAVE_CONFIG options that the regular
                 * configuration already sets, continuation lines included. */
                if (existing >= 0 && p->sections[st->section].options[existing].regular)
                        return 0;
        }

        if (len - (size_t) (delim + 1 - value) > PRINTERCFG_MAX_VALUE) {
                parser_error(p, "%s:%u: Value longer than %u bytes.", file, lineno, PRINTERCFG_MAX_VALUE);
                return -E2BIG;
        }
        val = strndup_stripped(delim + 1, len - (size_t) (delim + 1 - value));
        if (!val)
                return -ENOMEM;
        st->option = section_set_option(&p->sections[st->section], TAKE_PTR(key), val, !st->autosave,
                                        file, lineno);
        if (st->option < 0)
                return (int) st->option;
        return 0;
}

static bool has_glob_magic(const char *s) {
        return strpbrk(s, "*?[") != NULL;
}

static int strcmp_ptr(const void *a, const void *b) {
        return strcmp(*(char * const *) a, *(char * const *) b);
}

static int parse_file(struct parser *p, const char *path, bool top);

/* [include SPEC] in @file. */
static int parse_include(struct parser *p, const char *file, unsigned lineno, const char *spec) {
        _cleanup_free_ char *pattern = NULL;
        const char *slash;
        glob_t g = {};
        int r;

        if (isempty(spec)) {
                parser_warn(p, "%s:%u: Empty [include], ignoring.", file, lineno);
                return 0;
        }

        slash = strrchr(file, '/');
        if (spec[0] == '/' || !slash)
                pattern = strdup(spec);
        else if (asprintf(&pattern, "%.*s/%s", (int) (slash - file), file, spec) < 0)
                pattern = NULL;
        if (!pattern)
                return -ENOMEM;

        r = glob(pattern, GLOB_NOSORT | GLOB_NOESCAPE, NULL, &g);
        if (r == 0 && g.gl_pathc > PRINTERCFG_MAX_FILES) {
                parser_error(p, "%s:%u: [include] matches more than %u files.", file, lineno,
                             PRINTERCFG_MAX_FILES);
                globfree(&g);
                return -E2BIG;
        }
        if (r == GLOB_NOMATCH) {
                if (!has_glob_magic(pattern))
                        parser_warn(p, "%s:%u: Include file '%s' does not exist, ignoring.",
                                    file, lineno, pattern);
                else
                        log_debug("%s:%u: [include %s] matches no file.", file, lineno, spec);
                return 0;
        }
        if (r == GLOB_NOSPACE)
                return -ENOMEM;
        if (r != 0) {
                parser_warn(p, "%s:%u: Cannot expand include '%s', ignoring.", file, lineno, pattern);
                globfree(&g);
                return 0;
        }

        qsort(g.gl_pathv, g.gl_pathc, sizeof(char *), strcmp_ptr);
        for (size_t i = 0; i < g.gl_pathc; i++) {
                if (p->depth > PRINTERCFG_MAX_DEPTH) {
                        parser_error(p, "%s:%u: Includes nested deeper than %u levels.", file, lineno,
                                     PRINTERCFG_MAX_DEPTH);
                        r = -E2BIG;
                        break;
                }
                r = parse_file(p, g.gl_pathv[i], false);
                if (r == -ELOOP)
                        parser_warn(p, "%s:%u: Recursive include of config file '%s', ignoring.",
                                    file, lineno, g.gl_pathv[i]);
                else if (r == -EACCES)
                        parser_warn(p, "%s:%u: Included file '%s' is not readable for the owner of printer.cfg "
                                    "(uid %u), ignoring.", file, lineno, g.gl_pathv[i], (unsigned) p->reader.uid);
                else if (r == -ENOENT)
                        parser_warn(p, "%s:%u: Included file '%s' went away, ignoring.",
                                    file, lineno, g.gl_pathv[i]);
                else if (r < 0)
                        /* parse_file() said what; the whole printer.cfg is unusable. */
                        break;
                r = 0;
        }
        globfree(&g);
        return r;
}

/* Feed lines[0..n) through klippy's include handling and configparser. */
static int parse_lines(struct parser *p, const char *file, char **lines, const unsigned *linenos,
                       size_t n, struct chunk_state *st) {
        int r;

        for (size_t i = 0; i < n; i++) {
                char *line = lines[i], *hash;
                const char *header;
                size_t header_len;

                hash = strchr(line, '#');
                if (hash)
                        *hash = '\0';

                if (match_section_header(line, strlen(line), &header, &header_len) &&
                    header_len >= 8 && strncmp(header, "include ", 8) == 0) {
                        _cleanup_free_ char *spec = strndup_stripped(header + 8, header_len - 8);

                        if (!spec)
                                return -ENOMEM;
                        r = parse_include(p, file, linenos[i], spec);
                        if (r < 0)
                                return r;
                        if (p->cancel && atomic_load(p->cancel))
                                return -ECANCELED;
                        /* klippy parses the text after an include as a new chunk. */
                        chunk_state_reset(st);
                        continue;
                }

                r = parse_line(p, st, file, linenos[i], line);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Read all of @fd, refusing more than @limit bytes (a file may grow after
 * fstat()). */
static int read_file(int fd, size_t limit, char **ret, size_t *ret_size) {
        _cleanup_free_ char *buf = NULL;
        size_t size = 0, allocated = 0;

        for (;;) {
                ssize_t n;

                if (allocated - size < 4096) {
                        char *grown;

                        if (allocated > limit)
                                return -EFBIG;
                        allocated = allocated ? allocated * 2 : 8192;
                        grown = realloc(buf, allocated + 1);
                        if (!grown)
                                return -ENOMEM;
                        buf = grown;
                }
                n = read(fd, buf + size, allocated - size);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        break;
                size += (size_t) n;
        }
        buf[size] = '\0';
        *ret = TAKE_PTR(buf);
        *ret_size = size;
        return 0;
}

/* Split @buf in place into lines (without "\n" and a trailing "\r"). */
static int split_lines(char *buf, size_t size, char ***ret, size_t *ret_n) {
        char **lines = NULL;
        size_t n = 0, allocated = 0;
        char *p = buf, *end = buf + size;

        while (p < end) {
                char *nl = memchr(p, '\n', (size_t) (end - p));
                char *line_end = nl ? nl : end;

                if (n == allocated) {
                        char **grown;

                        allocated = allocated ? allocated * 2 : 64;
                        grown = realloc(lines, allocated * sizeof(char *));
                        if (!grown) {
                                free(lines);
                                return -ENOMEM;
                        }
                        lines = grown;
                }
                *line_end = '\0';
                if (line_end > p && line_end[-1] == '\r')
                        line_end[-1] = '\0';
                lines[n++] = p;
                p = line_end + 1;
        }

        *ret = lines;
        *ret_n = n;
        return 0;
}

static bool line_is_blank(const char *s) {
        for (; *s; s++)
                if (!isspace((unsigned char) *s))
                        return false;
        return true;
}

/* Find klippy's SAVE_CONFIG block in the top file.  Returns the number of
 * regular lines; *ret_first and *ret_count give the block's content lines
 * (with "#*# " already removed in place), or count 0 if there is no usable
 * block.  Like klippy, a block with foreign lines after the header, or
 * "#*# " lines above it, is not used at all. */
static size_t find_autosave(struct parser *p, const char *file, char **lines, size_t n,
                            size_t *ret_first, size_t *ret_count) {
        size_t header = n, first, last;

        *ret_first = n;
        *ret_count = 0;

        for (size_t i = 0; i + 2 < n; i++)
                if (streq(lines[i], autosave_header[0]) && streq(lines[i + 1], autosave_header[1]) &&
                    streq(lines[i + 2], autosave_header[2])) {
                        header = i;
                        break;
                }
        if (header == n)
                return n;

        for (size_t i = 0; i < header; i++)
                if (startswith(lines[i], "#*# ") && i > 0) {
                        parser_warn(p, "%s: Can't read the SAVE_CONFIG block - autosave state corrupted.",
                                    file);
                        return n;
                }

        first = header + 3;
        last = n;
        while (first < last && line_is_blank(lines[first]))
                first++;
        while (last > first && line_is_blank(lines[last - 1]))
                last--;

        for (size_t i = first; i < last; i++) {
                const char *l = lines[i];

                while (i == first && isspace((unsigned char) *l))
                        l++;
                if (!startswith(l, "#*#") || (strlen(l) >= 4 && !startswith(l, "#*# "))) {
                        parser_warn(p, "%s:%zu: Can't read the SAVE_CONFIG block - modifications after header.",
                                    file, i + 1);
                        return n;
                }
        }
        for (size_t i = first; i < last; i++) {
                char *l = lines[i];

                while (i == first && isspace((unsigned char) *l))
                        l++;
                lines[i] = strlen(l) >= 4 ? l + 4 : l + strlen(l);
        }

        *ret_first = first;
        *ret_count = last - first;
        return header;
}

static const char *file_type_name(mode_t mode) {
        switch (mode & S_IFMT) {
        case S_IFDIR: return "a directory";
        case S_IFIFO: return "a FIFO";
        case S_IFCHR: return "a character device";
        case S_IFBLK: return "a block device";
        case S_IFSOCK: return "a socket";
        default: return "not a regular file";
        }
}

static bool reader_in_group(const struct reader *u, gid_t gid) {
        for (int i = 0; i < u->n_groups; i++)
                if (u->groups[i] == gid)
                        return true;
        return false;
}

/* May the Klipper user do @mask (R_OK, X_OK) to @st by its mode bits?
 * POSIX order: the owner class alone decides for the owner, then the
 * group class for group members, else the other class. */
static bool reader_may(const struct reader *u, const struct stat *st, unsigned mask) {
        unsigned bits;

        if (u->unrestricted)
                return true;
        if (st->st_uid == u->uid)
                bits = (st->st_mode >> 6) & 7;
        else if (reader_in_group(u, st->st_gid))
                bits = (st->st_mode >> 3) & 7;
        else
                bits = st->st_mode & 7;
        return (bits & mask) == mask;
}

/* Could the Klipper user reach the file open at @fd: search permission on
 * every directory above its real path? */
static int reader_may_reach(const struct reader *u, int fd) {
        char proc[64], real[PATH_MAX];
        ssize_t n;

        if (u->unrestricted)
                return 0;
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        n = readlink(proc, real, sizeof(real) - 1);
        if (n <= 0 || real[0] != '/')
                return -EACCES;         /* cannot tell: refuse */
        real[n] = '\0';

        for (char *slash = strrchr(real, '/'); slash; slash = strrchr(real, '/')) {
                struct stat st;

                *slash = '\0';
                if (stat(*real ? real : "/", &st) < 0)
                        return -EACCES;
                if (!reader_may(u, &st, X_OK))
                        return -EACCES;
                if (slash == real)
                        break;
        }
        return 0;
}

/* The owner of the top file is the Klipper user: look up its groups. */
static int reader_init(struct reader *u, uid_t owner) {
        _cleanup_free_ char *buf = NULL;
        struct passwd pw, *result = NULL;
        long size = sysconf(_SC_GETPW_R_SIZE_MAX);
        int n = 32;

        *u = (struct reader) { .uid = owner };
        if (owner == 0 || owner == geteuid()) {
                u->unrestricted = true;
                return 0;
        }

        buf = malloc(size > 0 ? (size_t) size : 16384);
        if (!buf)
                return -ENOMEM;
        if (getpwuid_r(owner, &pw, buf, size > 0 ? (size_t) size : 16384, &result) != 0 || !result)
                return 0;       /* no such user: only the owner and other bits count */

        for (;;) {
                gid_t *groups = reallocarray(u->groups, (size_t) n, sizeof(gid_t));
                int want = n;

                if (!groups)
                        return -ENOMEM;
                u->groups = groups;
                if (getgrouplist(pw.pw_name, pw.pw_gid, u->groups, &want) >= 0) {
                        u->n_groups = want;
                        return 0;
                }
                if (want <= n || want > 65536) {
                        /* The database answered nonsense: the primary group only. */
                        u->groups[0] = pw.pw_gid;
                        u->n_groups = 1;
                        return 0;
                }
                n = want;
        }
}

/* Open @path for reading if it is a regular file, without ever opening
 * anything else (a FIFO would block, a device may react to open()). */
static int open_regular(struct parser *p, const char *path, struct stat *ret_st) {
        _cleanup_close_ int fd = -1;
        struct stat before;

        if (stat(path, &before) < 0)
                return -errno;
        if (!S_ISREG(before.st_mode)) {
                parser_error(p, "%s: %s, not a configuration file.", path, file_type_name(before.st_mode));
                return S_ISDIR(before.st_mode) ? -EISDIR : -EBADFD;
        }
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        if (fstat(fd, ret_st) < 0)
                return -errno;
        if (!S_ISREG(ret_st->st_mode) || ret_st->st_dev != before.st_dev || ret_st->st_ino != before.st_ino) {
                parser_error(p, "%s: changed while being opened.", path);
                return -EBADFD;
        }
        return TAKE_FD(fd);
}

static int parse_file(struct parser *p, const char *path, bool top) {
        _cleanup_free_ unsigned *linenos = NULL;
        _cleanup_free_ char **lines = NULL;
        _cleanup_free_ char *buf = NULL;
        _cleanup_close_ int fd = -1;
        struct chunk_state st = {};
        size_t size = 0, n = 0, n_regular, autosave_first, autosave_count, limit;
        struct stat s;
        int r;

        if (p->cancel && atomic_load(p->cancel))
                return -ECANCELED;

        fd = open_regular(p, path, &s);
        if (fd < 0)
                return fd;

        /* Compare identities rather than names: no realpath(), and links
         * cannot hide a loop. */
        for (size_t i = 0; i < p->depth; i++)
                if (p->stack[i].dev == s.st_dev && p->stack[i].ino == s.st_ino)
                        return -ELOOP;

        if (top && !p->reader.set) {
                r = reader_init(&p->reader, s.st_uid);
                if (r < 0)
                        return r;
        } else if (!reader_may(&p->reader, &s, R_OK) || reader_may_reach(&p->reader, fd) < 0) {
                if (top)
                        parser_error(p, "%s: Not readable for uid %u, whose printer.cfg it is said to be.",
                                     path, (unsigned) p->reader.uid);
                return -EACCES;
        }

        if (++p->n_files > PRINTERCFG_MAX_FILES) {
                parser_error(p, "%s: More than %u files read (includes count each time).", path,
                             PRINTERCFG_MAX_FILES);
                return -E2BIG;
        }
        limit = MIN((size_t) PRINTERCFG_MAX_FILE_SIZE, PRINTERCFG_MAX_TOTAL_SIZE - p->n_bytes);
        if ((uintmax_t) s.st_size > limit) {
                parser_error(p, "%s: Larger than %s.", path,
                             limit < PRINTERCFG_MAX_FILE_SIZE ? "what is left of the total size bound"
                                                              : "the size bound");
                return -EFBIG;
        }
        r = read_file(fd, limit, &buf, &size);
        if (r == -EFBIG)
                parser_error(p, "%s: Grew beyond the size bound while being read.", path);
        if (r < 0)
                return r;
        fd = safe_close(fd);
        p->n_bytes += size;

        r = split_lines(buf, size, &lines, &n);
        if (r < 0)
                return r;
        p->n_lines += n;
        if (p->n_lines > PRINTERCFG_MAX_LINES) {
                parser_error(p, "%s: More than %u lines in all.", path, PRINTERCFG_MAX_LINES);
                return -E2BIG;
        }
        linenos = calloc(n ? n : 1, sizeof(unsigned));
        if (!linenos)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                linenos[i] = (unsigned) i + 1;

        n_regular = n;
        autosave_first = autosave_count = 0;
        if (top)
                n_regular = find_autosave(p, path, lines, n, &autosave_first, &autosave_count);

        p->stack[p->depth++] = (struct open_file) { .dev = s.st_dev, .ino = s.st_ino };

        chunk_state_reset(&st);
        r = parse_lines(p, path, lines, linenos, n_regular, &st);
        if (r >= 0 && autosave_count > 0) {
                /* klippy appends the block to the regular text: the chunk
                 * state carries over. */
                st.autosave = true;
                r = parse_lines(p, path, lines + autosave_first, linenos + autosave_first,
                                autosave_count, &st);
        }

        p->depth--;
        return r;
}

static int parse_baud(const char *s, unsigned *ret) {
        unsigned long v;
        char *end;

        if (*s == '+')
                s++;
        if (!isdigit((unsigned char) *s))
                return -EINVAL;
        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno != 0 || *end != '\0' || v > UINT32_MAX)
                return -EINVAL;
        *ret = (unsigned) v;
        return 0;
}

/* The value of @key with surrounding whitespace (and so the newline of a
 * value starting on a continuation line) removed; NULL in *ret if absent or
 * empty. */
static int section_get(const struct section *s, const char *key, char **ret) {
        ssize_t i = section_find_option(s, key);
        char *v;

        *ret = NULL;
        if (i < 0)
                return 0;
        v = strndup_stripped(s->options[i].value, strlen(s->options[i].value));
        if (!v)
                return -ENOMEM;
        if (*v)
                *ret = v;
        else
                free(v);
        return 0;
}

static int mcu_from_section(struct parser *p, const struct section *s, struct printercfg_mcu *m) {
        _cleanup_free_ char *baud = NULL;

        /* The name is valid UTF-8 already (parser_find_or_add_section());
         * the other values are compared with device paths and ids and stay
         * as written. */
        m->name = strdup(s->name);
        if (!m->name)
                return -ENOMEM;
        if (section_get(s, "serial", &m->serial) < 0 ||
            section_get(s, "canbus_interface", &m->canbus_interface) < 0 ||
            section_get(s, "canbus_uuid", &m->canbus_uuid) < 0 ||
            section_get(s, "baud", &baud) < 0)
                return -ENOMEM;

        if (m->canbus_uuid)
                ascii_strlower(m->canbus_uuid);

        if (baud && parse_baud(baud, &m->baud) < 0) {
                ssize_t i = section_find_option(s, "baud");

                parser_warn(p, "%s:%u: Invalid baud, ignoring.", s->options[i].file, s->options[i].lineno);
        }

        return 0;
}

int printercfg_load_cancellable(const char *path, uid_t reader, const atomic_bool *cancel,
                                struct printercfg **ret) {
        _cleanup_(printercfg_freep) struct printercfg *cfg = NULL;
        struct parser p = { .cancel = cancel };
        int r;

        if (reader != PRINTERCFG_OWNER) {
                r = reader_init(&p.reader, reader);
                if (r < 0)
                        goto finish;
                p.reader.set = true;
        }
        r = parse_file(&p, path, true);
        if (r == -ELOOP)
                r = -EIO;       /* cannot happen for the top file */
        if (r < 0)
                goto finish;

        r = -ENOMEM;
        cfg = calloc(1, sizeof(*cfg));
        if (!cfg)
                goto finish;
        if (p.n_sections > 0) {
                cfg->mcus = calloc(p.n_sections, sizeof(struct printercfg_mcu));
                if (!cfg->mcus)
                        goto finish;
        }
        for (size_t i = 0; i < p.n_sections; i++) {
                r = mcu_from_section(&p, &p.sections[i], &cfg->mcus[i]);
                cfg->n_mcus = i + 1;
                if (r < 0)
                        goto finish;
        }
        cfg->n_warnings = p.n_warnings;

        *ret = TAKE_PTR(cfg);
        r = 0;
finish:
        parser_done(&p);
        return r;
}

int printercfg_load(const char *path, struct printercfg **ret) {
        return printercfg_load_cancellable(path, PRINTERCFG_OWNER, NULL, ret);
}

struct printercfg *printercfg_free(struct printercfg *p) {
        if (!p)
                return NULL;
        for (size_t i = 0; i < p->n_mcus; i++) {
                free(p->mcus[i].name);
                free(p->mcus[i].serial);
                free(p->mcus[i].canbus_uuid);
                free(p->mcus[i].canbus_interface);
        }
        free(p->mcus);
        free(p);
        return NULL;
}

/* Next path component of [*p, end), skipping empty and "." components. */
static bool next_component(const char **p, const char *end, const char **ret, size_t *ret_len) {
        for (;;) {
                const char *start;

                while (*p < end && **p == '/')
                        (*p)++;
                if (*p >= end)
                        return false;
                start = *p;
                while (*p < end && **p != '/')
                        (*p)++;
                if (*p - start == 1 && *start == '.')
                        continue;
                *ret = start;
                *ret_len = (size_t) (*p - start);
                return true;
        }
}

/* Compare @a with the @b_len bytes at @b, ignoring "//", "/./" and a
 * trailing "/" — purely textual, symlinks are not resolved. */
static bool path_equal_n(const char *a, const char *b, size_t b_len) {
        const char *a_end = a + strlen(a), *b_end = b + b_len;
        const char *ca, *cb;
        size_t la, lb;
        bool more_a, more_b;

        if (a_end == a || b_len == 0 || (*a == '/') != (*b == '/'))
                return false;
        for (;;) {
                more_a = next_component(&a, a_end, &ca, &la);
                more_b = next_component(&b, b_end, &cb, &lb);
                if (!more_a || !more_b)
                        return more_a == more_b;
                if (la != lb || memcmp(ca, cb, la) != 0)
                        return false;
        }
}

static bool serial_matches_usb_serial(const char *serial, const char *usb_serial) {
        _cleanup_free_ char *needle = NULL;
        const char *base = strrchr(serial, '/');

        base = base ? base + 1 : serial;
        if (!startswith(base, "usb-"))
                return false;
        if (asprintf(&needle, "_%s-if", usb_serial) < 0)
                return false;
        return strstr(base, needle) != NULL;
}

const struct printercfg_mcu *printercfg_find_serial(const struct printercfg *p,
                                                    const char *devnode,
                                                    const char *devlinks,
                                                    const char *usb_serial) {
        if (!p)
                return NULL;

        for (size_t i = 0; i < p->n_mcus; i++) {
                const struct printercfg_mcu *m = &p->mcus[i];

                if (!m->serial)
                        continue;

                if (devnode && path_equal_n(m->serial, devnode, strlen(devnode)))
                        return m;

                if (devlinks)
                        for (const char *l = devlinks; *l;) {
                                size_t len;

                                l += strspn(l, " \t\n");
                                len = strcspn(l, " \t\n");
                                if (len > 0 && path_equal_n(m->serial, l, len))
                                        return m;
                                l += len;
                        }

                if (!isempty(usb_serial) && serial_matches_usb_serial(m->serial, usb_serial))
                        return m;
        }
        return NULL;
}

const struct printercfg_mcu *printercfg_find_canbus(const struct printercfg *p, const char *uuid) {
        if (!p || isempty(uuid))
                return NULL;
        for (size_t i = 0; i < p->n_mcus; i++)
                if (p->mcus[i].canbus_uuid && strcasecmp(p->mcus[i].canbus_uuid, uuid) == 0)
                        return &p->mcus[i];
        return NULL;
}
