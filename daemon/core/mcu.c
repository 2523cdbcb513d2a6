/* The MCU record: string tables for its enums and setters that track which
 * D-Bus properties changed.  No I/O, no D-Bus: the bus layer reads the
 * fields and the changed mask.  Every string property is set through
 * mcu_set_string() (and the Id through mcu_new()), which make it valid
 * UTF-8: values come from udev, printer.cfg, klippy and the MCUs themselves,
 * and one invalid string would break GetAll and GetManagedObjects for every
 * MCU. */
#include <errno.h>
#include <event2/event.h>
#include <stddef.h>
#include <stdlib.h>

#include "core/mcu.h"
#include "shared/strutil.h"

static const char *const transport_names[_MCU_TRANSPORT_MAX] = {
        [MCU_TRANSPORT_USB_SERIAL] = "usb-serial",
        [MCU_TRANSPORT_SERIAL] = "serial",
        [MCU_TRANSPORT_CAN] = "can",
        [MCU_TRANSPORT_USB] = "usb",
        [MCU_TRANSPORT_BLOCK] = "block",
        [MCU_TRANSPORT_LINUX] = "linux",
};

static const char *const state_names[_MCU_STATE_MAX] = {
        [MCU_STATE_UNKNOWN] = "unknown",
        [MCU_STATE_APPLICATION] = "application",
        [MCU_STATE_BOOTLOADER] = "bootloader",
        [MCU_STATE_FLASHING] = "flashing",
        [MCU_STATE_REBOOTING] = "rebooting",
        [MCU_STATE_OFFLINE] = "offline",
};

static const char *const prop_names[_MCU_PROP_MAX] = {
        [MCU_PROP_NAME] = "Name",
        [MCU_PROP_TRANSPORT] = "Transport",
        [MCU_PROP_DEVICE_PATH] = "DevicePath",
        [MCU_PROP_CAN_INTERFACE] = "CanInterface",
        [MCU_PROP_CAN_UUID] = "CanUuid",
        [MCU_PROP_USB_VENDOR_ID] = "UsbVendorId",
        [MCU_PROP_USB_PRODUCT_ID] = "UsbProductId",
        [MCU_PROP_USB_SERIAL] = "UsbSerial",
        [MCU_PROP_USB_PORT] = "UsbPort",
        [MCU_PROP_STATE] = "State",
        [MCU_PROP_STATE_REASON] = "StateReason",
        [MCU_PROP_BOOTLOADER] = "Bootloader",
        [MCU_PROP_FIRMWARE] = "Firmware",
        [MCU_PROP_FIRMWARE_VERSION] = "FirmwareVersion",
        [MCU_PROP_BUILD_VERSIONS] = "BuildVersions",
        [MCU_PROP_BUILD_CONFIG] = "BuildConfig",
        [MCU_PROP_MCU_TYPE] = "McuType",
        [MCU_PROP_FLASH_START] = "FlashStart",
        [MCU_PROP_VERSION_MATCHES_HOST] = "VersionMatchesHost",
        [MCU_PROP_JOB] = "Job",
};

const char *mcu_transport_to_string(enum mcu_transport t) {
        return t < _MCU_TRANSPORT_MAX ? transport_names[t] : NULL;
}

const char *mcu_state_to_string(enum mcu_state s) {
        return s < _MCU_STATE_MAX ? state_names[s] : NULL;
}

const char *mcu_prop_name(enum mcu_prop p) {
        return p < _MCU_PROP_MAX ? prop_names[p] : NULL;
}

/* The string field behind a string property, or NULL for non-string ones. */
static char **mcu_string_field(struct mcu *m, enum mcu_prop p) {
        switch (p) {
        case MCU_PROP_NAME: return &m->name;
        case MCU_PROP_DEVICE_PATH: return &m->device_path;
        case MCU_PROP_CAN_INTERFACE: return &m->can_interface;
        case MCU_PROP_CAN_UUID: return &m->can_uuid;
        case MCU_PROP_USB_SERIAL: return &m->usb_serial;
        case MCU_PROP_USB_PORT: return &m->usb_port;
        case MCU_PROP_STATE_REASON: return &m->state_reason;
        case MCU_PROP_BOOTLOADER: return &m->bootloader;
        case MCU_PROP_FIRMWARE: return &m->firmware;
        case MCU_PROP_FIRMWARE_VERSION: return &m->firmware_version;
        case MCU_PROP_BUILD_VERSIONS: return &m->build_versions;
        case MCU_PROP_BUILD_CONFIG: return &m->build_config;
        case MCU_PROP_MCU_TYPE: return &m->mcu_type;
        case MCU_PROP_JOB: return &m->job;
        default: return NULL;
        }
}

int mcu_new(const char *id, struct mcu **ret) {
        _cleanup_(mcu_freep) struct mcu *m = NULL;

        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->id = utf8_sanitize(id);
        m->object_path = strdup("");
        m->syspath = strdup("");
        m->devlinks = strdup("");
        m->flash_start = MCU_FLASH_START_UNKNOWN;
        if (!m->id || !m->object_path || !m->syspath || !m->devlinks)
                return -ENOMEM;
        for (enum mcu_prop p = 0; p < _MCU_PROP_MAX; p++) {
                char **f = mcu_string_field(m, p);
                if (f && !(*f = strdup(p == MCU_PROP_JOB ? "/" : "")))
                        return -ENOMEM;
        }
        free(m->bootloader);
        if (!(m->bootloader = strdup("unknown")))
                return -ENOMEM;
        m->transport_id = MCU_TRANSPORT_SERIAL;
        m->transport = mcu_transport_to_string(m->transport_id);
        m->state_id = MCU_STATE_UNKNOWN;
        m->state = mcu_state_to_string(m->state_id);
        m->version_matches_host = version_match_to_string(VERSION_MATCH_UNKNOWN);
        *ret = TAKE_PTR(m);
        return 0;
}

struct mcu *mcu_free(struct mcu *m) {
        if (!m)
                return NULL;
        for (enum mcu_prop p = 0; p < _MCU_PROP_MAX; p++) {
                char **f = mcu_string_field(m, p);
                if (f)
                        free(*f);
        }
        if (m->offline_timer)
                event_free(m->offline_timer);
        if (m->refresh_timer)
                event_free(m->refresh_timer);
        free(m->pending_refresh);
        free(m->id);
        free(m->object_path);
        free(m->syspath);
        free(m->devlinks);
        free(m);
        return NULL;
}

static void mcu_mark(struct mcu *m, enum mcu_prop p) {
        m->changed |= UINT64_C(1) << p;
}

int mcu_set_string(struct mcu *m, enum mcu_prop p, const char *value) {
        char **f = mcu_string_field(m, p);
        int r;

        if (!f)
                return -EINVAL;
        r = free_and_strdup_utf8(f, value ?: "");
        if (r > 0)
                mcu_mark(m, p);
        return r < 0 ? r : 0;
}

void mcu_set_state(struct mcu *m, enum mcu_state s) {
        if (m->state_id == s)
                return;
        m->state_id = s;
        m->state = mcu_state_to_string(s);
        mcu_mark(m, MCU_PROP_STATE);
}

void mcu_set_transport(struct mcu *m, enum mcu_transport t) {
        if (m->transport_id == t)
                return;
        m->transport_id = t;
        m->transport = mcu_transport_to_string(t);
        mcu_mark(m, MCU_PROP_TRANSPORT);
}

void mcu_set_usb_ids(struct mcu *m, uint16_t vid, uint16_t pid) {
        if (m->usb_vendor_id != vid) {
                m->usb_vendor_id = vid;
                mcu_mark(m, MCU_PROP_USB_VENDOR_ID);
        }
        if (m->usb_product_id != pid) {
                m->usb_product_id = pid;
                mcu_mark(m, MCU_PROP_USB_PRODUCT_ID);
        }
}

void mcu_set_flash_start(struct mcu *m, uint64_t addr) {
        if (m->flash_start == addr)
                return;
        m->flash_start = addr;
        mcu_mark(m, MCU_PROP_FLASH_START);
}

void mcu_set_version_match(struct mcu *m, enum version_match v) {
        const char *s = version_match_to_string(v);

        if (streq(m->version_matches_host, s))
                return;
        m->version_matches_host = s;
        mcu_mark(m, MCU_PROP_VERSION_MATCHES_HOST);
}

void mcu_update_version_match(struct mcu *m, const char *host_version) {
        mcu_set_version_match(m, version_compare(m->firmware_version, host_version));
}
