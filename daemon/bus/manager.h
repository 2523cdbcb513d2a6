/* io.mcuflash1.Manager at /io/mcuflash1, plus the ObjectManager there. */
#pragma once

struct daemon;

int bus_manager_install(struct daemon *d);
/* Answer Rescan calls still waiting (with an error) and free their state. */
void bus_manager_uninstall(struct daemon *d);
void bus_manager_emit_changed(struct daemon *d, const char *property);
