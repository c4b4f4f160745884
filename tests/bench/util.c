/* Helpers shared by evbench's files (see util.h). */
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void bench_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

int bench_write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fputs(text, f);
    return fclose(f) == 0 ? 0 : -errno;
}

void bench_log_tail(const char *path)
{
    char cmd[400];
    snprintf(cmd, sizeof(cmd), "tail -n 15 '%s' >&2", path);
    fprintf(stderr, "evbench: last lines of %s:\n", path);
    if (system(cmd) != 0)
        fprintf(stderr, "(no log)\n");
}

int bench_proc_stat(pid_t pid, char *state, pid_t *pgrp, long *ticks)
{
    char path[64], buf[2048], st_c;
    unsigned long ut, st;
    int pg;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p || sscanf(p + 2, "%c %*d %d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &st_c, &pg, &ut,
                     &st) != 4)
        return -1;
    if (state)
        *state = st_c;
    if (pgrp)
        *pgrp = (pid_t)pg;
    if (ticks)
        *ticks = (long)(ut + st);
    return 0;
}
