/* Klipper data dictionaries (protocols.md §1.4, §15.2, §15.5): decompress
 * the stream an MCU returns from identify, or that an image embeds — zlib as
 * Klipper compresses it, or bzip2 as Kalico does, told apart by the magic
 * bytes and both capped in size — and pick the fields mcuflashd shows (app,
 * version, build_versions, config.MCU, config.CLOCK_FREQ, the embedded build
 * config "kconfig") out of the JSON.  The whole "config" object is kept for
 * image checks.  Command and response formats are not interpreted: the
 * daemon never talks to a running MCU beyond identify.  Walking an image is
 * the image loader's business; this file only says where a stream may start. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <bzlib.h>

#include "image/dictionary.h"
#include "shared/log.h"

struct klipper_dict *klipper_dict_free(struct klipper_dict *d) {
        if (!d)
                return NULL;

        free(d->app);
        free(d->version);
        free(d->build_versions);
        free(d->mcu);
        free(d->kconfig);
        json_object_put(d->config);
        free(d);
        return NULL;
}

static void inflate_endp(z_stream *z) {
        inflateEnd(z);
}

/* Make room in *@buf (of *@allocated bytes) for at least one more byte and
 * the final NUL after @used bytes.  The buffer never grows beyond
 * @max_size + 2: producing max_size + 1 bytes is enough to know the text is
 * too big. */
static int grow_output(char **buf, size_t *allocated, size_t used, size_t max_size) {
        size_t n;
        char *p;

        if (used + 1 < *allocated)
                return 0;
        n = MIN(MAX(*allocated * 2, (size_t) 16384), max_size + 2);
        if (n <= *allocated)
                return -E2BIG;
        p = realloc(*buf, n);
        if (!p)
                return -ENOMEM;
        *buf = p;
        *allocated = n;
        return 0;
}

/* Inflate one zlib stream from @data into a NUL-terminated buffer, stopping
 * at its end (whatever follows is not ours). */
static int zlib_decompress(const uint8_t *data, size_t len, size_t max_size, char **ret, size_t *ret_len) {
        _cleanup_(inflate_endp) z_stream z = {};
        _cleanup_free_ char *out = NULL;
        size_t allocated = 0, in_pos = 0;
        int r;

        r = inflateInit(&z);
        if (r != Z_OK)
                return r == Z_MEM_ERROR ? -ENOMEM : -EIO;

        for (;;) {
                size_t in_chunk, out_room;

                r = grow_output(&out, &allocated, z.total_out, max_size);
                if (r < 0)
                        return r;

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

static void bz_decompress_endp(bz_stream *s) {
        /* Harmless on a stream whose init failed: its state is NULL. */
        BZ2_bzDecompressEnd(s);
}

/* The same for one bzip2 stream (Kalico's identify data). */
static int bzip2_decompress(const uint8_t *data, size_t len, size_t max_size, char **ret, size_t *ret_len) {
        _cleanup_(bz_decompress_endp) bz_stream bz = {};
        _cleanup_free_ char *out = NULL;
        size_t allocated = 0, in_pos = 0, used = 0;
        int r;

        r = BZ2_bzDecompressInit(&bz, 0, 0);
        if (r != BZ_OK)
                return r == BZ_MEM_ERROR ? -ENOMEM : -EIO;

        for (;;) {
                size_t in_chunk, out_room, consumed, produced;

                r = grow_output(&out, &allocated, used, max_size);
                if (r < 0)
                        return r;

                in_chunk = MIN(len - in_pos, (size_t) UINT_MAX);
                out_room = MIN(allocated - 1 - used, (size_t) UINT_MAX);
                bz.next_in = (char *) (data + in_pos);
                bz.avail_in = (unsigned) in_chunk;
                bz.next_out = out + used;
                bz.avail_out = (unsigned) out_room;

                r = BZ2_bzDecompress(&bz);
                consumed = in_chunk - bz.avail_in;
                produced = out_room - bz.avail_out;
                in_pos += consumed;
                used += produced;

                if (used > max_size)
                        return -E2BIG;
                if (r == BZ_STREAM_END)
                        break;
                if (r == BZ_MEM_ERROR)
                        return -ENOMEM;
                if (r != BZ_OK)
                        return -EBADMSG;        /* BZ_DATA_ERROR, BZ_DATA_ERROR_MAGIC */
                if (consumed == 0 && produced == 0 && in_pos == len)
                        /* All input used, nothing more comes out and the
                         * stream has not ended: it was cut short. */
                        return -EBADMSG;
        }

        out[used] = '\0';
        *ret_len = used;
        *ret = TAKE_PTR(out);
        return 0;
}

static bool is_zlib_header(const uint8_t *p, size_t len) {
        /* CMF 0x78 (deflate, 32 KiB window) and a valid FCHECK; no preset
         * dictionary (Klipper never uses one). */
        return len >= 2 && p[0] == 0x78 && ((p[0] << 8) | p[1]) % 31 == 0 && !(p[1] & 0x20);
}

static bool is_bzip2_header(const uint8_t *p, size_t len) {
        return len >= 4 && p[0] == 'B' && p[1] == 'Z' && p[2] == 'h' && p[3] >= '1' && p[3] <= '9';
}

int klipper_dict_decompress(const void *data, size_t len, size_t max_size, char **ret, size_t *ret_len) {
        if (is_zlib_header(data, len))
                return zlib_decompress(data, len, max_size, ret, ret_len);
        if (is_bzip2_header(data, len))
                return bzip2_decompress(data, len, max_size, ret, ret_len);
        return -EBADMSG;
}

size_t klipper_dict_find_stream(const uint8_t *data, size_t len, size_t from) {
        /* After "BZh<level>" a bzip2 stream with data starts with the block
         * magic 0x314159265359, "1AY&SY" in ASCII. */
        static const uint8_t bzip2_block_magic[] = { 0x31, 0x41, 0x59, 0x26, 0x53, 0x59 };

        for (size_t i = from; i < len && len - i >= 2; i++) {
                if (data[i] == 0x78 && data[i + 1] == 0xDA)
                        return i;
                if (data[i] == 'B' && len - i >= 10 && is_bzip2_header(data + i, len - i) &&
                    memcmp(data + i + 4, bzip2_block_magic, sizeof(bzip2_block_magic)) == 0)
                        return i;
        }
        return len;
}

bool klipper_dict_app_is_klipper(const char *app) {
        return streq_ptr(app, "Klipper") || streq_ptr(app, "Kalico");
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

/* protocols.md §15.5: "kconfig" is the savedefconfig text; one early branch
 * nested it as {"kconfig": {"defconfig": "…"}}.  Anything else: none. */
static int kconfig_from_json(json_object *root, char **ret) {
        json_object *v;

        if (!json_object_object_get_ex(root, "kconfig", &v)) {
                *ret = NULL;
                return 0;
        }
        if (json_object_is_type(v, json_type_object))
                return dup_string_member(v, "defconfig", ret);
        if (!json_object_is_type(v, json_type_string)) {
                *ret = NULL;
                return 0;
        }
        *ret = strdup(json_object_get_string(v));
        return *ret ? 0 : -ENOMEM;
}

static int dict_from_object(json_object *root, struct klipper_dict **ret) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        json_object *config, *v;
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
        r = kconfig_from_json(root, &d->kconfig);
        if (r < 0)
                return r;
        d->has_commands = json_object_object_get_ex(root, "commands", &v) &&
                          json_object_is_type(v, json_type_object);

        if (json_object_object_get_ex(root, "config", &config) &&
            json_object_is_type(config, json_type_object)) {
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

        r = klipper_dict_decompress(data, len, max_size, &json, &json_len);
        if (r == -EBADMSG)
                return log_debug_errno(r, "Data dictionary is not a valid zlib or bzip2 stream.");
        if (r == -E2BIG)
                return log_debug_errno(r, "Data dictionary decompresses to more than %zu bytes.", max_size);
        if (r < 0)
                return r;

        return klipper_dict_parse_json(json, json_len, ret);
}
