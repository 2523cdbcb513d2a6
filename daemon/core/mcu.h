/* One microcontroller as the daemon knows it: identity (chip serial, CAN
 * UUID or port), where it is attached, what it runs and in which state.
 * The struct is owned by the registry; discovery and identification change
 * it only through mcu_set_*(), which record which D-Bus properties changed
 * so that registry_commit() can announce them in one PropertiesChanged. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/version.h"
#include "shared/macro.h"

struct daemon;

enum mcu_transport {
        MCU_TRANSPORT_USB_SERIAL,
        MCU_TRANSPORT_SERIAL,
        MCU_TRANSPORT_CAN,
        MCU_TRANSPORT_USB,
        MCU_TRANSPORT_BLOCK,
        MCU_TRANSPORT_LINUX,
        _MCU_TRANSPORT_MAX,
};

enum mcu_state {
        MCU_STATE_UNKNOWN,
        MCU_STATE_APPLICATION,
        MCU_STATE_BOOTLOADER,
        MCU_STATE_FLASHING,
        MCU_STATE_REBOOTING,
        MCU_STATE_OFFLINE,
        _MCU_STATE_MAX,
};

/* One bit per D-Bus property of io.mcuflash1.Mcu; mcu_prop_name() gives the
 * property name. */
enum mcu_prop {
        MCU_PROP_NAME,
        MCU_PROP_TRANSPORT,
        MCU_PROP_DEVICE_PATH,
        MCU_PROP_CAN_INTERFACE,
        MCU_PROP_CAN_UUID,
        MCU_PROP_USB_VENDOR_ID,
        MCU_PROP_USB_PRODUCT_ID,
        MCU_PROP_USB_SERIAL,
        MCU_PROP_USB_PORT,
        MCU_PROP_STATE,
        MCU_PROP_STATE_REASON,
        MCU_PROP_BOOTLOADER,
        MCU_PROP_FIRMWARE,
        MCU_PROP_FIRMWARE_VERSION,
        MCU_PROP_BUILD_VERSIONS,
        MCU_PROP_BUILD_CONFIG,
        MCU_PROP_MCU_TYPE,
        MCU_PROP_FLASH_START,
        MCU_PROP_VERSION_MATCHES_HOST,
        MCU_PROP_JOB,
        _MCU_PROP_MAX,
};

/* FlashStart when nobody stated it (D-Bus shows it as is); 0 is a real
 * start (AVR, SAMD and LPC176x without a bootloader). */
#define MCU_FLASH_START_UNKNOWN UINT64_MAX

struct mcu {
        /* Exported as D-Bus properties.  Strings are never NULL once the MCU
         * is in the registry (mcu_new() sets them to ""). */
        char *id;
        char *object_path;
        char *name;
        const char *transport;          /* mcu_transport_to_string() */
        char *device_path;
        char *can_interface;
        char *can_uuid;
        uint16_t usb_vendor_id;
        uint16_t usb_product_id;
        char *usb_serial;
        char *usb_port;
        const char *state;              /* mcu_state_to_string() */
        char *state_reason;
        char *bootloader;
        char *firmware;
        char *firmware_version;
        char *build_versions;
        char *build_config;             /* embedded savedefconfig text, "" if unknown */
        char *mcu_type;
        uint64_t flash_start;           /* MCU_FLASH_START_UNKNOWN until stated; 0 is a real start */
        const char *version_matches_host;
        char *job;

        /* Internal. */
        enum mcu_transport transport_id;
        enum mcu_state state_id;
        char *syspath;                  /* udev syspath while attached */
        char *devlinks;                 /* udev DEVLINKS, space separated */
        unsigned baud;                  /* UART speed, 0 = leave as is */
        unsigned can_nodeid;            /* node id the daemon gave it, 0 = none */
        unsigned usb_busnum;            /* of a USB bootloader device */
        unsigned usb_devnum;
        bool speaks_katapult;           /* its link answers Katapult, not Klipper */
        pid_t pty_owner;                /* Linux process MCU: the klipper_mcu holding its pty's */
        int pty_index;                  /* master, and that pty's number (linuxmcu.c); 0 = none */
        bool link_busy;                 /* a job's worker is using the link */
        bool identifying;
        uint64_t identify_generation;   /* bumped when a running identify becomes stale */
        uint64_t identify_count;        /* identify outcomes applied so far (fresh answers) */
        uint64_t changed;               /* bitmask of enum mcu_prop */
        struct event *offline_timer;
        struct daemon *daemon;          /* the daemon that tracks it */
        void **pending_refresh;         /* sd_bus_message* waiting for identify (bus layer's) */
        size_t n_pending_refresh;
        uint64_t refresh_last_usec;     /* when Refresh last started an identify (bus layer's) */
        struct event *refresh_timer;    /* the next one, while calls wait for it (bus layer's) */
};

const char *mcu_transport_to_string(enum mcu_transport t);
const char *mcu_state_to_string(enum mcu_state s);
const char *mcu_prop_name(enum mcu_prop p);

/* Allocate an MCU with all strings "" and state unknown.  -ENOMEM. */
int mcu_new(const char *id, struct mcu **ret);
struct mcu *mcu_free(struct mcu *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct mcu *, mcu_free);

/* Setters: change the field and mark the property changed when the value
 * differs.  NULL strings are stored as "".  Return 0 or -ENOMEM. */
int mcu_set_string(struct mcu *m, enum mcu_prop p, const char *value);
void mcu_set_state(struct mcu *m, enum mcu_state s);
void mcu_set_transport(struct mcu *m, enum mcu_transport t);
void mcu_set_usb_ids(struct mcu *m, uint16_t vid, uint16_t pid);
void mcu_set_flash_start(struct mcu *m, uint64_t addr);
void mcu_set_version_match(struct mcu *m, enum version_match v);

/* Recompute VersionMatchesHost from FirmwareVersion and @host_version. */
void mcu_update_version_match(struct mcu *m, const char *host_version);
