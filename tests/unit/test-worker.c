/* Unit tests for core/worker.c and shared/interrupt.c: every result of
 * many quick tasks reaches the loop exactly once (the hand-over never
 * blocks or drops one), shutdown hands out the ones not yet delivered, and
 * an interruptible sleep ends soon after its task's cancel flag is set. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/event.h>

#include "core/worker.h"
#include "shared/interrupt.h"
#include "shared/time-util.h"

#define N_TASKS 3000

struct tally {
        unsigned done[N_TASKS];
        unsigned cancelled;
        unsigned delivered;
        struct event_base *base;
};

struct item {
        struct tally *tally;
        unsigned index;
};

static int quick_run(void *userdata) {
        struct item *it = userdata;

        return (int) it->index;
}

static void quick_done(void *userdata, int result) {
        struct item *it = userdata;

        if (result == -ECANCELED)
                it->tally->cancelled++;
        else {
                assert_int_equal(result, (int) it->index);
                it->tally->delivered++;
        }
        it->tally->done[it->index]++;
        if (it->tally->delivered == N_TASKS)
                event_base_loopbreak(it->tally->base);
}

static void test_every_result_arrives_once(void **state) {
        static struct item items[N_TASKS];
        static struct tally tally;
        struct worker_pool *pool = NULL;

        memset(&tally, 0, sizeof(tally));
        tally.base = event_base_new();
        assert_non_null(tally.base);
        assert_int_equal(worker_pool_new(tally.base, &pool), 0);
        /* More than a pipe of pointers could hold while the loop is away. */
        for (unsigned i = 0; i < N_TASKS; i++) {
                items[i] = (struct item) { .tally = &tally, .index = i };
                assert_int_equal(worker_start(pool, quick_run, quick_done, &items[i]), 0);
        }
        assert_int_equal(event_base_dispatch(tally.base), 0);
        assert_int_equal(tally.delivered, N_TASKS);
        assert_int_equal(worker_pool_running(pool), 0);
        for (unsigned i = 0; i < N_TASKS; i++)
                assert_int_equal(tally.done[i], 1);
        worker_pool_free(pool);
        event_base_free(tally.base);
}

static void test_free_hands_out_undelivered_results(void **state) {
        static struct item items[64];
        static struct tally tally;
        struct worker_pool *pool = NULL;

        memset(&tally, 0, sizeof(tally));
        tally.base = event_base_new();
        assert_int_equal(worker_pool_new(tally.base, &pool), 0);
        for (unsigned i = 0; i < 64; i++) {
                items[i] = (struct item) { .tally = &tally, .index = i };
                assert_int_equal(worker_start(pool, quick_run, quick_done, &items[i]), 0);
        }
        /* The loop never runs: freeing joins and reports every one. */
        worker_pool_free(pool);
        assert_int_equal(tally.cancelled + tally.delivered, 64);
        assert_int_equal(tally.cancelled, 64);
        for (unsigned i = 0; i < 64; i++)
                assert_int_equal(tally.done[i], 1);
        event_base_free(tally.base);
}

struct sleeper {
        atomic_bool cancel;
        unsigned sleep_ms;
        uint64_t slept_ms;
        int result;
        struct event_base *base;
};

static int sleeper_run(void *userdata) {
        struct sleeper *s = userdata;
        uint64_t start = now_msec();
        int r;

        r = interruptible_sleep_msec(s->sleep_ms);
        s->slept_ms = now_msec() - start;
        return r;
}

static void sleeper_done(void *userdata, int result) {
        struct sleeper *s = userdata;

        s->result = result;
        event_base_loopbreak(s->base);
}

static void on_cancel(evutil_socket_t fd, short what, void *userdata) {
        struct sleeper *s = userdata;

        atomic_store(&s->cancel, true);
}

static void test_cancel_cuts_a_sleep_short(void **state) {
        struct sleeper s = { .sleep_ms = 60 * 1000 };
        struct worker_pool *pool = NULL;
        const struct timeval soon = { 0, 200 * 1000 };

        s.base = event_base_new();
        assert_int_equal(worker_pool_new(s.base, &pool), 0);
        assert_int_equal(worker_start_cancellable(pool, sleeper_run, sleeper_done, &s, &s.cancel), 0);
        assert_int_equal(event_base_once(s.base, -1, EV_TIMEOUT, on_cancel, &s, &soon), 0);
        assert_int_equal(event_base_dispatch(s.base), 0);
        assert_int_equal(s.result, -ECANCELED);
        /* Generous: 60 s asked, cancelled after 0.2 s. */
        assert_true(s.slept_ms < 10 * 1000);
        worker_pool_free(pool);
        event_base_free(s.base);
}

static void test_sleep_without_cancel_runs_out(void **state) {
        uint64_t start = now_msec();

        /* Outside a cancellable task no flag applies. */
        assert_int_equal(interruptible_sleep_msec(120), 0);
        assert_true(now_msec() - start >= 120);
        assert_false(interrupt_requested());
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_every_result_arrives_once),
                cmocka_unit_test(test_free_hands_out_undelivered_results),
                cmocka_unit_test(test_cancel_cuts_a_sleep_short),
                cmocka_unit_test(test_sleep_without_cancel_runs_out),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
