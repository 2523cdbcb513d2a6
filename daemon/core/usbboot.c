/* USB bootloaders that are whole USB devices rather than ttys: ST's ROM DFU
 * (0483:df11), the RP2040/RP2350 boot ROM (2e8a:0003, 2e8a:000f),
 * stm32duino (1eaf:0003), the STM32 HID bootloader (1209:beba) and Teensy's
 * HalfKay (16c0:0478).  Such a device belongs to the MCU whose chip serial
 * it reports, or else to the MCU last seen on the same USB port (ST's DFU
 * reports a serial of its own), so an MCU keeps its object while it moves
 * between Klipper and its bootloader; a device nobody was waiting for (BOOT
 * button, empty chip) gets an object of its own.  Other USB devices are
 * ignored: their ttys are handled by tty.c. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/daemon-internal.h"
#include "shared/log.h"

struct usb_bootloader_id {
        uint16_t vendor_id;
        uint16_t product_id;
        const char *bootloader;         /* Mcu.Bootloader */
        const char *firmware;           /* Mcu.Firmware while it runs */
        const char *mcu_type;           /* when the id alone tells, else NULL */
        uint64_t flash_start;           /* where an application starts, when the chip tells; 0 = unknown */
};

static const struct usb_bootloader_id usb_bootloaders[] = {
        { 0x0483, 0xdf11, "stm32-dfu", "STM32 ROM DFU", NULL, 0 },
        /* The boot ROM starts whatever is at the start of flash (boot2 then
         * the application): nothing of a bootloader's sits below it. */
        { 0x2e8a, 0x0003, "picoboot", "RP2040 boot ROM", "rp2040", 0x10000000 },
        { 0x2e8a, 0x000f, "picoboot", "RP2350 boot ROM", "rp2350", 0x10000000 },
        { 0x1eaf, 0x0003, "stm32duino", "stm32duino bootloader", NULL, 0x08002000 },
        { 0x1209, 0xbeba, "hid", "HID bootloader", NULL, 0 },
        { 0x16c0, 0x0478, "halfkay", "Teensy HalfKay", NULL, 0 },
};

static const struct usb_bootloader_id *usb_bootloader_lookup(uint16_t vid, uint16_t pid) {
        for (size_t i = 0; i < ELEMENTSOF(usb_bootloaders); i++)
                if (usb_bootloaders[i].vendor_id == vid && usb_bootloaders[i].product_id == pid)
                        return &usb_bootloaders[i];
        return NULL;
}

/* The MCU this bootloader device is: same chip serial, else the MCU that
 * was last on this port and is not attached anywhere now. */
static struct mcu *usbboot_find_mcu(struct daemon *d, const struct udev_usb_info *info) {
        struct mcu *m = registry_find_by_syspath(d->registry, info->syspath);

        if (m)
                return m;
        if (!isempty(info->serial)) {
                m = registry_find_by_id(d->registry, info->serial);
                if (m)
                        return m;
        }
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                m = d->registry->mcus[i];
                if (!isempty(info->port) && streq(m->usb_port, info->port) && isempty(m->syspath))
                        return m;
        }
        return NULL;
}

void daemon_usb_added(void *userdata, const struct udev_usb_info *info) {
        struct daemon *d = userdata;
        const struct usb_bootloader_id *id = usb_bootloader_lookup(info->vendor_id, info->product_id);
        struct mcu *m;
        bool is_new = false;

        if (!id)
                return;
        m = usbboot_find_mcu(d, info);
        if (m && d->rescanning && daemon_mcu_has_job(m))
                return;         /* the job's; a Rescan does not touch it */
        if (!m) {
                _cleanup_free_ char *mcu_id = NULL;

                if (!isempty(info->serial))
                        mcu_id = strdup(info->serial);
                else if (asprintf(&mcu_id, "usb-%s", info->port) < 0)
                        mcu_id = NULL;
                if (!mcu_id || mcu_new(mcu_id, &m) < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
                is_new = true;
        }

        daemon_cancel_offline_timer(m);
        (void) free_and_strdup(&m->syspath, info->syspath);
        (void) free_and_strdup(&m->devlinks, "");
        m->usb_busnum = info->busnum;
        m->usb_devnum = info->devnum;
        mcu_set_transport(m, MCU_TRANSPORT_USB);
        (void) mcu_set_string(m, MCU_PROP_DEVICE_PATH, info->devnode);
        mcu_set_usb_ids(m, info->vendor_id, info->product_id);
        if (!isempty(info->serial) && isempty(m->usb_serial))
                (void) mcu_set_string(m, MCU_PROP_USB_SERIAL, info->serial);
        (void) mcu_set_string(m, MCU_PROP_USB_PORT, info->port);
        mcu_set_state(m, MCU_STATE_BOOTLOADER);
        (void) mcu_set_string(m, MCU_PROP_STATE_REASON, "");
        (void) mcu_set_string(m, MCU_PROP_BOOTLOADER, id->bootloader);
        (void) mcu_set_string(m, MCU_PROP_FIRMWARE, id->firmware);
        (void) mcu_set_string(m, MCU_PROP_FIRMWARE_VERSION, "");
        (void) mcu_set_string(m, MCU_PROP_BUILD_CONFIG, "");
        if (id->mcu_type && isempty(m->mcu_type))
                (void) mcu_set_string(m, MCU_PROP_MCU_TYPE, id->mcu_type);
        /* Only where nothing better is known: an MCU that was seen in
         * Katapult keeps Katapult's application start. */
        if (id->flash_start && m->flash_start == MCU_FLASH_START_UNKNOWN)
                mcu_set_flash_start(m, id->flash_start);
        mcu_update_version_match(m, d->host_version);

        if (is_new) {
                log_info("%s: %s at %s (USB port %s)", m->id, id->firmware, info->devnode, info->port);
                if (registry_add(d->registry, m) < 0)
                        log_oom();
                return;
        }
        log_info("%s: in its bootloader: %s at %s", m->id, id->firmware, info->devnode);
        registry_commit(d->registry, m);
}

void daemon_usb_removed(void *userdata, const char *syspath) {
        struct daemon *d = userdata;
        struct mcu *m = registry_find_by_syspath(d->registry, syspath);

        if (!m || m->transport_id != MCU_TRANSPORT_USB)
                return;
        log_info("%s: bootloader device %s is gone.", m->id, m->device_path);
        daemon_mcu_gone(d, m, "left its bootloader or was unplugged");
}
