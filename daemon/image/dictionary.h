/* Klipper's data dictionary: decompress the zlib or bzip2 stream an MCU
 * returns from identify (or that is embedded in an image) and parse the JSON
 * into the few fields the daemon uses. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>

#include "shared/macro.h"

struct klipper_dict {
        char *app;              /* "Klipper", "Kalico" (or NULL for old builds) */
        char *version;          /* "v0.12.0-123-gabcdef12" */
        char *build_versions;   /* "gcc: … binutils: …" */
        char *mcu;              /* config.MCU, e.g. "stm32f429xx" */
        char *kconfig;          /* embedded build config (savedefconfig text), NULL if none */
        uint64_t clock_freq;    /* config.CLOCK_FREQ, 0 if absent */
        bool has_commands;      /* has a "commands" object (tells old builds without "app") */
        json_object *config;    /* the whole "config" object (owned) */
};

/* Limit used by klipper_dict_parse_compressed() when @max_size is 0.  Real
 * dictionaries inflate to 10..40 KiB. */
#define KLIPPER_DICT_MAX_SIZE_DEFAULT (4 * 1024 * 1024)

/* Decompress @data — a zlib stream (78 xx) or a bzip2 stream ("BZh1".."BZh9"),
 * told apart by its first bytes; trailing bytes after its end are ignored —
 * into a NUL-terminated text.  Returns 0, -EBADMSG for data that is neither
 * or is corrupt or truncated, -E2BIG when it expands beyond @max_size bytes,
 * -ENOMEM. */
int klipper_dict_decompress(const void *data, size_t len, size_t max_size, char **ret, size_t *ret_len);

/* Decompress @data (see klipper_dict_decompress()) and parse it.  Returns 0,
 * -EBADMSG for a stream that is neither zlib nor bzip2 or not a JSON object
 * with at least "version", -E2BIG when it expands beyond @max_size bytes
 * (0 = KLIPPER_DICT_MAX_SIZE_DEFAULT), -ENOMEM. */
int klipper_dict_parse_compressed(const void *data, size_t len, size_t max_size,
                                  struct klipper_dict **ret);

/* Parse an already inflated JSON text (e.g. out/klipper.dict). */
int klipper_dict_parse_json(const char *json, size_t len, struct klipper_dict **ret);

/* Offset of the next place at or after @from in @data where a compressed
 * dictionary may start, as Klipper and Kalico builds embed it (protocols.md
 * §15.2: zlib level 9 "78 DA", or bzip2 "BZh[1-9]1AY&SY"), or @len if none. */
size_t klipper_dict_find_stream(const uint8_t *data, size_t len, size_t from);

/* Is @app the "app" of a Klipper build or of a fork that speaks its protocol
 * and is flashed the same way (Kalico)? */
bool klipper_dict_app_is_klipper(const char *app);

struct klipper_dict *klipper_dict_free(struct klipper_dict *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct klipper_dict *, klipper_dict_free);
