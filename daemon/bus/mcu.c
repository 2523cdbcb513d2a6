/* Implementation of bus/mcu.h.  Properties are read straight from struct
 * mcu (every exported string is kept non-NULL by core/mcu.c). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>

#include "bus/bouncer.h"
#include "bus/bus.h"
#include "bus/errors.h"
#include "bus/mcu.h"
#include "core/daemon.h"
#include "core/job.h"
#include "core/flash.h"
#include "core/reboot.h"
#include "core/worker.h"
#include "image/image.h"
#include "shared/log.h"
#include "shared/time-util.h"

#define MCU_INTERFACE "io.mcuflash1.Mcu"

static int mcu_find(sd_bus *bus, const char *path, const char *interface, void *userdata,
                    void **found, sd_bus_error *error) {
        struct daemon *d = userdata;
        struct mcu *m = registry_find_by_path(d->registry, path);

        if (!m)
                return 0;
        *found = m;
        return 1;
}

static int mcu_enumerate(sd_bus *bus, const char *prefix, void *userdata, char ***nodes,
                         sd_bus_error *error) {
        struct daemon *d = userdata;
        char **l;

        l = calloc(d->registry->n_mcus + 1, sizeof(char *));
        if (!l)
                return -ENOMEM;
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                l[i] = strdup(d->registry->mcus[i]->object_path);
                if (!l[i]) {
                        for (size_t j = 0; j < i; j++)
                                free(l[j]);
                        free(l);
                        return -ENOMEM;
                }
        }
        *nodes = l;
        return 0;
}

/* Refresh is open to everybody, so it is rate-limited per MCU: an
 * identify it starts comes at most once a second; calls in between (or
 * while any identify runs) join the next one.  An MCU with a job is not
 * touched at all: Busy. */
#define REFRESH_INTERVAL_USEC (1000ULL * 1000ULL)
#define REFRESH_WAITING_MAX 256

static int refresh_error(struct mcu *m, int r, sd_bus_error *error) {
        if (r == -EALREADY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "MCU %s has a job running (%s); it is not asked while the job runs, "
                                      "and its state shows what the job finds.", m->id, m->job);
        if (r == -ENODEV)
                return bus_error_setf(error, MCUFLASH_ERROR_DISCONNECTED,
                                      "MCU %s is offline: plug it in (or power it) and try again.",
                                      m->id);
        if (r == -EBUSY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "MCU %s is in use by Klipper; stop Klipper to identify it again "
                                      "(its version is shown as Klipper reports it).", m->id);
        return r;
}

/* Answer every waiting Refresh call of @m: success, or @error. */
static void refresh_answer_all(struct daemon *d, struct mcu *m, const sd_bus_error *error) {
        for (size_t i = 0; i < m->n_pending_refresh; i++) {
                sd_bus_message *msg = m->pending_refresh[i];

                if (error)
                        (void) sd_bus_reply_method_error(msg, error);
                else
                        (void) sd_bus_reply_method_return(msg, NULL);
                sd_bus_message_unref(msg);
        }
        free(m->pending_refresh);
        m->pending_refresh = NULL;
        m->n_pending_refresh = 0;
        bus_kick(d);
}

/* Identify @m for the calls waiting; they are answered now unless an
 * identify runs (then bus_mcu_complete_refresh() answers them). */
static void refresh_start(struct daemon *d, struct mcu *m) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        m->refresh_last_usec = now_usec();
        r = daemon_refresh_mcu(d, m);
        if (r == 0)
                return;
        if (r < 0) {
                (void) refresh_error(m, r, &error);
                if (!sd_bus_error_is_set(&error))
                        sd_bus_error_set_errno(&error, r);
        }
        refresh_answer_all(d, m, r < 0 ? &error : NULL);
}

static void on_refresh_due(evutil_socket_t fd, short what, void *userdata) {
        struct mcu *m = userdata;

        refresh_start(m->daemon, m);
}

static int method_refresh(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;
        struct daemon *d = m->daemon;
        uint64_t now = now_usec(), due = m->refresh_last_usec + REFRESH_INTERVAL_USEC;
        struct timeval tv;
        void **pending;

        if (!streq(m->job, "/"))
                return refresh_error(m, -EALREADY, error);
        if (m->n_pending_refresh >= REFRESH_WAITING_MAX)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "%d Refresh calls for MCU %s are waiting already; try again in a second.",
                                      REFRESH_WAITING_MAX, m->id);
        pending = realloc(m->pending_refresh, (m->n_pending_refresh + 1) * sizeof(void *));
        if (!pending)
                return -ENOMEM;
        m->pending_refresh = pending;
        m->pending_refresh[m->n_pending_refresh++] = sd_bus_message_ref(msg);

        if (m->identifying || (m->refresh_timer && evtimer_pending(m->refresh_timer, NULL)))
                return 1;       /* joins the identify that runs or is due */
        if (m->refresh_last_usec == 0 || now >= due) {
                refresh_start(d, m);
                return 1;
        }
        if (!m->refresh_timer)
                m->refresh_timer = evtimer_new(d->base, on_refresh_due, m);
        due -= now;
        tv.tv_sec = (time_t) (due / 1000000);
        tv.tv_usec = (suseconds_t) (due % 1000000);
        if (!m->refresh_timer || evtimer_add(m->refresh_timer, &tv) < 0) {
                m->pending_refresh[--m->n_pending_refresh] = sd_bus_message_unref(msg);
                return -ENOMEM;
        }
        return 1;
}

void bus_mcu_complete_refresh(struct daemon *d, struct mcu *m, int result) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;

        if (result < 0) {
                _cleanup_free_ char *text = NULL;

                if (asprintf(&text, "MCU %s: %s", m->id,
                             isempty(m->state_reason) ? strerror(-result) : m->state_reason) < 0)
                        text = NULL;
                (void) bus_error_from_errno(&error, result, text ?: "identify failed");
        }
        refresh_answer_all(d, m, result < 0 ? &error : NULL);
}

/* ---- RebootToBootloader / RebootToApplication / Flash -------------------- */

/* Every job method goes through the bouncer first: polkit's answer comes
 * before any argument, fd or MCU state is looked at.  The *_admitted()
 * functions run once the caller is authorized and find the MCU again by the
 * message's path (it may have gone while polkit was asked). */

/* Largest image file accepted, by its size, before a byte is read. */
#define IMAGE_MAX_SIZE (16u * 1024 * 1024)
/* The worker gives up copying after this long... */
#define IMAGE_READ_TIMEOUT_USEC (10ULL * 1000000ULL)
/* ...and the caller is answered after this long, whatever the worker does. */
#define IMAGE_ANSWER_TIMEOUT_USEC (30ULL * 1000000ULL)
/* Images being read at once (each may take IMAGE_MAX_SIZE several times). */
#define IMAGE_LOADS_MAX 4

static struct mcu *admitted_mcu(struct daemon *d, sd_bus_message *msg, sd_bus_error *error) {
        struct mcu *m = registry_find_by_path(d->registry, sd_bus_message_get_path(msg));

        if (!m)
                bus_error_setf(error, MCUFLASH_ERROR_NOT_FOUND, "MCU %s is gone.", sd_bus_message_get_path(msg));
        return m;
}

/* Read the a{sv} options of a job method.  Unknown options are an error:
 * a caller that asks for something must not get something else.  @force
 * NULL: the method takes no "force". */
static int read_job_options(sd_bus_message *msg, bool *stop_klipper, bool *force, sd_bus_error *error) {
        int r;

        r = sd_bus_message_enter_container(msg, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(msg, 'e', "sv")) > 0) {
                const char *key;
                int b;

                r = sd_bus_message_read(msg, "s", &key);
                if (r < 0)
                        return r;
                if (!streq(key, "stop-klipper") && !(force && streq(key, "force")))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Unknown option '%s'.", key);
                r = sd_bus_message_read(msg, "v", "b", &b);
                if (r < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Option '%s' takes a boolean.", key);
                if (streq(key, "force"))
                        *force = b;
                else
                        *stop_klipper = b;
                r = sd_bus_message_exit_container(msg);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(msg);
}

/* The job is running: its path to the caller, who may always cancel it. */
static int reply_job(struct daemon *d, sd_bus_message *msg, struct mcu *m, struct job *j, int r,
                     sd_bus_error *error) {
        if (r == -EBUSY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY, "MCU %s already has a job running.", m->id);
        if (r < 0)
                return r;
        (void) free_and_strdup(&j->owner, sd_bus_message_get_sender(msg));
        r = sd_bus_reply_method_return(msg, "o", j->object_path);
        bus_kick(d);
        return r;
}

static int reboot_admitted(struct daemon *d, sd_bus_message *msg, sd_bus_error *error) {
        bool to_bootloader = streq(sd_bus_message_get_member(msg), "RebootToBootloader");
        _cleanup_free_ char *message = NULL;
        enum mcuflash_error code;
        bool stop_klipper = true;
        struct job *j = NULL;
        struct mcu *m;
        int r;

        m = admitted_mcu(d, msg, error);
        if (!m)
                return -ENOENT;
        r = read_job_options(msg, &stop_klipper, NULL, error);
        if (r < 0)
                return r;
        r = reboot_check(d, m, to_bootloader, stop_klipper, &code, &message);
        if (r == -EPERM)
                return bus_error_setf(error, code, "%s", message);
        if (r < 0)
                return r;
        r = reboot_start(d, m, to_bootloader, &j);
        return reply_job(d, msg, m, j, r, error);
}

static int method_reboot_to_bootloader(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;

        return bus_bouncer_admit(m->daemon, msg, NULL, reboot_admitted);
}

static int method_reboot_to_application(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;

        return bus_bouncer_admit(m->daemon, msg, NULL, reboot_admitted);
}

/* An authorized Flash() whose image a worker reads. */
struct image_load {
        struct daemon *daemon;
        sd_bus_message *message;        /* NULL once answered */
        char *mcu_id;
        bool stop_klipper, force;
        int fd;                         /* our duplicate of the caller's fd; the worker closes it */
        struct image *image;            /* the worker's result */
        char *refusal;                  /* the worker's message for a person */
        struct event *answer_timer;
};

static struct image_load *image_load_free(struct image_load *l) {
        if (!l)
                return NULL;
        if (l->answer_timer)
                event_free(l->answer_timer);
        sd_bus_message_unref(l->message);
        safe_close(l->fd);
        image_free(l->image);
        free(l->refusal);
        free(l->mcu_id);
        free(l);
        return NULL;
}
DEFINE_TRIVIAL_CLEANUP_FUNC(struct image_load *, image_load_free);

/* Worker thread: only the fd and the image, nothing of the daemon. */
static int image_load_run(void *userdata) {
        struct image_load *l = userdata;
        int r;

        r = image_load_fd(l->fd, IMAGE_MAX_SIZE, IMAGE_READ_TIMEOUT_USEC, &l->image, &l->refusal);
        l->fd = safe_close(l->fd);
        return r;
}

static void image_load_reply_error(struct image_load *l, const sd_bus_error *error) {
        (void) sd_bus_reply_method_error(l->message, error);
        l->message = sd_bus_message_unref(l->message);
        bus_kick(l->daemon);
}

/* The worker did not answer in time (a file system that does not answer):
 * the caller hears so now; the worker's result is dropped when it comes. */
static void on_image_load_overdue(evutil_socket_t fd, short what, void *userdata) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        struct image_load *l = userdata;

        log_warning("Reading the image for %s did not finish within %llu s; refused.", l->mcu_id,
                    IMAGE_ANSWER_TIMEOUT_USEC / 1000000ULL);
        bus_error_setf(&error, MCUFLASH_ERROR_INVALID_IMAGE,
                       "Reading the image did not finish within %llu s; nothing was sent to the MCU.",
                       IMAGE_ANSWER_TIMEOUT_USEC / 1000000ULL);
        image_load_reply_error(l, &error);
}

/* Back on the loop: the image is read (or refused); check it against the
 * MCU as it is now and start the job. */
static int image_loaded(struct image_load *l, int result, sd_bus_error *error) {
        struct daemon *d = l->daemon;
        _cleanup_free_ char *message = NULL;
        enum mcuflash_error code;
        struct job *j = NULL;
        struct mcu *m;
        int r;

        if (result == -ENOMEM)
                return result;
        if (result < 0)
                return bus_error_setf(error, MCUFLASH_ERROR_INVALID_IMAGE, "%s",
                                      l->refusal ?: "The image cannot be read.");
        m = registry_find_by_id(d->registry, l->mcu_id);
        if (!m)
                return bus_error_setf(error, MCUFLASH_ERROR_NOT_FOUND, "MCU %s is gone.", l->mcu_id);
        r = flash_check(d, m, l->image, l->stop_klipper, &code, &message);
        if (r == -EPERM)
                return bus_error_setf(error, code, "%s", message);
        if (r < 0)
                return r;
        r = flash_start(d, m, l->image, l->force, &j);
        if (r >= 0)
                l->image = NULL;        /* the job's now */
        return reply_job(d, l->message, m, j, r, error);
}

static void image_load_done(void *userdata, int result) {
        _cleanup_(image_load_freep) struct image_load *l = userdata;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        l->daemon->n_image_loads--;
        if (!l->message || result == -ECANCELED)
                return;         /* answered already, or the daemon is stopping */
        r = image_loaded(l, result, &error);
        if (r < 0) {
                if (!sd_bus_error_is_set(&error))
                        sd_bus_error_set_errno(&error, r);
                image_load_reply_error(l, &error);
        }
}

static int flash_admitted(struct daemon *d, sd_bus_message *msg, sd_bus_error *error) {
        _cleanup_(image_load_freep) struct image_load *l = NULL;
        struct timeval tv = { .tv_sec = IMAGE_ANSWER_TIMEOUT_USEC / 1000000ULL };
        _cleanup_free_ char *message = NULL;
        enum mcuflash_error code;
        struct mcu *m;
        int fd, r;

        m = admitted_mcu(d, msg, error);
        if (!m)
                return -ENOENT;
        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->fd = -1;
        l->stop_klipper = true;
        r = sd_bus_message_read(msg, "h", &fd);
        if (r < 0)
                return r;
        r = read_job_options(msg, &l->stop_klipper, &l->force, error);
        if (r < 0)
                return r;
        /* Refuse what can be refused before reading anything. */
        r = reboot_check(d, m, m->transport_id != MCU_TRANSPORT_LINUX, l->stop_klipper, &code, &message);
        if (r == -EPERM)
                return bus_error_setf(error, code, "%s", message);
        if (r < 0)
                return r;
        if (d->n_image_loads >= IMAGE_LOADS_MAX)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "%u images are being read already; try again in a moment.",
                                      (unsigned) IMAGE_LOADS_MAX);

        /* The caller opened the file: the daemon never opens caller-named
         * paths as root.  The worker copies it into a sealed memfd, so
         * nothing the caller does later can change it; the loop goes on
         * answering meanwhile. */
        l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (l->fd < 0)
                return -errno;
        l->daemon = d;
        l->message = sd_bus_message_ref(msg);
        l->mcu_id = strdup(m->id);
        l->answer_timer = evtimer_new(d->base, on_image_load_overdue, l);
        if (!l->mcu_id || !l->answer_timer || evtimer_add(l->answer_timer, &tv) < 0)
                return -ENOMEM;
        r = worker_start(d->workers, image_load_run, image_load_done, l);
        if (r < 0)
                return r;
        d->n_image_loads++;
        TAKE_PTR(l);
        return 1;
}

static int method_flash(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;

        return bus_bouncer_admit(m->daemon, msg, NULL, flash_admitted);
}

#define MCU_PROPERTY(name, sig, field) \
        SD_BUS_PROPERTY(name, sig, NULL, offsetof(struct mcu, field), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

static const sd_bus_vtable mcu_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Id", "s", NULL, offsetof(struct mcu, id), SD_BUS_VTABLE_PROPERTY_CONST),
        MCU_PROPERTY("Name", "s", name),
        MCU_PROPERTY("Transport", "s", transport),
        MCU_PROPERTY("DevicePath", "s", device_path),
        MCU_PROPERTY("CanInterface", "s", can_interface),
        MCU_PROPERTY("CanUuid", "s", can_uuid),
        MCU_PROPERTY("UsbVendorId", "q", usb_vendor_id),
        MCU_PROPERTY("UsbProductId", "q", usb_product_id),
        MCU_PROPERTY("UsbSerial", "s", usb_serial),
        MCU_PROPERTY("UsbPort", "s", usb_port),
        MCU_PROPERTY("State", "s", state),
        MCU_PROPERTY("StateReason", "s", state_reason),
        MCU_PROPERTY("Bootloader", "s", bootloader),
        MCU_PROPERTY("Firmware", "s", firmware),
        MCU_PROPERTY("FirmwareVersion", "s", firmware_version),
        MCU_PROPERTY("BuildVersions", "s", build_versions),
        MCU_PROPERTY("BuildConfig", "s", build_config),
        MCU_PROPERTY("McuType", "s", mcu_type),
        MCU_PROPERTY("FlashStart", "t", flash_start),
        MCU_PROPERTY("VersionMatchesHost", "s", version_matches_host),
        MCU_PROPERTY("Job", "o", job),
        SD_BUS_METHOD("Refresh", "", "", method_refresh, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("RebootToBootloader", "a{sv}", SD_BUS_PARAM(options), "o", SD_BUS_PARAM(job),
                                 method_reboot_to_bootloader, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("Flash", "ha{sv}", SD_BUS_PARAM(image) SD_BUS_PARAM(options), "o",
                                 SD_BUS_PARAM(job), method_flash, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_NAMES("RebootToApplication", "a{sv}", SD_BUS_PARAM(options), "o", SD_BUS_PARAM(job),
                                 method_reboot_to_application, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

static void emit(struct daemon *d, int r, const char *what, const char *path) {
        if (r < 0)
                log_warning_errno(r, "Cannot emit %s for %s: %m", what, path);
}

static void on_mcu_added(void *userdata, struct mcu *m) {
        struct daemon *d = userdata;

        if (!d->bus)
                return;
        emit(d, sd_bus_emit_object_added(d->bus, m->object_path), "InterfacesAdded", m->object_path);
        emit(d, sd_bus_emit_signal(d->bus, MCUFLASH_MANAGER_PATH, "io.mcuflash1.Manager", "McuAdded",
                                   "o", m->object_path),
             "McuAdded", m->object_path);
        bus_kick(d);
}

static void on_mcu_changed(void *userdata, struct mcu *m, uint64_t mask) {
        struct daemon *d = userdata;
        const char *names[_MCU_PROP_MAX + 1];
        size_t n = 0;

        if (!d->bus)
                return;
        for (enum mcu_prop p = 0; p < _MCU_PROP_MAX; p++)
                if (mask & (UINT64_C(1) << p))
                        names[n++] = mcu_prop_name(p);
        names[n] = NULL;
        emit(d, sd_bus_emit_properties_changed_strv(d->bus, m->object_path, MCU_INTERFACE, (char **) names),
             "PropertiesChanged", m->object_path);
        bus_kick(d);
}

static void on_mcu_removed(void *userdata, struct mcu *m) {
        struct daemon *d = userdata;

        bus_mcu_complete_refresh(d, m, -ENODEV);
        if (!d->bus)
                return;
        emit(d, sd_bus_emit_signal(d->bus, MCUFLASH_MANAGER_PATH, "io.mcuflash1.Manager", "McuRemoved",
                                   "o", m->object_path),
             "McuRemoved", m->object_path);
        emit(d, sd_bus_emit_object_removed(d->bus, m->object_path), "InterfacesRemoved", m->object_path);
        bus_kick(d);
}

int bus_mcu_install(struct daemon *d) {
        static const struct registry_observer observer = {
                .added = on_mcu_added,
                .changed = on_mcu_changed,
                .removed = on_mcu_removed,
        };
        struct registry_observer o = observer;
        int r;

        r = sd_bus_add_fallback_vtable(d->bus, &d->mcu_slot, MCU_OBJECT_PATH_PREFIX, MCU_INTERFACE,
                                       mcu_vtable, mcu_find, d);
        if (r < 0)
                return r;
        r = sd_bus_add_node_enumerator(d->bus, &d->mcu_enumerator_slot, MCU_OBJECT_PATH_PREFIX,
                                       mcu_enumerate, d);
        if (r < 0)
                return r;
        o.userdata = d;
        return registry_add_observer(d->registry, &o);
}
