/* A small Cortex-M "firmware" laid out the way a Klipper build is
 * (protocols.md §15.3), for testing mcuflashd's image checks against real
 * compiler and linker output rather than bytes arranged by hand: a vector
 * table (initial SP, reset handler and the other handlers), a large
 * read-only block standing in for the code that puts the reset handler
 * tens of KiB into the image, a reset handler that copies .data from flash
 * and clears .bss (so the flash address of .data's initial values sits in
 * a literal pool next to .data's RAM start and end), SCB->VTOR set to the
 * table where the family's startup code does so, and the zlib-compressed
 * Klipper data dictionary in .rodata.  It is never run; nothing here is
 * Klipper's code.  fwimage.py compiles it once per family and link
 * address. */
#include <stdint.h>

#include "fwimage-config.h"     /* generated: FW_DICT_BYTES, FW_PAD_SIZE */

#define SYSTEM_VECTORS 16
#define IRQ_VECTORS 34
#define SCB_VTOR ((volatile uint32_t *) 0xE000ED08)

extern uint32_t _stack_end, _data_flash, _data_start, _data_end, _bss_start, _bss_end;

#ifdef FW_RAM_HANDLERS
/* The RP2040 build runs its handlers from RAM: they are copied with .data. */
#define HANDLER __attribute__((section(".ramfunc"), noinline, used))
#else
#define HANDLER __attribute__((noinline, used))
#endif

void reset_handler(void) __attribute__((noreturn, used));

/* Counters and settings with initial values: .data is never empty. */
volatile uint32_t irq_counts[IRQ_VECTORS] = { 1, 2, 3, 5, 8, 13, 21, 34 };
volatile uint32_t tick_rate = 1000;
volatile uint32_t scratch[64];

HANDLER void default_handler(void) {
        for (;;)
                irq_counts[0]++;
}

HANDLER void hardfault_handler(void) {
        for (;;)
                irq_counts[1]++;
}

HANDLER void systick_handler(void) {
        irq_counts[2] += tick_rate;
}

HANDLER void timer_irq_handler(void) {
        irq_counts[3]++;
        scratch[irq_counts[3] & 63] = irq_counts[4];
}

HANDLER void usb_irq_handler(void) {
        irq_counts[5] ^= scratch[irq_counts[5] & 63];
}

/* Stands in for the tens of KiB of code in front of the reset handler. */
__attribute__((section(".text.pad"), used)) const uint8_t code_pad[FW_PAD_SIZE] = {
        [0 ... FW_PAD_SIZE - 1] = 0x5a
};

/* The data dictionary, as Klipper's command_identify_data[]. */
__attribute__((used)) const uint8_t identify_data[] = { FW_DICT_BYTES };

#ifdef FW_BOOT2
/* The RP2040's second-stage boot code heads a no-bootloader image: 252
 * bytes and a CRC, the vector table 256 bytes in. */
__attribute__((section(".boot2"), used)) const uint8_t boot2[256] = {
        [0 ... 251] = 0x4b, [252] = 0x74, [253] = 0xb2, [254] = 0x4e, [255] = 0x7a
};
#endif

__attribute__((section(".vector_table"), used)) const void *const vector_table[SYSTEM_VECTORS + IRQ_VECTORS] = {
        [0] = &_stack_end,
        [1] = reset_handler,
        [2] = default_handler,          /* NMI */
        [3] = hardfault_handler,
        [4] = default_handler,
        [5] = default_handler,
        [6] = default_handler,
        /* 7-10 reserved */
        [11] = default_handler,         /* SVCall */
        [12] = default_handler,
        /* 13 reserved */
        [14] = default_handler,         /* PendSV */
        [15] = systick_handler,
        [16 ... SYSTEM_VECTORS + IRQ_VECTORS - 1] = default_handler,
        [16 + 3] = timer_irq_handler,
        [16 + 5] = usb_irq_handler,
};

#ifdef FW_VTOR_COPY
/* Cortex-M0 has no VTOR: the table is copied to the start of RAM. */
__attribute__((section(".ram_vectors"), aligned(256))) volatile const void *ram_vectors[SYSTEM_VECTORS + IRQ_VECTORS];
#endif

static void __attribute__((noinline)) main_loop(void) {
        for (;;) {
                for (uint32_t i = 0; i < IRQ_VECTORS; i++)
                        scratch[i & 63] += irq_counts[i];
                if (identify_data[scratch[0] & 0xff] == 0)
                        scratch[1]++;
                if (code_pad[scratch[2] & 0x3fff] == 0)
                        scratch[3]++;
        }
}

void reset_handler(void) {
        uint32_t *src = &_data_flash, *dst = &_data_start;

        while (dst < &_data_end)
                *dst++ = *src++;
        for (dst = &_bss_start; dst < &_bss_end;)
                *dst++ = 0;
#if defined(FW_VTOR)
        *SCB_VTOR = (uint32_t) vector_table;
#elif defined(FW_VTOR_COPY)
        for (uint32_t i = 0; i < SYSTEM_VECTORS + IRQ_VECTORS; i++)
                ram_vectors[i] = vector_table[i];
#endif
        main_loop();
        for (;;)
                ;
}
