/* What flash.c (flash jobs through a bootloader) and flash-linux.c (the
 * Linux process MCU: install a program, restart its service) share: the
 * job data and the worker/progress plumbing. */
#pragma once

#include <event2/event.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "bus/errors.h"
#include "core/reboot.h"
#include "flash/flasher.h"
#include "image/image.h"

struct job;
struct unit_op;

/* The Linux process MCU's install (flash-linux.c). */
struct flash_linux {
        char *program;                  /* where klipper_mcu is installed */
        char *service;                  /* the unit that runs it */
        struct unit_op *unit_op;
        struct event *retry;            /* ask the MCU again while waiting */
        uint64_t identify_base;         /* identify count when the restart finished */
        bool waiting;                   /* restarted; waiting for it to answer */
        bool rolling_back;              /* the new program failed; the old one goes back */
        enum mcuflash_error failure_error;
        char *failure;                  /* why the new program was rolled back */
        int output_fd;                  /* memfd: what the install tool printed */
};

struct flash {
        struct reboot rb;               /* first: the reboot step uses j->data */
        struct image *image;
        char *image_version;
        uint64_t start;
        uint8_t *data;
        size_t size;
        bool skip;                      /* already at this version, not forced */
        bool started_in_application;    /* the MCU ran its application when the job began */
        enum mcuflash_error refusal_error;
        char *refusal;                  /* why the bootloader's answer refused the image */

        /* Progress from the worker, read on the loop when the eventfd fires. */
        struct flash_session session;
        const struct flasher *flasher;
        int progress_fd;
        struct event *progress_event;
        _Atomic int progress_phase;
        _Atomic uint64_t progress_done;
        _Atomic uint64_t progress_total;
        bool flashing;

        struct flash_linux linux_mcu;
};

/* Run f->flasher->write(&f->session) in a worker; @done gets its result on
 * the loop.  Progress reaches the job's properties on the way. */
int flash_run_flasher(struct job *j, void (*done)(void *userdata, int result));

/* The D-Bus error for a flasher's negative errno. */
enum mcuflash_error flash_error_of(int r);

/* The Linux process MCU's job steps (flash-linux.c). */
void flash_linux_run(struct job *j);
void flash_linux_mcu_changed(struct job *j, struct mcu *m);
int flash_linux_cancel(struct job *j);
void flash_linux_done(struct flash_linux *l);

/* `mcuflashd --install-program=PATH` (@mode "install", image on stdin) or
 * `--restore-program=PATH` ("restore") (flash-linux-tool.c): the exit
 * status; the reason for a failure on stdout. */
int flash_linux_tool(const char *mode, const char *path);
