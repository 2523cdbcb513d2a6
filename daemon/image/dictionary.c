/* Klipper data dictionaries (protocols.md §1.4, §15.2): inflate the zlib
 * stream an MCU returns from identify, or that an image embeds, and pick the
 * fields mcuflashd shows (app, version, build_versions, config.MCU,
 * config.CLOCK_FREQ) out of the JSON.  The whole "config" object is kept for
 * image checks.  Command and response formats are not interpreted: the
 * daemon never talks to a running MCU beyond identify.  Finding a dictionary
 * inside an image is the image loader's business, not this file's. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "image/dictionary.h"
#include "shared/log.h"

struct klipper_dict *klipper_dict_free(struct klipper_dict *d) {
        if (!d)
                return NULL;

        free(d->app);
        free(d->version);
        free(d->build_versions);
        free(d->mcu);
        json_object_put(d->config);
        free(d);
        return NULL;
}

static void inflate_endp(z_stream *z) {
        inflateEnd(z);
}

/* Inflate one zlib stream from @data into a NUL-terminated buffer, stopping
 * at its end (whatever follows is not ours). */
static int dict_inflate(const uint8_t *data, size_t len, size_t max_size, char **ret, size_t *ret_len) {
        _cleanup_(inflate_endp) z_stream z = {};
        _cleanup_free_ char *out = NULL;
        size_t allocated = 0, in_pos = 0;
        int r;

        r = inflateInit(&z);
        if (r != Z_OK)
                return r == Z_MEM_ERROR ? -ENOMEM : -EIO;

        for (;;) {
                size_t in_chunk, out_room;

                /* Room for at least one more byte and the final NUL.  The
                 * buffer never grows beyond max_size + 2: producing
                 * max_size + 1 bytes is enough to know the text is too big. */
                if (z.total_out + 1 >= allocated) {
                        size_t n = MIN(MAX(allocated * 2, (size_t) 16384), max_size + 2);
                        char *p;

                        if (n <= allocated)
                                return -E2BIG;
                        p = realloc(out, n);
                        if (!p)
                                return -ENOMEM;
                        out = p;
                        allocated = n;
                }

                in_chunk = MIN(len - in_pos, (size_t) UINT_MAX);
                out_room = MIN(allocated - 1 - z.total_out, (size_t) UINT_MAX);
                z.next_in = (Bytef *) (data + in_pos);
                z.avail_in = (uInt) in_chunk;
                z.next_out = (Bytef *) out + z.total_out;
                z.avail_out = (uInt) out_room;

                r = inflate(&z, Z_NO_FLUSH);
                in_pos += in_chunk - z.avail_in;

                if (z.total_out > max_size)
                        return -E2BIG;
                if (r == Z_STREAM_END)
                        break;
                if (r == Z_MEM_ERROR)
                        return -ENOMEM;
                if (r == Z_NEED_DICT || r == Z_DATA_ERROR || r == Z_STREAM_ERROR)
                        return -EBADMSG;
                if (r == Z_BUF_ERROR && z.avail_out > 0)
                        /* No progress although there is room to write: the
                         * input ended inside the stream. */
                        return -EBADMSG;
        }

        out[z.total_out] = '\0';
        *ret_len = z.total_out;
        *ret = TAKE_PTR(out);
        return 0;
}

static int dup_string_member(json_object *obj, const char *key, char **ret) {
        json_object *v;
        char *s;

        if (!json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string)) {
                *ret = NULL;
                return 0;
        }

        s = strdup(json_object_get_string(v));
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

/* CLOCK_FREQ is a number in every build seen so far, but config values are
 * allowed to be strings; accept both, 0 when unusable. */
static uint64_t clock_freq_from_json(json_object *v) {
        switch (json_object_get_type(v)) {
        case json_type_int: {
                int64_t i = json_object_get_int64(v);
                return i > 0 ? (uint64_t) i : 0;
        }
        case json_type_double: {
                double d = json_object_get_double(v);
                return d > 0 && d < 1.8e19 ? (uint64_t) d : 0;
        }
        case json_type_string: {
                const char *s = json_object_get_string(v);
                char *end;
                unsigned long long u;

                if (!s || *s < '0' || *s > '9')
                        return 0;
                errno = 0;
                u = strtoull(s, &end, 10);
                if (errno != 0 || *end != '\0')
                        return 0;
                return (uint64_t) u;
        }
        default:
                return 0;
        }
}

static int dict_from_object(json_object *root, struct klipper_dict **ret) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        json_object *config;
        int r;

        if (!json_object_is_type(root, json_type_object))
                return log_debug_errno(EBADMSG, "Data dictionary is not a JSON object.");

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;

        r = dup_string_member(root, "version", &d->version);
        if (r < 0)
                return r;
        if (!d->version)
                return log_debug_errno(EBADMSG, "Data dictionary has no \"version\".");

        r = dup_string_member(root, "app", &d->app);
        if (r < 0)
                return r;
        r = dup_string_member(root, "build_versions", &d->build_versions);
        if (r < 0)
                return r;

        if (json_object_object_get_ex(root, "config", &config) &&
            json_object_is_type(config, json_type_object)) {
                json_object *v;

                d->config = json_object_get(config);
                r = dup_string_member(config, "MCU", &d->mcu);
                if (r < 0)
                        return r;
                if (json_object_object_get_ex(config, "CLOCK_FREQ", &v))
                        d->clock_freq = clock_freq_from_json(v);
        }

        *ret = TAKE_PTR(d);
        return 0;
}

static void json_tokener_freep(json_tokener **t) {
        if (*t)
                json_tokener_free(*t);
}

static void json_object_putp(json_object **o) {
        if (*o)
                json_object_put(*o);
}

int klipper_dict_parse_json(const char *json, size_t len, struct klipper_dict **ret) {
        _cleanup_(json_tokener_freep) json_tokener *tok = NULL;
        _cleanup_(json_object_putp) json_object *root = NULL;

        if (len > INT_MAX)
                return -E2BIG;

        tok = json_tokener_new();
        if (!tok)
                return -ENOMEM;

        root = json_tokener_parse_ex(tok, json, (int) len);
        if (!root || json_tokener_get_error(tok) != json_tokener_success)
                return log_debug_errno(EBADMSG, "Data dictionary is not valid JSON: %s",
                                       json_tokener_error_desc(json_tokener_get_error(tok)));

        /* Only whitespace (or a terminating NUL) may follow the object. */
        for (size_t i = json_tokener_get_parse_end(tok); i < len && json[i] != '\0'; i++)
                if (!strchr(" \t\r\n", json[i]))
                        return log_debug_errno(EBADMSG, "Data dictionary has trailing data after the JSON object.");

        return dict_from_object(root, ret);
}

int klipper_dict_parse_compressed(const void *data, size_t len, size_t max_size,
                                  struct klipper_dict **ret) {
        _cleanup_free_ char *json = NULL;
        size_t json_len;
        int r;

        if (max_size == 0)
                max_size = KLIPPER_DICT_MAX_SIZE_DEFAULT;
        max_size = MIN(max_size, (size_t) INT_MAX - 2);        /* json-c takes an int length */

        r = dict_inflate(data, len, max_size, &json, &json_len);
        if (r == -EBADMSG)
                return log_debug_errno(r, "Data dictionary is not a valid zlib stream.");
        if (r == -E2BIG)
                return log_debug_errno(r, "Data dictionary inflates to more than %zu bytes.", max_size);
        if (r < 0)
                return r;

        return klipper_dict_parse_json(json, json_len, ret);
}
