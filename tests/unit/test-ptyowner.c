/* Unit tests of transport/ptyowner.c: the "tty-index:" of a ptmx fd's
 * fdinfo, pty slave numbers, who holds a live pty's master, and the rule
 * that tells the Klipper Linux MCU program from other processes. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "transport/ptyowner.h"

static void test_fdinfo(void **state) {
        /* As Linux 6.x prints it for a /dev/ptmx fd. */
        assert_int_equal(pty_fdinfo_tty_index("pos:\t0\nflags:\t02100002\nmnt_id:\t24\nino:\t90\ntty-index:\t83\n"),
                         83);
        assert_int_equal(pty_fdinfo_tty_index("tty-index:\t0\n"), 0);
        assert_int_equal(pty_fdinfo_tty_index("pos: 0\ntty-index: 1234"), 1234);
        /* Other files, or kernels that do not tell. */
        assert_int_equal(pty_fdinfo_tty_index("pos:\t0\nflags:\t02\nmnt_id:\t24\nino:\t90\n"), -ENOENT);
        assert_int_equal(pty_fdinfo_tty_index(""), -ENOENT);
        assert_int_equal(pty_fdinfo_tty_index("xtty-index:\t5\n"), -ENOENT);
        /* Garbage is no number. */
        assert_int_equal(pty_fdinfo_tty_index("tty-index:\t\n"), -EBADMSG);
        assert_int_equal(pty_fdinfo_tty_index("tty-index:\t-3\n"), -EBADMSG);
        assert_int_equal(pty_fdinfo_tty_index("tty-index:\t12ab\n"), -EBADMSG);
        assert_int_equal(pty_fdinfo_tty_index("tty-index:\t99999999999999999999\n"), -EBADMSG);
}

static void test_slave_index(void **state) {
        assert_int_equal(pty_slave_index(makedev(136, 5)), 5);
        assert_int_equal(pty_slave_index(makedev(137, 1)), 257);
        assert_int_equal(pty_slave_index(makedev(143, 255)), 2047);
        assert_int_equal(pty_slave_index(makedev(144, 0)), -1);
        assert_int_equal(pty_slave_index(makedev(4, 64)), -1);  /* ttyS0 */
        assert_int_equal(pty_slave_index(makedev(5, 2)), -1);   /* ptmx */
        assert_true(pty_is_ptmx(makedev(5, 2)));
        assert_false(pty_is_ptmx(makedev(5, 0)));
        assert_false(pty_is_ptmx(makedev(136, 2)));
}

static struct process_identity identity(const char *exe, const char *comm) {
        struct process_identity id = {};

        snprintf(id.exe, sizeof(id.exe), "%s", exe);
        snprintf(id.comm, sizeof(id.comm), "%s", comm);
        return id;
}

static void test_is_program(void **state) {
        static const char program[] = "/usr/local/bin/klipper_mcu";
        struct process_identity id;

        /* The real program, also when it was replaced while running. */
        id = identity(program, "klipper_mcu");
        assert_true(process_is_program(&id, program, 0));
        id.exe_deleted = true;
        assert_true(process_is_program(&id, program, 0));
        /* Program= elsewhere, under another name. */
        id = identity("/opt/klipper/out/klipper.elf", "klipper.elf");
        assert_true(process_is_program(&id, "/opt/klipper/out/klipper.elf", 0));
        assert_false(process_is_program(&id, program, 0));
        /* Started as klipper_mcu from anywhere (or named so, as the
         * simulator is). */
        id = identity("/usr/bin/python3.11", "klipper_mcu");
        assert_true(process_is_program(&id, program, 0));
        assert_true(process_is_program(&id, "/opt/klipper/out/klipper.elf", 0));
        /* Program='s own file name, cut to 15 bytes as the kernel does. */
        id = identity("/usr/bin/python3.11", "klipper_mcu_tes");
        assert_true(process_is_program(&id, "/srv/klipper_mcu_testing", 0));
        assert_false(process_is_program(&id, program, 0));
        /* Strangers: a shell, tmux, a name that only starts alike. */
        id = identity("/usr/bin/bash", "bash");
        assert_false(process_is_program(&id, program, 0));
        id = identity("/usr/bin/tmux", "tmux: server");
        assert_false(process_is_program(&id, program, 0));
        id = identity("/usr/bin/python3.11", "klipper_mcu2");
        assert_false(process_is_program(&id, program, 0));
        id = identity("", "");
        assert_false(process_is_program(&id, program, 0));
        /* The name is anybody's to take: it counts for root's processes
         * and the program file owner's only; running the file always does. */
        id = identity("/usr/bin/python3.11", "klipper_mcu");
        id.uid = 1000;
        assert_false(process_is_program(&id, program, 0));
        assert_false(process_is_program(&id, program, (uid_t) -1));
        assert_true(process_is_program(&id, program, 1000));
        id = identity(program, "klipper_mcu");
        id.uid = 1000;
        assert_true(process_is_program(&id, program, 0));
        assert_false(process_is_program(&id, "", 0));
}

static int open_pty(int *ret_index) {
        int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        struct stat st;

        assert_true(master >= 0);
        assert_int_equal(grantpt(master), 0);
        assert_int_equal(unlockpt(master), 0);
        assert_int_equal(stat(ptsname(master), &st), 0);
        *ret_index = pty_slave_index(st.st_rdev);
        assert_true(*ret_index >= 0);
        return master;
}

static bool holders_include(int index, pid_t pid) {
        pid_t pids[16];
        int n = pty_find_master_holders(index, pids, 16);

        assert_true(n >= 0);
        for (int i = 0; i < n && i < 16; i++)
                if (pids[i] == pid)
                        return true;
        return false;
}

static void test_live_pty(void **state) {
        struct process_identity id;
        char exe[PATH_MAX];
        int index, master = open_pty(&index);
        ssize_t n;

        /* On this kernel a ptmx fd names its slave: we hold the master. */
        assert_int_equal(pty_process_holds_master(getpid(), index), 1);
        assert_true(holders_include(index, getpid()));
        assert_int_equal(pty_process_holds_master(getpid(), index + 1), 0);

        assert_int_equal(process_identity_read(getpid(), &id), 0);
        n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
        assert_true(n > 0);
        exe[n] = 0;
        assert_string_equal(id.exe, exe);
        assert_false(id.exe_deleted);
        assert_string_equal(id.comm, "test-ptyowner");
        assert_int_equal(id.uid, geteuid());
        assert_false(process_is_program(&id, "/usr/local/bin/klipper_mcu", 0));

        close(master);
        assert_int_equal(pty_process_holds_master(getpid(), index), 0);
        assert_false(holders_include(index, getpid()));
}

/* A child named klipper_mcu that inherited the master (fork keeps it) is
 * its only holder once we close ours, and passes as the program; once it
 * is gone it holds nothing. */
static void test_child_named_klipper_mcu(void **state) {
        struct process_identity id;
        int ready[2], index, master = open_pty(&index);
        pid_t pid;
        char c;

        assert_int_equal(pipe(ready), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                (void) prctl(PR_SET_NAME, "klipper_mcu", 0, 0, 0);
                (void) !write(ready[1], "x", 1);
                pause();
                _exit(0);
        }
        close(ready[1]);
        assert_int_equal(read(ready[0], &c, 1), 1);
        close(ready[0]);
        close(master);

        assert_int_equal(pty_process_holds_master(pid, index), 1);
        assert_true(holders_include(index, pid));
        assert_false(holders_include(index, getpid()));
        assert_int_equal(process_identity_read(pid, &id), 0);
        assert_string_equal(id.comm, "klipper_mcu");
        assert_true(process_is_program(&id, "/usr/local/bin/klipper_mcu", 0));

        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        assert_int_equal(pty_process_holds_master(pid, index), -ESRCH);
        assert_int_equal(process_identity_read(pid, &id), -ESRCH);
        assert_false(holders_include(index, pid));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_fdinfo),
                cmocka_unit_test(test_slave_index),
                cmocka_unit_test(test_is_program),
                cmocka_unit_test(test_live_pty),
                cmocka_unit_test(test_child_named_klipper_mcu),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
