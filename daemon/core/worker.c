/* Implementation of worker.h.  One joinable thread per task.  A finished
 * task is moved, under the pool's mutex, from the running list to the
 * finished list, and an eventfd wakes the loop; the loop joins it and runs
 * its completion.  Handing a result over never blocks and never loses it:
 * the list holds it whatever the eventfd write does (an eventfd counter
 * that is already non-zero wakes the loop anyway), and shutdown looks at
 * both lists. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/worker.h"
#include "shared/interrupt.h"
#include "shared/log.h"

struct worker_task {
        struct worker_pool *pool;
        pthread_t thread;
        worker_run_fn run;
        worker_done_fn done;
        void *userdata;
        const atomic_bool *cancel;
        int result;
        bool joined;                    /* worker_pool_free() joined it already */
        struct worker_task *next;
};

struct worker_pool {
        int wake_fd;
        struct event *wake_event;
        pthread_mutex_t lock;           /* guards running, finished, n_running */
        struct worker_task *running;
        struct worker_task *finished;
        unsigned n_running;             /* started and not yet completed on the loop */
};

static void task_unlink(struct worker_task **list, struct worker_task *t) {
        for (struct worker_task **i = list; *i; i = &(*i)->next)
                if (*i == t) {
                        *i = t->next;
                        return;
                }
}

/* Take one finished task off the list, or NULL. */
static struct worker_task *worker_pool_take_finished(struct worker_pool *p) {
        struct worker_task *t;

        pthread_mutex_lock(&p->lock);
        t = p->finished;
        if (t) {
                p->finished = t->next;
                p->n_running--;
        }
        pthread_mutex_unlock(&p->lock);
        return t;
}

static void on_tasks_finished(evutil_socket_t fd, short what, void *userdata) {
        struct worker_pool *p = userdata;
        struct worker_task *t;
        uint64_t n;

        (void) !read(fd, &n, sizeof(n));
        while ((t = worker_pool_take_finished(p))) {
                pthread_join(t->thread, NULL);
                t->done(t->userdata, t->result);
                free(t);
        }
}

int worker_pool_new(struct event_base *base, struct worker_pool **ret) {
        struct worker_pool *p;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        pthread_mutex_init(&p->lock, NULL);
        p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (p->wake_fd < 0) {
                int r = -errno;

                pthread_mutex_destroy(&p->lock);
                free(p);
                return r;
        }
        p->wake_event = event_new(base, p->wake_fd, EV_READ | EV_PERSIST, on_tasks_finished, p);
        if (!p->wake_event || event_add(p->wake_event, NULL) < 0) {
                worker_pool_free(p);
                return -ENOMEM;
        }
        *ret = p;
        return 0;
}

struct worker_pool *worker_pool_free(struct worker_pool *p) {
        struct worker_task *t;

        if (!p)
                return NULL;
        /* Wait for the running ones: each moves itself to the finished
         * list before its thread ends. */
        for (;;) {
                pthread_mutex_lock(&p->lock);
                t = p->running;
                pthread_mutex_unlock(&p->lock);
                if (!t)
                        break;
                pthread_join(t->thread, NULL);
                t->joined = true;
        }
        while ((t = worker_pool_take_finished(p))) {
                if (!t->joined)
                        pthread_join(t->thread, NULL);
                t->done(t->userdata, -ECANCELED);
                free(t);
        }
        if (p->wake_event)
                event_free(p->wake_event);
        safe_close(p->wake_fd);
        pthread_mutex_destroy(&p->lock);
        free(p);
        return NULL;
}

static void *worker_thread(void *arg) {
        struct worker_task *t = arg;
        struct worker_pool *p = t->pool;
        uint64_t one = 1;
        int result;

        interrupt_set_flag(t->cancel);
        result = t->run(t->userdata);
        interrupt_set_flag(NULL);

        pthread_mutex_lock(&p->lock);
        t->result = result;
        task_unlink(&p->running, t);
        t->next = p->finished;
        p->finished = t;
        pthread_mutex_unlock(&p->lock);
        /* Never blocks (EFD_NONBLOCK); EAGAIN means the counter is full,
         * i.e. the loop has a wake-up pending already. */
        if (write(p->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                log_warning_errno(errno, "Waking the main loop for a finished task failed: %m");
        return NULL;
}

int worker_start_cancellable(struct worker_pool *p, worker_run_fn run, worker_done_fn done, void *userdata,
                             const atomic_bool *cancel) {
        struct worker_task *t;
        int r;

        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        *t = (struct worker_task) {
                .pool = p,
                .run = run,
                .done = done,
                .userdata = userdata,
                .cancel = cancel,
        };
        /* Listed before the thread exists: it unlinks itself when done. */
        pthread_mutex_lock(&p->lock);
        t->next = p->running;
        p->running = t;
        p->n_running++;
        r = pthread_create(&t->thread, NULL, worker_thread, t);
        if (r != 0) {
                task_unlink(&p->running, t);
                p->n_running--;
        }
        pthread_mutex_unlock(&p->lock);
        if (r != 0) {
                free(t);
                return -r;
        }
        return 0;
}

int worker_start(struct worker_pool *p, worker_run_fn run, worker_done_fn done, void *userdata) {
        return worker_start_cancellable(p, run, done, userdata, NULL);
}

unsigned worker_pool_running(struct worker_pool *p) {
        unsigned n;

        pthread_mutex_lock(&p->lock);
        n = p->n_running;
        pthread_mutex_unlock(&p->lock);
        return n;
}
