/* Levelled logging to stderr and optionally syslog. One write(2) per line keeps lines whole
 * when several threads log at once. */
#include "hub/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include <sys/time.h>

atomic_int hub_log_level = HUB_LOG_INFO;
static int use_syslog;

static const char *const names[] = {"crit", "err", "warn", "notice", "info", "debug"};
static const int syslog_prio[] = {LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG};

void hub_log_set_level(int level)
{
    if (level < HUB_LOG_CRIT)
        level = HUB_LOG_CRIT;
    if (level > HUB_LOG_DEBUG)
        level = HUB_LOG_DEBUG;
    atomic_store(&hub_log_level, level);
}

const char *hub_log_level_name(int level)
{
    if (level < HUB_LOG_CRIT || level > HUB_LOG_DEBUG)
        return "?";
    return names[level];
}

int hub_log_level_parse(const char *s)
{
    static const struct {
        const char *name;
        int level;
    } aliases[] = {{"error", HUB_LOG_ERR}, {"warning", HUB_LOG_WARN}};
    if (s[0] >= '0' && s[0] <= '5' && s[1] == '\0')
        return s[0] - '0';
    for (int i = 0; i <= HUB_LOG_DEBUG; i++) {
        if (strcasecmp(s, names[i]) == 0)
            return i;
    }
    for (size_t i = 0; i < sizeof(aliases) / sizeof(aliases[0]); i++) {
        if (strcasecmp(s, aliases[i].name) == 0)
            return aliases[i].level;
    }
    return -EINVAL;
}

void hub_log_set_syslog(int on, const char *ident)
{
    if (on && !use_syslog)
        openlog(ident ? ident : "evhub", LOG_PID | LOG_NDELAY, LOG_DAEMON);
    else if (!on && use_syslog)
        closelog();
    use_syslog = on;
}

void hub_log_write(int level, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    va_list ap;

    gettimeofday(&tv, NULL);
    localtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, sizeof(line),
                     "%04d-%02d-%02d %02d:%02d:%02d.%03d [%d] %s: ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000), (int)getpid(), hub_log_level_name(level));
    size_t hdr = (size_t)n;
    va_start(ap, fmt);
    n = vsnprintf(line + hdr, sizeof(line) - hdr - 1, fmt, ap);
    va_end(ap);
    size_t len = hdr + (n < 0 ? 0 : (size_t)n);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    if (use_syslog)
        syslog(syslog_prio[level], "%.*s", (int)(len - hdr), line + hdr);
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
