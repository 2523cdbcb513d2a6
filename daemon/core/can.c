/* CAN MCUs: from CAN interfaces (discover/can.c) to Mcu objects.
 *
 * When an interface comes up (and on Rescan or Refresh) one worker job scans
 * it: the admin query finds every node that has no node id yet (Klipper and
 * Katapult both answer, with their UUID and application); each Klipper node
 * gets a node id from the daemon's own range (never one seen in traffic,
 * never one Klipper would give to a printer.cfg UUID) and is identified with
 * Klipper's protocol over CAN.  Nodes found before keep their node id and
 * are asked again on it.  A node that is assigned but not ours — answering
 * no query — is left alone while Klipper runs: its data comes from the
 * klippy API (klippy.c).  Only when the klippy API says that no Klipper runs
 * does the daemon (re)assign a printer.cfg node to identify it.
 *
 * The UUID is the MCU's identity, so an interface that goes down and up
 * again finds the same objects. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "bus/mcu.h"
#include "core/daemon-internal.h"
#include "core/identify.h"
#include "proto/canbus.h"
#include "proto/katapult.h"
#include "shared/log.h"
#include "transport/can.h"

#define CAN_QUERY_LISTEN_MS 1000
#define CAN_DEFAULT_INTERFACE "can0"

struct can_iface {
        char *name;
        bool up;
        uint32_t bitrate;
        bool scanning;
        bool scan_again;
        unsigned failed_scans;          /* in a row */
        struct event *retry;            /* after a failed scan */
        struct can_iface *next;
};

#define CAN_SCAN_RETRIES 3

struct can_scan_known {
        uint8_t uuid[CANBUS_UUID_LEN];
        unsigned nodeid;        /* the daemon's earlier assignment, 0 = none */
        bool may_assign;        /* nobody else can be using it: assign if silent */
};

struct can_scan_result {
        uint8_t uuid[CANBUS_UUID_LEN];
        uint8_t app;
        unsigned nodeid;
        bool answered_query;
        int result;
        struct klipper_dict *dict;
        struct katapult_info katapult;  /* app == Katapult, result >= 0 */
};

struct can_scan_job {
        struct daemon *daemon;
        char *ifname;
        int identify_timeout_ms;
        bool used[CANBUS_NODEID_MAX + 1];
        struct can_scan_known *known;
        size_t n_known;
        struct can_scan_result *results;
        size_t n_results;
};

static void can_scan_job_free(struct can_scan_job *job) {
        for (size_t i = 0; i < job->n_results; i++)
                klipper_dict_free(job->results[i].dict);
        free(job->results);
        free(job->known);
        free(job->ifname);
        free(job);
}

static struct can_iface *can_iface_find(struct daemon *d, const char *name) {
        for (struct can_iface *i = d->can_ifaces; i; i = i->next)
                if (streq(i->name, name))
                        return i;
        return NULL;
}

/* The interface printer.cfg puts @entry on (klippy's default is can0). */
static const char *printercfg_can_interface(const struct printercfg_mcu *entry) {
        return isempty(entry->canbus_interface) ? CAN_DEFAULT_INTERFACE : entry->canbus_interface;
}

/* ---- the worker part --------------------------------------------------- */

static struct can_scan_result *can_scan_add(struct can_scan_job *job, const uint8_t *uuid,
                                            uint8_t app, bool answered) {
        struct can_scan_result *n = realloc(job->results, (job->n_results + 1) * sizeof(*n));

        if (!n)
                return NULL;
        job->results = n;
        n = &job->results[job->n_results++];
        *n = (struct can_scan_result) { .app = app, .answered_query = answered, .result = -ENOMSG };
        memcpy(n->uuid, uuid, CANBUS_UUID_LEN);
        return n;
}

static int can_identify_node(struct can_scan_job *job, unsigned nodeid, struct klipper_dict **ret) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        r = can_stream_transport_open(job->ifname, nodeid, &t);
        if (r < 0)
                return r;
        return identify_over(t, job->identify_timeout_ms, ret);
}

static const struct can_scan_known *can_scan_known_find(struct can_scan_job *job, const uint8_t *uuid) {
        for (size_t i = 0; i < job->n_known; i++)
                if (memcmp(job->known[i].uuid, uuid, CANBUS_UUID_LEN) == 0)
                        return &job->known[i];
        return NULL;
}

/* Give @res a node id (its old one if it had one) and identify it. */
static void can_assign_and_identify(struct can_scan_job *job, int fd, struct can_scan_result *res,
                                    unsigned preferred) {
        int id = preferred ? (int) preferred : canbus_pick_nodeid(job->used);
        int r;

        if (id < 0) {
                res->result = id;
                return;
        }
        job->used[id] = true;
        r = canbus_set_klipper_nodeid(fd, res->uuid, (unsigned) id);
        if (r < 0) {
                res->result = r;
                return;
        }
        res->nodeid = (unsigned) id;
        res->result = can_identify_node(job, (unsigned) id, &res->dict);
}

/* Katapult on CAN: give it a node id of Katapult's range (128 and up;
 * flashtool.py's first is 129) and ask CONNECT where the application goes. */
static void can_connect_katapult(struct can_scan_job *job, int fd, struct can_scan_result *res,
                                 unsigned nodeid) {
        _cleanup_(transport_freep) struct transport *t = NULL;
        int r;

        r = canbus_set_katapult_nodeid(fd, res->uuid, nodeid);
        if (r >= 0)
                r = can_stream_transport_open(job->ifname, nodeid, &t);
        if (r >= 0)
                r = katapult_connect(t, job->identify_timeout_ms, &res->katapult);
        res->nodeid = nodeid;
        res->result = r;
}

static int can_scan_run(void *userdata) {
        struct can_scan_job *job = userdata;
        _cleanup_free_ struct canbus_node *nodes = NULL;
        _cleanup_close_ int fd = -1;
        unsigned katapult_nodeid = CANBUS_NODEID_KATAPULT;
        int n;

        fd = can_socket_open(job->ifname, NULL, 0);
        if (fd < 0)
                return fd;
        /* Our own earlier assignments are taken: new nodes get other ids. */
        for (size_t i = 0; i < job->n_known; i++)
                if (job->known[i].nodeid)
                        job->used[job->known[i].nodeid] = true;

        n = canbus_query(fd, CAN_QUERY_LISTEN_MS, job->used, &nodes);
        if (n < 0)
                return n;

        for (int i = 0; i < n; i++) {
                const struct can_scan_known *k = can_scan_known_find(job, nodes[i].uuid);
                struct can_scan_result *res = can_scan_add(job, nodes[i].uuid, nodes[i].app, true);

                if (!res)
                        return -ENOMEM;
                if (nodes[i].app == CANBUS_APP_KATAPULT) {
                        can_connect_katapult(job, fd, res, katapult_nodeid++);
                        continue;
                }
                if (nodes[i].app != CANBUS_APP_KLIPPER) {
                        res->result = 0;        /* something else: found, not asked */
                        continue;
                }
                can_assign_and_identify(job, fd, res, k ? k->nodeid : 0);
        }

        /* Nodes known from before or from printer.cfg that did not answer
         * the query: they have a node id already. */
        for (size_t i = 0; i < job->n_known; i++) {
                struct can_scan_known *k = &job->known[i];
                struct can_scan_result *res;
                bool answered = false;

                for (size_t j = 0; j < job->n_results; j++)
                        if (memcmp(job->results[j].uuid, k->uuid, CANBUS_UUID_LEN) == 0)
                                answered = true;
                if (answered || (!k->nodeid && !k->may_assign))
                        continue;
                res = can_scan_add(job, k->uuid, CANBUS_APP_KLIPPER, false);
                if (!res)
                        return -ENOMEM;
                if (k->nodeid) {
                        /* Still on the id we gave it?  Talking to our own id
                         * disturbs nobody. */
                        res->nodeid = k->nodeid;
                        res->result = can_identify_node(job, k->nodeid, &res->dict);
                        if (res->result >= 0 || !k->may_assign)
                                continue;
                        klipper_dict_free(res->dict);
                        res->dict = NULL;
                }
                can_assign_and_identify(job, fd, res, k->nodeid);
        }
        return 0;
}

/* ---- the main-loop part ------------------------------------------------ */

static bool can_mcu_on(const struct mcu *m, const char *ifname) {
        return m->transport_id == MCU_TRANSPORT_CAN && streq(m->can_interface, ifname);
}

/* Is the node with @uuid in the middle of a job's transfer (a flasher
 * talks to it)?  A scan then neither asks it nor trusts what it heard. */
static bool can_uuid_link_busy(struct daemon *d, const char *uuid) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                if (m->transport_id == MCU_TRANSPORT_CAN && m->link_busy && strcaseeq_ptr(m->can_uuid, uuid))
                        return true;
        }
        return false;
}

static void can_apply_result(struct daemon *d, const char *ifname, const struct can_scan_result *res) {
        char uuid[CANBUS_UUID_STRING_LEN], where[64];
        struct mcu *m;
        bool is_new = false;

        canbus_uuid_to_string(res->uuid, uuid);
        m = registry_find_by_id(d->registry, uuid);
        if (m && m->link_busy) {
                log_debug("%s: being flashed; scan result ignored.", m->id);
                return;
        }
        if (!m) {
                if (mcu_new(uuid, &m) < 0) {
                        log_oom();
                        return;
                }
                m->daemon = d;
                is_new = true;
        }
        daemon_cancel_offline_timer(m);
        mcu_set_transport(m, MCU_TRANSPORT_CAN);
        (void) mcu_set_string(m, MCU_PROP_CAN_INTERFACE, ifname);
        (void) mcu_set_string(m, MCU_PROP_CAN_UUID, uuid);
        if (res->nodeid)
                m->can_nodeid = res->nodeid;
        m->speaks_katapult = false;
        m->identifying = false;

        snprintf(where, sizeof(where), "%s node %u", ifname, res->nodeid);
        if (res->app == CANBUS_APP_KATAPULT) {
                m->speaks_katapult = true;
                identify_apply_katapult(m, &res->katapult, res->result, where, d->host_version);
        } else if (res->app != CANBUS_APP_KLIPPER) {
                char reason[96];

                snprintf(reason, sizeof(reason), "answers with unknown application id 0x%02x", res->app);
                mcu_set_state(m, MCU_STATE_UNKNOWN);
                (void) mcu_set_string(m, MCU_PROP_STATE_REASON, reason);
        } else
                identify_apply_result(m, res->dict, res->result, 0, where, d->host_version);

        daemon_apply_printercfg(d, m);
        if (is_new) {
                log_info("%s: found on %s%s%s", m->id, ifname, isempty(m->name) ? "" : " as ", m->name);
                if (registry_add(d->registry, m) < 0) {
                        log_oom();
                        return;
                }
        } else
                registry_commit(d->registry, m);
        bus_mcu_complete_refresh(d, m, res->app == CANBUS_APP_KLIPPER ? res->result : 0);
}

static void can_scan_start(struct daemon *d, struct can_iface *iface);

struct can_retry {
        struct daemon *daemon;
        char *ifname;
};

static void on_can_retry(evutil_socket_t fd, short what, void *userdata) {
        struct can_retry *retry = userdata;
        struct can_iface *iface = can_iface_find(retry->daemon, retry->ifname);

        if (iface) {
                event_free(iface->retry);
                iface->retry = NULL;
                can_scan_start(retry->daemon, iface);
        }
        free(retry->ifname);
        free(retry);
}

static void can_iface_retry_later(struct daemon *d, struct can_iface *iface) {
        struct timeval tv = { .tv_sec = 1 };
        struct can_retry *retry;

        if (iface->retry)
                return;
        retry = calloc(1, sizeof(*retry));
        if (!retry || !(retry->ifname = strdup(iface->name))) {
                free(retry);
                return;
        }
        retry->daemon = d;
        iface->retry = evtimer_new(d->base, on_can_retry, retry);
        if (!iface->retry || evtimer_add(iface->retry, &tv) < 0) {
                if (iface->retry)
                        event_free(iface->retry);
                iface->retry = NULL;
                free(retry->ifname);
                free(retry);
        }
}

static void can_iface_free(struct can_iface *iface) {
        if (iface->retry) {
                struct can_retry *retry = event_get_callback_arg(iface->retry);

                event_free(iface->retry);
                free(retry->ifname);
                free(retry);
        }
        free(iface->name);
        free(iface);
}

static void can_scan_done(void *userdata, int result) {
        struct can_scan_job *job = userdata;
        struct daemon *d = job->daemon;
        struct can_iface *iface;

        if (result == -ECANCELED) {
                can_scan_job_free(job);
                return;
        }
        iface = can_iface_find(d, job->ifname);
        if (iface)
                iface->scanning = false;
        if (result < 0) {
                log_warning_errno(result, "Scanning CAN interface %s failed: %m", job->ifname);
                /* An interface that was just announced may not take sockets
                 * yet (or was reconfigured): try again shortly. */
                if (iface && iface->up && ++iface->failed_scans <= CAN_SCAN_RETRIES)
                        can_iface_retry_later(d, iface);
        } else if (iface)
                iface->failed_scans = 0;

        for (size_t i = 0; result >= 0 && i < job->n_results; i++)
                can_apply_result(d, job->ifname, &job->results[i]);

        /* Whatever was on this interface and did not answer is not there. */
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];
                bool seen = false;
                char reason[96];

                if (!can_mcu_on(m, job->ifname) || m->link_busy)
                        continue;
                if (daemon_mcu_held_by_klipper(d, m)) {
                        /* Not asked: Klipper has it.  Refresh says so. */
                        m->identifying = false;
                        bus_mcu_complete_refresh(d, m, -EBUSY);
                        continue;
                }
                for (size_t j = 0; result >= 0 && j < job->n_results; j++) {
                        char uuid[CANBUS_UUID_STRING_LEN];

                        canbus_uuid_to_string(job->results[j].uuid, uuid);
                        seen = seen || streq(uuid, m->id);
                }
                if (seen)
                        continue;
                if (m->state_id == MCU_STATE_OFFLINE) {
                        m->identifying = false;
                        bus_mcu_complete_refresh(d, m, -ENODEV);
                        continue;
                }
                snprintf(reason, sizeof(reason), "does not answer on %s", job->ifname);
                log_info("%s: %s; offline.", m->id, reason);
                m->identifying = false;
                daemon_mcu_gone(d, m, reason);
        }

        if (iface && iface->up && iface->scan_again) {
                iface->scan_again = false;
                can_scan_start(d, iface);
        }
        can_scan_job_free(job);
}

static int can_scan_job_add_known(struct can_scan_job *job, const char *uuid_string, unsigned nodeid,
                                  bool may_assign) {
        uint8_t uuid[CANBUS_UUID_LEN];
        struct can_scan_known *n;

        if (canbus_uuid_from_string(uuid_string, uuid) < 0)
                return 0;
        for (size_t i = 0; i < job->n_known; i++)
                if (memcmp(job->known[i].uuid, uuid, CANBUS_UUID_LEN) == 0) {
                        if (nodeid)
                                job->known[i].nodeid = nodeid;
                        job->known[i].may_assign = job->known[i].may_assign || may_assign;
                        return 0;
                }
        n = realloc(job->known, (job->n_known + 1) * sizeof(*n));
        if (!n)
                return -ENOMEM;
        job->known = n;
        n = &job->known[job->n_known++];
        memcpy(n->uuid, uuid, CANBUS_UUID_LEN);
        n->nodeid = nodeid;
        n->may_assign = may_assign;
        return 0;
}

static void can_scan_start(struct daemon *d, struct can_iface *iface) {
        struct can_scan_job *job;
        unsigned klipper_nodes = 0;
        int r;

        if (!iface->up)
                return;
        if (iface->scanning) {
                iface->scan_again = true;
                return;
        }
        job = calloc(1, sizeof(*job));
        if (!job || !(job->ifname = strdup(iface->name))) {
                free(job);
                log_oom();
                return;
        }
        job->daemon = d;
        job->identify_timeout_ms = (int) MIN(d->config->identify_timeout_usec / 1000, 600000);

        /* Node ids Klipper gives: 4, 5, … in printer.cfg order (canbus_ids.py). */
        for (size_t i = 0; d->printercfg && i < d->printercfg->n_mcus; i++)
                if (!isempty(d->printercfg->mcus[i].canbus_uuid))
                        klipper_nodes++;
        for (unsigned i = 0; i < klipper_nodes && CANBUS_NODEID_KLIPPER_FIRST + i <= CANBUS_NODEID_MAX; i++)
                job->used[CANBUS_NODEID_KLIPPER_FIRST + i] = true;

        r = 0;
        /* Nodes the daemon itself gave an id before. */
        for (size_t i = 0; r >= 0 && i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                /* Only Klipper nodes on the daemon's own ids: a Katapult id is
                 * gone once the node runs Klipper again. */
                if (can_mcu_on(m, iface->name) && m->can_nodeid >= CANBUS_NODEID_DAEMON_FIRST &&
                    m->can_nodeid <= CANBUS_NODEID_DAEMON_LAST && !daemon_mcu_held_by_klipper(d, m) &&
                    !m->link_busy)
                        r = can_scan_job_add_known(job, m->can_uuid, m->can_nodeid, false);
        }
        /* printer.cfg's nodes on this interface: only when the klippy API
         * says that no Klipper runs may the daemon take them over. */
        for (size_t i = 0; r >= 0 && d->printercfg && i < d->printercfg->n_mcus; i++) {
                const struct printercfg_mcu *e = &d->printercfg->mcus[i];

                if (!isempty(e->canbus_uuid) && streq(printercfg_can_interface(e), iface->name) &&
                    d->klippy_says_stopped && !can_uuid_link_busy(d, e->canbus_uuid))
                        r = can_scan_job_add_known(job, e->canbus_uuid, 0, true);
        }
        if (r >= 0)
                r = worker_start(d->workers, can_scan_run, can_scan_done, job);
        if (r < 0) {
                log_error_errno(r, "Cannot scan CAN interface %s: %m", iface->name);
                can_scan_job_free(job);
                return;
        }
        iface->scanning = true;
        for (size_t i = 0; i < d->registry->n_mcus; i++)
                if (can_mcu_on(d->registry->mcus[i], iface->name))
                        d->registry->mcus[i]->identifying = true;
        log_debug("Scanning CAN interface %s.", iface->name);
}

/* Every MCU on @ifname goes offline with @reason. */
static void can_iface_offline(struct daemon *d, const char *ifname, const char *reason) {
        for (size_t i = 0; i < d->registry->n_mcus; i++) {
                struct mcu *m = d->registry->mcus[i];

                if (can_mcu_on(m, ifname) && m->state_id != MCU_STATE_OFFLINE && !daemon_mcu_held_by_klipper(d, m))
                        daemon_mcu_gone(d, m, reason);
        }
}

static void can_iface_changed(void *userdata, const struct can_iface_info *info) {
        struct daemon *d = userdata;
        struct can_iface *iface = can_iface_find(d, info->name);
        bool was_up;
        char reason[64];

        if (!iface) {
                iface = calloc(1, sizeof(*iface));
                if (!iface || !(iface->name = strdup(info->name))) {
                        free(iface);
                        log_oom();
                        return;
                }
                iface->next = d->can_ifaces;
                d->can_ifaces = iface;
        }
        was_up = iface->up;
        iface->up = info->up;
        iface->bitrate = info->bitrate;
        if (info->up && !was_up) {
                if (info->bitrate)
                        log_info("CAN interface %s is up at %u bit/s (%s).", info->name, info->bitrate, info->state);
                else
                        log_info("CAN interface %s is up (%s).", info->name, info->state);
                can_scan_start(d, iface);
        } else if (!info->up && was_up) {
                log_info("CAN interface %s is down.", info->name);
                snprintf(reason, sizeof(reason), "CAN interface %s is down", info->name);
                can_iface_offline(d, info->name, reason);
        }
}

static void can_iface_gone(void *userdata, const char *name) {
        struct daemon *d = userdata;
        char reason[64];

        log_info("CAN interface %s is gone.", name);
        snprintf(reason, sizeof(reason), "CAN interface %s is gone", name);
        can_iface_offline(d, name, reason);
        for (struct can_iface **i = &d->can_ifaces; *i; i = &(*i)->next)
                if (streq((*i)->name, name)) {
                        struct can_iface *dead = *i;

                        /* A scan still running finds no interface and only
                         * applies its results. */
                        *i = dead->next;
                        can_iface_free(dead);
                        return;
                }
}

int daemon_can_start(struct daemon *d) {
        static const struct can_watch_callbacks callbacks = {
                .changed = can_iface_changed,
                .gone = can_iface_gone,
        };
        struct can_watch_callbacks cb = callbacks;

        cb.userdata = d;
        return can_watch_new(d->base, &cb, &d->can_watch);
}

void daemon_can_stop(struct daemon *d) {
        d->can_watch = can_watch_free(d->can_watch);
        while (d->can_ifaces) {
                struct can_iface *i = d->can_ifaces;

                d->can_ifaces = i->next;
                can_iface_free(i);
        }
}

void daemon_can_rescan(struct daemon *d, const char *ifname) {
        for (struct can_iface *i = d->can_ifaces; i; i = i->next)
                if (!ifname || streq(i->name, ifname))
                        can_scan_start(d, i);
}

bool daemon_can_interface_up(struct daemon *d, const char *ifname) {
        struct can_iface *i = can_iface_find(d, ifname);

        return i && i->up;
}
