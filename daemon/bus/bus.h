/* The daemon's system-bus connection: connect and attach to the loop,
 * export the Manager and Mcu objects, own io.mcuflash1, and tear down. */
#pragma once

struct daemon;

#define MCUFLASH_BUS_NAME "io.mcuflash1"
#define MCUFLASH_MANAGER_PATH "/io/mcuflash1"

int bus_connect(struct daemon *d);
int bus_request_name(struct daemon *d);
void bus_disconnect(struct daemon *d);

/* Call after sending from outside a bus callback. */
void bus_kick(struct daemon *d);
