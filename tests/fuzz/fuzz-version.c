/* libFuzzer target: Klipper version strings (core/version.c).  The input
 * holds two versions separated by a newline (an MCU's and the host's).  Each
 * is parsed — a parsed version has the fields protocols.md §16 allows — and
 * the two are compared both ways: the comparison is symmetric, a version
 * that parses matches itself, and one that does not compares as unknown. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "core/version.h"
#include "fuzz-util.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static bool parses(const char *s) {
        struct version v = {};
        int r;

        r = version_parse(s, &v);
        if (r < 0) {
                fuzz_check(r == -EINVAL);
                return false;
        }
        fuzz_check(v.tag || v.sha);
        if (v.sha) {
                size_t len = strlen(v.sha);

                fuzz_check(len >= 4 && len <= 40);
                for (const char *c = v.sha; *c; c++)
                        fuzz_check(isxdigit((unsigned char) *c));
        }
        if (!v.tag || !v.sha)
                fuzz_check(v.commits == 0);
        fuzz_touch_string(v.tag);
        fuzz_touch_string(v.build_stamp);
        if (v.dirty || v.build_stamp)
                fuzz_check(version_is_custom_build(s));
        version_done(&v);
        return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        _cleanup_free_ char *text = fuzz_strndup(data, size);
        char *a = text, *b = strchr(text, '\n');
        enum version_match ab, ba;
        bool a_ok, b_ok;

        if (b)
                *b++ = '\0';
        else
                b = (char *) "v0.12.0-123-gabcdef12";

        a_ok = parses(a);
        b_ok = parses(b);

        ab = version_compare(a, b);
        ba = version_compare(b, a);
        fuzz_check(ab == ba);
        if (!a_ok || !b_ok)
                fuzz_check(ab == VERSION_MATCH_UNKNOWN);
        fuzz_touch_string(version_match_to_string(ab));

        if (a_ok) {
                enum version_match self = version_compare(a, a);

                fuzz_check(self == VERSION_MATCH_YES);
        }
        return 0;
}
