/* libFuzzer target: the image loader (image/image.c).  Any bytes go through
 * image_load_memory() — format detection, the ELF, Intel HEX, UF2 and .bin
 * loaders, the segment layout and the scan for an embedded data dictionary —
 * and what it returns must keep the promises of image.h: segments sorted,
 * non-empty, neither overlapping nor adjacent, the sizes adding up, a flat
 * copy holding each segment's bytes at its place.  Whether an image suits an
 * MCU (image/check.c) is not fuzzed here. */
#include <stdlib.h>
#include <string.h>

#include "fuzz-util.h"
#include "image/image.h"

/* image_flat() may allocate up to 256 MiB for a sparse image; the invariants
 * are as well checked on smaller ones. */
#define FLAT_CHECK_MAX (16 * 1024 * 1024)

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static void check_segments(const struct image *img, size_t size) {
        uint64_t data_size = 0;

        fuzz_check(img->n_segments > 0);
        fuzz_check(img->fd >= 0 && img->map && img->file_size == size);

        for (size_t i = 0; i < img->n_segments; i++) {
                const struct image_segment *s = &img->segments[i];
                volatile uint8_t sink;

                fuzz_check(s->size > 0 && s->data);
                fuzz_check(s->address + s->size > s->address);  /* no wrap-around */
                if (i > 0) {
                        const struct image_segment *prev = &img->segments[i - 1];

                        /* Sorted, not overlapping, not adjacent. */
                        fuzz_check(prev->address + prev->size < s->address);
                }
                /* Every byte must be readable. */
                sink = s->data[0];
                sink = s->data[s->size - 1];
                (void) sink;
                data_size += s->size;
        }

        fuzz_check(img->data_size == data_size);
        fuzz_check(img->lowest_address == img->segments[0].address);
        fuzz_check(img->total_size == img->segments[img->n_segments - 1].address +
                                      img->segments[img->n_segments - 1].size - img->lowest_address);
        fuzz_check(img->total_size >= img->data_size);

        if (img->format == IMAGE_FORMAT_BIN) {
                fuzz_check(!img->has_addresses);
                fuzz_check(img->n_segments == 1 && img->segments[0].address == 0 &&
                           img->segments[0].size == size);
        } else
                fuzz_check(img->has_addresses);
}

static void check_flat(const struct image *img) {
        _cleanup_free_ uint8_t *flat = NULL;
        size_t flat_len = 0;
        int r;

        if (img->total_size > FLAT_CHECK_MAX)
                return;
        r = image_flat(img, img->lowest_address, &flat, &flat_len);
        fuzz_check(r == 0);
        fuzz_check(flat_len == img->total_size);
        for (size_t i = 0; i < img->n_segments; i++) {
                const struct image_segment *s = &img->segments[i];

                fuzz_check(memcmp(flat + (s->address - img->lowest_address), s->data, s->size) == 0);
        }

        /* A base above the image is refused, not wrapped. */
        if (img->lowest_address < UINT64_MAX) {
                _cleanup_free_ uint8_t *none = NULL;
                size_t none_len;

                fuzz_check(image_flat(img, img->lowest_address + 1, &none, &none_len) == -ERANGE);
        }
}

static void check_dict(const struct klipper_dict *d) {
        if (!d)
                return;
        fuzz_check(d->version);
        fuzz_touch_string(d->app);
        fuzz_touch_string(d->version);
        fuzz_touch_string(d->build_versions);
        fuzz_touch_string(d->mcu);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;
        int r;

        r = image_load_memory(data, size, &img, &message);
        if (r < 0) {
                /* Refusals come with a message for a person. */
                fuzz_check(r != -EBADMSG || (message && *message));
                fuzz_check(r != -ENODATA || size == 0);
                return 0;
        }

        fuzz_check(img);
        check_segments(img, size);
        check_flat(img);
        check_dict(img->dict);
        fuzz_touch_string(image_format_to_string(img->format));
        if (img->format == IMAGE_FORMAT_ELF)
                fuzz_touch_string(image_elf_machine_name(img->elf_machine));
        return 0;
}
