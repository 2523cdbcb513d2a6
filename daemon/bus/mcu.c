/* Implementation of bus/mcu.h.  Properties are read straight from struct
 * mcu (every exported string is kept non-NULL by core/mcu.c). */
#include <errno.h>
#include <stdlib.h>

#include "bus/bus.h"
#include "bus/errors.h"
#include "bus/mcu.h"
#include "core/auth.h"
#include "core/daemon.h"
#include "core/job.h"
#include "core/flash.h"
#include "core/reboot.h"
#include "shared/log.h"

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

static int method_refresh(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;
        struct daemon *d = m->daemon;
        void **pending;
        int r;

        r = daemon_refresh_mcu(d, m);
        if (r == -ENODEV)
                return bus_error_setf(error, MCUFLASH_ERROR_DISCONNECTED,
                                      "MCU %s is offline: plug it in (or power it) and try again.",
                                      m->id);
        if (r == -EBUSY)
                return bus_error_setf(error, MCUFLASH_ERROR_BUSY,
                                      "MCU %s is in use by Klipper; stop Klipper to identify it again "
                                      "(its version is shown as Klipper reports it).", m->id);
        if (r < 0)
                return r;
        if (r > 0)
                return sd_bus_reply_method_return(msg, NULL);
        pending = realloc(m->pending_refresh, (m->n_pending_refresh + 1) * sizeof(void *));
        if (!pending)
                return -ENOMEM;
        m->pending_refresh = pending;
        m->pending_refresh[m->n_pending_refresh++] = sd_bus_message_ref(msg);
        return 1;
}

void bus_mcu_complete_refresh(struct daemon *d, struct mcu *m, int result) {
        for (size_t i = 0; i < m->n_pending_refresh; i++) {
                sd_bus_message *msg = m->pending_refresh[i];
                _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;

                if (result >= 0)
                        (void) sd_bus_reply_method_return(msg, NULL);
                else {
                        _cleanup_free_ char *text = NULL;

                        if (asprintf(&text, "MCU %s: %s", m->id,
                                     isempty(m->state_reason) ? strerror(-result) : m->state_reason) < 0)
                                text = NULL;
                        (void) bus_error_from_errno(&error, result, text ?: "identify failed");
                        (void) sd_bus_reply_method_error(msg, &error);
                }
                sd_bus_message_unref(msg);
        }
        free(m->pending_refresh);
        m->pending_refresh = NULL;
        m->n_pending_refresh = 0;
        bus_kick(d);
}

/* ---- RebootToBootloader / RebootToApplication --------------------------- */

struct reboot_request {
        struct daemon *daemon;
        sd_bus_message *message;
        char *mcu_id;
        bool to_bootloader;
        bool stop_klipper;
        struct auth_query *query;
        struct image *image;            /* Flash() */
        bool force;
};

static void reboot_request_free(struct reboot_request *req) {
        auth_query_free(req->query);
        image_free(req->image);
        sd_bus_message_unref(req->message);
        free(req->mcu_id);
        free(req);
}

/* Checks, then the job; answers @req's caller either way. */
static void reboot_request_answer(struct reboot_request *req) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_free_ char *message = NULL;
        struct daemon *d = req->daemon;
        enum mcuflash_error code;
        struct mcu *m = registry_find_by_id(d->registry, req->mcu_id);
        struct job *j;
        int r;

        if (!m) {
                bus_error_setf(&error, MCUFLASH_ERROR_NOT_FOUND, "MCU %s is gone.", req->mcu_id);
                goto fail;
        }
        if (req->image)
                r = flash_check(d, m, req->image, req->stop_klipper, &code, &message);
        else
                r = reboot_check(d, m, req->to_bootloader, req->stop_klipper, &code, &message);
        if (r == -EPERM) {
                bus_error_setf(&error, code, "%s", message);
                goto fail;
        }
        if (r >= 0 && req->image) {
                r = flash_start(d, m, req->image, req->force, &j);
                if (r >= 0)
                        req->image = NULL;      /* the job's now */
        } else if (r >= 0)
                r = reboot_start(d, m, req->to_bootloader, &j);
        if (r == -EBUSY) {
                bus_error_setf(&error, MCUFLASH_ERROR_BUSY, "MCU %s already has a job running.", m->id);
                goto fail;
        }
        if (r < 0) {
                sd_bus_error_set_errno(&error, r);
                goto fail;
        }
        /* Whoever started it may always cancel it. */
        (void) free_and_strdup(&j->owner, sd_bus_message_get_sender(req->message));
        (void) sd_bus_reply_method_return(req->message, "o", j->object_path);
        bus_kick(d);
        return;
fail:
        (void) sd_bus_reply_method_error(req->message, &error);
        bus_kick(d);
}

static void on_reboot_authorized(void *userdata, int result) {
        struct reboot_request *req = userdata;

        req->query = NULL;
        if (result <= 0) {
                _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;

                bus_error_setf(&error, MCUFLASH_ERROR_NOT_AUTHORIZED, "%s", auth_result_message(result));
                (void) sd_bus_reply_method_error(req->message, &error);
                bus_kick(req->daemon);
        } else
                reboot_request_answer(req);
        reboot_request_free(req);
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

/* Ask polkit for the action of @msg's method; the job starts (or the
 * refusal is sent) when the answer comes.  Takes *@image when given. */
static int authorize_job_request(sd_bus_message *msg, struct mcu *m, bool to_bootloader, bool stop_klipper,
                                 bool force, struct image **image) {
        struct daemon *d = m->daemon;
        struct reboot_request *req;
        int r;

        req = calloc(1, sizeof(*req));
        if (!req || !(req->mcu_id = strdup(m->id))) {
                free(req);
                return -ENOMEM;
        }
        req->daemon = d;
        req->message = sd_bus_message_ref(msg);
        req->to_bootloader = to_bootloader;
        req->stop_klipper = stop_klipper;
        req->force = force;
        if (image)
                req->image = TAKE_PTR(*image);
        r = auth_check_async(d->bus, d->base, msg,
                             auth_action_for("io.mcuflash1.Mcu", sd_bus_message_get_member(msg)),
                             on_reboot_authorized, req, &req->query);
        if (r < 0) {
                reboot_request_free(req);
                return r;
        }
        return 1;
}

static int method_reboot(sd_bus_message *msg, struct mcu *m, bool to_bootloader, sd_bus_error *error) {
        struct daemon *d = m->daemon;
        _cleanup_free_ char *message = NULL;
        enum mcuflash_error code;
        bool stop_klipper = true;
        int r;

        r = read_job_options(msg, &stop_klipper, NULL, error);
        if (r < 0)
                return r;
        /* Refuse what can be refused before asking anybody for a password. */
        r = reboot_check(d, m, to_bootloader, stop_klipper, &code, &message);
        if (r == -EPERM)
                return bus_error_setf(error, code, "%s", message);
        if (r < 0)
                return r;

        return authorize_job_request(msg, m, to_bootloader, stop_klipper, false, NULL);
}

#define IMAGE_MAX_SIZE (16 * 1024 * 1024)

static int method_flash(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        struct mcu *m = userdata;
        struct daemon *d = m->daemon;
        _cleanup_(image_freep) struct image *img = NULL;
        _cleanup_free_ char *message = NULL;
        enum mcuflash_error code;
        bool stop_klipper = true, force = false;
        int fd, r;

        r = sd_bus_message_read(msg, "h", &fd);
        if (r < 0)
                return r;
        r = read_job_options(msg, &stop_klipper, &force, error);
        if (r < 0)
                return r;
        /* The caller opened the file: the daemon never opens caller-named
         * paths as root.  image_load_fd() copies it into a sealed memfd
         * first, so nothing the caller does later can change it. */
        r = image_load_fd(fd, IMAGE_MAX_SIZE, &img, &message);
        if (r < 0)
                return bus_error_setf(error, MCUFLASH_ERROR_INVALID_IMAGE, "%s",
                                      message ?: "The image cannot be read.");
        free(message);
        message = NULL;
        r = flash_check(d, m, img, stop_klipper, &code, &message);
        if (r == -EPERM)
                return bus_error_setf(error, code, "%s", message);
        if (r < 0)
                return r;

        return authorize_job_request(msg, m, true, stop_klipper, force, &img);
}

static int method_reboot_to_bootloader(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        return method_reboot(msg, userdata, true, error);
}

static int method_reboot_to_application(sd_bus_message *msg, void *userdata, sd_bus_error *error) {
        return method_reboot(msg, userdata, false, error);
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
