/* Implementation of worker.h.  One joinable thread per task; a self-pipe
 * carries finished tasks to the loop.  The pool keeps a list of running
 * tasks so that shutdown can join them. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/worker.h"
#include "shared/log.h"

struct worker_task {
        struct worker_pool *pool;
        pthread_t thread;
        worker_run_fn run;
        worker_done_fn done;
        void *userdata;
        int result;
        struct worker_task *next;
};

struct worker_pool {
        int pipe_fds[2];
        struct event *pipe_event;
        struct worker_task *running;
        unsigned n_running;
};

static void worker_pool_unlink(struct worker_pool *p, struct worker_task *t) {
        for (struct worker_task **i = &p->running; *i; i = &(*i)->next)
                if (*i == t) {
                        *i = t->next;
                        p->n_running--;
                        return;
                }
}

static void on_task_finished(evutil_socket_t fd, short what, void *userdata) {
        struct worker_pool *p = userdata;
        struct worker_task *t;

        for (;;) {
                ssize_t n = read(fd, &t, sizeof(t));
                if (n != sizeof(t)) {
                        if (n < 0 && errno != EAGAIN && errno != EINTR)
                                log_error_errno(errno, "Reading worker pipe failed: %m");
                        return;
                }
                pthread_join(t->thread, NULL);
                worker_pool_unlink(p, t);
                t->done(t->userdata, t->result);
                free(t);
        }
}

int worker_pool_new(struct event_base *base, struct worker_pool **ret) {
        struct worker_pool *p;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        if (pipe2(p->pipe_fds, O_CLOEXEC) < 0) {
                free(p);
                return -errno;
        }
        /* Only the reading end is non-blocking: a writer must never lose a
         * pointer because the pipe is momentarily full. */
        (void) fcntl(p->pipe_fds[0], F_SETFL, O_NONBLOCK);
        p->pipe_event = event_new(base, p->pipe_fds[0], EV_READ | EV_PERSIST, on_task_finished, p);
        if (!p->pipe_event || event_add(p->pipe_event, NULL) < 0) {
                worker_pool_free(p);
                return -ENOMEM;
        }
        *ret = p;
        return 0;
}

struct worker_pool *worker_pool_free(struct worker_pool *p) {
        if (!p)
                return NULL;
        while (p->running) {
                struct worker_task *t = p->running;
                pthread_join(t->thread, NULL);
                p->running = t->next;
                t->done(t->userdata, -ECANCELED);
                free(t);
        }
        if (p->pipe_event)
                event_free(p->pipe_event);
        safe_close(p->pipe_fds[0]);
        safe_close(p->pipe_fds[1]);
        free(p);
        return NULL;
}

static void *worker_thread(void *arg) {
        struct worker_task *t = arg;
        ssize_t n;

        t->result = t->run(t->userdata);
        do
                n = write(t->pool->pipe_fds[1], &t, sizeof(t));
        while (n < 0 && errno == EINTR);
        if (n != sizeof(t))
                log_error_errno(errno, "Handing a finished task to the main loop failed: %m");
        return NULL;
}

int worker_start(struct worker_pool *p, worker_run_fn run, worker_done_fn done, void *userdata) {
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
                .next = p->running,
        };
        r = pthread_create(&t->thread, NULL, worker_thread, t);
        if (r != 0) {
                free(t);
                return -r;
        }
        p->running = t;
        p->n_running++;
        return 0;
}

unsigned worker_pool_running(struct worker_pool *p) {
        return p->n_running;
}
