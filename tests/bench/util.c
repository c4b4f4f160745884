/* Helpers shared by evbench's files (see util.h). */
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
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
