/* The registry: the set of MCUs the daemon knows, and the only place that
 * creates and destroys them.  Observers (the D-Bus layer) hear about every
 * addition, property change and removal; discovery and identification go
 * through registry_*() and never talk to D-Bus themselves.  Removal follows
 * bolt's order: observers are told first, then the MCU is freed. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/mcu.h"

#define MCU_OBJECT_PATH_PREFIX "/io/mcuflash1/mcu"

struct registry_observer {
        void (*added)(void *userdata, struct mcu *m);
        void (*changed)(void *userdata, struct mcu *m, uint64_t changed_mask);
        void (*removed)(void *userdata, struct mcu *m);
        void *userdata;
};

#define REGISTRY_OBSERVERS_MAX 2

struct registry {
        struct mcu **mcus;
        size_t n_mcus;
        struct registry_observer observers[REGISTRY_OBSERVERS_MAX];
        size_t n_observers;
};

int registry_new(struct registry **ret);
struct registry *registry_free(struct registry *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct registry *, registry_free);

/* Add an observer (the D-Bus layer, running jobs); called in the order
 * added.  -ENOSPC beyond REGISTRY_OBSERVERS_MAX. */
int registry_add_observer(struct registry *r, const struct registry_observer *o);

/* Take ownership of @m, give it its object path and announce it. On error
 * @m is freed. */
int registry_add(struct registry *r, struct mcu *m);

/* Announce the properties changed since the last commit. */
void registry_commit(struct registry *r, struct mcu *m);

/* Announce the removal and free @m. */
void registry_remove(struct registry *r, struct mcu *m);

struct mcu *registry_find_by_id(struct registry *r, const char *id);
struct mcu *registry_find_by_syspath(struct registry *r, const char *syspath);
struct mcu *registry_find_by_path(struct registry *r, const char *object_path);

/* Resolve what a user typed (design.md §3 GetMcu): id, printer.cfg name with
 * or without its "mcu " prefix ("mcu" alone is the main MCU), device path,
 * CAN UUID, USB serial or object path.  Names, UUIDs and serials compare
 * case-insensitively.  Returns NULL when nothing matches. */
struct mcu *registry_find_by_selector(struct registry *r, const char *selector);
