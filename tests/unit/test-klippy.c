/* Unit tests for daemon/discover/klippy.c: PrinterState derivation,
 * 0x03 framing with the 1 MiB limit, message parsing, the subscribe
 * request, merging of partial status updates — and one end-to-end run of
 * the client on a real event loop against a minimal klippy API server in a
 * thread (socket directories created after the client starts, startup
 * re-query, subscribe, notification, klippy going away and coming back,
 * garbage).  The Python FakeKlippy (tests/sim/klippy_api.py) is the fuller
 * server for integration tests; this one speaks just enough. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "discover/klippy.h"
#include "shared/macro.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put);

static json_object *parse(const char *text) {
        json_object *o = NULL;

        assert_int_equal(klippy_parse_message(text, strlen(text), &o), 0);
        return o;
}

static void test_printer_state(void **state) {
        assert_string_equal(klippy_printer_state(false, "ready", "printing"), "stopped");
        assert_string_equal(klippy_printer_state(false, NULL, NULL), "stopped");
        assert_string_equal(klippy_printer_state(true, NULL, NULL), "unknown");
        assert_string_equal(klippy_printer_state(true, "ready", "printing"), "printing");
        assert_string_equal(klippy_printer_state(true, "ready", "paused"), "paused");
        assert_string_equal(klippy_printer_state(true, "ready", "standby"), "idle");
        assert_string_equal(klippy_printer_state(true, "ready", "complete"), "idle");
        assert_string_equal(klippy_printer_state(true, "ready", "cancelled"), "idle");
        assert_string_equal(klippy_printer_state(true, "ready", "error"), "idle");
        assert_string_equal(klippy_printer_state(true, "ready", NULL), "idle");
        assert_string_equal(klippy_printer_state(true, "startup", NULL), "startup");
        assert_string_equal(klippy_printer_state(true, "shutdown", "printing"), "shutdown");
        assert_string_equal(klippy_printer_state(true, "error", "paused"), "error");
        assert_string_equal(klippy_printer_state(true, "disconnect", NULL), "unknown");
}

static void test_is_mcu_object(void **state) {
        assert_true(klippy_is_mcu_object("mcu"));
        assert_true(klippy_is_mcu_object("mcu EBBCan"));
        assert_true(klippy_is_mcu_object("mcu host"));
        assert_false(klippy_is_mcu_object("mcu "));
        assert_false(klippy_is_mcu_object("mcu_temp"));
        assert_false(klippy_is_mcu_object("temperature_sensor mcu"));
        assert_false(klippy_is_mcu_object("mcux"));
        assert_false(klippy_is_mcu_object(""));
}

static void test_frames_split(void **state) {
        struct klippy_frame_buffer b = {};
        char *frame;
        size_t size;

        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);

        /* Two messages and the start of a third in one read. */
        assert_int_equal(klippy_frame_buffer_append(&b, "{\"a\":1}\x03{\"b\":2}\x03{\"c\"", 20), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 1);
        assert_string_equal(frame, "{\"a\":1}");
        assert_int_equal(size, 7);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 1);
        assert_string_equal(frame, "{\"b\":2}");
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);

        /* The rest, one byte at a time. */
        assert_int_equal(klippy_frame_buffer_append(&b, ":", 1), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);
        assert_int_equal(klippy_frame_buffer_append(&b, "3}", 2), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);
        assert_int_equal(klippy_frame_buffer_append(&b, "\x03\x03", 2), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 1);
        assert_string_equal(frame, "{\"c\":3}");
        /* An empty message (two terminators in a row) is handed out too. */
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 1);
        assert_int_equal(size, 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);

        klippy_frame_buffer_done(&b);
        assert_null(b.data);
}

static void test_frames_limit(void **state) {
        struct klippy_frame_buffer b = {};
        _cleanup_free_ char *big = malloc(KLIPPY_MESSAGE_MAX + 2);
        char *frame;
        size_t size;

        assert_non_null(big);
        memset(big, 'x', KLIPPY_MESSAGE_MAX + 2);

        /* Exactly the limit, in pieces, is fine. */
        for (size_t off = 0; off < KLIPPY_MESSAGE_MAX; off += 65536) {
                assert_int_equal(klippy_frame_buffer_append(&b, big + off, 65536), 0);
                assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 0);
        }
        assert_int_equal(klippy_frame_buffer_append(&b, "\x03", 1), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), 1);
        assert_int_equal(size, KLIPPY_MESSAGE_MAX);
        klippy_frame_buffer_done(&b);

        /* One byte more without a terminator is refused before it ends... */
        assert_int_equal(klippy_frame_buffer_append(&b, big, KLIPPY_MESSAGE_MAX + 1), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), -EMSGSIZE);
        klippy_frame_buffer_done(&b);

        /* ...and when it arrives complete. */
        big[KLIPPY_MESSAGE_MAX + 1] = 0x03;
        assert_int_equal(klippy_frame_buffer_append(&b, big, KLIPPY_MESSAGE_MAX + 2), 0);
        assert_int_equal(klippy_frame_buffer_pop(&b, &frame, &size), -EMSGSIZE);
        klippy_frame_buffer_done(&b);
}

static void test_parse_message(void **state) {
        json_object *o = NULL;

        o = parse("{\"id\": 1, \"result\": {}}");
        assert_true(json_object_is_type(o, json_type_object));
        json_object_put(o);
        o = parse(" {\"a\":[1,2]} \n");
        json_object_put(o);

        o = NULL;
        assert_int_equal(klippy_parse_message("garbage", 7, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("[1,2]", 5, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("\"s\"", 3, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("{\"a\":1} x", 9, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("{\"a\":1}{}", 9, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("{\"a\":", 5, &o), -EBADMSG);
        assert_int_equal(klippy_parse_message("", 0, &o), -EBADMSG);
        assert_null(o);
}

static void test_notification_status(void **state) {
        _cleanup_(json_object_putp) json_object *ours = NULL, *other = NULL, *reply = NULL, *bad = NULL;
        json_object *status;

        ours = parse("{\"params\": {\"eventtime\": 12.5, \"status\": {\"print_stats\": {\"state\": \"printing\"}}},"
                     " \"mcuflashd\": \"status\"}");
        status = klippy_notification_status(ours);
        assert_non_null(status);
        assert_non_null(json_object_object_get(status, "print_stats"));

        other = parse("{\"params\": {\"status\": {}}, \"method\": \"process_status_update\"}");
        assert_null(klippy_notification_status(other));
        reply = parse("{\"id\": 3, \"result\": {\"status\": {}}}");
        assert_null(klippy_notification_status(reply));
        bad = parse("{\"mcuflashd\": \"status\", \"params\": {\"status\": 5}}");
        assert_null(klippy_notification_status(bad));
}

static void test_subscribe_params(void **state) {
        _cleanup_(json_object_putp) json_object *list = NULL, *params = NULL, *empty = NULL;
        json_object *objects, *fields, *template;

        list = parse("{\"objects\": [\"webhooks\", \"configfile\", \"mcu\", \"mcu EBBCan\", \"mcu_temp\","
                     " \"temperature_sensor mcu_temp\", \"print_stats\", 7, \"toolhead\"]}");
        assert_int_equal(klippy_subscribe_params(list, &params), 0);

        objects = json_object_object_get(params, "objects");
        assert_non_null(objects);
        assert_int_equal(json_object_object_length(objects), 4);
        fields = json_object_object_get(objects, "mcu EBBCan");
        assert_non_null(fields);
        assert_string_equal(json_object_to_json_string_ext(fields, JSON_C_TO_STRING_PLAIN),
                            "[\"mcu_version\",\"mcu_build_versions\",\"mcu_constants\",\"mcu_kconfig\"]");
        assert_non_null(json_object_object_get(objects, "mcu"));
        assert_string_equal(json_object_to_json_string_ext(json_object_object_get(objects, "webhooks"),
                                                           JSON_C_TO_STRING_PLAIN),
                            "[\"state\",\"state_message\"]");
        assert_string_equal(json_object_to_json_string_ext(json_object_object_get(objects, "print_stats"),
                                                           JSON_C_TO_STRING_PLAIN),
                            "[\"state\"]");
        template = json_object_object_get(params, "response_template");
        assert_string_equal(json_object_to_json_string_ext(template, JSON_C_TO_STRING_PLAIN),
                            "{\"mcuflashd\":\"status\"}");

        empty = parse("{\"something\": []}");
        assert_int_equal(klippy_subscribe_params(empty, &params), -EBADMSG);
}

static void test_model(void **state) {
        _cleanup_(klippy_model_freep) struct klippy_model *m = NULL;
        _cleanup_(json_object_putp) json_object *info_startup = NULL, *info_ready = NULL, *subscribed = NULL,
                                                *printing = NULL, *shutdown = NULL, *again = NULL, *junk = NULL;
        const struct klippy_status *st;

        assert_int_equal(klippy_model_new(&m), 0);
        st = klippy_model_status(m);
        assert_false(st->connected);
        assert_string_equal(st->printer_state, "stopped");
        assert_null(st->klippy_state);
        assert_int_equal(st->n_mcus, 0);
        assert_int_equal(klippy_model_reset(m), 0);

        info_startup = parse("{\"state\": \"startup\", \"state_message\": \"Printer is not ready\","
                             " \"software_version\": \"v0.12.0-100-gabcdef12\"}");
        assert_int_equal(klippy_model_set_info(m, info_startup), 1);
        st = klippy_model_status(m);
        assert_true(st->connected);
        assert_string_equal(st->klippy_state, "startup");
        assert_string_equal(st->printer_state, "startup");
        assert_string_equal(st->software_version, "v0.12.0-100-gabcdef12");
        assert_null(st->print_state);
        /* Asking again while nothing changed is no change. */
        assert_int_equal(klippy_model_set_info(m, info_startup), 0);

        info_ready = parse("{\"state\": \"ready\", \"state_message\": \"Printer is ready\"}");
        assert_int_equal(klippy_model_set_info(m, info_ready), 1);
        st = klippy_model_status(m);
        assert_string_equal(st->printer_state, "idle");
        assert_null(st->software_version);

        subscribed = parse(
                "{\"webhooks\": {\"state\": \"ready\", \"state_message\": \"Printer is ready\"},"
                " \"print_stats\": {\"state\": \"standby\"},"
                " \"mcu EBBCan\": {\"mcu_version\": \"v0.12.0-99-g1111111\", \"mcu_build_versions\": null,"
                "                  \"mcu_constants\": {\"MCU\": \"stm32g0b1xx\", \"CLOCK_FREQ\": 64000000},"
                "                  \"mcu_kconfig\": \"CONFIG_MACH_STM32=y\\nCONFIG_MACH_STM32G0B1=y\\n\"},"
                " \"mcu\": {\"mcu_version\": \"v0.12.0-100-gabcdef12\", \"mcu_kconfig\": {\"defconfig\": \"CONFIG_X=y\"},"
                "           \"mcu_build_versions\": \"gcc: (15:12.2.rel1-1) 12.2.1 binutils: 2.40\","
                "           \"mcu_constants\": {\"MCU\": \"stm32f429xx\"}},"
                " \"mcu host\": {},"
                " \"not_an_object\": 5}");
        assert_int_equal(klippy_model_merge_status(m, subscribed), 1);
        st = klippy_model_status(m);
        assert_string_equal(st->print_state, "standby");
        assert_string_equal(st->printer_state, "idle");
        assert_int_equal(st->n_mcus, 3);
        assert_string_equal(st->mcus[0].name, "mcu");
        assert_string_equal(st->mcus[0].version, "v0.12.0-100-gabcdef12");
        assert_string_equal(st->mcus[0].build_versions, "gcc: (15:12.2.rel1-1) 12.2.1 binutils: 2.40");
        assert_string_equal(st->mcus[0].mcu_type, "stm32f429xx");
        assert_string_equal(st->mcus[0].kconfig, "CONFIG_X=y");
        assert_string_equal(st->mcus[1].name, "mcu EBBCan");
        assert_string_equal(st->mcus[1].build_versions, "");
        assert_string_equal(st->mcus[1].mcu_type, "stm32g0b1xx");
        assert_string_equal(st->mcus[1].kconfig, "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32G0B1=y\n");
        /* An MCU klippy has not identified: listed, nothing known. */
        assert_string_equal(st->mcus[2].name, "mcu host");
        assert_string_equal(st->mcus[2].version, "");
        assert_string_equal(st->mcus[2].mcu_type, "");
        assert_null(st->mcus[2].kconfig);     /* this klippy does not report one */

        /* A notification carries only what changed: the rest stays. */
        printing = parse("{\"print_stats\": {\"state\": \"printing\"}}");
        assert_int_equal(klippy_model_merge_status(m, printing), 1);
        st = klippy_model_status(m);
        assert_string_equal(st->printer_state, "printing");
        assert_int_equal(st->n_mcus, 3);
        assert_string_equal(st->mcus[0].version, "v0.12.0-100-gabcdef12");
        assert_int_equal(klippy_model_merge_status(m, printing), 0);

        /* webhooks.state overrides what info said. */
        shutdown = parse("{\"webhooks\": {\"state\": \"shutdown\", \"state_message\": \"MCU 'mcu' shutdown\"}}");
        assert_int_equal(klippy_model_merge_status(m, shutdown), 1);
        st = klippy_model_status(m);
        assert_string_equal(st->klippy_state, "shutdown");
        assert_string_equal(st->state_message, "MCU 'mcu' shutdown");
        assert_string_equal(st->printer_state, "shutdown");
        assert_string_equal(st->print_state, "printing");

        again = parse("{\"mcu host\": {\"mcu_version\": \"v0.12.0-100-gabcdef12\","
                      " \"mcu_constants\": {\"MCU\": \"linux\"}}}");
        assert_int_equal(klippy_model_merge_status(m, again), 1);
        st = klippy_model_status(m);
        assert_string_equal(st->mcus[2].mcu_type, "linux");
        assert_string_equal(st->mcus[2].version, "v0.12.0-100-gabcdef12");

        junk = parse("{\"a\": 1}");
        assert_int_equal(klippy_model_merge_status(m, json_object_object_get(junk, "a")), -EBADMSG);
        assert_int_equal(klippy_model_set_info(m, junk), -EBADMSG);

        /* klippy went away: everything is forgotten. */
        assert_int_equal(klippy_model_reset(m), 1);
        st = klippy_model_status(m);
        assert_false(st->connected);
        assert_string_equal(st->printer_state, "stopped");
        assert_null(st->klippy_state);
        assert_null(st->print_state);
        assert_int_equal(st->n_mcus, 0);
        assert_int_equal(klippy_model_reset(m), 0);
}

/* ---- end to end: the client against a minimal server thread ---- */

#define MAX_EVENTS 16

struct e2e {
        char dir[64];
        char socket_path[128];
        /* written by the server thread, read by the test after joining */
        char server_error[256];
        /* the callback tells the server that the client saw klippy go */
        int stopped_pipe[2];
        struct event_base *base;
        char events[MAX_EVENTS][256];
        size_t n_events;
        unsigned n_stopped;
};

static void server_fail(struct e2e *t, const char *what) {
        if (!t->server_error[0])
                snprintf(t->server_error, sizeof(t->server_error), "%s (errno %d)", what, errno);
}

/* Listen at a temporary name and rename into place, so the socket appears
 * fully listening (IN_MOVED_TO). */
static int server_listen(struct e2e *t) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char tmp[sizeof(sa.sun_path)];
        int fd;

        assert_true(strlen(t->socket_path) + 4 < sizeof(tmp));
        snprintf(tmp, sizeof(tmp), "%.100s.tmp", t->socket_path);
        memcpy(sa.sun_path, tmp, sizeof(tmp));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(fd, 1) < 0 ||
            rename(tmp, t->socket_path) < 0) {
                server_fail(t, "listen");
                return safe_close(fd);
        }
        return fd;
}

static int server_accept(struct e2e *t, int lfd) {
        struct pollfd p = { .fd = lfd, .events = POLLIN };
        struct timeval tv = { .tv_sec = 3 };
        int fd;

        if (poll(&p, 1, 3000) != 1) {
                server_fail(t, "no client connected");
                return -1;
        }
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0) {
                server_fail(t, "accept");
                return safe_close(fd);
        }
        return fd;
}

/* Reads one request; returns its id and method (NULL on failure) and the
 * whole request in *ret. */
static const char *server_read(struct e2e *t, int fd, int64_t *ret_id, json_object **ret) {
        char buf[4096];
        size_t n = 0;

        while (n < sizeof(buf) - 1) {
                if (read(fd, buf + n, 1) != 1) {
                        server_fail(t, "read request");
                        return NULL;
                }
                if (buf[n] == 0x03)
                        break;
                n++;
        }
        buf[n] = '\0';
        *ret = NULL;
        if (klippy_parse_message(buf, n, ret) < 0) {
                server_fail(t, "parse request");
                return NULL;
        }
        *ret_id = json_object_get_int64(json_object_object_get(*ret, "id"));
        return json_object_get_string(json_object_object_get(*ret, "method"));
}

static bool server_expect(struct e2e *t, int fd, const char *method, int64_t *ret_id) {
        _cleanup_(json_object_putp) json_object *request = NULL;
        const char *m = server_read(t, fd, ret_id, &request);

        if (!m || strcmp(m, method) != 0) {
                if (m) {
                        errno = 0;
                        server_fail(t, method);
                }
                return false;
        }
        return true;
}

static void server_send(struct e2e *t, int fd, const char *fmt, ...) {
        _cleanup_free_ char *text = NULL;
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vasprintf(&text, fmt, ap);
        va_end(ap);
        if (n < 0 || write(fd, text, (size_t) n) != n || write(fd, "\x03", 1) != 1)
                server_fail(t, "write");
}

static void server_phase_ready(struct e2e *t) {
        _cleanup_close_ int lfd = -1, fd = -1;
        int64_t id;

        lfd = server_listen(t);
        if (lfd < 0)
                return;
        fd = server_accept(t, lfd);
        if (fd < 0 || !server_expect(t, fd, "info", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"state\":\"ready\",\"state_message\":\"Printer is ready\","
                    "\"software_version\":\"v0.12.0-1-gabc\"}}", id);
        if (!server_expect(t, fd, "objects/list", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"objects\":[\"webhooks\",\"configfile\","
                    "\"print_stats\",\"mcu\",\"temperature_sensor mcu_temp\",\"toolhead\"]}}", id);
        if (!server_expect(t, fd, "objects/subscribe", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"eventtime\":1.5,\"status\":{"
                    "\"webhooks\":{\"state\":\"ready\",\"state_message\":\"Printer is ready\"},"
                    "\"print_stats\":{\"state\":\"standby\"},"
                    "\"mcu\":{\"mcu_version\":\"v0.12.0-1-gabc\",\"mcu_build_versions\":\"gcc: 12 binutils: 2.40\","
                    "\"mcu_constants\":{\"MCU\":\"stm32f429xx\",\"CLOCK_FREQ\":180000000}}}}}", id);
        server_send(t, fd, "{\"mcuflashd\":\"status\",\"params\":{\"eventtime\":1.75,\"status\":{"
                    "\"print_stats\":{\"state\":\"printing\"}}}}");
        /* klippy exits: connection and socket file gone. */
        if (unlink(t->socket_path) < 0)
                server_fail(t, "unlink");
}

static void server_phase_restart(struct e2e *t) {
        _cleanup_close_ int lfd = -1, fd = -1;
        struct pollfd p = { .fd = t->stopped_pipe[0], .events = POLLIN };
        char c;
        int64_t id;

        if (poll(&p, 1, 3000) != 1 || read(t->stopped_pipe[0], &c, 1) != 1) {
                server_fail(t, "client did not notice the disconnect");
                return;
        }
        lfd = server_listen(t);
        if (lfd < 0)
                return;
        fd = server_accept(t, lfd);
        if (fd < 0 || !server_expect(t, fd, "info", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"state\":\"startup\","
                    "\"state_message\":\"Printer is not ready\"}}", id);
        /* The client asks again after a second. */
        if (!server_expect(t, fd, "info", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"state\":\"ready\",\"state_message\":\"Printer is ready\"}}",
                    id);
        if (!server_expect(t, fd, "objects/list", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"objects\":[\"webhooks\",\"mcu EBBCan\",\"mcu\"]}}",
                    id);
        if (!server_expect(t, fd, "objects/subscribe", &id))
                return;
        server_send(t, fd, "{\"id\":%" PRId64 ",\"result\":{\"eventtime\":9.0,\"status\":{"
                    "\"webhooks\":{\"state\":\"shutdown\",\"state_message\":\"Emergency stop\"},"
                    "\"print_stats\":{\"state\":\"standby\"},"
                    "\"mcu EBBCan\":{\"mcu_version\":\"v3\",\"mcu_build_versions\":\"\","
                    "\"mcu_constants\":{\"MCU\":\"stm32g0b1xx\"}},"
                    "\"mcu\":{\"mcu_version\":\"v2\",\"mcu_constants\":{\"MCU\":\"stm32f429xx\"}}}}}", id);
        /* Garbage: the client must hang up. */
        server_send(t, fd, "this is not json");
        if (read(fd, &c, 1) != 0)
                server_fail(t, "client did not hang up after garbage");
}

static void *server_thread(void *userdata) {
        struct e2e *t = userdata;
        char sub[80];

        /* The directories appear after the client started watching. */
        snprintf(sub, sizeof(sub), "%s/run", t->dir);
        if (mkdir(sub, 0755) < 0)
                server_fail(t, "mkdir");
        snprintf(sub, sizeof(sub), "%s/run/klipper", t->dir);
        if (mkdir(sub, 0755) < 0)
                server_fail(t, "mkdir");
        server_phase_ready(t);
        if (!t->server_error[0])
                server_phase_restart(t);
        return NULL;
}

static void on_state_changed(void *userdata, const struct klippy_status *st) {
        struct e2e *t = userdata;
        char *p;
        size_t left;

        if (t->n_events >= MAX_EVENTS)
                return;
        p = t->events[t->n_events];
        left = sizeof(t->events[0]);
        p += snprintf(p, left, "%s klippy=%s print=%s mcus=[", st->printer_state,
                      st->klippy_state ?: "-", st->print_state ?: "-");
        for (size_t i = 0; i < st->n_mcus; i++)
                p += snprintf(p, left - (size_t) (p - t->events[t->n_events]), "%s%s:%s:%s", i > 0 ? "," : "",
                              st->mcus[i].name, st->mcus[i].version, st->mcus[i].mcu_type);
        snprintf(p, left - (size_t) (p - t->events[t->n_events]), "]");
        t->n_events++;

        if (streq(st->printer_state, "stopped")) {
                t->n_stopped++;
                if (t->n_stopped == 1)
                        assert_int_equal(write(t->stopped_pipe[1], "x", 1), 1);
                else
                        event_base_loopbreak(t->base);
        }
}

static void on_deadline(evutil_socket_t fd, short what, void *userdata) {
        event_base_loopbreak(userdata);
}

static void test_client_end_to_end(void **state) {
        static const char *const expected[] = {
                "idle klippy=ready print=- mcus=[]",
                "idle klippy=ready print=standby mcus=[mcu:v0.12.0-1-gabc:stm32f429xx]",
                "printing klippy=ready print=printing mcus=[mcu:v0.12.0-1-gabc:stm32f429xx]",
                "stopped klippy=- print=- mcus=[]",
                "startup klippy=startup print=- mcus=[]",
                "idle klippy=ready print=- mcus=[]",
                "shutdown klippy=shutdown print=standby mcus=[mcu:v2:stm32f429xx,mcu EBBCan:v3:stm32g0b1xx]",
                "stopped klippy=- print=- mcus=[]",
        };
        struct e2e t = {};
        struct klippy_callbacks cb = { .state_changed = on_state_changed, .userdata = &t };
        struct klippy_client *c = NULL;
        struct timeval deadline = { .tv_sec = 4 };
        struct event *deadline_timer;
        const struct klippy_status *st;
        pthread_t thread;
        char path[160];

        strcpy(t.dir, "/tmp/test-klippy-XXXXXX");
        assert_non_null(mkdtemp(t.dir));
        snprintf(t.socket_path, sizeof(t.socket_path), "%s/run/klipper/klippy.sock", t.dir);
        assert_int_equal(pipe2(t.stopped_pipe, O_CLOEXEC), 0);
        t.base = event_base_new();
        assert_non_null(t.base);
        deadline_timer = evtimer_new(t.base, on_deadline, t.base);
        assert_int_equal(evtimer_add(deadline_timer, &deadline), 0);

        assert_int_equal(klippy_client_new(t.base, "relative/klippy.sock", &cb, &c), -EINVAL);
        assert_int_equal(klippy_client_new(t.base, t.socket_path, &cb, &c), 0);
        st = klippy_client_status(c);
        assert_false(st->connected);
        assert_string_equal(st->printer_state, "stopped");

        assert_int_equal(pthread_create(&thread, NULL, server_thread, &t), 0);
        assert_int_equal(event_base_dispatch(t.base), 0);
        st = klippy_client_status(c);
        assert_false(st->connected);
        assert_int_equal(st->n_mcus, 0);

        /* libevent closes a freed connection's socket from the loop's
         * finalizers: free the loop before the server waits for EOF. */
        klippy_client_free(c);
        event_free(deadline_timer);
        event_base_free(t.base);
        assert_int_equal(pthread_join(thread, NULL), 0);

        for (size_t i = 0; i < t.n_events; i++)
                print_message("# state_changed %zu: %s\n", i, t.events[i]);
        assert_string_equal(t.server_error, "");
        assert_int_equal(t.n_events, ELEMENTSOF(expected));
        for (size_t i = 0; i < ELEMENTSOF(expected); i++)
                assert_string_equal(t.events[i], expected[i]);
        safe_close(t.stopped_pipe[0]);
        safe_close(t.stopped_pipe[1]);
        unlink(t.socket_path);
        snprintf(path, sizeof(path), "%s/run/klipper", t.dir);
        rmdir(path);
        snprintf(path, sizeof(path), "%s/run", t.dir);
        rmdir(path);
        rmdir(t.dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_printer_state),
                cmocka_unit_test(test_is_mcu_object),
                cmocka_unit_test(test_frames_split),
                cmocka_unit_test(test_frames_limit),
                cmocka_unit_test(test_parse_message),
                cmocka_unit_test(test_notification_status),
                cmocka_unit_test(test_subscribe_params),
                cmocka_unit_test(test_model),
                cmocka_unit_test(test_client_end_to_end),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
