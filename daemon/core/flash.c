/* Flash jobs: Mcu.Flash end to end.
 *
 *   checks (before anything is sent: a valid Klipper image for this MCU type,
 *   built for the flash start its bootloader uses, that fits)
 *   → [stop Klipper] → enter the bootloader (reboot.c's step)
 *   → check again against what the bootloader itself says (Katapult tells
 *     its application start) → flash: erase / write / verify in a worker,
 *     progress in bytes → back to the application (reboot.c's step)
 *   → Klipper answers with the image's version → [start Klipper].
 *
 * A failure leaves the MCU in its bootloader (reachable: flash again, or
 * mcuflashctl reboot) or in its old application, and the message says
 * which.  The flashers themselves are behind flash/flasher.h. */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/config.h"
#include "core/daemon-internal.h"
#include "core/flash.h"
#include "core/flash-internal.h"
#include "core/job.h"
#include "core/reboot.h"
#include "flash/flasher.h"
#include "image/check.h"
#include "shared/log.h"

static void flash_free(struct job *j) {
        struct flash *f = j->data;

        if (!f)
                return;
        reboot_data_done(&f->rb);
        flash_linux_done(&f->linux_mcu);
        if (f->progress_event)
                event_free(f->progress_event);
        safe_close(f->progress_fd);
        image_free(f->image);
        free(f->image_version);
        free(f->refusal);
        free(f->data);
        free(f);
}

static const enum job_phase flash_phases[_FLASH_PHASE_MAX] = {
        [FLASH_PHASE_ERASING] = JOB_PHASE_ERASING,
        [FLASH_PHASE_WRITING] = JOB_PHASE_WRITING,
        [FLASH_PHASE_VERIFYING] = JOB_PHASE_VERIFYING,
};

/* Worker thread: remember, wake the loop. */
static void flash_progress(void *userdata, enum flash_phase phase, uint64_t done, uint64_t total) {
        struct flash *f = userdata;
        uint64_t one = 1;

        f->progress_phase = (int) phase;
        f->progress_done = done;
        f->progress_total = total;
        (void) !write(f->progress_fd, &one, sizeof(one));
}

/* Main loop: publish. */
static void on_progress(evutil_socket_t fd, short what, void *userdata) {
        struct job *j = userdata;
        struct flash *f = j->data;
        uint64_t n;
        int phase = f->progress_phase;

        (void) !read(fd, &n, sizeof(n));
        if (phase >= 0 && phase < _FLASH_PHASE_MAX)
                job_set_phase(j, flash_phases[phase]);
        job_set_progress(j, f->progress_done, f->progress_total);
}

static void flash_back_in_application(struct job *j) {
        struct flash *f = j->data;
        struct mcu *m = job_mcu(j);

        if (!m || !streq(m->firmware_version, f->image_version)) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL,
                           "The image was written and verified, but the MCU now reports version %s, not %s.",
                           m ? m->firmware_version : "(gone)", f->image_version);
                return;
        }
        job_set_fraction(j, 1.0);
        job_finish(j, JOB_STATE_SUCCEEDED, 0, "%s", "");
}

enum mcuflash_error flash_error_of(int r) {
        switch (r) {
        case -EMEDIUMTYPE:
        case -EINVAL:
                return MCUFLASH_ERROR_IMAGE_MISMATCH;
        case -ENODEV:
                return MCUFLASH_ERROR_DISCONNECTED;
        case -ETIMEDOUT:
                return MCUFLASH_ERROR_TIMEOUT;
        case -ECANCELED:
                return MCUFLASH_ERROR_CANCELLED;
        case -EOPNOTSUPP:
                return MCUFLASH_ERROR_UNSUPPORTED;
        default:
                return MCUFLASH_ERROR_PROTOCOL;
        }
}

static int flash_worker(void *userdata) {
        struct job *j = userdata;
        struct flash *f = j->data;

        return f->flasher->write(&f->session);
}

int flash_run_flasher(struct job *j, void (*done)(void *userdata, int result)) {
        struct flash *f = j->data;

        f->session.progress = flash_progress;
        f->session.userdata = f;
        f->session.cancel = &j->cancel_requested;
        job_set_progress(j, 0, f->size);
        return job_worker_start(j, flash_worker, done);
}

static void flash_worker_done(void *userdata, int result) {
        struct job *j = userdata;
        struct flash *f = j->data;
        struct mcu *m;

        if (result == -ECANCELED && !j->cancel_requested)
                return;         /* daemon shutting down */
        f->flashing = false;
        m = job_mcu(j);
        if (m)
                m->link_busy = false;
        if (m)
                mcu_set_state(m, MCU_STATE_BOOTLOADER);
        if (result < 0) {
                const char *where = "it stays in its bootloader: flash it again, or 'mcuflashctl reboot' "
                                    "starts what is in its flash";

                if (m)
                        registry_commit(j->daemon->registry, m);
                job_finish(j, result == -ECANCELED ? JOB_STATE_CANCELLED : JOB_STATE_FAILED,
                           flash_error_of(result), "%s%s%s.",
                           isempty(f->session.message) ? strerror(-result) : f->session.message,
                           isempty(f->session.message) ? "; " : "; ", where);
                return;
        }
        if (m)
                registry_commit(j->daemon->registry, m);
        log_info("job %u: %zu bytes written to %s at 0x%08llx and verified.", j->number, f->size, j->mcu_id,
                 (unsigned long long) f->start);
        f->rb.after = "the write";
        reboot_step(j, false, flash_back_in_application);
}

/* The bootloader's own answer refused the image; the MCU is back. */
static void flash_refused_back(struct job *j) {
        struct flash *f = j->data;

        job_finish(j, JOB_STATE_FAILED, f->refusal_error, "%s; nothing was written, and the MCU runs its "
                   "application again.", f->refusal ?: "the image does not fit this MCU");
}

_Static_assert(MCU_FLASH_START_UNKNOWN == IMAGE_START_UNKNOWN, "one spelling of an unknown start");

/* What an image is checked against: what the MCU says about itself, and
 * the chip's flash size where mcuflashd.conf states it. */
static struct image_target flash_target(struct daemon *d, const struct mcu *m) {
        struct image_target t = {
                .mcu_type = m->mcu_type,
                .flash_start = m->flash_start,
                .bootloader = m->bootloader,
                .id = m->id,
        };
        uint64_t size;

        if (config_mcu_flash_size(d->config, m->id, &size) >= 0)
                t.flash_size = size;
        return t;
}

/* In the bootloader: check against what it says, then write. */
static void flash_in_bootloader(struct job *j) {
        struct flash *f = j->data;
        struct mcu *m = job_mcu(j);
        _cleanup_free_ char *message = NULL;
        struct image_target target;
        enum image_check_error kind;
        uint64_t start;
        int r;

        if (!m) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_DISCONNECTED, "The MCU is gone.");
                return;
        }
        f->flasher = flasher_find(m->bootloader);
        if (!f->flasher) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_UNSUPPORTED,
                           "The MCU is in its bootloader (%s), which mcuflashd cannot flash yet; "
                           "'mcuflashctl reboot' starts its application again.", m->bootloader);
                return;
        }
        target = flash_target(j->daemon, m);
        r = image_check(f->image, &target, &start, &kind, &message);
        if (r < 0) {
                enum mcuflash_error error = kind == IMAGE_CHECK_MISMATCH || kind == IMAGE_CHECK_TOO_BIG ?
                                            MCUFLASH_ERROR_IMAGE_MISMATCH : MCUFLASH_ERROR_INVALID_IMAGE;

                /* Leave things as they were: back to the application. */
                if (f->started_in_application) {
                        f->refusal_error = error;
                        f->refusal = TAKE_PTR(message);
                        log_info("job %u: %s; starting the application again.", j->number,
                                 strempty(f->refusal));
                        reboot_step(j, false, flash_refused_back);
                        return;
                }
                job_finish(j, JOB_STATE_FAILED, error,
                           "%s; nothing was written. The MCU is in its bootloader; 'mcuflashctl reboot' "
                           "starts its application again.", message ?: "the image does not fit this MCU");
                return;
        }
        f->start = start;
        /* A .bin carries no addresses: its first byte goes to @start. */
        r = image_flat(f->image, f->image->has_addresses ? start : 0, &f->data, &f->size);
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_INVALID_IMAGE, "Cannot lay out the image: %s.",
                           strerror(-r));
                return;
        }

        f->session = (struct flash_session) {
                .link = m->transport_id == MCU_TRANSPORT_CAN ? FLASH_LINK_CAN :
                        m->transport_id == MCU_TRANSPORT_USB ? FLASH_LINK_USB : FLASH_LINK_SERIAL,
                .device_path = f->rb.device_path,
                .baud = m->baud,
                .can_interface = f->rb.can_interface,
                .can_nodeid = m->can_nodeid,
                .usb_busnum = m->usb_busnum,
                .usb_devnum = m->usb_devnum,
                .data = f->data,
                .size = f->size,
                .start = start,
                .app_start = m->flash_start != MCU_FLASH_START_UNKNOWN ? m->flash_start : start,
                .mcu_type = m->mcu_type,
        };
        /* The reboot step copied the link when it started; the bootloader
         * may sit on another node (a USB re-enumeration): take it fresh. */
        if (free_and_strdup(&f->rb.device_path, m->device_path) < 0 ||
            free_and_strdup(&f->rb.can_interface, m->can_interface) < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Out of memory.");
                return;
        }
        f->session.device_path = f->rb.device_path;
        f->session.can_interface = f->rb.can_interface;

        job_set_phase(j, JOB_PHASE_ERASING);
        r = flash_run_flasher(j, flash_worker_done);
        if (r < 0) {
                job_finish(j, JOB_STATE_FAILED, MCUFLASH_ERROR_PROTOCOL, "Cannot start writing: %s.", strerror(-r));
                return;
        }
        f->flashing = true;
        m->link_busy = true;
        mcu_set_state(m, MCU_STATE_FLASHING);
        registry_commit(j->daemon->registry, m);
}

static void flash_run(struct job *j) {
        struct flash *f = j->data;
        struct mcu *m = job_mcu(j);

        if (f->skip) {
                log_info("job %u: %s already runs %s; not flashed (force flashes anyway).", j->number, j->mcu_id,
                         f->image_version);
                job_set_fraction(j, 1.0);
                job_finish(j, JOB_STATE_SUCCEEDED, 0, "%s", "");
                return;
        }
        if (m && m->transport_id == MCU_TRANSPORT_LINUX) {
                flash_linux_run(j);
                return;
        }
        reboot_step(j, true, flash_in_bootloader);
}

static int flash_cancel(struct job *j) {
        struct flash *f = j->data;
        struct mcu *m = job_mcu(j);

        if (m && m->transport_id == MCU_TRANSPORT_LINUX)
                return flash_linux_cancel(j);
        if (f->flashing)
                return -EBUSY;  /* the flasher stops after the current block */
        return reboot_cancel(j);
}

static void flash_mcu_changed(struct job *j, struct mcu *m) {
        struct flash *f = j->data;

        if (m->transport_id == MCU_TRANSPORT_LINUX) {
                flash_linux_mcu_changed(j, m);
                return;
        }
        if (!f->flashing)
                reboot_mcu_changed(j, m);
}

static const struct job_ops flash_ops = {
        .run = flash_run,
        .mcu_changed = flash_mcu_changed,
        .cancel = flash_cancel,
        .free = flash_free,
};

int flash_check(struct daemon *d, struct mcu *m, struct image *img, bool stop_klipper,
                enum mcuflash_error *ret_error,
                char **ret_message) {
        _cleanup_free_ char *message = NULL;
        struct image_target target = flash_target(d, m);
        enum image_check_error kind;
        uint64_t start;
        int r;

        /* Printing, busy, offline, held by Klipper: as for a reboot (the
         * Linux process MCU has no bootloader: its service is restarted). */
        r = reboot_check(d, m, m->transport_id != MCU_TRANSPORT_LINUX, stop_klipper, ret_error, ret_message);
        if (r < 0)
                return r;
        if (!img->dict) {
                *ret_error = MCUFLASH_ERROR_INVALID_IMAGE;
                return asprintf(ret_message, "This is not a Klipper image: it holds no data dictionary.") < 0 ?
                        -ENOMEM : -EPERM;
        }
        r = image_check(img, &target, &start, &kind, &message);
        /* Where the application goes may only be known once the bootloader
         * answers (Katapult tells): then that check waits until then. */
        if (r < 0 && !(kind == IMAGE_CHECK_UNKNOWN_TARGET && m->flash_start == MCU_FLASH_START_UNKNOWN &&
                       (streq(m->bootloader, "katapult") || streq(m->bootloader, "unknown")))) {
                *ret_error = kind == IMAGE_CHECK_INVALID ? MCUFLASH_ERROR_INVALID_IMAGE :
                             kind == IMAGE_CHECK_UNKNOWN_TARGET ? MCUFLASH_ERROR_UNSUPPORTED :
                             MCUFLASH_ERROR_IMAGE_MISMATCH;
                *ret_message = TAKE_PTR(message);
                return -EPERM;
        }
        return 0;
}

int flash_start(struct daemon *d, struct mcu *m, struct image *img, bool force, struct job **ret) {
        struct flash *f;
        int r;

        f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        f->linux_mcu.output_fd = -1;
        f->progress_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        f->image_version = strdup(img->dict && img->dict->version ? img->dict->version : "");
        if (f->progress_fd < 0 || !f->image_version) {
                safe_close(f->progress_fd);
                free(f->image_version);
                free(f);
                return -ENOMEM;
        }
        f->started_in_application = m->state_id == MCU_STATE_APPLICATION;
        f->skip = !force && m->state_id == MCU_STATE_APPLICATION && !isempty(m->firmware_version) &&
                  streq(m->firmware_version, f->image_version);
        /* The job owns the image once it exists (it may need it at once). */
        f->image = img;
        r = job_start(d, m, JOB_KIND_FLASH, &flash_ops, f, ret);
        if (r < 0) {
                safe_close(f->progress_fd);
                free(f->image_version);
                free(f);
                return r;
        }
        f->progress_event = event_new(d->base, f->progress_fd, EV_READ | EV_PERSIST, on_progress, *ret);
        if (f->progress_event)
                (void) event_add(f->progress_event, NULL);
        return 0;
}
