/* libFuzzer target: klippy's API messages as the daemon receives them
 * (discover/klippy-model.c, the pure half of discover/klippy.c).  The input
 * is the byte stream from klippy's socket: it is split into 0x03-terminated
 * messages (appended in pieces of varying size), each message parsed, and
 * fed to the model the way the client does — a reply's result as an
 * "info" result, as an objects/list result (building the subscribe
 * request) and by its "status"; a notification by its status.  An empty
 * message stands for a reconnect (the model is reset).  After every step
 * the derived status must hold together: a known PrinterState matching
 * klippy_printer_state(), MCUs sorted by name with strings for every field.
 * Moonraker speaks the same 0x03-framed JSON-RPC; the daemon has no
 * Moonraker client yet, so there is no target for it. */
#include <stdlib.h>
#include <string.h>

#include "discover/klippy-model.h"
#include "fuzz-util.h"

static void json_object_putp(json_object **o) {
        if (*o)
                json_object_put(*o);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        fuzz_setup_logging();
        return 0;
}

static void check_status(const struct klippy_status *s) {
        static const char *const states[] = { "idle", "printing", "paused", "startup", "shutdown",
                                              "error", "stopped", "unknown" };
        bool known = false;

        fuzz_check(s && s->printer_state);
        for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
                known = known || strcmp(s->printer_state, states[i]) == 0;
        fuzz_check(known);
        fuzz_check(strcmp(s->printer_state,
                          klippy_printer_state(s->connected, s->klippy_state, s->print_state)) == 0);

        fuzz_touch_string(s->klippy_state);
        fuzz_touch_string(s->state_message);
        fuzz_touch_string(s->print_state);
        fuzz_touch_string(s->software_version);
        fuzz_touch_string(s->config_file);

        fuzz_check(s->n_mcus == 0 || s->mcus);
        for (size_t i = 0; i < s->n_mcus; i++) {
                const struct klippy_mcu_info *m = &s->mcus[i];

                fuzz_check(m->name && klippy_is_mcu_object(m->name));
                fuzz_check(m->version && m->build_versions && m->mcu_type);
                fuzz_touch_string(m->version);
                fuzz_touch_string(m->build_versions);
                fuzz_touch_string(m->mcu_type);
                if (i > 0)
                        fuzz_check(strcmp(s->mcus[i - 1].name, m->name) < 0);
        }
}

static void check_update(struct klippy_model *m, int r) {
        fuzz_check(r == 0 || r == 1 || r == -EBADMSG);
        check_status(klippy_model_status(m));
}

static void handle_message(struct klippy_model *m, json_object *msg) {
        json_object *id, *result, *status;

        if (json_object_object_get_ex(msg, "id", &id)) {
                result = klippy_json_get_typed(msg, "result", json_type_object);
                if (!result)
                        return;

                /* As the reply to "info". */
                check_update(m, klippy_model_set_info(m, result));

                /* As the reply to "objects/list". */
                {
                        _cleanup_(json_object_putp) json_object *params = NULL;
                        int r = klippy_subscribe_params(result, &params);

                        fuzz_check(r == 0 || r == -EBADMSG);
                        if (r == 0) {
                                json_object *objects = klippy_json_get_typed(params, "objects", json_type_object);

                                fuzz_check(objects);
                                fuzz_check(json_object_object_get_ex(objects, "print_stats", NULL));
                                fuzz_check(json_object_object_get_ex(objects, "webhooks", NULL));
                                fuzz_touch_string(json_object_to_json_string(params));
                        }
                }

                /* As the reply to "objects/subscribe". */
                status = klippy_json_get_typed(result, "status", json_type_object);
                if (status)
                        check_update(m, klippy_model_merge_status(m, status));
                return;
        }

        status = klippy_notification_status(msg);
        if (status)
                check_update(m, klippy_model_merge_status(m, status));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const size_t pieces[] = { 5, 1, 200, 17, 4096 };
        _cleanup_(klippy_model_freep) struct klippy_model *m = NULL;
        struct klippy_frame_buffer b = {};
        size_t pos = 0;
        unsigned n = 0;

        fuzz_check(klippy_model_new(&m) == 0);
        check_status(klippy_model_status(m));

        while (pos < size) {
                size_t piece = MIN(pieces[n++ % (sizeof(pieces) / sizeof(pieces[0]))], size - pos);
                int r;

                fuzz_check(klippy_frame_buffer_append(&b, data + pos, piece) == 0);
                pos += piece;

                for (;;) {
                        _cleanup_(json_object_putp) json_object *msg = NULL;
                        char *frame;
                        size_t frame_size;

                        r = klippy_frame_buffer_pop(&b, &frame, &frame_size);
                        fuzz_check(r == 0 || r == 1);   /* inputs stay below KLIPPY_MESSAGE_MAX */
                        if (r == 0)
                                break;
                        fuzz_check(frame[frame_size] == '\0' && !memchr(frame, 0x03, frame_size));
                        if (frame_size == 0) {
                                check_update(m, klippy_model_reset(m));
                                continue;
                        }
                        r = klippy_parse_message(frame, frame_size, &msg);
                        fuzz_check(r == 0 || r == -EBADMSG);
                        if (r < 0)
                                continue;
                        fuzz_check(json_object_is_type(msg, json_type_object));
                        handle_message(m, msg);
                }
        }

        klippy_frame_buffer_done(&b);
        return 0;
}
