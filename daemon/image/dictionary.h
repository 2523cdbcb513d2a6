/* Klipper's data dictionary: inflate the zlib stream an MCU returns from
 * identify (or that is embedded in an image) and parse the JSON into the few
 * fields the daemon uses. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>

#include "shared/macro.h"

struct klipper_dict {
        char *app;              /* "Klipper" (or NULL for old builds) */
        char *version;          /* "v0.12.0-123-gabcdef12" */
        char *build_versions;   /* "gcc: … binutils: …" */
        char *mcu;              /* config.MCU, e.g. "stm32f429xx" */
        uint64_t clock_freq;    /* config.CLOCK_FREQ, 0 if absent */
        json_object *config;    /* the whole "config" object (owned) */
};

/* Limit used by klipper_dict_parse_compressed() when @max_size is 0.  Real
 * dictionaries inflate to 10..40 KiB. */
#define KLIPPER_DICT_MAX_SIZE_DEFAULT (4 * 1024 * 1024)

/* Inflate @data (a zlib stream; trailing bytes after its end are ignored)
 * and parse it.  Returns 0, -EBADMSG for a stream that is not zlib or not a
 * JSON object with at least "version", -E2BIG when it inflates beyond
 * @max_size bytes (0 = KLIPPER_DICT_MAX_SIZE_DEFAULT), -ENOMEM. */
int klipper_dict_parse_compressed(const void *data, size_t len, size_t max_size,
                                  struct klipper_dict **ret);

/* Parse an already inflated JSON text (e.g. out/klipper.dict). */
int klipper_dict_parse_json(const char *json, size_t len, struct klipper_dict **ret);

struct klipper_dict *klipper_dict_free(struct klipper_dict *d);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct klipper_dict *, klipper_dict_free);
