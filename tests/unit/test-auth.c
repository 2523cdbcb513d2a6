/* Unit tests of core/auth.c's pure part: the method → polkit action table
 * (mutating methods map to their action, everything that only reads is
 * open) and the messages for each result.  The polkit round trip itself is
 * tested end to end in tests/integration/test_auth_units.py. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "core/auth.h"

static void test_mutating_methods(void **state) {
        assert_string_equal(auth_action_for("io.mcuflash1.Mcu", "RebootToBootloader"), "io.mcuflash1.reboot");
        assert_string_equal(auth_action_for("io.mcuflash1.Mcu", "RebootToApplication"), "io.mcuflash1.reboot");
        assert_string_equal(auth_action_for("io.mcuflash1.Mcu", "Flash"), "io.mcuflash1.flash");
        assert_string_equal(auth_action_for("io.mcuflash1.Manager", "UpdateAll"), "io.mcuflash1.update-all");
}

static void test_reads_are_open(void **state) {
        static const char *const open_methods[][2] = {
                { "io.mcuflash1.Manager", "ListMcus" },
                { "io.mcuflash1.Manager", "GetMcu" },
                { "io.mcuflash1.Manager", "Rescan" },
                { "io.mcuflash1.Manager", "ListJobs" },
                { "io.mcuflash1.Mcu", "Refresh" },
                { "org.freedesktop.DBus.Properties", "Get" },
                { "org.freedesktop.DBus.Properties", "GetAll" },
                { "org.freedesktop.DBus.Introspectable", "Introspect" },
                { "org.freedesktop.DBus.ObjectManager", "GetManagedObjects" },
        };

        for (size_t i = 0; i < sizeof(open_methods) / sizeof(open_methods[0]); i++)
                assert_null(auth_action_for(open_methods[i][0], open_methods[i][1]));
}

static void test_exact_match(void **state) {
        /* The interface matters, and names are case-sensitive as in D-Bus. */
        assert_null(auth_action_for("io.mcuflash1.Manager", "Flash"));
        assert_null(auth_action_for("io.mcuflash1.Mcu", "UpdateAll"));
        assert_null(auth_action_for("io.mcuflash1.Mcu", "flash"));
        assert_null(auth_action_for("io.mcuflash1.Mcu2", "Flash"));
        assert_null(auth_action_for(NULL, "Flash"));
        assert_null(auth_action_for("io.mcuflash1.Mcu", NULL));
}

/* The bouncer's list: every method is on it, and what is not is denied. */
static void test_policy_list(void **state) {
        const char *action = "x";

        assert_int_equal(auth_policy_for("io.mcuflash1.Mcu", "Flash", &action), AUTH_POLICY_ACTION);
        assert_string_equal(action, "io.mcuflash1.flash");
        assert_int_equal(auth_policy_for("io.mcuflash1.Mcu", "Refresh", &action), AUTH_POLICY_OPEN);
        assert_null(action);
        assert_int_equal(auth_policy_for("io.mcuflash1.Manager", "Rescan", NULL), AUTH_POLICY_OPEN);
        assert_int_equal(auth_policy_for("io.mcuflash1.Job", "Cancel", &action), AUTH_POLICY_JOB);
        assert_null(action);
        assert_int_equal(auth_policy_for("org.freedesktop.DBus.Properties", "GetAll", NULL), AUTH_POLICY_OPEN);
        /* Not on the list: denied. */
        assert_int_equal(auth_policy_for("org.freedesktop.DBus.Properties", "Set", NULL), AUTH_POLICY_DENY);
        assert_int_equal(auth_policy_for("io.mcuflash1.Mcu", "Erase", &action), AUTH_POLICY_DENY);
        assert_null(action);
        assert_int_equal(auth_policy_for("io.mcuflash1.Mcu", "flash", NULL), AUTH_POLICY_DENY);
        assert_int_equal(auth_policy_for(NULL, "Flash", NULL), AUTH_POLICY_DENY);
        assert_int_equal(auth_policy_for("io.mcuflash1.Mcu", NULL, NULL), AUTH_POLICY_DENY);
        assert_null(auth_action_for("io.mcuflash1.Job", "Cancel"));
}

static void test_result_messages(void **state) {
        assert_string_equal(auth_result_message(-EACCES), "polkit is not available; only root may do this.");
        assert_non_null(strstr(auth_result_message(0), "denied"));
        assert_non_null(strstr(auth_result_message(-ETIMEDOUT), "in time"));
        assert_non_null(strstr(auth_result_message(-EIO), "daemon's log"));
        assert_string_equal(auth_result_message(1), "Authorized.");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_mutating_methods),
                cmocka_unit_test(test_reads_are_open),
                cmocka_unit_test(test_exact_match),
                cmocka_unit_test(test_policy_list),
                cmocka_unit_test(test_result_messages),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
