/* Flash sizes of the chips Klipper runs on, by config.MCU name. */
#pragma once

#include <stdint.h>

/* Bytes of flash (from the chip's flash base) the largest part named @mcu
 * has; 0 when the name is unknown. */
uint64_t chip_flash_size(const char *mcu);
