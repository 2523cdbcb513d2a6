/* How much flash a chip of a given Klipper MCU type has, so that an image
 * too big for it is refused before a single byte is sent.  Klipper's
 * config.MCU names a part more or less exactly: STM32 names carry the
 * flash-size letter of ST's ordering code ("stm32f103xe": E = 512 KiB)
 * unless they say "xx", Microchip's SAM names carry log2 of the flash size
 * ("samd21g18a": 2^18 = 256 KiB, "same70q20b": 1 MiB).  Where a name covers
 * parts of several sizes, the largest is taken: the check is an upper bound
 * that never refuses a real image, and a person with a smaller part states
 * its size with FlashSize= (and a ROM DFU bootloader tells its own).  The
 * RP2040/RP2350 keep their flash on an external chip: 2 MiB, the smallest
 * board flash and the size Klipper links for. */
#include <string.h>

#include "image/chips.h"
#include "shared/macro.h"

#define KiB(n) ((uint64_t) (n) * 1024)
#define MiB(n) ((uint64_t) (n) * 1024 * 1024)

struct chip_flash {
        const char *prefix;     /* config.MCU prefix */
        uint64_t size;
};

/* Names whose flash size is not spelled out in them: the largest part of
 * the line (datasheets), longest prefixes first where they overlap. */
static const struct chip_flash chip_table[] = {
        { "stm32f070", KiB(128) }, { "stm32f072", KiB(128) },
        { "stm32f207", MiB(1) },
        { "stm32f401", KiB(512) }, { "stm32f405", MiB(1) }, { "stm32f407", MiB(1) },
        { "stm32f429", MiB(2) }, { "stm32f446", KiB(512) },
        { "stm32f765", MiB(2) }, { "stm32f767", MiB(2) },
        { "stm32g070", KiB(128) }, { "stm32g071", KiB(128) },
        { "stm32g0b0", KiB(512) }, { "stm32g0b1", KiB(512) },
        { "stm32g431", KiB(128) }, { "stm32g474", KiB(512) },
        { "stm32h723", MiB(1) }, { "stm32h743", MiB(2) }, { "stm32h750", KiB(128) },
        { "stm32l412", KiB(128) },
        { "rp2040", MiB(2) }, { "rp2350", MiB(2) },
        { "sam3x8", KiB(512) }, { "sam4s8", KiB(512) }, { "sam4e8", KiB(512) },
        { "lpc1768", KiB(512) }, { "lpc1769", KiB(512) },
        { "lpc1778", KiB(512) }, { "lpc1788", KiB(512) },
        { "hc32f460", KiB(512) },
        { "atmega2560", KiB(256) }, { "atmega1280", KiB(128) }, { "atmega1284", KiB(128) },
        { "atmega644", KiB(64) }, { "atmega328", KiB(32) }, { "atmega168", KiB(16) },
        { "atmega32u4", KiB(32) }, { "at90usb1286", KiB(128) }, { "at90usb646", KiB(64) },
};

/* ST ordering code, flash-size letter (RM/datasheet "ordering information"). */
static uint64_t stm32_letter_size(char letter) {
        switch (letter) {
        case '4': return KiB(16);
        case '6': return KiB(32);
        case '8': return KiB(64);
        case 'b': return KiB(128);
        case 'c': return KiB(256);
        case 'd': return KiB(384);
        case 'e': return KiB(512);
        case 'f': return KiB(768);
        case 'g': return MiB(1);
        case 'h': return KiB(1536);
        case 'i': return MiB(2);
        default: return 0;
        }
}

/* "stm32f103xe": family, 3-4 characters of line, 'x' for the package, then
 * the size letter.  "stm32f446xx" has none. */
static uint64_t stm32_name_size(const char *mcu) {
        const char *x;

        if (!startswith(mcu, "stm32"))
                return 0;
        x = strrchr(mcu, 'x');
        if (!x || x < mcu + strlen("stm32f0") || x[1] == '\0' || x[2] != '\0')
                return 0;
        return stm32_letter_size(x[1]);
}

/* "samd21g18a", "same54p20a", "samc21g18a", "same70q20b": a pin-count
 * letter, then two digits that are log2 of the flash size in bytes. */
static uint64_t sam_name_size(const char *mcu) {
        static const char *const prefixes[] = { "samd21", "samd51", "same51", "same53", "same54", "samc21",
                                                "same70" };

        for (size_t i = 0; i < ELEMENTSOF(prefixes); i++) {
                const char *p;
                unsigned bits;

                if (!startswith(mcu, prefixes[i]))
                        continue;
                p = mcu + strlen(prefixes[i]);
                if (p[0] < 'a' || p[0] > 'z' || p[1] < '0' || p[1] > '9' || p[2] < '0' || p[2] > '9')
                        return 0;
                bits = (unsigned) (p[1] - '0') * 10 + (unsigned) (p[2] - '0');
                return bits >= 12 && bits <= 24 ? (uint64_t) 1 << bits : 0;
        }
        return 0;
}

uint64_t chip_flash_size(const char *mcu) {
        uint64_t size;

        if (isempty(mcu))
                return 0;
        size = stm32_name_size(mcu);
        if (size == 0)
                size = sam_name_size(mcu);
        if (size != 0)
                return size;
        for (size_t i = 0; i < ELEMENTSOF(chip_table); i++)
                if (startswith(mcu, chip_table[i].prefix))
                        return chip_table[i].size;
        return 0;
}
