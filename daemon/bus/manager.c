/* The Manager object: the sd_bus_vtable and thin handlers that call into
 * core/.  ListMcus, GetMcu (selector resolution is the registry's), Rescan;
 * McuAdded/McuRemoved are emitted by bus/mcu.c as the registry announces. */
#include <errno.h>

#include "bus/bus.h"
#include "bus/errors.h"
#include "bus/manager.h"
#include "core/daemon.h"
#include "core/job.h"
#include "shared/log.h"
#include "build-config.h"

static int property_get_version(sd_bus *bus, const char *path, const char *interface,
                                const char *property, sd_bus_message *reply, void *userdata,
                                sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PACKAGE_VERSION);
}

static int method_list_mcus(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = sd_bus_message_new_method_return(m, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "o");
        if (r < 0)
                return r;
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                r = sd_bus_message_append(reply, "o", d->registry->mcus[i]->object_path);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int method_list_jobs(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        r = sd_bus_message_new_method_return(m, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "o");
        if (r < 0)
                return r;
        for (struct job *j = d->jobs; j; j = j->next) {
                r = sd_bus_message_append(reply, "o", j->object_path);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int method_get_mcu(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        const char *selector;
        struct mcu *mcu;
        int r;

        r = sd_bus_message_read(m, "s", &selector);
        if (r < 0)
                return r;
        mcu = registry_find_by_selector(d->registry, selector);
        if (!mcu)
                return bus_error_setf(error, MCUFLASH_ERROR_NOT_FOUND,
                                      "No MCU matches '%s'; 'mcuflashctl status' lists the known ones.",
                                      selector);
        return sd_bus_reply_method_return(m, "o", mcu->object_path);
}

/* Answered when the rescan is complete, printer.cfg's names included. */
static void rescan_done(struct daemon *d, int result, void *userdata) {
        sd_bus_message *m = userdata;

        if (result < 0)
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_FAILED, "Rescan failed: %s", strerror(-result));
        else
                (void) sd_bus_reply_method_return(m, NULL);
        sd_bus_message_unref(m);
        if (d->bus)
                bus_kick(d);
}

static int method_rescan(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        struct daemon *d = userdata;
        int r;

        r = daemon_rescan(d, rescan_done, sd_bus_message_ref(m));
        if (r < 0) {
                sd_bus_message_unref(m);
                return sd_bus_error_set_errnof(error, -r, "Rescan failed: %s", strerror(-r));
        }
        return 1;
}

static const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("HostVersion", "s", NULL, offsetof(struct daemon, host_version),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("PrinterState", "s", NULL, offsetof(struct daemon, printer_state),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("AutoFlash", "b", NULL, offsetof(struct daemon, auto_flash),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_NAMES("ListMcus", "", , "ao", SD_BUS_PARAM(mcus),
                                 method_list_mcus, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("GetMcu", "s", SD_BUS_PARAM(selector), "o", SD_BUS_PARAM(mcu),
                                 method_get_mcu, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Rescan", "", "", method_rescan, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("ListJobs", "", , "ao", SD_BUS_PARAM(jobs),
                                 method_list_jobs, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_NAMES("McuAdded", "o", SD_BUS_PARAM(mcu), 0),
        SD_BUS_SIGNAL_WITH_NAMES("McuRemoved", "o", SD_BUS_PARAM(mcu), 0),
        SD_BUS_VTABLE_END,
};

int bus_manager_install(struct daemon *d) {
        int r;

        r = sd_bus_add_object_vtable(d->bus, &d->manager_slot, MCUFLASH_MANAGER_PATH,
                                     "io.mcuflash1.Manager", manager_vtable, d);
        if (r < 0)
                return r;
        return sd_bus_add_object_manager(d->bus, &d->object_manager_slot, MCUFLASH_MANAGER_PATH);
}

void bus_manager_emit_changed(struct daemon *d, const char *property) {
        int r;

        if (!d->bus)
                return;
        r = sd_bus_emit_properties_changed(d->bus, MCUFLASH_MANAGER_PATH, "io.mcuflash1.Manager",
                                           property, NULL);
        if (r < 0)
                log_warning_errno(r, "Cannot announce the change of %s: %m", property);
        bus_kick(d);
}
