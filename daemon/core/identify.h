/* Identification of an MCU that speaks Klipper's protocol on a tty: open
 * the port (exclusively, never taking it from another process), run the
 * identify exchange, parse the dictionary.  identify_run() is the blocking
 * part for a worker thread; identify_apply() turns its outcome into MCU
 * state on the main thread. */
#pragma once

#include <stdint.h>

#include "core/mcu.h"
#include "image/dictionary.h"
#include "proto/katapult.h"
#include "transport/transport.h"

struct identify_request {
        char *mcu_id;
        uint64_t generation;
        char *device_path;
        unsigned baud;
        int timeout_ms;
        bool katapult;                  /* ask Katapult (CONNECT), not Klipper */
        pid_t pty_owner;                /* > 0: only open /dev/pts/pty_index of this klipper_mcu;
                                         * -1: a Linux MCU without one (never opened) */
        int pty_index;
        struct klipper_dict *dict;      /* result on success (Klipper) */
        struct katapult_info katapult_info; /* result on success (Katapult) */
};

int identify_request_new(const struct mcu *m, int timeout_ms, struct identify_request **ret);
struct identify_request *identify_request_free(struct identify_request *req);
DEFINE_TRIVIAL_CLEANUP_FUNC(struct identify_request *, identify_request_free);

/* Identify whatever speaks Klipper's protocol on @t (blocking): 0 with the
 * parsed dictionary in *ret, or -errno as klipper_identify() returns it
 * (-EPROTO for a dictionary that cannot be read). */
int identify_over(struct transport *t, int timeout_ms, struct klipper_dict **ret);

/* Worker-thread body: returns 0 (req->dict set) or -errno. */
int identify_run(void *userdata);

/* Apply the outcome @result of @req to @m (state, firmware fields, reason)
 * and recompute VersionMatchesHost against @host_version. */
void identify_apply(struct mcu *m, const struct identify_request *req, int result,
                    const char *host_version);

/* What Katapult's CONNECT told (@result >= 0) or why it failed. */
void identify_apply_katapult(struct mcu *m, const struct katapult_info *info, int result,
                             const char *where, const char *host_version);

/* The same for an identify that ran elsewhere (e.g. over CAN): @dict when
 * @result >= 0; @where names the link in messages. */
void identify_apply_result(struct mcu *m, const struct klipper_dict *dict, int result,
                           int timeout_ms, const char *where, const char *host_version);
