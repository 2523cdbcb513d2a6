/* Unit tests of transport/holders.c: another process holding a pty slave
 * is a holder; the process that owns the pty (holds its master too, as
 * klipper_mcu does) is not; nobody holding it means free. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "transport/holders.h"

/* Fork a child that opens @path and waits; it keeps the pty master
 * @master only when @keep_master.  Returns its pid once the open is done. */
static pid_t spawn_holder(const char *path, int master, bool keep_master) {
        int ready[2];
        pid_t pid;
        char c;

        assert_int_equal(pipe(ready), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                int fd;

                if (!keep_master)
                        close(master);
                fd = open(path, O_RDWR | O_NOCTTY);
                (void) fd;
                (void) !write(ready[1], "x", 1);
                pause();
                _exit(0);
        }
        close(ready[1]);
        assert_int_equal(read(ready[0], &c, 1), 1);
        close(ready[0]);
        return pid;
}

static void reap(pid_t pid) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
}

static void test_pty(void **state) {
        int master = posix_openpt(O_RDWR | O_NOCTTY);
        char comm[32];
        pid_t pid, holder = 0;
        const char *slave;

        assert_true(master >= 0);
        assert_int_equal(grantpt(master), 0);
        assert_int_equal(unlockpt(master), 0);
        slave = ptsname(master);
        assert_non_null(slave);

        /* Only we have the master: nobody else holds the slave. */
        assert_int_equal(tty_find_holder(slave, &holder, comm, sizeof(comm)), 0);

        /* Another process opens the slave: a holder. */
        pid = spawn_holder(slave, master, false);
        assert_int_equal(tty_find_holder(slave, &holder, comm, sizeof(comm)), 1);
        assert_int_equal(holder, pid);
        reap(pid);
        assert_int_equal(tty_find_holder(slave, &holder, comm, sizeof(comm)), 0);

        /* A child that inherits the master and opens the slave owns the pty
         * (like klipper_mcu): not a holder. */
        pid = spawn_holder(slave, master, true);
        assert_int_equal(tty_find_holder(slave, &holder, comm, sizeof(comm)), 0);
        reap(pid);

        close(master);
}

static void test_not_a_device(void **state) {
        assert_int_equal(tty_find_holder("/", NULL, NULL, 0), -ENOTTY);
        assert_int_equal(tty_find_holder("/nonexistent/tty", NULL, NULL, 0), -ENOENT);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_pty),
                cmocka_unit_test(test_not_a_device),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
