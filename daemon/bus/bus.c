/* Implementation of bus.h.  DBUS_SYSTEM_BUS_ADDRESS is honoured by
 * sd_bus_open_system() itself, which is how tests use a private bus. */
#include <errno.h>

#include "bus/bouncer.h"
#include "bus/bus-loop.h"
#include "bus/bus.h"
#include "bus/job.h"
#include "bus/manager.h"
#include "bus/mcu.h"
#include "core/daemon.h"
#include "shared/log.h"

int bus_connect(struct daemon *d) {
        int r;

        r = sd_bus_open_system(&d->bus);
        if (r < 0)
                return log_error_errno(r, "Cannot connect to the system bus: %m");
        /* First: no method call reaches a handler without passing it. */
        r = bus_bouncer_install(d);
        if (r < 0)
                return log_error_errno(r, "Cannot install the method filter: %m");
        r = bus_manager_install(d);
        if (r < 0)
                return log_error_errno(r, "Cannot export the Manager object: %m");
        r = bus_mcu_install(d);
        if (r < 0)
                return log_error_errno(r, "Cannot export the Mcu objects: %m");
        r = bus_job_install(d);
        if (r < 0)
                return log_error_errno(r, "Cannot export the Job objects: %m");
        r = bus_loop_attach(d->bus, d->base, &d->bus_loop);
        if (r < 0)
                return log_error_errno(r, "Cannot attach the bus to the event loop: %m");
        return 0;
}

int bus_request_name(struct daemon *d) {
        int r;

        r = sd_bus_request_name(d->bus, MCUFLASH_BUS_NAME, 0);
        if (r == -EEXIST)
                return log_error_errno(r, "%s is already owned: is another mcuflashd running?",
                                       MCUFLASH_BUS_NAME);
        if (r < 0)
                return log_error_errno(r, "Cannot own %s on the system bus (%m); only root may, "
                                       "as the bus policy io.mcuflash1.conf says.", MCUFLASH_BUS_NAME);
        bus_kick(d);
        return 0;
}

void bus_disconnect(struct daemon *d) {
        bus_manager_uninstall(d);
        d->bus_loop = bus_loop_free(d->bus_loop);
        d->mcu_slot = sd_bus_slot_unref(d->mcu_slot);
        d->mcu_enumerator_slot = sd_bus_slot_unref(d->mcu_enumerator_slot);
        d->job_slot = sd_bus_slot_unref(d->job_slot);
        d->job_enumerator_slot = sd_bus_slot_unref(d->job_enumerator_slot);
        d->object_manager_slot = sd_bus_slot_unref(d->object_manager_slot);
        d->manager_slot = sd_bus_slot_unref(d->manager_slot);
        d->bus = sd_bus_flush_close_unref(d->bus);
}

void bus_kick(struct daemon *d) {
        if (d->bus_loop)
                (void) bus_loop_rearm(d->bus_loop);
}
