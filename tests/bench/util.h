/* Helpers shared by evbench's files. */
#ifndef EVBENCH_UTIL_H
#define EVBENCH_UTIL_H

#include <sys/types.h>

/* Sleep ms milliseconds, resuming after signals. */
void bench_sleep_ms(long ms);
/* Write text to path (created or truncated). 0 or a negative errno. */
int bench_write_file(const char *path, const char *text);

/* Print the last lines of the log at path on stderr (to explain a failed start). */
void bench_log_tail(const char *path);

/* State, process group and utime + stime (clock ticks) of pid from /proc/PID/stat; any out
 * pointer may be NULL. Returns 0 or -1. */
int bench_proc_stat(pid_t pid, char *state, pid_t *pgrp, long *ticks);

#endif
