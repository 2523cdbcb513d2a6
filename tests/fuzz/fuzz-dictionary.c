/* libFuzzer target: Klipper's data dictionary (image/dictionary.c) and the
 * scan for one inside an image (image/image.c).  The first input byte picks
 * what the rest is:
 *   0  a zlib stream, as an MCU's identify returns it (inflate + parse),
 *      also with a small size limit;
 *   1  the inflated JSON text (out/klipper.dict);
 *   2  JSON text that this target compresses first, so that the parser
 *      behind the inflater sees structured input;
 *   3  JSON text compressed and embedded in a .bin between filler bytes,
 *      found by the loader's dictionary scan.
 * Whatever parses must have a version and well-formed strings. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "fuzz-util.h"
#include "image/dictionary.h"
#include "image/image.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static void check_dict(const struct klipper_dict *d) {
        fuzz_check(d);
        fuzz_check(d->version);
        fuzz_touch_string(d->app);
        fuzz_touch_string(d->version);
        fuzz_touch_string(d->build_versions);
        fuzz_touch_string(d->mcu);
        fuzz_touch_string(d->kconfig);
        if (d->config)
                fuzz_check(json_object_is_type(d->config, json_type_object));
        else
                fuzz_check(!d->mcu && d->clock_freq == 0);
}

static void parse_compressed(const uint8_t *data, size_t size, size_t max_size) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        int r;

        r = klipper_dict_parse_compressed(data, size, max_size, &d);
        if (r < 0) {
                fuzz_check(r == -EBADMSG || r == -E2BIG);
                fuzz_check(!d);
                return;
        }
        check_dict(d);
}

static void parse_json(const uint8_t *data, size_t size) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;
        int r;

        r = klipper_dict_parse_json((const char *) data, size, &d);
        if (r < 0) {
                fuzz_check(r == -EBADMSG);
                return;
        }
        check_dict(d);
}

/* zlib at level 9: the "78 DA" header a Klipper build embeds. */
static uint8_t *compress_text(const uint8_t *data, size_t size, size_t *ret_len) {
        uLongf len = compressBound(size);
        uint8_t *out = malloc(len);

        if (!out || compress2(out, &len, data, size, Z_BEST_COMPRESSION) != Z_OK)
                abort();
        *ret_len = len;
        return out;
}

static void scan_image(const uint8_t *data, size_t size) {
        _cleanup_(klipper_dict_freep) struct klipper_dict *direct = NULL;
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ uint8_t *z = NULL, *bin = NULL;
        _cleanup_free_ char *message = NULL;
        size_t z_len, bin_len;
        bool usable;

        z = compress_text(data, size, &z_len);
        /* Filler standing in for code, with a false "78 DA" in front. */
        bin_len = 64 + z_len + 33;
        bin = malloc(bin_len);
        if (!bin)
                abort();
        memset(bin, 0x5a, bin_len);
        bin[10] = 0x78;
        bin[11] = 0xda;
        memcpy(bin + 64 + 3, z, z_len);

        fuzz_check(image_load_memory(bin, bin_len, &img, &message) == 0);
        fuzz_check(img->format == IMAGE_FORMAT_BIN || img->format == IMAGE_FORMAT_HEX);
        if (!img->dict)
                return;
        check_dict(img->dict);

        /* The scan only takes what the parser takes: our stream, or one
         * the text itself holds (deflate stores incompressible bytes as
         * they are): a zlib or a bzip2 stream. */
        usable = klipper_dict_parse_compressed(z, z_len, IMAGE_DICT_MAX_SIZE, &direct) == 0;
        fuzz_check(usable || memmem(data, size, "\x78\xda", 2) || memmem(data, size, "BZh", 3));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_free_ uint8_t *z = NULL;
        size_t z_len;

        if (size < 1)
                return 0;

        switch (data[0] & 3) {
        case 0:
                parse_compressed(data + 1, size - 1, 0);
                parse_compressed(data + 1, size - 1, 64);
                break;
        case 1:
                parse_json(data + 1, size - 1);
                break;
        case 2:
                z = compress_text(data + 1, size - 1, &z_len);
                parse_compressed(z, z_len, 0);
                /* Cut short: never a dictionary. */
                if (z_len > 2) {
                        _cleanup_(klipper_dict_freep) struct klipper_dict *d = NULL;

                        fuzz_check(klipper_dict_parse_compressed(z, z_len - 1, 0, &d) < 0 || size - 1 == 0);
                }
                break;
        case 3:
                scan_image(data + 1, size - 1);
                break;
        }
        return 0;
}
