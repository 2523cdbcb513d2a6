/* Implementation of identify.h.  The worker part only does I/O on the one
 * tty it was given; it never looks at the registry. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bus/mcu.h"
#include "core/daemon-internal.h"
#include "core/identify.h"
#include "proto/klipper.h"
#include "shared/log.h"
#include "transport/serial.h"

#define DICTIONARY_MAX_SIZE (1024 * 1024)

int identify_request_new(const struct mcu *m, int timeout_ms, struct identify_request **ret) {
        _cleanup_(identify_request_freep) struct identify_request *req = NULL;

        req = calloc(1, sizeof(*req));
        if (!req)
                return -ENOMEM;
        req->mcu_id = strdup(m->id);
        req->device_path = strdup(m->device_path);
        if (!req->mcu_id || !req->device_path)
                return -ENOMEM;
        req->generation = m->identify_generation;
        req->baud = m->baud;
        req->timeout_ms = timeout_ms;
        req->katapult = m->speaks_katapult;
        /* A Linux process MCU's pty is only opened as klipper_mcu's. */
        if (m->transport_id == MCU_TRANSPORT_LINUX)
                req->pty_owner = m->pty_owner > 0 ? m->pty_owner : -1;
        req->pty_index = m->pty_index;
        *ret = TAKE_PTR(req);
        return 0;
}

struct identify_request *identify_request_free(struct identify_request *req) {
        if (!req)
                return NULL;
        klipper_dict_free(req->dict);
        free(req->mcu_id);
        free(req->device_path);
        free(req);
        return NULL;
}

int identify_over(struct transport *t, int timeout_ms, struct klipper_dict **ret) {
        _cleanup_free_ uint8_t *data = NULL;
        struct klipper_identify_params params = {
                .timeout_ms = timeout_ms,
                .max_size = DICTIONARY_MAX_SIZE,
        };
        size_t len = 0;
        int r;

        r = klipper_identify(t, &params, &data, &len);
        if (r < 0)
                return r;
        r = klipper_dict_parse_compressed(data, len, DICTIONARY_MAX_SIZE, ret);
        if (r == -E2BIG)
                return -EFBIG;  /* a compression bomb, not a long download */
        if (r < 0)
                return r == -ENOMEM ? r : -EPROTO;
        return 0;
}

int identify_run(void *userdata) {
        struct identify_request *req = userdata;
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        r = serial_transport_open_pty(req->device_path, req->baud, req->pty_owner, req->pty_index, &t);
        if (r < 0)
                return r;
        if (req->katapult)
                return katapult_connect(t, req->timeout_ms, &req->katapult_info);
        return identify_over(t, req->timeout_ms, &req->dict);
}

void identify_apply_katapult(struct mcu *m, const struct katapult_info *info, int result,
                             const char *where, const char *host_version) {
        char reason[256];

        if (result < 0) {
                snprintf(reason, sizeof(reason), "Katapult does not answer CONNECT (%s)", strerror(-result));
                mcu_set_state(m, MCU_STATE_UNKNOWN);
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, reason);
                log_warning("%s: %s: %s", m->id, where, reason);
                return;
        }
        mcu_set_state(m, MCU_STATE_BOOTLOADER);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
        (void) mcu_set_string(m, MCU_PROP_BOOTLOADER, "katapult");
        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Katapult");
        (void) mcu_set_string(m, MCU_PROP_FIRMWARE_VERSION, info->version);
        (void) mcu_set_string(m, MCU_PROP_BUILD_VERSIONS, "");
        (void) mcu_set_string(m, MCU_PROP_BUILD_CONFIG, "");
        if (!isempty(info->mcu))
                (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, info->mcu);
        mcu_set_flash_start(m, info->app_start);
        /* A bootloader's version is not Klipper's: nothing to compare. */
        mcu_update_version_match(m, "");
        log_info("%s: Katapult %s on %s (%s), application at 0x%08x, %u-byte blocks", m->id,
                 isempty(info->version) ? "(version unknown)" : info->version, m->mcu_type, where,
                 info->app_start, info->block_size);
}

/* A sentence a person can act on, for StateReason and the log. */
static void identify_describe_failure(int result, int timeout_ms, const char *where,
                                      char *buf, size_t size) {
        switch (result) {
        case -EBUSY:
                snprintf(buf, size, "port is held by another process and was not opened (is Klipper running?)");
                break;
        case -ETIMEDOUT:
                snprintf(buf, size, "no complete answer to identify within %.1f s",
                         timeout_ms / 1000.0);
                break;
        case -EBADMSG:
                snprintf(buf, size, "answers with data that is not Klipper's protocol");
                break;
        case -EPROTO:
                snprintf(buf, size, "sent a data dictionary that cannot be read");
                break;
        case -E2BIG:
                snprintf(buf, size, "sent a data dictionary larger than %u KiB", DICTIONARY_MAX_SIZE / 1024);
                break;
        case -EFBIG:
                snprintf(buf, size, "sent a data dictionary that decompresses to more than %u KiB; refused",
                         DICTIONARY_MAX_SIZE / 1024);
                break;
        case -ENODEV:
                snprintf(buf, size, "went away during identify");
                break;
        case -ESTALE:
                snprintf(buf, size, "the pty behind %s no longer belongs to klipper_mcu; not opened", where);
                break;
        case -EACCES:
        case -EPERM:
                snprintf(buf, size, "cannot open %s: permission denied", where);
                break;
        default:
                snprintf(buf, size, "cannot identify: %s", strerror(-result));
                break;
        }
}

void identify_apply_result(struct mcu *m, const struct klipper_dict *dict, int result,
                           int timeout_ms, const char *where, const char *host_version) {
        char reason[256];

        if (result >= 0) {
                mcu_set_state(m, MCU_STATE_APPLICATION);
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
                (void) mcu_set_string(m, MCU_PROP_FIRMWARE, dict->app ?: "Klipper");
                (void) mcu_set_string(m, MCU_PROP_FIRMWARE_VERSION, dict->version);
                (void) mcu_set_string(m, MCU_PROP_BUILD_VERSIONS, dict->build_versions);
                (void) mcu_set_string(m, MCU_PROP_BUILD_CONFIG, dict->kconfig);
                if (dict->mcu)
                        (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, dict->mcu);
                mcu_update_version_match(m, host_version);
                log_info("%s: %s %s on %s (%s)", m->id, m->firmware, m->firmware_version,
                         m->mcu_type, where);
                return;
        }

        identify_describe_failure(result, timeout_ms, where, reason, sizeof(reason));
        /* What was learnt before (version, type) stays visible; only the
         * state says that it is not confirmed now. */
        mcu_set_state(m, MCU_STATE_UNKNOWN);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, reason);
        mcu_update_version_match(m, host_version);
        if (result == -EBUSY)
                log_info("%s: %s: %s", m->id, where, reason);
        else
                log_warning("%s: %s: %s", m->id, where, reason);
}

void identify_apply(struct mcu *m, const struct identify_request *req, int result,
                    const char *host_version) {
        if (req->katapult)
                identify_apply_katapult(m, &req->katapult_info, result, req->device_path, host_version);
        else
                identify_apply_result(m, req->dict, result, req->timeout_ms, req->device_path, host_version);
}

/* ---- scheduling, on the main loop ------------------------------------- */

struct identify_job {
        struct daemon *daemon;
        struct identify_request *req;
};

static void identify_done(void *userdata, int result) {
        struct identify_job *job = userdata;
        struct daemon *d = job->daemon;
        struct mcu *m;

        if (result != -ECANCELED) {
                m = registry_find_by_id(d->registry, job->req->mcu_id);
                /* Unplugged (or re-plugged) meanwhile: this answer is stale. */
                if (m && m->identify_generation == job->req->generation) {
                        m->identifying = false;
                        m->identify_count++;
                        identify_apply(m, job->req, result, d->host_version);
                        registry_commit(d->registry, m);
                        bus_mcu_complete_refresh(d, m, result);
                }
        }
        identify_request_free(job->req);
        free(job);
}

static int identify_job_run(void *userdata) {
        struct identify_job *job = userdata;

        return identify_run(job->req);
}

void daemon_start_identify(struct daemon *d, struct mcu *m) {
        struct identify_job *job;
        int timeout_ms = (int) MIN(d->config->identify_timeout_usec / 1000, 600000);
        int r;

        if (daemon_mcu_held_by_klipper(d, m)) {
                /* Klipper's link: not opened.  host.c shows what Klipper says. */
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, DAEMON_HELD_REASON);
                registry_commit(d->registry, m);
                return;
        }
        if (m->transport_id == MCU_TRANSPORT_CAN) {
                /* A CAN node is asked again by scanning its interface. */
                daemon_can_rescan(d, m->can_interface);
                return;
        }
        if (m->identifying || m->link_busy || m->state_id == MCU_STATE_OFFLINE || isempty(m->device_path) ||
            m->transport_id == MCU_TRANSPORT_USB)
                return;
        job = calloc(1, sizeof(*job));
        if (!job) {
                log_oom();
                return;
        }
        job->daemon = d;
        m->identify_generation++;
        r = identify_request_new(m, timeout_ms, &job->req);
        if (r >= 0)
                r = worker_start(d->workers, identify_job_run, identify_done, job);
        if (r < 0) {
                log_error_errno(r, "%s: cannot start identify: %m", m->id);
                identify_request_free(job->req);
                free(job);
                return;
        }
        m->identifying = true;
        log_debug("%s: identifying on %s", m->id, m->device_path);
}

int daemon_refresh_mcu(struct daemon *d, struct mcu *m) {
        if (daemon_mcu_held_by_klipper(d, m))
                return -EBUSY;
        if (m->transport_id == MCU_TRANSPORT_CAN) {
                if (!daemon_can_interface_up(d, m->can_interface))
                        return -ENODEV;
                daemon_can_rescan(d, m->can_interface);
                return 0;
        }
        if (m->state_id == MCU_STATE_OFFLINE || isempty(m->device_path))
                return -ENODEV;
        if (m->transport_id == MCU_TRANSPORT_USB)
                return 1;       /* a bootloader device: udev told all there is */
        daemon_start_identify(d, m);
        return m->identifying ? 0 : -ENOMEM;
}

