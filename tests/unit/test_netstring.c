/* Unit tests for the streaming netstring reader: framing cases, every split point, limits,
 * sticky errors, buffer release and out-of-memory behaviour. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/alloc.h"
#include "hub/netstring.h"

#define MAX_FRAME  1048576
#define MAX_FRAMES 16
#define BIG_CORPUS 2000

/* ---- a counting, optionally failing allocator ---------------------------------------- */

static struct {
    long live;      /* blocks currently allocated */
    long reallocs;  /* successful realloc calls */
    size_t largest; /* largest size ever requested */
    long budget;    /* allocations left before failing; <0 = never fail */
} am;

static int am_take(size_t n)
{
    if (n > am.largest)
        am.largest = n;
    if (am.budget == 0)
        return 0;
    if (am.budget > 0)
        am.budget--;
    return 1;
}

static void *am_malloc(size_t n)
{
    void *p = am_take(n) ? malloc(n) : NULL;
    am.live += p != NULL;
    return p;
}

static void *am_calloc(size_t n, size_t size)
{
    void *p = am_take(n * size) ? calloc(n, size) : NULL;
    am.live += p != NULL;
    return p;
}

static void *am_realloc(void *old, size_t n)
{
    void *p = am_take(n) ? realloc(old, n) : NULL;
    if (p && !old)
        am.live++;
    am.reallocs += p != NULL;
    return p;
}

static void am_free(void *p)
{
    am.live--;
    free(p);
}

static const hub_allocator counting = {am_malloc, am_calloc, am_realloc, am_free};

static int setup_allocator(void **state)
{
    (void)state;
    memset(&am, 0, sizeof(am));
    am.budget = -1;
    hub_set_allocator(&counting);
    return 0;
}

static int teardown_allocator(void **state)
{
    (void)state;
    hub_set_allocator(NULL);
    /* Every test must give back what it took, including on failure paths. */
    assert_int_equal(am.live, 0);
    return 0;
}

/* ---- helpers --------------------------------------------------------------------------- */

typedef struct frames {
    size_t n;
    size_t len[MAX_FRAMES];
    char data[MAX_FRAMES][64];
} frames;

/* Drain every complete frame into f; returns the last _next() result (0 or an error). */
static int drain(hub_ns_reader *r, frames *f)
{
    hub_slice s;
    int rc;
    for (int i = 0; i < 10000; i++) {
        rc = hub_ns_reader_next(r, &s);
        if (rc != 1)
            return rc;
        assert_true(f->n < MAX_FRAMES);
        assert_true(s.len <= sizeof(f->data[0]));
        memcpy(f->data[f->n], s.data, s.len);
        f->len[f->n++] = s.len;
    }
    fail_msg("drain did not terminate");
    return -1;
}

enum feed_mode { FEED_ONCE, FEED_BYTES, FEED_SPACE3 };

/* Feed buf in the given way, draining after each piece. */
static int feed_all(hub_ns_reader *r, const char *buf, size_t len, enum feed_mode mode, frames *f)
{
    int rc = 0;
    size_t step = mode == FEED_ONCE ? (len ? len : 1) : mode == FEED_BYTES ? 1 : 3;
    if (len == 0)
        return drain(r, f);
    for (size_t off = 0; off < len; off += step) {
        size_t n = len - off < step ? len - off : step;
        if (mode == FEED_SPACE3) {
            char *p;
            size_t avail;
            assert_int_equal(hub_ns_reader_space(r, n, &p, &avail), 0);
            assert_true(avail >= n);
            memcpy(p, buf + off, n);
            hub_ns_reader_commit(r, n);
        } else {
            assert_int_equal(hub_ns_reader_feed(r, buf + off, n), 0);
        }
        rc = drain(r, f);
        if (rc < 0)
            return rc;
    }
    return rc;
}

/* ---- case table ------------------------------------------------------------------------ */

typedef struct ns_case {
    const char *name;
    const char *in;
    size_t in_len; /* 0 = strlen(in) */
    size_t max_frame;
    int rc;             /* last _next() result: 0 or the sticky error */
    const char *err;    /* expected errstr, exact */
    const char *out[4]; /* expected frames, NULL-terminated */
    size_t pending;     /* hub_ns_reader_pending() at the end when rc == 0 */
} ns_case;

static const ns_case cases[] = {
    {"empty frame", "0:,", 0, MAX_FRAME, 0, NULL, {""}, 0},
    {"one frame", "5:hello,", 0, MAX_FRAME, 0, NULL, {"hello"}, 0},
    {"two frames in one feed", "5:hello,3:abc,", 0, MAX_FRAME, 0, NULL, {"hello", "abc"}, 0},
    {"whitespace between frames",
     " \r\n\t5:hello,\n 0:,\r\n",
     0,
     MAX_FRAME,
     0,
     NULL,
     {"hello", ""},
     0},
    {"leading zeros", "007:abcdefg,", 0, MAX_FRAME, 0, NULL, {"abcdefg"}, 0},
    {"separators inside payload", "5:a,b:c,", 0, MAX_FRAME, 0, NULL, {"a,b:c"}, 0},
    {"incomplete payload waits", "5:hel", 0, MAX_FRAME, 0, NULL, {NULL}, 5},
    {"incomplete length waits", "12", 0, MAX_FRAME, 0, NULL, {NULL}, 2},
    {"missing comma waits", "5:hello", 0, MAX_FRAME, 0, NULL, {NULL}, 7},
    {"frame at max_frame is accepted", "10:0123456789,", 0, 10, 0, NULL, {"0123456789"}, 0},
    {"wrong byte instead of comma",
     "5:hello!",
     0,
     MAX_FRAME,
     -EPROTO,
     "missing ',' after 5-byte payload",
     {NULL},
     0},
    {"junk at start",
     "xyz",
     0,
     MAX_FRAME,
     -EPROTO,
     "invalid character 'x' (0x78) in netstring length",
     {NULL},
     0},
    {"junk after a good frame",
     "3:abc,hello",
     0,
     MAX_FRAME,
     -EPROTO,
     "invalid character 'h' (0x68) in netstring length",
     {"abc"},
     0},
    {"bad digit",
     "5x:hello,",
     0,
     MAX_FRAME,
     -EPROTO,
     "invalid character 'x' (0x78) in netstring length",
     {NULL},
     0},
    {"space before colon",
     "5 :hello,",
     0,
     MAX_FRAME,
     -EPROTO,
     "invalid character ' ' (0x20) in netstring length",
     {NULL},
     0},
    {"negative length",
     "-1:a,",
     0,
     MAX_FRAME,
     -EPROTO,
     "invalid character '-' (0x2d) in netstring length",
     {NULL},
     0},
    {"NUL in length",
     "1\0:a,",
     5,
     MAX_FRAME,
     -EPROTO,
     "invalid byte 0x00 in netstring length",
     {NULL},
     0},
    {"empty length", ":abc,", 0, MAX_FRAME, -EPROTO, "empty length before ':'", {NULL}, 0},
    {"oversized length",
     "1048577:",
     0,
     MAX_FRAME,
     -EMSGSIZE,
     "frame length exceeds max_frame_size (1048576)",
     {NULL},
     0},
    {"oversized length before colon",
     "1048577",
     0,
     MAX_FRAME,
     -EMSGSIZE,
     "frame length exceeds max_frame_size (1048576)",
     {NULL},
     0},
    {"small limit", "11:", 0, 10, -EMSGSIZE, "frame length exceeds max_frame_size (10)", {NULL}, 0},
    {"huge length does not overflow",
     "99999999999999999999999999999999:",
     0,
     (size_t)-1,
     -EMSGSIZE,
     "frame length exceeds max_frame_size (18446744073709551615)",
     {NULL},
     0},
    /* Leading zeros do not count toward max_frame's 7 digits (issue 12, item 7). */
    {"leading zeros past max_frame's digits",
     "00000005:hello,",
     0,
     MAX_FRAME,
     0,
     NULL,
     {"hello"},
     0},
    {"leading zeros on an empty frame", "0000000000:,", 0, MAX_FRAME, 0, NULL, {""}, 0},
    {"leading zeros up to the prefix cap",
     "00000000000000000005:hello,",
     0,
     MAX_FRAME,
     0,
     NULL,
     {"hello"},
     0},
    {"prefix longer than the cap",
     "000000000000000000005:hello,",
     0,
     MAX_FRAME,
     -EPROTO,
     "netstring length has more than 20 digits",
     {NULL},
     0},
    {"endless zeros are refused at the cap",
     "0000000000000000000000000000000000000000",
     0,
     MAX_FRAME,
     -EPROTO,
     "netstring length has more than 20 digits",
     {NULL},
     0},
    {"leading zeros do not hide an oversized length",
     "0001048577:",
     0,
     MAX_FRAME,
     -EMSGSIZE,
     "frame length exceeds max_frame_size (1048576)",
     {NULL},
     0},
};

static void run_case(const ns_case *c, enum feed_mode mode)
{
    size_t in_len = c->in_len ? c->in_len : strlen(c->in);
    hub_ns_reader *r = hub_ns_reader_new(c->max_frame);
    frames f = {0};
    assert_non_null(r);
    int rc = feed_all(r, c->in, in_len, mode, &f);
    if (rc != c->rc)
        fail_msg("case '%s' mode %d: rc %d, want %d", c->name, mode, rc, c->rc);
    size_t want_n = 0;
    while (want_n < 4 && c->out[want_n])
        want_n++;
    if (f.n != want_n)
        fail_msg("case '%s' mode %d: %zu frames, want %zu", c->name, mode, f.n, want_n);
    for (size_t i = 0; i < want_n; i++) {
        assert_int_equal(f.len[i], strlen(c->out[i]));
        assert_memory_equal(f.data[i], c->out[i], f.len[i]);
    }
    if (c->err)
        assert_string_equal(hub_ns_reader_errstr(r), c->err);
    else
        assert_null(hub_ns_reader_errstr(r));
    if (rc == 0)
        assert_int_equal(hub_ns_reader_pending(r), c->pending);
    hub_ns_reader_free(r);
}

static void test_ns_reader_case_table_in_one_feed(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(&cases[i], FEED_ONCE);
}

static void test_ns_reader_case_table_byte_by_byte(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(&cases[i], FEED_BYTES);
}

static void test_ns_reader_case_table_via_space_commit(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(&cases[i], FEED_SPACE3);
}

/* ---- corpus at every split point --------------------------------------------------- */

static const struct {
    const char *data;
    size_t len;
} corpus[] = {
    {"", 0},      {"hello", 5},       {"a\0b", 3}, {",,,", 3},
    {":::", 3},   {"12:34,", 6},      {"\0", 1},   {"{\"event\":\"x\",\"n\":1}", 19},
    {" \r\n", 3}, {"0123456789", 10},
};
#define NCORPUS (sizeof(corpus) / sizeof(corpus[0]))

/* Encode the corpus with a little whitespace between some frames. */
static size_t build_corpus_stream(char *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < NCORPUS; i++) {
        assert_true(n + HUB_NS_HDR_MAX + corpus[i].len + 2 < cap);
        if (i % 3 == 1)
            out[n++] = '\n';
        n += hub_ns_encode_header(out + n, corpus[i].len);
        memcpy(out + n, corpus[i].data, corpus[i].len);
        n += corpus[i].len;
        out[n++] = ',';
    }
    return n;
}

static void check_corpus(const frames *f)
{
    assert_int_equal(f->n, NCORPUS);
    for (size_t i = 0; i < NCORPUS; i++) {
        assert_int_equal(f->len[i], corpus[i].len);
        assert_memory_equal(f->data[i], corpus[i].data, corpus[i].len);
    }
}

static void test_ns_reader_corpus_split_at_every_point(void **state)
{
    (void)state;
    char stream[512];
    size_t n = build_corpus_stream(stream, sizeof(stream));
    for (size_t split = 0; split <= n; split++) {
        hub_ns_reader *r = hub_ns_reader_new(64);
        frames f = {0};
        assert_non_null(r);
        assert_int_equal(hub_ns_reader_feed(r, stream, split), 0);
        assert_int_equal(drain(r, &f), 0);
        assert_int_equal(hub_ns_reader_feed(r, stream + split, n - split), 0);
        assert_int_equal(drain(r, &f), 0);
        check_corpus(&f);
        assert_int_equal(hub_ns_reader_pending(r), 0);
        hub_ns_reader_free(r);
    }
}

static void test_ns_reader_corpus_in_pieces_of_every_size(void **state)
{
    (void)state;
    char stream[512];
    size_t n = build_corpus_stream(stream, sizeof(stream));
    for (size_t step = 1; step <= n; step++) {
        hub_ns_reader *r = hub_ns_reader_new(64);
        frames f = {0};
        assert_non_null(r);
        for (size_t off = 0; off < n; off += step) {
            size_t len = n - off < step ? n - off : step;
            if (step % 2) {
                assert_int_equal(hub_ns_reader_feed(r, stream + off, len), 0);
            } else {
                char *p;
                size_t avail;
                assert_int_equal(hub_ns_reader_space(r, len, &p, &avail), 0);
                memcpy(p, stream + off, len);
                hub_ns_reader_commit(r, len);
            }
            assert_int_equal(drain(r, &f), 0);
        }
        check_corpus(&f);
        hub_ns_reader_free(r);
    }
}

/* Many frames of pseudo-random sizes in pseudo-random reads: exercises compaction and growth
 * with frames straddling every kind of boundary. */
static void test_ns_reader_many_frames_random_reads_survive_compaction(void **state)
{
    (void)state;
    size_t cap = BIG_CORPUS * (3000 + HUB_NS_HDR_MAX);
    char *stream = malloc(cap);
    size_t *lens = malloc(BIG_CORPUS * sizeof(*lens));
    uint32_t seed = 12345;
    size_t n = 0;
    assert_non_null(stream);
    assert_non_null(lens);
    for (size_t i = 0; i < BIG_CORPUS; i++) {
        seed = seed * 1103515245u + 12345u;
        lens[i] = (seed >> 8) % (i % 10 == 0 ? 3000 : 40);
        n += hub_ns_encode_header(stream + n, lens[i]);
        for (size_t k = 0; k < lens[i]; k++)
            stream[n++] = (char)(i + k);
        stream[n++] = ',';
    }
    hub_ns_reader *r = hub_ns_reader_new(4096);
    assert_non_null(r);
    size_t got = 0;
    for (size_t off = 0; off < n;) {
        seed = seed * 1103515245u + 12345u;
        size_t want = 1 + (seed >> 8) % 5000, avail;
        char *p;
        assert_int_equal(hub_ns_reader_space(r, want, &p, &avail), 0);
        size_t take = n - off < want ? n - off : want;
        memcpy(p, stream + off, take);
        hub_ns_reader_commit(r, take);
        off += take;
        hub_slice s;
        while (got < BIG_CORPUS && hub_ns_reader_next(r, &s) == 1) {
            assert_int_equal(s.len, lens[got]);
            for (size_t k = 0; k < s.len; k++)
                assert_int_equal((unsigned char)s.data[k], (unsigned char)(got + k));
            got++;
        }
    }
    assert_int_equal(got, BIG_CORPUS);
    assert_int_equal(hub_ns_reader_pending(r), 0);
    hub_ns_reader_free(r);
    free(stream);
    free(lens);
}

/* ---- slices, limits, stickiness, memory ------------------------------------------------- */

static void test_ns_reader_slices_stay_valid_until_next_feed(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    hub_slice a, b;
    assert_non_null(r);
    assert_int_equal(hub_ns_reader_feed(r, "3:one,3:two,", 12), 0);
    assert_int_equal(hub_ns_reader_next(r, &a), 1);
    assert_int_equal(hub_ns_reader_next(r, &b), 1);
    assert_memory_equal(a.data, "one", 3);
    assert_memory_equal(b.data, "two", 3);
    assert_int_equal(hub_ns_reader_next(r, &b), 0);
    hub_ns_reader_free(r);
}

static void test_ns_reader_error_is_sticky(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    hub_slice s;
    assert_non_null(r);
    assert_int_equal(hub_ns_reader_feed(r, "3:abc!", 6), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), -EPROTO);
    const char *e = hub_ns_reader_errstr(r);
    assert_string_equal(e, "missing ',' after 3-byte payload");
    /* Valid bytes after the error do not revive the stream. */
    assert_int_equal(hub_ns_reader_feed(r, "3:abc,", 6), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), -EPROTO);
    assert_int_equal(hub_ns_reader_next(r, &s), -EPROTO);
    assert_string_equal(hub_ns_reader_errstr(r), "missing ',' after 3-byte payload");
    assert_int_equal(hub_ns_reader_pending(r), 0);
    hub_ns_reader_free(r);
}

/* "0001024:" at a 1 KiB limit: 7 digits where 1024 has 4, yet the frame is exactly at the
 * limit and must pass, whatever way it is fed (issue 12, item 7). */
static void test_ns_reader_leading_zeros_at_max_frame(void **state)
{
    (void)state;
    static char in[8 + 1024 + 1];
    memcpy(in, "0001024:", 8);
    memset(in + 8, 'z', 1024);
    in[8 + 1024] = ',';
    for (int mode = FEED_ONCE; mode <= FEED_SPACE3; mode++) {
        hub_ns_reader *r = hub_ns_reader_new(1024);
        hub_slice s;
        int got = 0;
        assert_non_null(r);
        size_t step = mode == FEED_ONCE ? sizeof(in) : mode == FEED_BYTES ? 1 : 3;
        for (size_t off = 0; off < sizeof(in); off += step) {
            size_t n = sizeof(in) - off < step ? sizeof(in) - off : step;
            assert_int_equal(hub_ns_reader_feed(r, in + off, n), 0);
            int rc = hub_ns_reader_next(r, &s);
            assert_true(rc >= 0);
            if (rc == 1) {
                assert_int_equal(s.len, 1024);
                assert_int_equal(s.data[0], 'z');
                assert_int_equal(s.data[1023], 'z');
                got++;
            }
        }
        assert_int_equal(got, 1);
        assert_null(hub_ns_reader_errstr(r));
        /* One byte more is still refused, zeros or not. */
        assert_int_equal(hub_ns_reader_feed(r, "0001025:", 8), 0);
        assert_int_equal(hub_ns_reader_next(r, &s), -EMSGSIZE);
        hub_ns_reader_free(r);
    }
}

static void test_ns_reader_idle_reader_holds_no_buffer(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    hub_slice s;
    assert_non_null(r);
    assert_int_equal(am.live, 1); /* the reader itself, no buffer yet */
    assert_int_equal(hub_ns_reader_feed(r, "5:hel", 5), 0);
    assert_int_equal(am.live, 2);
    hub_ns_reader_shrink(r); /* a partial frame is pending: keep it */
    assert_int_equal(am.live, 2);
    assert_int_equal(hub_ns_reader_pending(r), 5);
    assert_int_equal(hub_ns_reader_feed(r, "lo,", 3), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_memory_equal(s.data, "hello", 5);
    assert_int_equal(hub_ns_reader_pending(r), 0);
    hub_ns_reader_shrink(r);
    assert_int_equal(am.live, 1);
    /* It keeps working after the buffer was released. */
    assert_int_equal(hub_ns_reader_feed(r, "0:,", 3), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_int_equal(s.len, 0);
    hub_ns_reader_free(r);
}

/* An embedded reader (a client's) allocates nothing until bytes come, and its error's reason
 * only when it fails; without memory for the reason it still fails with the right error and
 * says what kind. deinit releases both, and the reader can be initialised again. */
static void test_ns_reader_embedded_allocates_only_what_it_holds(void **state)
{
    (void)state;
    hub_ns_reader r;
    hub_slice s;
    hub_ns_reader_init(&r, 10);
    assert_int_equal(am.live, 0);
    assert_int_equal(hub_ns_reader_feed(&r, "2:ab,", 5), 0);
    assert_int_equal(hub_ns_reader_next(&r, &s), 1);
    assert_int_equal(am.live, 1); /* the buffer */
    assert_int_equal(hub_ns_reader_feed(&r, "x", 1), 0);
    assert_int_equal(hub_ns_reader_next(&r, &s), -EPROTO);
    assert_int_equal(am.live, 2); /* the buffer and the reason */
    assert_string_equal(hub_ns_reader_errstr(&r),
                        "invalid character 'x' (0x78) in netstring length");
    hub_ns_reader_deinit(&r);
    assert_int_equal(am.live, 0);

    hub_ns_reader_init(&r, 10);
    assert_null(hub_ns_reader_errstr(&r));
    assert_int_equal(hub_ns_reader_feed(&r, "123", 3), 0);
    am.budget = 0; /* no memory for the reason */
    assert_int_equal(hub_ns_reader_next(&r, &s), -EMSGSIZE);
    assert_int_equal(hub_ns_reader_next(&r, &s), -EMSGSIZE); /* sticky */
    assert_string_equal(hub_ns_reader_errstr(&r), "frame length exceeds max_frame_size");
    am.budget = -1;
    hub_ns_reader_deinit(&r);
    assert_int_equal(am.live, 0);

    hub_ns_reader_init(&r, 10);
    assert_int_equal(hub_ns_reader_feed(&r, ":", 1), 0);
    am.budget = 0;
    assert_int_equal(hub_ns_reader_next(&r, &s), -EPROTO);
    assert_string_equal(hub_ns_reader_errstr(&r), "netstring framing error");
    am.budget = -1;
    hub_ns_reader_deinit(&r);
    assert_int_equal(am.live, 0);
}

/* The pool of read buffers (client.c): an empty reader hands its buffer over, a reader with
 * pending bytes keeps it, and a reader given a buffer parses into it as into its own. */
static void test_ns_reader_buffer_taken_and_given(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME), *r2 = hub_ns_reader_new(MAX_FRAME);
    hub_slice s;
    size_t cap = 0;
    assert_non_null(r);
    assert_non_null(r2);
    assert_null(hub_ns_reader_take_buf(r, &cap)); /* none yet */
    assert_int_equal(hub_ns_reader_feed(r, "5:hel", 5), 0);
    assert_null(hub_ns_reader_take_buf(r, &cap)); /* a partial frame is pending */
    assert_int_equal(hub_ns_reader_feed(r, "lo,", 3), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_memory_equal(s.data, "hello", 5);
    char *b = hub_ns_reader_take_buf(r, &cap);
    assert_non_null(b);
    assert_true(cap >= 8);
    assert_int_equal(am.live, 3); /* two readers and the buffer, now nobody's */
    /* r works on with a buffer of its own; r2 gets the taken one */
    assert_int_equal(hub_ns_reader_feed(r, "1:x,", 4), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_int_equal(hub_ns_reader_give_buf(r, b, cap), -EBUSY);
    assert_int_equal(hub_ns_reader_give_buf(r2, b, cap), 0);
    assert_int_equal(am.live, 4);
    char *p;
    size_t avail;
    assert_int_equal(hub_ns_reader_space(r2, 4, &p, &avail), 0);
    assert_ptr_equal(p, b); /* the given buffer, from its start */
    assert_int_equal(avail, cap);
    memcpy(p, "3:a\0b,2:", 8);
    hub_ns_reader_commit(r2, 8);
    assert_int_equal(hub_ns_reader_next(r2, &s), 1);
    assert_memory_equal(s.data, "a\0b", 3);
    assert_int_equal(hub_ns_reader_next(r2, &s), 0);
    assert_int_equal(hub_ns_reader_pending(r2), 2);
    hub_ns_reader_free(r);
    hub_ns_reader_free(r2);
    assert_int_equal(am.live, 0);
}

static void test_ns_reader_big_frame_byte_by_byte_grows_geometrically(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    char hdr[HUB_NS_HDR_MAX];
    hub_slice s;
    assert_non_null(r);
    size_t h = hub_ns_encode_header(hdr, MAX_FRAME);
    for (size_t i = 0; i < h; i++)
        assert_int_equal(hub_ns_reader_feed(r, hdr + i, 1), 0);
    for (size_t i = 0; i < MAX_FRAME; i++) {
        char c = (char)('a' + i % 26);
        assert_int_equal(hub_ns_reader_feed(r, &c, 1), 0);
        if (i % 65536 == 0)
            assert_int_equal(hub_ns_reader_next(r, &s), 0);
    }
    assert_int_equal(hub_ns_reader_next(r, &s), 0);
    assert_int_equal(hub_ns_reader_feed(r, ",", 1), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_int_equal(s.len, MAX_FRAME);
    assert_int_equal(s.data[MAX_FRAME - 1], 'a' + (MAX_FRAME - 1) % 26);
    /* Doubling from 4 KiB: a handful of reallocs, and never more than one frame needs. */
    assert_true(am.reallocs <= 12);
    assert_true(am.largest <= MAX_FRAME + HUB_NS_HDR_MAX + 1);
    hub_ns_reader_free(r);
}

static void test_ns_reader_consumed_bytes_are_compacted_not_grown(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    const char *frame = "5:hello,";
    hub_slice s;
    size_t got = 0;
    assert_non_null(r);
    /* After a 3-byte first read, 8-byte reads of 8-byte frames always end 3 bytes into the
     * next frame: something is always pending, so only compaction can reuse the consumed
     * space. 80 KB go through a buffer that never grows past its first allocation. */
    for (size_t off = 0; off < 10000 * 8;) {
        char *p;
        size_t avail, n = off == 0 ? 3 : 8;
        assert_int_equal(hub_ns_reader_space(r, n, &p, &avail), 0);
        for (size_t k = 0; k < n; k++)
            p[k] = frame[(off + k) % 8];
        hub_ns_reader_commit(r, n);
        off += n;
        while (hub_ns_reader_next(r, &s) == 1) {
            assert_memory_equal(s.data, "hello", 5);
            got++;
        }
        assert_int_equal(hub_ns_reader_pending(r), 3);
    }
    assert_int_equal(got, 10000);
    assert_true(am.largest <= 4096);
    hub_ns_reader_free(r);
}

static void test_ns_reader_space_gives_at_least_want(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(16);
    char *p;
    size_t avail;
    assert_non_null(r);
    /* A read size larger than one frame is the caller's choice and is honoured. */
    assert_int_equal(hub_ns_reader_space(r, 65536, &p, &avail), 0);
    assert_true(avail >= 65536);
    memcpy(p, "2:hi,", 5);
    hub_ns_reader_commit(r, 5);
    assert_int_equal(hub_ns_reader_pending(r), 5);
    hub_ns_reader_free(r);
}

static void test_ns_reader_out_of_memory_is_reported_not_fatal(void **state)
{
    (void)state;
    hub_slice s;
    am.budget = 0;
    assert_null(hub_ns_reader_new(MAX_FRAME));
    am.budget = 1; /* the reader, but not its buffer */
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    assert_non_null(r);
    assert_int_equal(hub_ns_reader_feed(r, "3:abc,", 6), -ENOMEM);
    char *p;
    size_t avail;
    assert_int_equal(hub_ns_reader_space(r, 10, &p, &avail), -ENOMEM);
    assert_int_equal(hub_ns_reader_next(r, &s), 0);
    /* Memory comes back: nothing was lost or corrupted. */
    am.budget = -1;
    assert_int_equal(hub_ns_reader_feed(r, "3:abc,", 6), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_memory_equal(s.data, "abc", 3);
    /* A failed growth keeps the pending bytes. */
    assert_int_equal(hub_ns_reader_feed(r, "9000:x", 6), 0);
    am.budget = 0;
    assert_int_equal(hub_ns_reader_space(r, 100000, &p, &avail), -ENOMEM);
    am.budget = -1;
    assert_int_equal(hub_ns_reader_pending(r), 6);
    assert_int_equal(hub_ns_reader_next(r, &s), 0);
    hub_ns_reader_free(r);
}

static void test_ns_reader_oom_at_every_allocation_does_not_leak(void **state)
{
    (void)state;
    for (long budget = 0; budget < 12; budget++) {
        am.budget = budget;
        hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
        if (!r)
            continue;
        char chunk[5000];
        memset(chunk, 'x', sizeof(chunk));
        size_t h = hub_ns_encode_header(chunk, 40000);
        (void)h;
        for (int i = 0; i < 10; i++)
            (void)hub_ns_reader_feed(r, chunk, sizeof(chunk));
        hub_ns_reader_free(r);
    }
    am.budget = -1;
}

static void test_ns_encode_header_and_length(void **state)
{
    (void)state;
    char hdr[HUB_NS_HDR_MAX];
    assert_int_equal(hub_ns_encode_header(hdr, 0), 2);
    assert_memory_equal(hdr, "0:", 2);
    assert_int_equal(hub_ns_encode_header(hdr, 12345), 6);
    assert_memory_equal(hdr, "12345:", 6);
    assert_int_equal(hub_ns_encode_header(hdr, (size_t)-1), 21);
    assert_memory_equal(hdr, "18446744073709551615:", 21);
    assert_int_equal(hub_ns_encoded_len(0), 3);
    assert_int_equal(hub_ns_encoded_len(5), 8);
    assert_int_equal(hub_ns_encoded_len(9), 12);
    assert_int_equal(hub_ns_encoded_len(10), 14);
}

static void test_ns_encoded_frame_round_trips(void **state)
{
    (void)state;
    hub_ns_reader *r = hub_ns_reader_new(MAX_FRAME);
    char buf[64];
    hub_slice s;
    assert_non_null(r);
    size_t n = hub_ns_encode_header(buf, 7);
    memcpy(buf + n, "a\0b,c:d", 7);
    buf[n + 7] = ',';
    assert_int_equal(n + 8, hub_ns_encoded_len(7));
    assert_int_equal(hub_ns_reader_feed(r, buf, n + 8), 0);
    assert_int_equal(hub_ns_reader_next(r, &s), 1);
    assert_int_equal(s.len, 7);
    assert_memory_equal(s.data, "a\0b,c:d", 7);
    hub_ns_reader_free(r);
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup_allocator, teardown_allocator)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_ns_reader_case_table_in_one_feed),
        T(test_ns_reader_case_table_byte_by_byte),
        T(test_ns_reader_case_table_via_space_commit),
        T(test_ns_reader_corpus_split_at_every_point),
        T(test_ns_reader_corpus_in_pieces_of_every_size),
        T(test_ns_reader_many_frames_random_reads_survive_compaction),
        T(test_ns_reader_slices_stay_valid_until_next_feed),
        T(test_ns_reader_error_is_sticky),
        T(test_ns_reader_leading_zeros_at_max_frame),
        T(test_ns_reader_idle_reader_holds_no_buffer),
        T(test_ns_reader_buffer_taken_and_given),
        T(test_ns_reader_embedded_allocates_only_what_it_holds),
        T(test_ns_reader_big_frame_byte_by_byte_grows_geometrically),
        T(test_ns_reader_consumed_bytes_are_compacted_not_grown),
        T(test_ns_reader_space_gives_at_least_want),
        T(test_ns_reader_out_of_memory_is_reported_not_fatal),
        T(test_ns_reader_oom_at_every_allocation_does_not_leak),
        T(test_ns_encode_header_and_length),
        T(test_ns_encoded_frame_round_trips),
    };
    return cmocka_run_group_tests_name("netstring", tests, NULL, NULL);
}
