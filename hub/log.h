/* Levelled logging to stderr (and optionally syslog); safe to call from any thread. */
#ifndef HUB_LOG_H
#define HUB_LOG_H

#include <stdatomic.h>

enum {
    HUB_LOG_CRIT = 0,
    HUB_LOG_ERR = 1,
    HUB_LOG_WARN = 2,
    HUB_LOG_NOTICE = 3,
    HUB_LOG_INFO = 4,
    HUB_LOG_DEBUG = 5,
};

/* Current threshold; messages above it are not formatted at all. Any thread may read it while
 * the control socket changes it. */
extern atomic_int hub_log_level;

#define hub_log_enabled(l) ((l) <= atomic_load_explicit(&hub_log_level, memory_order_relaxed))
#define hub_log(l, ...)                                                                            \
    do {                                                                                           \
        if (hub_log_enabled(l))                                                                    \
            hub_log_write((l), __VA_ARGS__);                                                       \
    } while (0)

void hub_log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void hub_log_set_level(int level);
/* "crit", "err"/"error", "warn"/"warning", "notice", "info", "debug", or "0".."5".
 * Returns the level or -EINVAL. */
int hub_log_level_parse(const char *s);
const char *hub_log_level_name(int level);
/* Also send messages to syslog (facility daemon) under ident; 0 turns it off. */
void hub_log_set_syslog(int on, const char *ident);

#endif
