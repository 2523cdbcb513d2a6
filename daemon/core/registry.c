/* Implementation of the registry: a small array of MCUs (a printer has a
 * handful), lookups by identity, and observer notification. */
#include <errno.h>
#include <stdlib.h>
#include <strings.h>

#include <systemd/sd-bus.h>

#include "core/registry.h"
#include "shared/strutil.h"

int registry_new(struct registry **ret) {
        struct registry *r = calloc(1, sizeof(*r));

        if (!r)
                return -ENOMEM;
        *ret = r;
        return 0;
}

struct registry *registry_free(struct registry *r) {
        if (!r)
                return NULL;
        for (size_t i = 0; i < r->n_mcus; i++)
                mcu_free(r->mcus[i]);
        free(r->mcus);
        free(r);
        return NULL;
}

int registry_add_observer(struct registry *r, const struct registry_observer *o) {
        if (r->n_observers >= REGISTRY_OBSERVERS_MAX)
                return -ENOSPC;
        r->observers[r->n_observers++] = *o;
        return 0;
}

int registry_add(struct registry *r, struct mcu *m) {
        struct mcu **n;
        char *path = NULL;
        int k;

        k = sd_bus_path_encode(MCU_OBJECT_PATH_PREFIX, m->id, &path);
        if (k < 0) {
                mcu_free(m);
                return k;
        }
        free(m->object_path);
        m->object_path = path;

        n = realloc(r->mcus, (r->n_mcus + 1) * sizeof(*n));
        if (!n) {
                mcu_free(m);
                return -ENOMEM;
        }
        r->mcus = n;
        r->mcus[r->n_mcus++] = m;
        m->changed = 0;
        for (size_t i = 0; i < r->n_observers; i++)
                if (r->observers[i].added)
                        r->observers[i].added(r->observers[i].userdata, m);
        return 0;
}

void registry_commit(struct registry *r, struct mcu *m) {
        uint64_t mask = m->changed;

        if (!mask)
                return;
        m->changed = 0;
        for (size_t i = 0; i < r->n_observers; i++)
                if (r->observers[i].changed)
                        r->observers[i].changed(r->observers[i].userdata, m, mask);
}

void registry_remove(struct registry *r, struct mcu *m) {
        for (size_t i = 0; i < r->n_mcus; i++) {
                if (r->mcus[i] != m)
                        continue;
                for (size_t k = 0; k < r->n_observers; k++)
                        if (r->observers[k].removed)
                                r->observers[k].removed(r->observers[k].userdata, m);
                r->mcus[i] = r->mcus[--r->n_mcus];
                mcu_free(m);
                return;
        }
}

struct mcu *registry_find_by_id(struct registry *r, const char *id) {
        /* mcu_new() stores the id as valid UTF-8; compare like with like. */
        _cleanup_free_ char *clean = utf8_sanitize(id);

        if (clean)
                id = clean;
        for (size_t i = 0; i < r->n_mcus; i++)
                if (streq(r->mcus[i]->id, id))
                        return r->mcus[i];
        return NULL;
}

struct mcu *registry_find_by_syspath(struct registry *r, const char *syspath) {
        for (size_t i = 0; i < r->n_mcus; i++)
                if (!isempty(r->mcus[i]->syspath) && streq(r->mcus[i]->syspath, syspath))
                        return r->mcus[i];
        return NULL;
}

struct mcu *registry_find_by_path(struct registry *r, const char *object_path) {
        for (size_t i = 0; i < r->n_mcus; i++)
                if (streq(r->mcus[i]->object_path, object_path))
                        return r->mcus[i];
        return NULL;
}

static bool name_matches(const char *name, const char *selector) {
        const char *short_name;

        if (isempty(name))
                return false;
        if (strcasecmp(name, selector) == 0)
                return true;
        /* "mcu eddy" is also reachable as "eddy". */
        short_name = startswith(name, "mcu ");
        return short_name && strcasecmp(short_name, selector) == 0;
}

struct mcu *registry_find_by_selector(struct registry *r, const char *selector) {
        struct mcu *m;

        if (isempty(selector))
                return NULL;

        /* Exact identities first, so that an id never loses to a name. */
        m = registry_find_by_id(r, selector);
        if (m)
                return m;
        m = registry_find_by_path(r, selector);
        if (m)
                return m;
        for (size_t i = 0; i < r->n_mcus; i++)
                if (name_matches(r->mcus[i]->name, selector))
                        return r->mcus[i];
        for (size_t i = 0; i < r->n_mcus; i++) {
                m = r->mcus[i];
                if ((!isempty(m->device_path) && streq(m->device_path, selector)) ||
                    (!isempty(m->can_uuid) && strcasecmp(m->can_uuid, selector) == 0) ||
                    (!isempty(m->usb_serial) && strcasecmp(m->usb_serial, selector) == 0))
                        return m;
        }
        return NULL;
}
