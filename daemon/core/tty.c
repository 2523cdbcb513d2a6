/* From udev tty devices to MCUs: which ttys are MCUs (Klipper's USB id,
 * printer.cfg, SerialDevices=), what identity a chip gets, and what happens
 * when its tty goes away (offline, then forgotten after OfflineTimeoutSec).
 * Called by discover/udev.c through its callbacks. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bus/mcu.h"
#include "core/daemon-internal.h"
#include "shared/log.h"
#include "shared/strutil.h"

#define KLIPPER_USB_VENDOR_ID 0x1d50
#define KLIPPER_USB_PRODUCT_ID 0x614e
#define KATAPULT_USB_PRODUCT_ID 0x6177
/* Klipper's CONFIG_USB_SERIAL_NUMBER default, used when the chip has no id:
 * not unique, so such boards are identified by their USB port instead. */
#define KLIPPER_DEFAULT_USB_SERIAL "12345"

static bool devlinks_in_list(const char *devlinks, char **l) {
        _cleanup_free_ char *copy = strdup(devlinks);
        char *save = NULL;

        if (!copy)
                return false;
        for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
                if (strv_contains(l, w))
                        return true;
        return false;
}

static bool tty_is_klipper_usb(const struct udev_tty_info *info) {
        return info->usb_vendor_id == KLIPPER_USB_VENDOR_ID &&
               info->usb_product_id == KLIPPER_USB_PRODUCT_ID;
}

/* Katapult's USB CDC bootloader (same vendor id as Klipper). */
static bool tty_is_katapult_usb(const struct udev_tty_info *info) {
        return info->usb_vendor_id == KLIPPER_USB_VENDOR_ID &&
               info->usb_product_id == KATAPULT_USB_PRODUCT_ID;
}

/* Is this tty one we watch: Klipper's USB id, named in printer.cfg, or
 * listed in SerialDevices=? */
static bool daemon_tty_wanted(struct daemon *d, const struct udev_tty_info *info) {
        if (tty_is_klipper_usb(info) || tty_is_katapult_usb(info))
                return true;
        if (d->printercfg &&
            printercfg_find_serial(d->printercfg, info->devnode, info->devlinks, info->usb_serial))
                return true;
        return strv_contains(d->config->extra_serial_devices, info->devnode) ||
               devlinks_in_list(info->devlinks, d->config->extra_serial_devices);
}

/* The stable identity of the chip behind a tty: its USB serial when that
 * is a real chip id, else the USB port, else the device name. */
static int tty_mcu_id(const struct udev_tty_info *info, char **ret) {
        const char *base;

        if (!isempty(info->usb_serial) && !streq(info->usb_serial, KLIPPER_DEFAULT_USB_SERIAL))
                return (*ret = strdup(info->usb_serial)) ? 0 : -ENOMEM;
        if (!isempty(info->usb_port))
                return asprintf(ret, "usb-%s", info->usb_port) < 0 ? -ENOMEM : 0;
        base = strrchr(info->devnode, '/');
        return (*ret = strdup(base ? base + 1 : info->devnode)) ? 0 : -ENOMEM;
}

void daemon_cancel_offline_timer(struct mcu *m) {
        if (m->offline_timer) {
                event_free(m->offline_timer);
                m->offline_timer = NULL;
        }
}

void daemon_tty_added(void *userdata, const struct udev_tty_info *info) {
        struct daemon *d = userdata;
        _cleanup_free_ char *id = NULL;
        struct mcu *m;
        bool is_new = false;
        int r;

        if (!daemon_tty_wanted(d, info))
                return;

        m = registry_find_by_syspath(d->registry, info->syspath);
        if (!m) {
                r = tty_mcu_id(info, &id);
                if (r < 0) {
                        log_oom();
                        return;
                }
                m = registry_find_by_id(d->registry, id);
                /* Two boards claiming one serial number: the second one is
                 * told apart by its port. */
                if (m && !isempty(m->syspath) && !isempty(info->usb_port) &&
                    (m->transport_id == MCU_TRANSPORT_USB_SERIAL || m->transport_id == MCU_TRANSPORT_SERIAL)) {
                        log_warning("%s and %s report the same USB serial %s; identifying %s by its port.",
                                    m->device_path, info->devnode, info->usb_serial, info->devnode);
                        free(id);
                        if (asprintf(&id, "usb-%s", info->usb_port) < 0) {
                                id = NULL;
                                log_oom();
                                return;
                        }
                        m = registry_find_by_id(d->registry, id);
                }
        }
        if (!m) {
                r = mcu_new(id, &m);
                if (r < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
                is_new = true;
        }

        if (d->rescanning && daemon_mcu_has_job(m))
                return;         /* the job's; a Rescan does not touch it */
        daemon_cancel_offline_timer(m);
        (void) free_and_strdup(&m->syspath, info->syspath);
        (void) free_and_strdup(&m->devlinks, info->devlinks);
        mcu_set_transport(m, info->usb_vendor_id ? MCU_TRANSPORT_USB_SERIAL : MCU_TRANSPORT_SERIAL);
        (void) mcu_set_string(m, MCU_PROP_DEVICE_PATH, info->devnode);
        mcu_set_usb_ids(m, info->usb_vendor_id, info->usb_product_id);
        (void) mcu_set_string(m, MCU_PROP_USB_SERIAL, info->usb_serial);
        (void) mcu_set_string(m, MCU_PROP_USB_PORT, info->usb_port);
        m->speaks_katapult = tty_is_katapult_usb(info);
        if (m->speaks_katapult) {
                (void) mcu_set_string(m, MCU_PROP_BOOTLOADER, "katapult");
                (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Katapult");
        }
        if (tty_is_klipper_usb(info)) {
                /* Klipper's USB descriptors name the firmware and the chip;
                 * good to know even before (or without) identify. */
                if (streq(m->firmware, "Katapult") || m->state_id == MCU_STATE_BOOTLOADER)
                        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Klipper");
                if (isempty(m->firmware))
                        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, "Klipper");
                if (isempty(m->mcu_type) && !isempty(info->usb_product))
                        (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, info->usb_product);
        }
        daemon_mcu_attached(d, m, is_new);
}

void daemon_mcu_attached(struct daemon *d, struct mcu *m, bool is_new) {
        if (m->state_id == MCU_STATE_OFFLINE) {
                mcu_set_state(m, MCU_STATE_UNKNOWN);
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
        }
        daemon_apply_printercfg(d, m);

        if (is_new) {
                log_info("%s: found %s (%s)%s%s", m->id, m->device_path, m->transport,
                         isempty(m->name) ? "" : " as ", m->name);
                if (registry_add(d->registry, m) < 0) {
                        log_oom();
                        return;
                }
        } else
                registry_commit(d->registry, m);

        daemon_start_identify(d, m);
}

/* An offline MCU stays visible (its identity and last version are useful to
 * a person looking for it) until OfflineTimeoutSec has passed. */
static void on_offline_timeout(evutil_socket_t fd, short what, void *userdata) {
        struct mcu *m = userdata;

        log_info("%s: offline for too long; forgetting it.", m->id);
        registry_remove(m->daemon->registry, m);
}

void daemon_arm_offline_timer(struct daemon *d, struct mcu *m) {
        uint64_t timeout = d->config->offline_timeout_usec;
        struct timeval tv = {
                .tv_sec = (time_t) (timeout / 1000000),
                .tv_usec = (suseconds_t) (timeout % 1000000),
        };

        daemon_cancel_offline_timer(m);
        if (timeout == 0)
                return;
        m->offline_timer = evtimer_new(d->base, on_offline_timeout, m);
        if (!m->offline_timer || evtimer_add(m->offline_timer, &tv) < 0)
                log_oom();
}

void daemon_mcu_gone(struct daemon *d, struct mcu *m, const char *reason) {
        (void) free_and_strdup(&m->syspath, "");
        m->identify_generation++;
        m->identifying = false;
        mcu_set_state(m, MCU_STATE_OFFLINE);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, reason);
        registry_commit(d->registry, m);
        bus_mcu_complete_refresh(d, m, -ENODEV);
        daemon_arm_offline_timer(d, m);
}

void daemon_tty_removed(void *userdata, const char *syspath) {
        struct daemon *d = userdata;
        struct mcu *m = registry_find_by_syspath(d->registry, syspath);

        if (!m)
                return;
        log_info("%s: %s is gone; keeping the MCU as offline.", m->id, m->device_path);
        daemon_mcu_gone(d, m, "device was unplugged or reset");
}

