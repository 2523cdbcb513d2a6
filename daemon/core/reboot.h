/* Reboot jobs (reboot.c): into the bootloader and back to the application. */
#pragma once

#include <stdbool.h>

#include <stdint.h>

#include "bus/errors.h"
#include "core/mcu.h"
#include "proto/canbus.h"
#include "proto/katapult.h"

struct daemon;
struct job;
struct mcu;

/* May @m be rebooted now?  0, or -EPERM with the D-Bus error and a message
 * for a person (malloc()ed) — printing, busy, offline, unsupported, held by
 * Klipper without permission to stop it — or -ENOMEM. */
int reboot_check(struct daemon *d, struct mcu *m, bool to_bootloader, bool stop_klipper,
                 enum mcuflash_error *ret_error, char **ret_message);

/* Start the job (reboot_check() passed). */
int reboot_start(struct daemon *d, struct mcu *m, bool to_bootloader, struct job **ret);

/* The reboot step, also used inside other jobs (a flash job's data starts
 * with a struct reboot).  What the worker needs is copied from the MCU on
 * the main loop. */
struct reboot {
        bool to_bootloader;
        /* What the worker needs, copied from the MCU on the main loop. */
        enum mcu_transport transport;
        char *device_path;
        unsigned baud;
        char *can_interface;
        uint8_t uuid[CANBUS_UUID_LEN];
        unsigned can_nodeid;
        char *bootloader;
        uint64_t flash_start;
        unsigned busnum, devnum;
        struct katapult_info katapult;   /* UART: Katapult answered on the same tty */
        bool katapult_found;
        bool worker_running;
        struct event *rescan;            /* CAN: scan the bus again while waiting */
        /* Part of a bigger job (a flash): called instead of finishing the
         * job when the MCU got where it was sent. */
        void (*reached)(struct job *j);
        /* Back to the application: the MCU was seen away from its
         * bootloader (so finding it there again means it stayed). */
        bool left_bootloader;
        /* What came before leaving the bootloader, for messages ("the
         * write"); NULL for a plain reboot. */
        const char *after;
};

void reboot_data_done(struct reboot *rb);

/* Send the job's MCU into its bootloader (or back) and wait until it is
 * there; then call @reached (the job goes on) — or, with NULL, finish the
 * job as succeeded.  Failures finish the job. */
void reboot_step(struct job *j, bool to_bootloader, void (*reached)(struct job *j));

/* job_ops pieces for jobs built on the reboot step. */
void reboot_run(struct job *j);
void reboot_mcu_changed(struct job *j, struct mcu *m);
int reboot_cancel(struct job *j);
