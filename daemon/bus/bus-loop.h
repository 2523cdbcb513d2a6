/* Runs an sd-bus connection on a libevent loop: one event on the bus fd for
 * the events sd-bus asks for, with sd-bus's own timeout.  No second loop,
 * no polling.  Anything that sends outside a bus callback (a signal from a
 * udev or worker completion) calls bus_loop_rearm() so that queued output
 * gets written. */
#pragma once

#include <event2/event.h>
#include <systemd/sd-bus.h>

#include "shared/macro.h"

struct bus_loop;

int bus_loop_attach(sd_bus *bus, struct event_base *base, struct bus_loop **ret);
struct bus_loop *bus_loop_free(struct bus_loop *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct bus_loop *, bus_loop_free);

/* Re-read sd-bus's fd events and timeout and re-arm the event. */
int bus_loop_rearm(struct bus_loop *l);
