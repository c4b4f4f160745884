/* Unit tests for the control socket server (hub/control.c) on its own: a real unix socket and
 * a libev loop in this process, with fake commands registered through the public registry.
 * The hub's own commands are covered by tests/integration/test_control.py. */
#include <errno.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cmocka.h>
#include <ev.h>
#include <json-c/json.h>

#include "hub/control.h"

typedef struct fixture {
    struct ev_loop *loop;
    hub_ctl *ctl;
    char dir[64], path[96];
    hub_ctl_call *held[8]; /* calls the "later" command has not answered yet */
    int nheld;
    int echo_calls;
    int big_calls;
} fixture;

static fixture *current; /* the running test's, for send_str */

/* ---- fake commands ---- */

static const hub_ctl_param echo_params[] = {
    {"n", HUB_CTL_INT, 1, "a number"},
    {"s", HUB_CTL_STRING, 0, "a string"},
    {"b", HUB_CTL_BOOL, 0, "a flag"},
};
static const hub_ctl_spec echo_spec = {"echo", "answers its params", NULL, echo_params, 3};
static const hub_ctl_spec later_spec = {"later", "answers when told to", NULL, NULL, 0};
static const hub_ctl_spec fail_spec = {"fail", "always fails", NULL, NULL, 0};
static const hub_ctl_spec big_spec = {"big", "answers 32 KiB", NULL, NULL, 0};

static void echo_cmd(hub_ctl_call *call, json_object *params, void *ud)
{
    fixture *f = ud;
    f->echo_calls++;
    hub_ctl_reply(call, json_object_get(params));
}

static void later_cmd(hub_ctl_call *call, json_object *params, void *ud)
{
    fixture *f = ud;
    (void)params;
    assert_true(f->nheld < (int)(sizeof(f->held) / sizeof(f->held[0])));
    f->held[f->nheld++] = call;
}

static void big_cmd(hub_ctl_call *call, json_object *params, void *ud)
{
    fixture *f = ud;
    static char text[32 * 1024];
    (void)params;
    f->big_calls++;
    memset(text, 'x', sizeof(text));
    hub_ctl_reply(call, json_object_new_string_len(text, sizeof(text)));
}

static void fail_cmd(hub_ctl_call *call, json_object *params, void *ud)
{
    (void)params, (void)ud;
    hub_ctl_fail(call, HUB_CTL_FAILED, "it failed: %d", 42);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    char err[256];
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/evhub_test_ctl_XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof(f->path), "%s/ctl.sock", f->dir);
    f->loop = ev_loop_new(EVFLAG_AUTO);
    f->ctl = hub_ctl_new(f->loop, f->path, "", err, sizeof(err));
    if (!f->ctl)
        fail_msg("hub_ctl_new: %s", err);
    assert_int_equal(hub_ctl_register(f->ctl, &echo_spec, echo_cmd, f), 0);
    assert_int_equal(hub_ctl_register(f->ctl, &later_spec, later_cmd, f), 0);
    assert_int_equal(hub_ctl_register(f->ctl, &fail_spec, fail_cmd, f), 0);
    current = f;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    hub_ctl_free(f->ctl);
    /* Calls still held are answered after the server is gone: dropped, nothing leaks. */
    for (int i = 0; i < f->nheld; i++)
        hub_ctl_reply(f->held[i], NULL);
    ev_loop_destroy(f->loop);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* ---- a client ---- */

static int client(fixture *f)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", f->path);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return fd;
}

/* Send all of data, running the loop while the socket is full (the server is in-process).
 * Stops early if the server closes the connection. */
static void send_all(fixture *f, int fd, const char *data, size_t n)
{
    for (size_t off = 0; off < n;) {
        ssize_t w = send(fd, data + off, n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0)
            off += (size_t)w;
        else if (errno == EPIPE || errno == ECONNRESET)
            return;
        else
            assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
        ev_run(f->loop, EVRUN_NOWAIT);
    }
}

static void send_str(int fd, const char *s) { send_all(current, fd, s, strlen(s)); }

/* Run the loop until fd has a whole line (or EOF); returns the line (static buffer), or NULL
 * on EOF. Fails after about two seconds. */
static const char *read_line(fixture *f, int fd)
{
    static char buf[1 << 16];
    static size_t have;
    static int last_fd = -1;
    if (fd != last_fd)
        have = 0, last_fd = fd;
    for (int i = 0; i < 2000; i++) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            static char line[1 << 16];
            size_t n = (size_t)(nl - buf);
            memcpy(line, buf, n);
            line[n] = '\0';
            memmove(buf, nl + 1, have - n - 1);
            have -= n + 1;
            return line;
        }
        ev_run(f->loop, EVRUN_NOWAIT);
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 1) == 1) {
            ssize_t r = recv(fd, buf + have, sizeof(buf) - have, 0);
            if (r <= 0)
                return NULL;
            have += (size_t)r;
        }
    }
    fail_msg("no answer within 2 s");
    return NULL;
}

/* Read one answer and parse it. */
static json_object *answer(fixture *f, int fd)
{
    const char *line = read_line(f, fd);
    if (!line)
        fail_msg("connection closed instead of answering");
    json_object *o = json_tokener_parse(line);
    if (!o)
        fail_msg("answer is not JSON: %s", line);
    return o;
}

static int error_code(json_object *a)
{
    json_object *e, *c;
    if (!json_object_object_get_ex(a, "error", &e) || !json_object_object_get_ex(e, "code", &c))
        return 0;
    return json_object_get_int(c);
}

static const char *member_str(json_object *o, const char *k)
{
    json_object *v;
    return json_object_object_get_ex(o, k, &v) ? json_object_get_string(v) : NULL;
}

/* The answer's "id" as JSON text ("7", "\"x\"", "null"). */
static const char *id_text(json_object *a)
{
    json_object *v;
    if (!json_object_object_get_ex(a, "id", &v))
        return "(missing)";
    return json_object_to_json_string(v);
}

/* Read one answer and check its error code (0: none) and id (as id_text gives it). */
static void expect_answer(fixture *f, int fd, int code, const char *id)
{
    json_object *a = answer(f, fd);
    if (error_code(a) != code || strcmp(id_text(a), id) != 0)
        fail_msg("got %s, want code %d id %s", json_object_to_json_string(a), code, id);
    json_object_put(a);
}

/* Send req, then expect_answer. */
static void expect_reply(fixture *f, int fd, const char *req, int code, const char *id)
{
    send_str(fd, req);
    expect_answer(f, fd, code, id);
}

/* ---- tests ---- */

static void test_socket_is_0600_and_removed_on_free(void **state)
{
    fixture *f = *state;
    struct stat st;
    assert_int_equal(stat(f->path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0600);
    hub_ctl_free(f->ctl);
    f->ctl = NULL;
    assert_int_equal(stat(f->path, &st), -1);
    assert_int_equal(errno, ENOENT);
}

static void test_live_socket_refused_stale_replaced(void **state)
{
    fixture *f = *state;
    char err[256];
    /* A second server on a path a live one holds fails, and leaves the first working. */
    hub_ctl *two = hub_ctl_new(f->loop, f->path, "", err, sizeof(err));
    assert_null(two);
    assert_non_null(strstr(err, "in use by a running evhub"));
    int fd = client(f);
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[1]}\n", 0,
                 "1");
    close(fd);
    /* A socket file nobody listens on is replaced. */
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char stale[100];
    snprintf(stale, sizeof(stale), "%s/stale.sock", f->dir);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", stale);
    assert_int_equal(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(s);
    two = hub_ctl_new(f->loop, stale, "", err, sizeof(err));
    if (!two)
        fail_msg("stale socket not replaced: %s", err);
    hub_ctl_free(two);
    /* Anything else at the path is not removed. */
    FILE *fp = fopen(stale, "w");
    assert_non_null(fp);
    fclose(fp);
    assert_null(hub_ctl_new(f->loop, stale, "", err, sizeof(err)));
    assert_non_null(strstr(err, "is not a socket"));
    unlink(stale);
}

static void test_params_by_name_and_position(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[7,\"x\",true]}\n");
    json_object *a = answer(f, fd), *r;
    assert_true(json_object_object_get_ex(a, "result", &r));
    assert_string_equal(json_object_to_json_string_ext(r, JSON_C_TO_STRING_PLAIN),
                        "{\"n\":7,\"s\":\"x\",\"b\":true}");
    assert_string_equal(id_text(a), "1");
    json_object_put(a);
    /* by name, an optional one given as null is left out, the id is a string */
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":\"q\",\"method\":\"echo\","
                 "\"params\":{\"s\":null,\"n\":-3}}\n");
    a = answer(f, fd);
    assert_true(json_object_object_get_ex(a, "result", &r));
    assert_string_equal(json_object_to_json_string_ext(r, JSON_C_TO_STRING_PLAIN), "{\"n\":-3}");
    assert_string_equal(id_text(a), "\"q\"");
    json_object_put(a);
    close(fd);
}

static void test_bad_requests_get_each_error_and_connection_lives(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    expect_reply(f, fd, "42\n", HUB_CTL_INVALID_REQUEST, "null");
    expect_reply(f, fd, "{\"jsonrpc\":\"1.0\",\"id\":2,\"method\":\"echo\"}\n",
                 HUB_CTL_INVALID_REQUEST, "2");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":3}\n", HUB_CTL_INVALID_REQUEST, "3");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":5}\n", HUB_CTL_INVALID_REQUEST,
                 "4");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":[1],\"method\":\"echo\"}\n",
                 HUB_CTL_INVALID_REQUEST, "null");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"echo\",\"params\":3}\n",
                 HUB_CTL_INVALID_REQUEST, "5");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"echo\",\"x\":1}\n",
                 HUB_CTL_INVALID_REQUEST, "6");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"nope\"}\n",
                 HUB_CTL_METHOD_NOT_FOUND, "7");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":8,\"method\":\"echo\"}\n",
                 HUB_CTL_INVALID_PARAMS, "8");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"echo\",\"params\":[\"1\"]}\n",
                 HUB_CTL_INVALID_PARAMS, "9");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":10,\"method\":\"echo\",\"params\":[1,2]}\n",
                 HUB_CTL_INVALID_PARAMS, "10");
    expect_reply(f, fd,
                 "{\"jsonrpc\":\"2.0\",\"id\":11,\"method\":\"echo\",\"params\":[1,\"\",true,4]}\n",
                 HUB_CTL_INVALID_PARAMS, "11");
    expect_reply(
        f, fd, "{\"jsonrpc\":\"2.0\",\"id\":12,\"method\":\"echo\",\"params\":{\"n\":1,\"z\":1}}\n",
        HUB_CTL_INVALID_PARAMS, "12");
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":13,\"method\":\"fail\"}\n", HUB_CTL_FAILED,
                 "13");
    expect_reply(f, fd, "[]\n", HUB_CTL_INVALID_REQUEST, "null");
    assert_int_equal(f->echo_calls, 0);
    /* ...and the same connection still answers a good request */
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":14,\"method\":\"echo\",\"params\":[1]}\n", 0,
                 "14");
    assert_int_equal(f->echo_calls, 1);
    close(fd);
}

static void test_text_that_is_not_json_ends_the_connection(void **state)
{
    fixture *f = *state;
    /* what a broken text's next lines hold cannot be told from new requests: none runs */
    static const char *const broken[] = {
        "nonsense\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[1]}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":1,,}\n",
        "[\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[1]},\n"
        "{\"jsonrpc\":\"2.0\",\"id\":2 oops},\n"
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"echo\",\"params\":[3]}\n]\n",
    };
    for (size_t i = 0; i < sizeof(broken) / sizeof(broken[0]); i++) {
        int fd = client(f);
        expect_reply(f, fd, broken[i], HUB_CTL_PARSE_ERROR, "null");
        assert_null(read_line(f, fd)); /* then the server closes */
        close(fd);
    }
    assert_int_equal(f->echo_calls, 0);
    /* requests before the broken text on the same connection are answered */
    int fd = client(f);
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"later\"}\n{\"jsonrpc\"]");
    json_object *a = answer(f, fd);
    assert_int_equal(error_code(a), HUB_CTL_PARSE_ERROR);
    json_object_put(a);
    hub_ctl_reply(f->held[0], json_object_new_int(1));
    f->nheld = 0;
    expect_answer(f, fd, 0, "1");
    assert_null(read_line(f, fd));
    close(fd);
    /* a request cut short by the end of the input is answered too */
    fd = client(f);
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ec");
    shutdown(fd, SHUT_WR);
    a = answer(f, fd);
    assert_int_equal(error_code(a), HUB_CTL_PARSE_ERROR);
    assert_non_null(strstr(json_object_to_json_string(a), "incomplete"));
    json_object_put(a);
    close(fd);
}

static void test_split_pipelined_and_multiline_requests(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    const char *req = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[12345]}";
    /* byte by byte, the loop running between bytes */
    for (const char *p = req; *p; p++) {
        assert_int_equal(send(fd, p, 1, 0), 1);
        ev_run(f->loop, EVRUN_NOWAIT);
    }
    send_str(fd, "\n");
    expect_answer(f, fd, 0, "1");
    /* two in one write, no newline between them, then one spread over lines */
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]}"
                 "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"echo\",\"params\":[3]}\n"
                 "{\n  \"jsonrpc\": \"2.0\",\n  \"id\": 4,\n  \"method\": \"echo\",\n"
                 "  \"params\": [4]\n}\n");
    expect_answer(f, fd, 0, "2");
    expect_answer(f, fd, 0, "3");
    expect_answer(f, fd, 0, "4");
    assert_int_equal(f->echo_calls, 4);
    close(fd);
}

static void test_notifications_get_no_answer(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"params\":[1]}\n"
                 "{\"jsonrpc\":\"2.0\",\"method\":\"nope\"}\n"
                 "{\"jsonrpc\":\"2.0\",\"method\":\"fail\"}\n"
                 "{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"echo\",\"params\":[2]}\n");
    json_object *a = answer(f, fd), *r;
    /* "id": null is a request (answered with id null), not a notification; the first answer
     * must be its own (params [2]), not one for the echo notification (params [1]) */
    assert_string_equal(id_text(a), "null");
    assert_true(json_object_object_get_ex(a, "result", &r));
    assert_string_equal(json_object_to_json_string_ext(r, JSON_C_TO_STRING_PLAIN), "{\"n\":2}");
    json_object_put(a);
    assert_int_equal(f->echo_calls, 2);
    close(fd);
}

/* Backpressure: a client that pipelines requests gets at most HUB_CTL_MAX_INFLIGHT of them
 * under way; the rest wait unread until answers are taken. */
static void test_pipelined_calls_are_bounded_in_flight(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    char req[64 * 40], *p = req;
    for (int i = 1; i <= 40; i++)
        p += sprintf(p, "{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"later\"}\n", i);
    send_str(fd, req);
    for (int i = 0; i < 50; i++)
        ev_run(f->loop, EVRUN_NOWAIT);
    assert_int_equal(f->nheld, HUB_CTL_MAX_INFLIGHT);
    /* answering them lets the next ones start, in order, and each answer comes */
    for (int done = 0; done < 40;) {
        int n = f->nheld;
        assert_true(n > 0 && n <= HUB_CTL_MAX_INFLIGHT);
        for (int i = 0; i < n; i++) {
            hub_ctl_call *c = f->held[0];
            memmove(f->held, f->held + 1, (size_t)(f->nheld - 1) * sizeof(f->held[0]));
            f->nheld--;
            hub_ctl_reply(c, json_object_new_int(done + i));
        }
        for (int i = 0; i < n; i++) {
            json_object *a = answer(f, fd);
            char want[16];
            snprintf(want, sizeof(want), "%d", done + i + 1);
            assert_string_equal(id_text(a), want);
            json_object_put(a);
        }
        done += n;
        for (int i = 0; i < 50 && done < 40 && f->nheld == 0; i++)
            ev_run(f->loop, EVRUN_NOWAIT);
    }
    close(fd);
}

/* A client that asks for big answers and never reads: the hub builds a bounded number of
 * them (unsent answers over HUB_CTL_OUT_PAUSE stop the reading), whether the requests come
 * pipelined or as one batch; reading them all later gets every answer. */
static void test_unread_answers_stop_the_reading(void **state)
{
    fixture *f = *state;
    enum { N = 400 };
    static char req[N * 48 + 4];
    assert_int_equal(hub_ctl_register(f->ctl, &big_spec, big_cmd, f), 0);
    for (int batch = 0; batch < 2; batch++) {
        int fd = client(f);
        int rcv = 4096;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
        char *p = req;
        if (batch)
            *p++ = '[';
        for (int i = 1; i <= N; i++)
            p += sprintf(p, "%s{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"big\"}%s",
                         batch && i > 1 ? "," : "", i, batch ? "" : "\n");
        if (batch)
            p += sprintf(p, "]\n");
        f->big_calls = 0;
        send_str(fd, req);
        for (int i = 0; i < 200; i++)
            ev_run(f->loop, EVRUN_NOWAIT);
        /* what the socket buffers took, plus HUB_CTL_OUT_PAUSE unsent, plus one answer */
        int bound = (int)((HUB_CTL_OUT_PAUSE + 4 * 1024 * 1024) / (32 * 1024)) + 2;
        if (f->big_calls >= N || f->big_calls > bound)
            fail_msg("%s: %d of %d answers built while the client read nothing",
                     batch ? "batch" : "pipelined", f->big_calls, N);
        /* now read everything: every answer arrives */
        int got = 0;
        if (batch) {
            /* one line of N answers: too long for read_line */
            size_t cap = (size_t)N * 33 * 1024, have = 0;
            char *all = malloc(cap);
            assert_non_null(all);
            for (int i = 0; i < 100000 && (have == 0 || all[have - 1] != '\n'); i++) {
                ev_run(f->loop, EVRUN_NOWAIT);
                ssize_t r = recv(fd, all + have, cap - have, MSG_DONTWAIT);
                assert_true(r != 0);
                if (r > 0)
                    have += (size_t)r;
            }
            all[have - 1] = '\0';
            json_object *a = json_tokener_parse(all);
            assert_non_null(a);
            assert_true(json_object_is_type(a, json_type_array));
            got = (int)json_object_array_length(a);
            json_object_put(a);
            free(all);
        } else {
            for (; got < N; got++)
                json_object_put(answer(f, fd));
        }
        assert_int_equal(got, N);
        assert_int_equal(f->big_calls, N);
        close(fd);
        for (int i = 0; i < 20; i++)
            ev_run(f->loop, EVRUN_NOWAIT);
    }
}

static void test_batch_with_late_answers(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    send_str(fd, "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"later\"},"
                 "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]},"
                 "{\"jsonrpc\":\"2.0\",\"method\":\"echo\",\"params\":[3]},"
                 "7,"
                 "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"nope\"}]\n");
    /* answers go out as they come, but the line (the batch's array) is not complete while one
     * part of the batch is still out */
    for (int i = 0; i < 20; i++)
        ev_run(f->loop, EVRUN_NOWAIT);
    char part[4096];
    ssize_t got = recv(fd, part, sizeof(part) - 1, MSG_DONTWAIT | MSG_PEEK);
    assert_true(got > 0 && part[0] == '[');
    part[got] = '\0';
    assert_null(strchr(part, '\n'));
    assert_int_equal(f->nheld, 1);
    hub_ctl_reply(f->held[0], json_object_new_string("done"));
    f->nheld = 0;
    json_object *a = answer(f, fd);
    assert_true(json_object_is_type(a, json_type_array));
    assert_int_equal(json_object_array_length(a), 4);
    int seen = 0;
    for (size_t i = 0; i < 4; i++) {
        json_object *e = json_object_array_get_idx(a, i);
        const char *id = id_text(e);
        if (strcmp(id, "1") == 0 && strcmp(member_str(e, "result"), "done") == 0)
            seen |= 1;
        else if (strcmp(id, "2") == 0 && error_code(e) == 0)
            seen |= 2;
        else if (strcmp(id, "null") == 0 && error_code(e) == HUB_CTL_INVALID_REQUEST)
            seen |= 4;
        else if (strcmp(id, "4") == 0 && error_code(e) == HUB_CTL_METHOD_NOT_FOUND)
            seen |= 8;
    }
    assert_int_equal(seen, 15);
    json_object_put(a);
    close(fd);
}

static void test_late_answer_after_asker_left(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"later\"}\n");
    while (f->nheld == 0)
        ev_run(f->loop, EVRUN_NOWAIT);
    close(fd);
    for (int i = 0; i < 20; i++)
        ev_run(f->loop, EVRUN_NOWAIT);
    hub_ctl_fail(f->held[0], HUB_CTL_FAILED, "too late"); /* dropped; ASan/valgrind watch */
    f->nheld = 0;
    /* the server is unharmed */
    fd = client(f);
    expect_reply(f, fd, "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[1]}\n", 0,
                 "2");
    close(fd);
}

static void test_half_closed_asker_still_gets_answers(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    /* as `nc -N`: write the request, shut down the sending side, read the answer */
    send_str(fd, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"later\"}\n"
                 "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[1]}\n");
    shutdown(fd, SHUT_WR);
    expect_answer(f, fd, 0, "2");
    for (int i = 0; i < 20; i++)
        ev_run(f->loop, EVRUN_NOWAIT);
    assert_int_equal(f->nheld, 1);
    hub_ctl_reply(f->held[0], json_object_new_int(5));
    f->nheld = 0;
    expect_answer(f, fd, 0, "1");
    /* then the server closes its end */
    assert_null(read_line(f, fd));
    close(fd);
}

static void test_oversized_request_is_refused(void **state)
{
    fixture *f = *state;
    int fd = client(f);
    size_t n = HUB_CTL_MAX_REQUEST + 4096;
    char *big = malloc(n + 64);
    assert_non_null(big);
    int k = snprintf(big, 64, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[\"");
    memset(big + k, 'a', n - (size_t)k);
    big[n] = '\0';
    send_all(f, fd, big, n);
    free(big);
    json_object *a = answer(f, fd);
    assert_int_equal(error_code(a), HUB_CTL_PARSE_ERROR);
    assert_non_null(strstr(json_object_to_json_string(a), "too large"));
    json_object_put(a);
    assert_null(read_line(f, fd));
    close(fd);
    assert_int_equal(f->echo_calls, 0);
    /* exactly at the limit is fine, and whitespace after it does not count */
    fd = client(f);
    n = HUB_CTL_MAX_REQUEST;
    big = malloc(n + 5000);
    assert_non_null(big);
    k = snprintf(big, 64, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"nope\",\"params\":[\"");
    memset(big + k, 'a', n - (size_t)k - 3);
    memcpy(big + n - 3, "\"]}", 3);
    memset(big + n, ' ', 4999);
    big[n + 4999] = '\n';
    send_all(f, fd, big, n + 5000);
    free(big);
    a = answer(f, fd);
    assert_int_equal(error_code(a), HUB_CTL_METHOD_NOT_FOUND); /* parsed, not refused */
    json_object_put(a);
    close(fd);
}

static void test_register_refuses_duplicates_and_lists(void **state)
{
    fixture *f = *state;
    assert_int_equal(hub_ctl_register(f->ctl, &echo_spec, echo_cmd, f), -EEXIST);
    assert_ptr_equal(hub_ctl_spec_at(f->ctl, 0), &echo_spec);
    assert_ptr_equal(hub_ctl_spec_at(f->ctl, 2), &fail_spec);
    assert_null(hub_ctl_spec_at(f->ctl, 3));
    assert_non_null(hub_ctl_core_spec("status"));
    assert_null(hub_ctl_core_spec("nope"));
}

static void test_tcp_must_be_loopback(void **state)
{
    fixture *f = *state;
    char err[256];
    assert_null(hub_ctl_new(f->loop, "", "0.0.0.0:0", err, sizeof(err)));
    assert_non_null(strstr(err, "not a loopback address"));
    hub_ctl *t = hub_ctl_new(f->loop, "", "127.0.0.1:0", err, sizeof(err));
    if (!t)
        fail_msg("loopback tcp: %s", err);
    assert_true(hub_ctl_tcp_port(t) > 0);
    hub_ctl_free(t);
}

#define T(name) cmocka_unit_test_setup_teardown(name, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_socket_is_0600_and_removed_on_free),
        T(test_live_socket_refused_stale_replaced),
        T(test_params_by_name_and_position),
        T(test_bad_requests_get_each_error_and_connection_lives),
        T(test_text_that_is_not_json_ends_the_connection),
        T(test_split_pipelined_and_multiline_requests),
        T(test_notifications_get_no_answer),
        T(test_batch_with_late_answers),
        T(test_pipelined_calls_are_bounded_in_flight),
        T(test_unread_answers_stop_the_reading),
        T(test_late_answer_after_asker_left),
        T(test_half_closed_asker_still_gets_answers),
        T(test_oversized_request_is_refused),
        T(test_register_refuses_duplicates_and_lists),
        T(test_tcp_must_be_loopback),
    };
    return cmocka_run_group_tests_name("control", tests, NULL, NULL);
}
