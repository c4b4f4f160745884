/* Unit tests for the INI configuration: defaults from the rows, each key, strict values, error
 * messages with file:line, relative script paths, host:port splitting, and the sections modules
 * own (lists, named instances, freeing). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hub/alloc.h"
#include "hub/config.h"
#include "hub/log.h"

#define GiB (1024UL * 1024 * 1024)

/* A config file under /tmp, removed by the test that made it. */
static void write_conf(char *path, size_t pathlen, const char *text)
{
    snprintf(path, pathlen, "/tmp/evhub_test_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t n = strlen(text);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    close(fd);
}

/* Load text as a file; returns the result, err gets the message. */
static int load_text(hub_config *c, const char *text, char *path, size_t pathlen, char *err,
                     size_t errlen)
{
    write_conf(path, pathlen, text);
    int rc = hub_config_load(c, path, err, errlen);
    unlink(path);
    return rc;
}

/* Load text and expect failure with "<path>:<line>: <reason>". */
static void expect_error(const char *text, int line, const char *reason)
{
    hub_config c;
    char path[64], err[512], want[512];
    hub_config_defaults(&c);
    int rc = load_text(&c, text, path, sizeof(path), err, sizeof(err));
    snprintf(want, sizeof(want), "%s:%d: %s", path, line, reason);
    assert_int_equal(rc, -EINVAL);
    assert_string_equal(err, want);
}

static void test_config_defaults_match_header(void **state)
{
    (void)state;
    hub_config c;
    hub_config_defaults(&c);
    assert_string_equal(c.bind_addr, "127.0.0.1:8448");
    assert_int_equal(c.backlog, 128);
    assert_int_equal(c.workers, 1);
    assert_int_equal(c.netstring_format, 1);
    assert_int_equal(c.max_clients, 1024);
    assert_int_equal(c.max_frame_size, 1024 * 1024);
    assert_int_equal(c.max_outbuf, 8 * 1024 * 1024);
    assert_int_equal(c.outbuf_policy, HUB_OUTBUF_CLOSE);
    assert_int_equal(c.unicast_policy, HUB_UNICAST_FIRST);
    assert_string_equal(c.event_callback, "");
    assert_int_equal(c.wait_idle, 500000);
    assert_int_equal(c.wait_increase, 3);
    assert_int_equal(c.worker_queue, 4096);
    assert_int_equal(c.shutdown_timeout, 5000);
    assert_string_equal(c.script, "");
    assert_int_equal(c.max_instructions, 100000000);
    assert_int_equal(c.max_memory, 0);
    assert_int_equal(c.log_level, HUB_LOG_INFO);
    assert_int_equal(c.log_syslog, 0);
    assert_string_equal(c.control_socket, "/run/evhub/evhub.sock");
    assert_string_equal(c.control_tcp, "");
}

static void test_config_every_key_is_parsed(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    const char *text = "; evhub test config\n"
                       "# hash comment\n"
                       "[evapi]\n"
                       "bind_addr = [::1]:9000\n"
                       "backlog = 511\n"
                       "workers = 0\n"
                       "netstring_format = 0\n"
                       "max_clients = 1000000\n"
                       "max_frame_size = 64k\n"
                       "max_outbuf = 2M\n"
                       "outbuf_policy = drop\n"
                       "unicast = round_robin\n"
                       "event_callback = ksr_evapi_event\n"
                       "wait_idle = 1000\n"
                       "wait_increase = 100\n"
                       "worker_queue = 10000000\n"
                       "shutdown_timeout = 0\n"
                       "[lua]\n"
                       "script = /etc/evhub/handler.lua\n"
                       "max_instructions = 0\n"
                       "max_memory = 1g\n"
                       "[log]\n"
                       "level = debug\n"
                       "syslog = yes\n";
    assert_int_equal(load_text(&c, text, path, sizeof(path), err, sizeof(err)), 0);
    assert_string_equal(c.bind_addr, "[::1]:9000");
    assert_int_equal(c.backlog, 511);
    assert_int_equal(c.workers, 0);
    assert_int_equal(c.netstring_format, 0);
    assert_int_equal(c.max_clients, 1000000);
    assert_int_equal(c.max_frame_size, 64 * 1024);
    assert_int_equal(c.max_outbuf, 2 * 1024 * 1024);
    assert_int_equal(c.outbuf_policy, HUB_OUTBUF_DROP);
    assert_int_equal(c.unicast_policy, HUB_UNICAST_RROBIN);
    assert_string_equal(c.event_callback, "ksr_evapi_event");
    assert_int_equal(c.wait_idle, 1000);
    assert_int_equal(c.wait_increase, 100);
    assert_int_equal(c.worker_queue, 10000000);
    assert_int_equal(c.shutdown_timeout, 0);
    assert_string_equal(c.script, "/etc/evhub/handler.lua");
    assert_int_equal(c.max_instructions, 0);
    assert_int_equal(c.max_memory, GiB);
    assert_int_equal(c.log_level, HUB_LOG_DEBUG);
    assert_int_equal(c.log_syslog, 1);
}

static void test_config_empty_file_keeps_defaults(void **state)
{
    (void)state;
    hub_config c, d;
    char path[64], err[512];
    hub_config_defaults(&c);
    hub_config_defaults(&d);
    assert_int_equal(load_text(&c, "", path, sizeof(path), err, sizeof(err)), 0);
    /* Only the name of the file read changes. */
    assert_string_equal(c.file, path);
    snprintf(d.file, sizeof(d.file), "%s", path);
    assert_memory_equal(&c, &d, sizeof(c));
}

/* ---- values through hub_config_set ------------------------------------------------------ */

typedef struct set_case {
    const char *section, *key, *value;
    const char *err; /* NULL: accepted */
} set_case;

static const set_case set_cases[] = {
    {"evapi", "max_frame_size", "1", NULL},
    {"evapi", "max_frame_size", "1k", NULL},
    {"evapi", "max_frame_size", "1K", NULL},
    {"evapi", "max_frame_size", "3m", NULL},
    {"evapi", "max_frame_size", "1G", NULL},
    {"evapi", "max_frame_size", "0", "max_frame_size: '0' is out of range 1..1073741824"},
    {"evapi", "max_frame_size", "2g", "max_frame_size: '2g' is out of range 1..1073741824"},
    {"evapi", "max_frame_size", "1073741825",
     "max_frame_size: '1073741825' is out of range 1..1073741824"},
    {"evapi", "max_frame_size", "99999999999999999999g",
     "max_frame_size: '99999999999999999999g' is out of range 1..1073741824"},
    {"evapi", "max_frame_size", "1kb",
     "max_frame_size: '1kb' is not a size (bytes, or a number with k, m or g)"},
    {"evapi", "max_frame_size", "1.5m",
     "max_frame_size: '1.5m' is not a size (bytes, or a number with k, m or g)"},
    {"evapi", "max_frame_size", "k",
     "max_frame_size: 'k' is not a size (bytes, or a number with k, m or g)"},
    {"evapi", "max_frame_size", "-1",
     "max_frame_size: '-1' is not a size (bytes, or a number with k, m or g)"},
    {"evapi", "max_frame_size", "1t",
     "max_frame_size: '1t' is not a size (bytes, or a number with k, m or g)"},
    {"evapi", "max_outbuf", "1023", "max_outbuf: '1023' is out of range 1024..1073741824"},
    {"evapi", "max_outbuf", "1k", NULL},
    {"evapi", "max_clients", "0", "max_clients: '0' is out of range 1..1000000"},
    {"evapi", "max_clients", "12abc", "max_clients: '12abc' is not an integer"},
    {"evapi", "max_clients", "", "max_clients: '' is not an integer"},
    {"evapi", "max_clients", "0x10", "max_clients: '0x10' is not an integer"},
    {"evapi", "max_clients", "+5", "max_clients: '+5' is not an integer"},
    {"evapi", "max_clients", "1k", "max_clients: '1k' is not an integer"},
    {"evapi", "max_clients", "99999999999999999999999",
     "max_clients: '99999999999999999999999' is out of range 1..1000000"},
    {"evapi", "max_clients", "-9223372036854775808",
     "max_clients: '-9223372036854775808' is out of range 1..1000000"},
    {"evapi", "backlog", "65535", NULL},
    {"evapi", "backlog", "65536", "backlog: '65536' is out of range 1..65535"},
    {"evapi", "workers", "64", NULL},
    {"evapi", "workers", "-1", "workers: '-1' is out of range 0..64"},
    {"evapi", "netstring_format", "2", "netstring_format: '2' is out of range 0..1"},
    {"evapi", "wait_idle", "0", "wait_idle: '0' is out of range 1..60000000"},
    {"evapi", "wait_increase", "101", "wait_increase: '101' is out of range 1..100"},
    {"evapi", "worker_queue", "0", "worker_queue: '0' is out of range 1..10000000"},
    {"evapi", "shutdown_timeout", "600001", "shutdown_timeout: '600001' is out of range 0..600000"},
    {"evapi", "outbuf_policy", "close", NULL},
    {"evapi", "outbuf_policy", "Drop", "outbuf_policy: 'Drop' must be close or drop"},
    {"evapi", "unicast", "first", NULL},
    {"evapi", "unicast", "random", "unicast: 'random' must be first or round_robin"},
    {"evapi", "unicast_policy", "first", "unknown key 'unicast_policy' in section [evapi]"},
    {"evapi", "event_callback", "", NULL},
    {"evapi", "event_callback", "_on_event2", NULL},
    {"evapi", "event_callback", "2fast", "event_callback: '2fast' is not a Lua identifier"},
    {"evapi", "event_callback", "a.b", "event_callback: 'a.b' is not a Lua identifier"},
    {"evapi", "event_callback", "end", "event_callback: 'end' is not a Lua identifier"},
    {"evapi", "bind_addr", "0.0.0.0:1", NULL},
    {"evapi", "bind_addr", "::1:8448",
     "bind_addr: '::1:8448' is not host:port or [v6]:port with a port in 0..65535"},
    {"evapi", "bind_addr", "127.0.0.1:0", NULL},
    {"evapi", "bind_addr", "127.0.0.1:65536",
     "bind_addr: '127.0.0.1:65536' is not host:port or [v6]:port with a port in 0..65535"},
    {"lua", "max_instructions", "9223372036854775807", NULL},
    {"lua", "max_instructions", "-1",
     "max_instructions: '-1' is out of range 0..9223372036854775807"},
    {"lua", "max_memory", "0", NULL},
    {"lua", "max_memory", "512M", NULL},
    {"lua", "max_memory", "256k", NULL},
    {"lua", "max_memory", "1k",
     "max_memory: '1k' must be 0 (off) or in 262144..9223372036854775807"},
    {"log", "level", "warning", NULL},
    {"log", "level", "3", NULL},
    {"log", "level", "loud", "level: 'loud' must be crit, err, warn, notice, info or debug"},
    {"log", "syslog", "2", "syslog: '2' is not a boolean (yes/no, true/false, on/off, 1/0)"},
    {"log", "syslog", "", "syslog: '' is not a boolean (yes/no, true/false, on/off, 1/0)"},
    {"log", "colour", "yes", "unknown key 'colour' in section [log]"},
    {"control", "socket", "", NULL},
    {"control", "socket", "/run/evhub/evhub.sock", NULL},
    {"control", "socket",
     "/a/very/long/path/that/cannot/be/a/unix/socket/because/sun_path/holds/only/one/hundred/"
     "and/eight/bytes/x.sock",
     "socket: value is too long (max 107 bytes)"},
    {"control", "tcp", "", NULL},
    {"control", "tcp", "127.0.0.1:8449", NULL},
    {"control", "tcp", "127.1.2.3:0", NULL},
    {"control", "tcp", "[::1]:8449", NULL},
    {"control", "tcp", "0.0.0.0:8449",
     "tcp: '0.0.0.0:8449' is not a numeric loopback address (127.x.x.x or [::1]); the control "
     "socket has no authentication"},
    {"control", "tcp", "localhost:8449",
     "tcp: 'localhost:8449' is not a numeric loopback address (127.x.x.x or [::1]); the control "
     "socket has no authentication"},
    {"control", "tcp", "8449", "tcp: '8449' is not host:port or [v6]:port with a port in 0..65535"},
    {"control", "user", "x", "unknown key 'user' in section [control]"},
    {"kafka", "brokers", "x", "unknown section [kafka] (not supported by this build)"},
    {"", "backlog", "1", "key 'backlog' is outside any section"},
};

static void test_config_set_validates_each_value(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(set_cases) / sizeof(set_cases[0]); i++) {
        const set_case *t = &set_cases[i];
        hub_config c, before;
        char err[256] = "";
        hub_config_defaults(&c);
        before = c;
        int rc = hub_config_set(&c, t->section, t->key, t->value, err, sizeof(err));
        if (!t->err && rc != 0)
            fail_msg("[%s] %s = '%s': rejected: %s", t->section, t->key, t->value, err);
        if (t->err) {
            if (rc != -EINVAL || strcmp(err, t->err) != 0)
                fail_msg("[%s] %s = '%s': rc %d err '%s', want '%s'", t->section, t->key, t->value,
                         rc, err, t->err);
            /* A rejected value leaves the config as it was. */
            assert_memory_equal(&c, &before, sizeof(c));
        }
    }
}

static void test_config_set_stores_parsed_values(void **state)
{
    (void)state;
    hub_config c;
    char err[256];
    hub_config_defaults(&c);
    assert_int_equal(hub_config_set(&c, "evapi", "max_frame_size", "3m", err, sizeof(err)), 0);
    assert_int_equal(c.max_frame_size, 3 * 1024 * 1024);
    assert_int_equal(hub_config_set(&c, "evapi", "max_frame_size", "7K", err, sizeof(err)), 0);
    assert_int_equal(c.max_frame_size, 7 * 1024);
    assert_int_equal(hub_config_set(&c, "lua", "max_memory", "512M", err, sizeof(err)), 0);
    assert_int_equal(c.max_memory, 512UL * 1024 * 1024);
    assert_int_equal(hub_config_set(&c, "log", "level", "warning", err, sizeof(err)), 0);
    assert_int_equal(c.log_level, HUB_LOG_WARN);
    assert_int_equal(hub_config_set(&c, "evapi", "bind_addr", "0.0.0.0:1", err, sizeof(err)), 0);
    assert_string_equal(c.bind_addr, "0.0.0.0:1");
    /* From the command line a relative script path stays relative to the cwd. */
    assert_int_equal(hub_config_set(&c, "lua", "script", "handler.lua", err, sizeof(err)), 0);
    assert_string_equal(c.script, "handler.lua");
    /* A NULL err buffer is allowed. */
    assert_int_equal(hub_config_set(&c, "evapi", "backlog", "x", NULL, 0), -EINVAL);
}

static void test_config_booleans_accept_all_spellings(void **state)
{
    (void)state;
    static const char *const yes[] = {"yes", "true", "on", "1", "YES", "True"};
    static const char *const no[] = {"no", "false", "off", "0", "No", "OFF"};
    hub_config c;
    char err[256];
    hub_config_defaults(&c);
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        c.log_syslog = 0;
        assert_int_equal(hub_config_set(&c, "log", "syslog", yes[i], err, sizeof(err)), 0);
        assert_int_equal(c.log_syslog, 1);
        assert_int_equal(hub_config_set(&c, "log", "syslog", no[i], err, sizeof(err)), 0);
        assert_int_equal(c.log_syslog, 0);
    }
}

static void test_config_value_too_long_is_rejected(void **state)
{
    (void)state;
    hub_config c;
    char err[256], v[300];
    hub_config_defaults(&c);
    memset(v, 'a', sizeof(v) - 1);
    v[sizeof(v) - 1] = '\0';
    assert_int_equal(hub_config_set(&c, "evapi", "event_callback", v, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "event_callback: value is too long (max 127 bytes)");
}

/* ---- file errors carry file:line ------------------------------------------------------- */

static void test_config_bad_value_reports_file_and_line(void **state)
{
    (void)state;
    expect_error("[evapi]\n"
                 "bind_addr = 127.0.0.1:8448\n"
                 "\n"
                 "; the next one is wrong\n"
                 "backlog = 16\n"
                 "workers = 2\n"
                 "max_clients = 0\n",
                 7, "max_clients: '0' is out of range 1..1000000");
}

static void test_config_unknown_key_is_an_error(void **state)
{
    (void)state;
    expect_error("[evapi]\nbacklog = 1\nfoo = bar\n", 3, "unknown key 'foo' in section [evapi]");
}

static void test_config_unknown_section_is_an_error(void **state)
{
    (void)state;
    /* (not [kafka]: the kafka module, built in, owns it) */
    expect_error("[evapi]\nbacklog = 1\n\n\n\n\n\n[nosuch]\nbrokers = localhost:9092\n", 9,
                 "unknown section [nosuch] (not supported by this build)");
}

static void test_config_key_before_any_section_is_an_error(void **state)
{
    (void)state;
    expect_error("backlog = 1\n[evapi]\n", 1, "key 'backlog' is outside any section");
}

static void test_config_syntax_error_reports_its_line(void **state)
{
    (void)state;
    expect_error("[evapi]\nbacklog = 1\n\njust some words\n", 4,
                 "syntax error (expected [section] or key = value)");
    expect_error("[evapi\nbacklog = 1\n", 1, "syntax error (expected [section] or key = value)");
    /* An inline comment before the ']' hides it, for the reader as for inih. */
    expect_error("[evapi ;]\nbacklog = 1\n", 1, "syntax error (expected [section] or key = value)");
}

static void test_config_first_error_wins(void **state)
{
    (void)state;
    expect_error("[evapi]\nnonsense\nbacklog = 0\n", 2,
                 "syntax error (expected [section] or key = value)");
    expect_error("[evapi]\nbacklog = 0\nnonsense\n", 2, "backlog: '0' is out of range 1..65535");
}

static void test_config_bad_bind_addr_reports_line(void **state)
{
    (void)state;
    expect_error("[evapi]\nbind_addr = 8448\n", 2,
                 "bind_addr: '8448' is not host:port or [v6]:port with a port in 0..65535");
}

static void test_config_indented_continuation_is_an_error(void **state)
{
    (void)state;
    /* inih would read the second line as more of bind_addr's value. */
    expect_error("[evapi]\n  bind_addr = 127.0.0.1:1\n  backlog = 5\n", 3,
                 "indented line continues the value of 'bind_addr'; remove the indentation");
    /* So is an indented header after a key: it opens nothing. */
    expect_error("[evapi]\nbacklog = 5\n  [log]\n", 3,
                 "indented line continues the value of 'backlog'; remove the indentation");
}

static void test_config_long_line_reports_its_own_line(void **state)
{
    (void)state;
    char text[1024];
    int n = snprintf(text, sizeof(text), "[lua]\n; ok\nscript = /");
    memset(text + n, 'x', 400);
    snprintf(text + n + 400, sizeof(text) - (size_t)n - 400, ".lua\n[evapi]\nbacklog = 0\n");
    expect_error(text, 3, "line is too long (max 198 characters)");
}

static void test_config_error_leaves_config_untouched(void **state)
{
    (void)state;
    hub_config c, before;
    char path[64], err[512];
    hub_config_defaults(&c);
    before = c;
    assert_int_equal(
        load_text(&c, "[evapi]\nbacklog = 7\nworkers = 99\n", path, sizeof(path), err, sizeof(err)),
        -EINVAL);
    assert_memory_equal(&c, &before, sizeof(c));
}

static void test_config_missing_file_is_enoent(void **state)
{
    (void)state;
    hub_config c;
    char err[512];
    hub_config_defaults(&c);
    assert_int_equal(hub_config_load(&c, "/tmp/evhub-no-such-dir/x.conf", err, sizeof(err)),
                     -ENOENT);
    assert_string_equal(err, "/tmp/evhub-no-such-dir/x.conf:0: cannot open: No such file or "
                             "directory");
}

/* ---- INI dialect ------------------------------------------------------------------------ */

/* Issue 12, item 8: a key given twice was taken silently, the last one winning. */
static void test_config_duplicate_key_is_an_error_naming_both_lines(void **state)
{
    (void)state;
    expect_error("[evapi]\nbacklog = 1\nworkers = 0\nbacklog = 1\n", 4,
                 "key 'backlog' given twice in [evapi] (first at line 2)");
    /* A repeated header continues its section: the key still counts against the first. */
    expect_error("[evapi]\nbacklog = 1\n[log]\nlevel = err\n[evapi]\nbacklog = 2\n", 6,
                 "key 'backlog' given twice in [evapi] (first at line 2)");
    expect_error("[log]\nlevel = err\n[lua]\nmax_memory = 0\n[log]\n; again\nlevel = err\n", 7,
                 "key 'level' given twice in [log] (first at line 2)");
}

static void test_config_repeated_header_with_other_keys_continues_the_section(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_text(&c,
                               "[evapi]\nbacklog = 1\n[log]\nlevel = err\n[evapi]\nworkers = 2\n"
                               "[evapi]\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(c.backlog, 1);
    assert_int_equal(c.workers, 2);
    assert_int_equal(c.log_level, HUB_LOG_ERR);
    /* Keys of the same name in different sections are different keys. */
    assert_int_equal(load_text(&c, "[evapi]\nbind_addr = 127.0.0.1:1\n[control]\nsocket =\n", path,
                               sizeof(path), err, sizeof(err)),
                     0);
}

/* Issue 12, item 8: max_memory = 1k failed later, in lua_newstate, with no file:line. */
static void test_config_max_memory_is_off_or_at_least_256k(void **state)
{
    (void)state;
    expect_error("[lua]\n\nmax_memory = 1k\n", 3,
                 "max_memory: '1k' must be 0 (off) or in 262144..9223372036854775807");
    expect_error("[lua]\nmax_memory = 262143\n", 2,
                 "max_memory: '262143' must be 0 (off) or in 262144..9223372036854775807");
    expect_error("[lua]\nmax_memory = 99999999999999999999\n", 2,
                 "max_memory: '99999999999999999999' must be 0 (off) or in "
                 "262144..9223372036854775807");
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(
        load_text(&c, "[lua]\nmax_memory = 256k\n", path, sizeof(path), err, sizeof(err)), 0);
    assert_int_equal(c.max_memory, 256 * 1024);
    assert_int_equal(load_text(&c, "[lua]\nmax_memory = 0\n", path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(c.max_memory, 0);
}

static void test_config_inline_semicolon_comment_is_stripped(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_text(&c, "[evapi] ; the listener\nbacklog = 5 ; five\nworkers=2\t;two\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(c.backlog, 5);
    assert_int_equal(c.workers, 2);
    /* inih only strips ';' after whitespace, so "2;two" is a bad value, not 2. */
    expect_error("[evapi]\nworkers=2;two\n", 2, "workers: '2;two' is not an integer");
}

static void test_config_inline_hash_is_not_a_comment(void **state)
{
    (void)state;
    expect_error("[evapi]\nbacklog = 5 # five\n", 2, "backlog: '5 # five' is not an integer");
}

static void test_config_crlf_line_endings_are_accepted(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_text(&c, "[evapi]\r\nbacklog = 9\r\n[log]\r\nsyslog = on\r\n", path,
                               sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(c.backlog, 9);
    assert_int_equal(c.log_syslog, 1);
}

/* ---- script path resolution -------------------------------------------------------------- */

static void test_config_relative_script_resolves_against_config_dir(void **state)
{
    (void)state;
    char dir[] = "/tmp/evhub_dir_XXXXXX", path[128], err[512];
    hub_config c;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/evhub.conf", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("[lua]\nscript = lua/handler.lua\n", f);
    fclose(f);
    hub_config_defaults(&c);
    assert_int_equal(hub_config_load(&c, path, err, sizeof(err)), 0);
    char want[256];
    snprintf(want, sizeof(want), "%s/lua/handler.lua", dir);
    assert_string_equal(c.script, want);

    /* An absolute path is kept, and an empty one stays empty. */
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("[lua]\nscript = /opt/x.lua\n", f);
    fclose(f);
    assert_int_equal(hub_config_load(&c, path, err, sizeof(err)), 0);
    assert_string_equal(c.script, "/opt/x.lua");
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("[lua]\nscript =\n", f);
    fclose(f);
    assert_int_equal(hub_config_load(&c, path, err, sizeof(err)), 0);
    assert_string_equal(c.script, "");

    /* A config named without a directory resolves against the cwd, i.e. stays as written. */
    char cwd[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(dir), 0);
    f = fopen("evhub.conf", "w");
    assert_non_null(f);
    fputs("[lua]\nscript = handler.lua\n", f);
    fclose(f);
    int rc = hub_config_load(&c, "evhub.conf", err, sizeof(err));
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, 0);
    assert_string_equal(c.script, "handler.lua");
    unlink(path);
    rmdir(dir);
}

/* ---- sections owned by modules ------------------------------------------------------------ */

/* A module's section for the tests, with the kinds a module is likely to use. */
typedef struct demo_conf {
    int port;
    char host[32];
    hub_conf_list topics;
    int mode;
    int verbose;
    char dir[64];
} demo_conf;

static const char *const ten_modes[] = {"m0", "m1", "m2", "m3", "m4", "m5",
                                        "m6", "m7", "m8", "m9", NULL};

static const hub_conf_row demo_rows[] = {
    HUB_CONF_ROW(demo_conf, "port", HUB_CONF_INT, port, 1, 65535, NULL, "9000"),
    HUB_CONF_ROW(demo_conf, "host", HUB_CONF_STRING, host, 0, 0, NULL, "localhost"),
    HUB_CONF_ROW(demo_conf, "topic", HUB_CONF_LIST, topics, 0, 0, NULL, NULL),
    HUB_CONF_ROW(demo_conf, "mode", HUB_CONF_ENUM, mode, 0, 0, ten_modes, "m0"),
    HUB_CONF_ROW(demo_conf, "verbose", HUB_CONF_BOOL, verbose, 0, 1, NULL, "yes"),
    HUB_CONF_ROW(demo_conf, "dir", HUB_CONF_PATH, dir, 0, 0, NULL, NULL),
    {.name = NULL},
};

static const hub_conf_section demo_sections[] = {
    {.name = "demo", .named = 1, .size = sizeof(demo_conf), .rows = demo_rows},
    {.name = "single", .size = sizeof(demo_conf), .rows = demo_rows},
    {.name = NULL},
};
static const hub_conf_section *const demo_tables[] = {demo_sections, NULL};

/* Load text with the demo sections; the caller frees c. */
static int load_demo(hub_config *c, const char *text, char *path, size_t pathlen, char *err,
                     size_t errlen)
{
    write_conf(path, pathlen, text);
    int rc = hub_config_load_sections(c, path, demo_tables, err, errlen);
    unlink(path);
    return rc;
}

/* As expect_error, with the demo sections. */
static void expect_demo_error(const char *text, int line, const char *reason)
{
    hub_config c;
    char path[64], err[512], want[512];
    hub_config_defaults(&c);
    int rc = load_demo(&c, text, path, sizeof(path), err, sizeof(err));
    snprintf(want, sizeof(want), "%s:%d: %s", path, line, reason);
    assert_int_equal(rc, -EINVAL);
    assert_string_equal(err, want);
    assert_null(c.modules);
    hub_config_free(&c);
}

static const demo_conf *demo_of(const hub_conf_instance *i)
{
    assert_non_null(i);
    return i->data;
}

static void test_config_defaults_ignore_what_the_memory_held(void **state)
{
    (void)state;
    hub_config c;
    memset(&c, 0xa5, sizeof(c));
    hub_config_defaults(&c);
    assert_null(c.modules);
    assert_string_equal(c.file, "");
    assert_string_equal(c.bind_addr, "127.0.0.1:8448");
    assert_string_equal(c.event_callback, "");
    assert_string_equal(c.script, "");
    assert_string_equal(c.control_tcp, "");
    assert_int_equal(c.max_memory, 0);
    assert_int_equal(c.log_syslog, 0);
}

static void test_config_list_key_keeps_every_value_with_its_line(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c,
                               "[single]\n"
                               "topic = a\n"
                               "port = 1\n"
                               "topic = b ; a comment\n"
                               "\n"
                               "topic = c d\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    const demo_conf *d = demo_of(hub_conf_next(&c, "single", NULL));
    assert_int_equal(d->topics.n, 3);
    assert_string_equal(d->topics.items[0].value, "a");
    assert_int_equal(d->topics.items[0].line, 2);
    assert_string_equal(d->topics.items[1].value, "b");
    assert_int_equal(d->topics.items[1].line, 4);
    assert_string_equal(d->topics.items[2].value, "c d");
    assert_int_equal(d->topics.items[2].line, 6);
    assert_int_equal(d->port, 1);
    hub_config_free(&c);
}

/* Issue 12, item 8: this was last-wins; a non-list key given twice is now an error. */
/* A LIST row named "x." takes every key that starts with "x." (and goes on), whole. */
typedef struct props_conf {
    int size;
    hub_conf_list g;
} props_conf;

static const hub_conf_row props_rows[] = {
    HUB_CONF_ROW(props_conf, "size", HUB_CONF_INT, size, 0, 100, NULL, "1"),
    HUB_CONF_ROW(props_conf, "g.", HUB_CONF_LIST, g, 0, 0, NULL, NULL),
    {.name = NULL},
};
static const hub_conf_section props_sections[] = {
    {.name = "props", .named = 1, .size = sizeof(props_conf), .rows = props_rows},
    {.name = NULL},
};
static const hub_conf_section *const props_tables[] = {props_sections, NULL};

static void test_config_prefix_row_collects_every_key_with_its_prefix(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512], want[600];
    hub_config_defaults(&c);
    write_conf(path, sizeof(path),
               "[props:a]\ng.linger.ms = 5\nsize = 2\ng.acks=all\ng.linger.ms = 7\n");
    assert_int_equal(hub_config_load_sections(&c, path, props_tables, err, sizeof(err)), 0);
    unlink(path);
    const hub_conf_instance *i = hub_conf_next(&c, "props", NULL);
    assert_non_null(i);
    const props_conf *p = i->data;
    assert_int_equal(p->size, 2);
    assert_int_equal(p->g.n, 3); /* the module decides about a key given twice */
    assert_string_equal(p->g.items[0].value, "g.linger.ms=5");
    assert_int_equal(p->g.items[0].line, 2);
    assert_string_equal(p->g.items[1].value, "g.acks=all");
    assert_int_equal(p->g.items[1].line, 4);
    assert_string_equal(p->g.items[2].value, "g.linger.ms=7");
    hub_config_free(&c);
    /* the prefix alone, or another prefix, is an unknown key */
    const char *bad[] = {"[props]\ng. = 1\n", "[props]\nt.acks = 1\n", "[props]\ng = 1\n"};
    const char *names[] = {"g.", "t.acks", "g"};
    for (size_t k = 0; k < 3; k++) {
        hub_config_defaults(&c);
        write_conf(path, sizeof(path), bad[k]);
        assert_int_equal(hub_config_load_sections(&c, path, props_tables, err, sizeof(err)),
                         -EINVAL);
        unlink(path);
        snprintf(want, sizeof(want), "%s:2: unknown key '%s' in section [props]", path, names[k]);
        assert_string_equal(err, want);
        hub_config_free(&c);
    }
}

static void test_config_module_key_given_twice_is_an_error(void **state)
{
    (void)state;
    expect_demo_error("[single]\nport = 1\n[evapi]\nbacklog = 3\n[single]\nport = 2\n", 6,
                      "key 'port' given twice in [single] (first at line 2)");
    expect_demo_error("[demo:a]\nhost = x\ntopic = t\nhost = y\n", 4,
                      "key 'host' given twice in [demo:a] (first at line 2)");
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    /* Other keys after a repeated header continue the instance; a LIST key may repeat; the
     * same key in another instance is another key. */
    assert_int_equal(load_demo(&c,
                               "[single]\nport = 1\ntopic = a\n[evapi]\nbacklog = 3\n"
                               "[single]\nhost = h\ntopic = b\n[demo:x]\nport = 5\n"
                               "[demo:y]\nport = 6\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    const hub_conf_instance *i = hub_conf_next(&c, "single", NULL);
    assert_int_equal(demo_of(i)->port, 1);
    assert_string_equal(demo_of(i)->host, "h");
    assert_int_equal(demo_of(i)->topics.n, 2);
    /* The second [single] continued the first: one instance, from line 1. */
    assert_int_equal(i->line, 1);
    assert_null(hub_conf_next(&c, "single", i));
    assert_int_equal(c.backlog, 3);
    const hub_conf_instance *x = hub_conf_next(&c, "demo", NULL);
    assert_int_equal(demo_of(x)->port, 5);
    assert_int_equal(demo_of(hub_conf_next(&c, "demo", x))->port, 6);
    hub_config_free(&c);
}

static void test_config_named_instances_get_defaults_and_their_own_values(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512], want[128];
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c,
                               "[demo:a]\n"
                               "port = 1\n"
                               "dir = spool\n"
                               "[demo:b]\n"
                               "host = h\n"
                               "[single]\n"
                               "[demo:a]\n"
                               "topic = x\n"
                               "[demo]\n"
                               "[demo:c-2_Z]\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    assert_string_equal(c.file, path);

    const hub_conf_instance *a = hub_conf_next(&c, "demo", NULL);
    assert_string_equal(a->name, "a");
    assert_int_equal(a->line, 1);
    assert_string_equal(a->file, path);
    assert_int_equal(demo_of(a)->port, 1);
    assert_string_equal(demo_of(a)->host, "localhost");
    assert_int_equal(demo_of(a)->verbose, 1);
    assert_int_equal(demo_of(a)->topics.n, 1);
    assert_int_equal(demo_of(a)->topics.items[0].line, 8);
    /* A relative path in a module's section resolves against the file's directory too. */
    snprintf(want, sizeof(want), "/tmp/spool");
    assert_string_equal(demo_of(a)->dir, want);

    const hub_conf_instance *b = hub_conf_next(&c, "demo", a);
    assert_string_equal(b->name, "b");
    assert_int_equal(b->line, 4);
    assert_int_equal(demo_of(b)->port, 9000);
    assert_string_equal(demo_of(b)->host, "h");
    assert_int_equal(demo_of(b)->topics.n, 0);
    assert_string_equal(demo_of(b)->dir, "");

    /* [single] sits between them in the file but not in the walk; [demo] is the instance "". */
    const hub_conf_instance *bare = hub_conf_next(&c, "demo", b);
    assert_string_equal(bare->name, "");
    assert_int_equal(bare->line, 9);
    const hub_conf_instance *last = hub_conf_next(&c, "demo", bare);
    assert_string_equal(last->name, "c-2_Z");
    assert_int_equal(demo_of(last)->port, 9000);
    assert_null(hub_conf_next(&c, "demo", last));

    const hub_conf_instance *single = hub_conf_next(&c, "single", NULL);
    assert_int_equal(single->line, 6);
    assert_null(hub_conf_next(&c, "single", single));
    assert_null(hub_conf_next(&c, "absent", NULL));
    hub_config_free(&c);
}

static void test_config_bad_instance_name_reports_its_line(void **state)
{
    (void)state;
    char text[256], name[80];
    expect_demo_error("[demo:a]\n\n[demo:bad name]\nport = 1\n", 3,
                      "bad instance name 'bad name' in [demo:...] (letters, digits, '_' and '-', "
                      "at most 44 bytes)");
    expect_demo_error("[demo:]\n", 1,
                      "bad instance name '' in [demo:...] (letters, digits, '_' and '-', at most "
                      "44 bytes)");
    expect_demo_error("[demo:a.b]\n", 1,
                      "bad instance name 'a.b' in [demo:...] (letters, digits, '_' and '-', at "
                      "most 44 bytes)");
    /* "demo:" and 44 bytes fill inih's 49-byte section name: a name; 45 bytes are not. */
    memset(name, 'n', 44);
    name[44] = '\0';
    snprintf(text, sizeof(text), "[demo:%s]\nport = 2\n", name);
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c, text, path, sizeof(path), err, sizeof(err)), 0);
    assert_string_equal(hub_conf_next(&c, "demo", NULL)->name, name);
    assert_int_equal(demo_of(hub_conf_next(&c, "demo", NULL))->port, 2);
    hub_config_free(&c);
    snprintf(text, sizeof(text), "[evapi]\n[demo:%sn]\n", name);
    char want[256];
    snprintf(want, sizeof(want),
             "bad instance name '%sn' in [demo:...] (letters, digits, '_' and '-', at most 44 "
             "bytes)",
             name);
    expect_demo_error(text, 2, want);
}

static void test_config_section_name_longer_than_inih_keeps_is_an_error(void **state)
{
    (void)state;
    char text[256], name[64], want[256];
    /* 49 bytes are read whole: the unknown section is named in full at its key. */
    memset(name, 's', HUB_CONF_SECTION_MAX);
    name[HUB_CONF_SECTION_MAX] = '\0';
    snprintf(text, sizeof(text), "[evapi]\n[%s]\nkey = 1\n", name);
    snprintf(want, sizeof(want), "unknown section [%s] (not supported by this build)", name);
    expect_demo_error(text, 3, want);
    /* 50 bytes are refused at the header, never cut, even with no key after it. */
    snprintf(text, sizeof(text), "[evapi]\n[%ss]\n", name);
    expect_demo_error(text, 2, "section name is too long (max 49 bytes)");
    /* inih would read the key after it as one of the first 49 bytes' section. */
    snprintf(text, sizeof(text), "[%ss]\nport = 1\n", name);
    expect_demo_error(text, 1, "section name is too long (max 49 bytes)");
    /* A module's name that leaves no room for an instance is refused with its table. */
    static const hub_conf_row rows[] = {{.name = NULL}};
    static const hub_conf_section long_named[] = {
        {.name = "a_module_name_of_forty_eight_bytes_is_too_long_x",
         .named = 1,
         .size = 1,
         .rows = rows},
        {.name = NULL},
    };
    const hub_conf_section *tables[] = {long_named, NULL};
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    write_conf(path, sizeof(path), "");
    assert_int_equal(hub_config_load_sections(&c, path, tables, err, sizeof(err)), -EINVAL);
    unlink(path);
    snprintf(want, sizeof(want), "%s:0: section [%s]: bad name or size", path, long_named[0].name);
    assert_string_equal(err, want);
}

static void test_config_instance_of_a_section_without_instances_is_an_error(void **state)
{
    (void)state;
    expect_demo_error("[single]\nport = 1\n[single:x]\nport = 2\n", 3,
                      "section [single] takes no instance name ('x')");
    expect_demo_error("[evapi:main]\nbacklog = 1\n", 1,
                      "section [evapi] takes no instance name ('main')");
}

static void test_config_instance_names_differing_only_in_case_are_an_error(void **state)
{
    (void)state;
    expect_demo_error("[demo:main]\nport = 1\n[demo:Main]\n", 3,
                      "duplicate instance name: [demo:Main] differs from [demo:main] (line 1) "
                      "only in case");
}

static void test_config_unknown_key_in_module_section_reports_its_line(void **state)
{
    (void)state;
    expect_demo_error("[demo:a]\nport = 1\n\nbrokers = x\n", 4,
                      "unknown key 'brokers' in section [demo:a]");
    expect_demo_error("[single]\nport = 0\n", 2, "port: '0' is out of range 1..65535");
}

static void test_config_module_section_is_unknown_without_its_module(void **state)
{
    (void)state;
    /* hub_config_load knows only the modules built in; none of them is "demo". */
    expect_error("[demo:a]\nport = 1\n", 2,
                 "unknown section [demo:a] (not supported by this build)");
}

static void test_config_line_of_the_limit_is_read_and_a_longer_one_is_an_error(void **state)
{
    (void)state;
    size_t len = 5000 + 64;
    char *text = malloc(len);
    assert_non_null(text);
    /* A comment of exactly HUB_CONF_LINE_MAX bytes is read as one line. */
    int n = snprintf(text, len, "[single]\n;");
    memset(text + n, 'c', HUB_CONF_LINE_MAX - 1);
    n += HUB_CONF_LINE_MAX - 1;
    n += snprintf(text + n, len - (size_t)n, "\nport = 7\n");
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c, text, path, sizeof(path), err, sizeof(err)), 0);
    assert_int_equal(demo_of(hub_conf_next(&c, "single", NULL))->port, 7);
    hub_config_free(&c);

    /* So is a value that fills the line, last line of the file, with no '\n'. */
    n = snprintf(text, len, "[single]\ntopic = ");
    memset(text + n, 'v', HUB_CONF_LINE_MAX - 8);
    text[n + HUB_CONF_LINE_MAX - 8] = '\0';
    assert_int_equal(load_demo(&c, text, path, sizeof(path), err, sizeof(err)), 0);
    const demo_conf *d = demo_of(hub_conf_next(&c, "single", NULL));
    assert_int_equal(d->topics.n, 1);
    assert_int_equal(strlen(d->topics.items[0].value), HUB_CONF_LINE_MAX - 8);
    hub_config_free(&c);

    /* One byte more is an error on its line, with or without the '\n'. */
    text[n + HUB_CONF_LINE_MAX - 8] = 'v';
    text[n + HUB_CONF_LINE_MAX - 7] = '\0';
    expect_demo_error(text, 2, "line is too long (max 198 characters)");
    text[n + HUB_CONF_LINE_MAX - 7] = '\n';
    text[n + HUB_CONF_LINE_MAX - 6] = '\0';
    expect_demo_error(text, 2, "line is too long (max 198 characters)");

    /* A 5000-byte value on line 4 is refused there, not cut into pieces read as more lines. */
    n = snprintf(text, len, "[single]\nport = 1\n\ntopic = ");
    memset(text + n, 'v', 5000 - (size_t)n);
    snprintf(text + 5000, len - 5000, "\nport = 2\n");
    expect_demo_error(text, 4, "line is too long (max 198 characters)");
    free(text);
}

static void test_config_nul_byte_is_an_error(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512], want[128];
    static const char text[] = "[evapi]\nbacklog = 1\0 junk\n";
    hub_config_defaults(&c);
    snprintf(path, sizeof(path), "/tmp/evhub_test_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, sizeof(text) - 1), (ssize_t)sizeof(text) - 1);
    close(fd);
    assert_int_equal(hub_config_load(&c, path, err, sizeof(err)), -EINVAL);
    unlink(path);
    snprintf(want, sizeof(want), "%s:2: line holds a NUL byte", path);
    assert_string_equal(err, want);
}

static void test_config_enum_with_ten_choices_takes_the_tenth_and_lists_all(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c, "[single]\nmode = m9\n", path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(demo_of(hub_conf_next(&c, "single", NULL))->mode, 9);
    hub_config_free(&c);
    expect_demo_error("[single]\nmode = m10\n", 2,
                      "mode: 'm10' must be m0, m1, m2, m3, m4, m5, m6, m7, m8 or m9");
}

static void test_config_dialect_is_kept(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    /* A BOM, "key: value", text after a header, an indented comment, a blank-only line. */
    assert_int_equal(load_demo(&c,
                               "\xEF\xBB\xBF[evapi] anything\n"
                               "backlog: 3\n"
                               "  ; indented comment\n"
                               " \t \n"
                               "workers =4\n"
                               "[single]\n"
                               "host = a=b:c\n",
                               path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(c.backlog, 3);
    assert_int_equal(c.workers, 4);
    assert_string_equal(demo_of(hub_conf_next(&c, "single", NULL))->host, "a=b:c");
    hub_config_free(&c);
    /* A key after "[]" is outside any section, as inih had it. */
    expect_error("[]\nbacklog = 1\n", 2, "key 'backlog' is outside any section");
    /* A header with no key still makes its instance, and an indented key after it is a key. */
    hub_config_defaults(&c);
    assert_int_equal(load_demo(&c, "[demo:x]\n  port = 5\n", path, sizeof(path), err, sizeof(err)),
                     0);
    assert_int_equal(demo_of(hub_conf_next(&c, "demo", NULL))->port, 5);
    hub_config_free(&c);
}

static void test_config_load_replaces_instances_and_failure_keeps_them(void **state)
{
    (void)state;
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    assert_int_equal(
        load_demo(&c, "[demo:a]\ntopic = 1\ntopic = 2\n", path, sizeof(path), err, sizeof(err)), 0);
    const hub_conf_instance *first = c.modules;
    /* A failed load leaves the config, instances included, as it was. */
    assert_int_equal(
        load_demo(&c, "[demo:b]\ntopic = 3\nport = x\n", path, sizeof(path), err, sizeof(err)),
        -EINVAL);
    assert_ptr_equal(c.modules, first);
    assert_string_equal(hub_conf_next(&c, "demo", NULL)->name, "a");
    /* A successful one gives this file's instances; the old are freed (valgrind checks). */
    assert_int_equal(load_demo(&c, "[demo:b]\ntopic = 3\n", path, sizeof(path), err, sizeof(err)),
                     0);
    const hub_conf_instance *b = hub_conf_next(&c, "demo", NULL);
    assert_string_equal(b->name, "b");
    assert_null(hub_conf_next(&c, "demo", b));
    /* hub_config_set works on the core keys and keeps the instances. */
    assert_int_equal(hub_config_set(&c, "evapi", "backlog", "9", err, sizeof(err)), 0);
    assert_ptr_equal(hub_conf_next(&c, "demo", NULL), b);
    hub_config_free(&c);
    assert_null(c.modules);
    assert_int_equal(c.backlog, 9);
    hub_config_free(&c);
    hub_config_free(NULL);
}

static void test_config_defaults_of_an_absent_section_come_from_its_rows(void **state)
{
    (void)state;
    demo_conf d;
    char err[256];
    memset(&d, 0xa5, sizeof(d));
    assert_int_equal(hub_conf_defaults(&demo_sections[0], &d, err, sizeof(err)), 0);
    assert_int_equal(d.port, 9000);
    assert_string_equal(d.host, "localhost");
    assert_int_equal(d.topics.n, 0);
    assert_null(d.topics.items);
    assert_int_equal(d.mode, 0);
    assert_int_equal(d.verbose, 1);
    assert_string_equal(d.dir, "");
    /* A default its own row refuses is reported. */
    static const hub_conf_row rows[] = {
        HUB_CONF_ROW(demo_conf, "port", HUB_CONF_INT, port, 1, 5, NULL, "9"),
        {.name = NULL},
    };
    static const hub_conf_section bad = {"bad", 0, sizeof(demo_conf), rows};
    assert_int_equal(hub_conf_defaults(&bad, &d, err, sizeof(err)), -EINVAL);
    assert_string_equal(err, "[bad] bad default: port: '9' is out of range 1..5");
}

/* An allocator that fails the fail_at-th call (counting from 0) and every one after it. */
static int alloc_calls, fail_at;
static int oom_now(void) { return alloc_calls++ >= fail_at; }
static void *oom_malloc(size_t n) { return oom_now() ? NULL : malloc(n); }
static void *oom_calloc(size_t n, size_t size) { return oom_now() ? NULL : calloc(n, size); }
static void *oom_realloc(void *p, size_t n) { return oom_now() ? NULL : realloc(p, n); }

static void test_config_out_of_memory_anywhere_leaves_the_config_as_it_was(void **state)
{
    (void)state;
    static const hub_allocator oom = {oom_malloc, oom_calloc, oom_realloc, free};
    const char *text = "[demo:a]\ntopic = 1\ntopic = 2\ntopic = 3\n[demo:b]\n[single]\ntopic = x\n";
    hub_config c;
    char path[64], err[512];
    hub_config_defaults(&c);
    write_conf(path, sizeof(path), "[single]\nport = 3\n");
    assert_int_equal(hub_config_load_sections(&c, path, demo_tables, err, sizeof(err)), 0);
    unlink(path);
    const hub_conf_instance *before = c.modules;
    write_conf(path, sizeof(path), text);
    int rc = -ENOMEM;
    /* Bounded: the load makes a few dozen allocations. */
    for (fail_at = 0; fail_at < 200 && rc == -ENOMEM; fail_at++) {
        alloc_calls = 0;
        hub_set_allocator(&oom);
        rc = hub_config_load_sections(&c, path, demo_tables, err, sizeof(err));
        hub_set_allocator(NULL);
        if (rc == -ENOMEM)
            assert_ptr_equal(c.modules, before);
    }
    unlink(path);
    assert_int_equal(rc, 0);
    assert_true(fail_at > 5);
    const demo_conf *a = demo_of(hub_conf_next(&c, "demo", NULL));
    assert_int_equal(a->topics.n, 3);
    assert_string_equal(a->topics.items[2].value, "3");
    hub_config_free(&c);
}

typedef struct bad_conf {
    long n;
    int m;
} bad_conf;

static void test_config_module_table_that_does_not_fit_is_refused(void **state)
{
    (void)state;
    static const hub_conf_row int_on_long[] = {
        {.name = "n", .kind = HUB_CONF_INT, .off = offsetof(bad_conf, n), .size = sizeof(long)},
        {.name = NULL},
    };
    static const hub_conf_row past_end[] = {
        {.name = "m", .kind = HUB_CONF_INT, .off = sizeof(bad_conf), .size = sizeof(int)},
        {.name = NULL},
    };
    static const hub_conf_row bad_default[] = {
        HUB_CONF_ROW(bad_conf, "m", HUB_CONF_INT, m, 1, 5, NULL, "9"),
        {.name = NULL},
    };
    static const hub_conf_section s1[] = {{"bad", 0, sizeof(bad_conf), int_on_long},
                                          {NULL, 0, 0, NULL}};
    static const hub_conf_section s2[] = {{"bad", 0, sizeof(bad_conf), past_end},
                                          {NULL, 0, 0, NULL}};
    static const hub_conf_section s3[] = {{"log", 0, sizeof(bad_conf), bad_default},
                                          {NULL, 0, 0, NULL}};
    static const hub_conf_section s4[] = {{"bad", 0, sizeof(bad_conf), bad_default},
                                          {NULL, 0, 0, NULL}};
    static const struct {
        const hub_conf_section *table;
        int line;
        const char *reason;
    } cases[] = {
        {s1, 0, "section [bad] key 'n': row does not fit its kind"},
        {s2, 0, "section [bad] key 'm': row does not fit its kind"},
        {s3, 0, "section [log]: bad name or size"},
        {s4, 2, "[bad] bad default: m: '9' is out of range 1..5"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const hub_conf_section *tables[] = {cases[i].table, NULL};
        hub_config c;
        char path[64], err[512], want[512];
        hub_config_defaults(&c);
        write_conf(path, sizeof(path), "[evapi]\n[bad]\n");
        int rc = hub_config_load_sections(&c, path, tables, err, sizeof(err));
        unlink(path);
        snprintf(want, sizeof(want), "%s:%d: %s", path, cases[i].line, cases[i].reason);
        assert_int_equal(rc, -EINVAL);
        assert_string_equal(err, want);
        assert_null(c.modules);
    }
    /* Two tables claiming one name. */
    const hub_conf_section *twice[] = {demo_sections, demo_sections, NULL};
    hub_config c;
    char path[64], err[512], want[512];
    hub_config_defaults(&c);
    write_conf(path, sizeof(path), "");
    assert_int_equal(hub_config_load_sections(&c, path, twice, err, sizeof(err)), -EINVAL);
    unlink(path);
    snprintf(want, sizeof(want), "%s:0: section [demo] is claimed twice", path);
    assert_string_equal(err, want);
}

/* ---- host:port ------------------------------------------------------------------------- */

static void test_config_split_addr_accepts_v4_v6_and_names(void **state)
{
    (void)state;
    char host[64], port[8];
    assert_int_equal(
        hub_config_split_addr("127.0.0.1:8448", host, sizeof(host), port, sizeof(port)), 0);
    assert_string_equal(host, "127.0.0.1");
    assert_string_equal(port, "8448");
    assert_int_equal(hub_config_split_addr("[::1]:80", host, sizeof(host), port, sizeof(port)), 0);
    assert_string_equal(host, "::1");
    assert_string_equal(port, "80");
    assert_int_equal(
        hub_config_split_addr("[fe80::1%eth0]:65535", host, sizeof(host), port, sizeof(port)), 0);
    assert_string_equal(host, "fe80::1%eth0");
    assert_string_equal(port, "65535");
    assert_int_equal(hub_config_split_addr("localhost:1", host, sizeof(host), port, sizeof(port)),
                     0);
    assert_string_equal(host, "localhost");
    assert_string_equal(port, "1");
    /* Port 0: the kernel picks one (what the tests use). */
    assert_int_equal(hub_config_split_addr("127.0.0.1:0", host, sizeof(host), port, sizeof(port)),
                     0);
    assert_string_equal(port, "0");
}

static void test_config_split_addr_rejects_malformed(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "127.0.0.1",
        "127.0.0.1:",
        ":8448",
        "::1:8448",
        "[::1]8448",
        "[::1]",
        "[::1:80",
        "[]:80",
        "host:-0",
        "host:65536",
        "host:abc",
        "host:-1",
        "host:+1",
        "host:80x",
        "host: 80",
        "a]b:80",
        "[a[b]:80",
        "host:99999999999999999999",
    };
    char host[64], port[8];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (hub_config_split_addr(bad[i], host, sizeof(host), port, sizeof(port)) != -EINVAL)
            fail_msg("'%s' was accepted", bad[i]);
    }
    /* Buffers too small for the parts. */
    assert_int_equal(hub_config_split_addr("abcdef:80", host, 6, port, sizeof(port)), -EINVAL);
    assert_int_equal(hub_config_split_addr("abcde:8080", host, 6, port, 4), -EINVAL);
    assert_int_equal(hub_config_split_addr("abcde:808", host, 6, port, 4), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_defaults_match_header),
        cmocka_unit_test(test_config_every_key_is_parsed),
        cmocka_unit_test(test_config_empty_file_keeps_defaults),
        cmocka_unit_test(test_config_set_validates_each_value),
        cmocka_unit_test(test_config_set_stores_parsed_values),
        cmocka_unit_test(test_config_booleans_accept_all_spellings),
        cmocka_unit_test(test_config_value_too_long_is_rejected),
        cmocka_unit_test(test_config_bad_value_reports_file_and_line),
        cmocka_unit_test(test_config_unknown_key_is_an_error),
        cmocka_unit_test(test_config_unknown_section_is_an_error),
        cmocka_unit_test(test_config_key_before_any_section_is_an_error),
        cmocka_unit_test(test_config_syntax_error_reports_its_line),
        cmocka_unit_test(test_config_first_error_wins),
        cmocka_unit_test(test_config_bad_bind_addr_reports_line),
        cmocka_unit_test(test_config_indented_continuation_is_an_error),
        cmocka_unit_test(test_config_long_line_reports_its_own_line),
        cmocka_unit_test(test_config_error_leaves_config_untouched),
        cmocka_unit_test(test_config_missing_file_is_enoent),
        cmocka_unit_test(test_config_duplicate_key_is_an_error_naming_both_lines),
        cmocka_unit_test(test_config_repeated_header_with_other_keys_continues_the_section),
        cmocka_unit_test(test_config_max_memory_is_off_or_at_least_256k),
        cmocka_unit_test(test_config_inline_semicolon_comment_is_stripped),
        cmocka_unit_test(test_config_inline_hash_is_not_a_comment),
        cmocka_unit_test(test_config_crlf_line_endings_are_accepted),
        cmocka_unit_test(test_config_relative_script_resolves_against_config_dir),
        cmocka_unit_test(test_config_split_addr_accepts_v4_v6_and_names),
        cmocka_unit_test(test_config_split_addr_rejects_malformed),
        cmocka_unit_test(test_config_defaults_ignore_what_the_memory_held),
        cmocka_unit_test(test_config_list_key_keeps_every_value_with_its_line),
        cmocka_unit_test(test_config_module_key_given_twice_is_an_error),
        cmocka_unit_test(test_config_prefix_row_collects_every_key_with_its_prefix),
        cmocka_unit_test(test_config_named_instances_get_defaults_and_their_own_values),
        cmocka_unit_test(test_config_bad_instance_name_reports_its_line),
        cmocka_unit_test(test_config_section_name_longer_than_inih_keeps_is_an_error),
        cmocka_unit_test(test_config_instance_of_a_section_without_instances_is_an_error),
        cmocka_unit_test(test_config_instance_names_differing_only_in_case_are_an_error),
        cmocka_unit_test(test_config_unknown_key_in_module_section_reports_its_line),
        cmocka_unit_test(test_config_module_section_is_unknown_without_its_module),
        cmocka_unit_test(test_config_line_of_the_limit_is_read_and_a_longer_one_is_an_error),
        cmocka_unit_test(test_config_nul_byte_is_an_error),
        cmocka_unit_test(test_config_enum_with_ten_choices_takes_the_tenth_and_lists_all),
        cmocka_unit_test(test_config_dialect_is_kept),
        cmocka_unit_test(test_config_load_replaces_instances_and_failure_keeps_them),
        cmocka_unit_test(test_config_module_table_that_does_not_fit_is_refused),
        cmocka_unit_test(test_config_out_of_memory_anywhere_leaves_the_config_as_it_was),
        cmocka_unit_test(test_config_defaults_of_an_absent_section_come_from_its_rows),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
