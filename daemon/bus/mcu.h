/* io.mcuflash1.Mcu objects under /io/mcuflash1/mcu/<id>: one fallback
 * vtable for all of them, found through the registry, and the registry
 * observer that turns additions, changes and removals into McuAdded,
 * PropertiesChanged, McuRemoved and the ObjectManager signals. */
#pragma once

struct daemon;
struct mcu;

int bus_mcu_install(struct daemon *d);

/* Answer the Refresh() calls waiting for @m's identify with @result. */
void bus_mcu_complete_refresh(struct daemon *d, struct mcu *m, int result);
