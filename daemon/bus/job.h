/* io.mcuflash1.Job objects under /io/mcuflash1/job/<n>: one fallback
 * vtable for all jobs, Cancel(), the Finished signal, PropertiesChanged and
 * the ObjectManager signals.  core/job.c calls the bus_job_*() functions as
 * a job comes, changes, finishes and goes. */
#pragma once

#include <stdint.h>

struct daemon;
struct job;

int bus_job_install(struct daemon *d);

void bus_job_added(struct daemon *d, struct job *j);
void bus_job_changed(struct daemon *d, struct job *j, uint64_t changed_mask);
void bus_job_finished(struct daemon *d, struct job *j);
void bus_job_removed(struct daemon *d, struct job *j);
