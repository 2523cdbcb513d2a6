/* libFuzzer target: what a DFU device answers (proto/dfu.c), all three
 * read from the same input: a GETSTATUS reply, the descriptors after a DFU
 * interface (the functional descriptor is looked for among them) and the
 * DfuSe memory layout string of an alternate setting
 * ("@Internal Flash  /0x08000000/04*016Kg,01*064Kg,07*128Kg").  A parsed
 * layout must describe segments below 4 GiB whose sectors the lookups find
 * again at every boundary. */
#include <stdlib.h>
#include <string.h>

#include "fuzz-util.h"
#include "proto/dfu.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static void check_status(const uint8_t *data, size_t size) {
        struct dfu_status st;

        if (dfu_parse_status(data, size, &st) < 0) {
                fuzz_check(size < 6);
                return;
        }
        fuzz_check(st.status == data[0] && st.state == data[4] && st.string_index == data[5]);
        fuzz_check(st.poll_timeout_ms == ((uint32_t) data[1] | (uint32_t) data[2] << 8 | (uint32_t) data[3] << 16));
        fuzz_touch_string(dfu_state_to_string(st.state));
        fuzz_touch_string(dfu_status_to_string(st.status));
}

static void check_functional(const uint8_t *data, size_t size) {
        struct dfu_functional f;
        int r;

        r = dfu_find_functional(data, size, &f);
        fuzz_check(r == 0 || r == -ENOENT || r == -EBADMSG);
}

static void check_sector(const struct dfu_layout *layout, const struct dfu_segment *seg, uint64_t address) {
        uint32_t start, sector_size;
        uint8_t flags;
        const struct dfu_segment *found;

        if (address > UINT32_MAX)
                return;
        found = dfu_layout_find(layout, (uint32_t) address);
        fuzz_check(found);
        /* Segments may overlap; the first one holding the address wins. */
        fuzz_check(found <= seg);
        fuzz_check(dfu_layout_sector(layout, (uint32_t) address, &start, &sector_size, &flags) == 0);
        fuzz_check(sector_size == found->sector_size && flags == found->flags);
        fuzz_check(start <= address && address < (uint64_t) start + sector_size);
        fuzz_check(start >= found->start && (uint64_t) start + sector_size <= dfu_segment_end(found));
}

static void check_layout(const uint8_t *data, size_t size) {
        _cleanup_(dfu_layout_freep) struct dfu_layout *layout = NULL;
        _cleanup_free_ char *text = fuzz_strndup(data, size);
        int r;

        r = dfu_layout_parse(text, &layout);
        if (r < 0) {
                fuzz_check(r == -EINVAL || r == -ERANGE);
                return;
        }
        fuzz_check(layout->name && layout->n_segments > 0);
        fuzz_touch_string(layout->name);
        for (size_t i = 0; i < layout->n_segments; i++) {
                const struct dfu_segment *s = &layout->segments[i];
                uint64_t end = dfu_segment_end(s);

                fuzz_check(s->sector_count > 0 && s->sector_size > 0);
                fuzz_check(s->flags >= 1 && s->flags <= 7);
                fuzz_check(end > s->start && end <= (uint64_t) UINT32_MAX + 1);

                check_sector(layout, s, s->start);
                check_sector(layout, s, end - 1);
                check_sector(layout, s, s->start + (uint64_t) s->sector_size * (s->sector_count / 2));
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        check_status(data, size);
        check_functional(data, size);
        check_layout(data, size);
        return 0;
}
