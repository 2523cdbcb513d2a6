/* io.mcuflash1.Manager at /io/mcuflash1, plus the ObjectManager there. */
#pragma once

struct daemon;

int bus_manager_install(struct daemon *d);
void bus_manager_emit_changed(struct daemon *d, const char *property);
