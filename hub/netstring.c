/* Streaming netstring reader and header encoder: a pure codec, no I/O (see netstring.h). */
#include "hub/netstring.h"

#include "hub/alloc.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Consumed bytes are moved out of the buffer once this many have piled up (or half of it). */
#define NS_COMPACT_MIN 1024
/* The first allocation; small so that a connection sending small frames stays small. */
#define NS_INITIAL_CAP 4096
/* Room for a failure's reason. */
#define NS_ERRSTR_MAX 96

enum ns_state {
    NS_BETWEEN, /* skipping whitespace, expecting the first length digit */
    NS_LENGTH,  /* reading length digits, expecting more digits or ':' */
    NS_PAYLOAD, /* header done, waiting for payload bytes and the ',' */
    NS_FAILED,  /* sticky error; err and errstr are set */
};

static size_t count_digits(size_t v)
{
    size_t n = 1;
    while (v >= 10 && n < HUB_NS_HDR_MAX) {
        v /= 10;
        n++;
    }
    return n;
}

void hub_ns_reader_init(hub_ns_reader *r, size_t max_frame)
{
    memset(r, 0, sizeof(*r));
    r->max_frame = max_frame;
    r->state = NS_BETWEEN;
}

void hub_ns_reader_deinit(hub_ns_reader *r)
{
    hub_free(r->buf);
    hub_free(r->errstr);
    r->buf = r->errstr = NULL;
    r->cap = r->start = r->end = r->pos = r->payload = 0;
}

hub_ns_reader *hub_ns_reader_new(size_t max_frame)
{
    hub_ns_reader *r = hub_malloc(sizeof(*r));
    if (r)
        hub_ns_reader_init(r, max_frame);
    return r;
}

void hub_ns_reader_free(hub_ns_reader *r)
{
    if (!r)
        return;
    hub_ns_reader_deinit(r);
    hub_free(r);
}

/* The buffer a single maximal frame needs; growth stops there. Saturates rather than wraps
 * for absurd limits (realloc then fails with -ENOMEM). */
static size_t max_cap(const hub_ns_reader *r)
{
    return r->max_frame > (size_t)-1 - HUB_NS_HDR_MAX - 1 ? (size_t)-1
                                                          : r->max_frame + HUB_NS_HDR_MAX + 1;
}

/* Enter the sticky failed state; what was buffered is useless now, so drop it. The reason is
 * allocated here, once: a reader that never fails holds no room for one. */
static int fail(hub_ns_reader *r, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(hub_ns_reader *r, int err, const char *fmt, ...)
{
    va_list ap;
    if (!r->errstr && (r->errstr = hub_malloc(NS_ERRSTR_MAX))) {
        va_start(ap, fmt);
        vsnprintf(r->errstr, NS_ERRSTR_MAX, fmt, ap);
        va_end(ap);
    }
    r->err = (short)err;
    r->state = NS_FAILED;
    r->start = r->end = r->pos = r->payload = 0;
    return err;
}

static int fail_char(hub_ns_reader *r, unsigned char c)
{
    if (c >= 0x20 && c < 0x7f)
        return fail(r, -EPROTO, "invalid character '%c' (0x%02x) in netstring length", c, c);
    return fail(r, -EPROTO, "invalid byte 0x%02x in netstring length", c);
}

/* Move pending bytes to the front. Offsets shift with them; handed-out slices die here. */
static void compact(hub_ns_reader *r)
{
    size_t shift = r->start;
    if (shift == 0)
        return;
    if (r->end > shift)
        memmove(r->buf, r->buf + shift, r->end - shift);
    r->end -= shift;
    r->start = 0;
    r->pos = r->pos > shift ? r->pos - shift : 0;
    r->payload = r->payload > shift ? r->payload - shift : 0;
}

/* Geometric growth, but never past what one maximal frame needs unless want demands it. */
static int grow(hub_ns_reader *r, size_t want)
{
    if (want > (size_t)-1 - r->end)
        return -ENOMEM;
    size_t need = r->end + want;
    size_t ncap = r->cap ? r->cap : NS_INITIAL_CAP;
    while (ncap < need && ncap <= (size_t)-1 / 2)
        ncap *= 2;
    if (ncap > max_cap(r))
        ncap = max_cap(r);
    if (ncap < need)
        ncap = need;
    char *nbuf = hub_realloc(r->buf, ncap);
    if (!nbuf)
        return -ENOMEM;
    r->buf = nbuf;
    r->cap = ncap;
    return 0;
}

int hub_ns_reader_space(hub_ns_reader *r, size_t want, char **ptr, size_t *avail)
{
    if (r->start == r->end) {
        /* Nothing pending: rewinding is free, no bytes move. */
        r->start = r->end = r->pos = r->payload = 0;
    } else if (r->start >= NS_COMPACT_MIN || r->start >= r->cap / 2) {
        compact(r);
    }
    if (want == 0)
        want = 1;
    if (r->cap - r->end < want) {
        int rc = grow(r, want);
        if (rc < 0)
            return rc;
    }
    *ptr = r->buf + r->end;
    *avail = r->cap - r->end;
    return 0;
}

void hub_ns_reader_commit(hub_ns_reader *r, size_t n)
{
    /* After a failure the bytes are dropped: the stream cannot resynchronise. */
    if (r->state == NS_FAILED)
        return;
    if (n > r->cap - r->end)
        n = r->cap - r->end;
    r->end += n;
}

int hub_ns_reader_feed(hub_ns_reader *r, const char *buf, size_t len)
{
    char *p;
    size_t avail;
    if (len == 0 || r->state == NS_FAILED)
        return 0;
    int rc = hub_ns_reader_space(r, len, &p, &avail);
    if (rc < 0)
        return rc;
    memcpy(p, buf, len);
    r->end += len;
    return 0;
}

static int is_ws(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* NS_BETWEEN: skip whitespace; a digit starts the next frame. Returns 1 on a digit. */
static int parse_between(hub_ns_reader *r)
{
    size_t pos = r->pos;
    while (pos < r->end && is_ws((unsigned char)r->buf[pos]))
        pos++;
    /* Skipped whitespace counts as consumed, so it never holds the buffer. */
    r->start = r->pos = pos;
    if (pos == r->end)
        return 0;
    unsigned char c = (unsigned char)r->buf[pos];
    if (c >= '0' && c <= '9') {
        r->state = NS_LENGTH;
        r->len = 0;
        r->ndigits = 0;
        return 1;
    }
    if (c == ':')
        return fail(r, -EPROTO, "empty length before ':'");
    return fail_char(r, c);
}

/* The whole "<digits>:" plus ',' fits in the HUB_NS_HDR_MAX + 1 bytes max_cap allows for. */
_Static_assert(HUB_NS_DIGITS_MAX + 2 <= HUB_NS_HDR_MAX + 1, "length prefix outgrows max_cap");

/* NS_LENGTH: accumulate digits up to ':'. The limit is checked before each multiply, so len
 * never exceeds max_frame and cannot overflow; that alone bounds the significant digits, so
 * leading zeros are free (README: they are accepted) and only the prefix as a whole is capped.
 * Returns 1 once ':' is seen. */
static int parse_length(hub_ns_reader *r)
{
    size_t pos = r->pos, len = r->len;
    unsigned nd = r->ndigits;
    int rc = 0;
    while (pos < r->end) {
        unsigned char c = (unsigned char)r->buf[pos];
        if (c == ':') {
            r->state = NS_PAYLOAD;
            r->payload = pos + 1;
            rc = 1;
            break;
        }
        if (c < '0' || c > '9')
            return fail_char(r, c);
        size_t d = (size_t)(c - '0');
        if (d > r->max_frame || len > (r->max_frame - d) / 10)
            return fail(r, -EMSGSIZE, "frame length exceeds max_frame_size (%zu)", r->max_frame);
        if (++nd > HUB_NS_DIGITS_MAX)
            return fail(r, -EPROTO, "netstring length has more than %d digits", HUB_NS_DIGITS_MAX);
        len = len * 10 + d;
        pos++;
    }
    r->pos = pos;
    r->len = len;
    r->ndigits = nd;
    return rc;
}

int hub_ns_reader_next(hub_ns_reader *r, hub_slice *out)
{
    int rc;
    if (r->state == NS_FAILED)
        return r->err;
    if (r->state == NS_BETWEEN && (rc = parse_between(r)) <= 0)
        return rc;
    if (r->state == NS_LENGTH && (rc = parse_length(r)) <= 0)
        return rc;
    /* NS_PAYLOAD: the payload is skipped by length, never scanned. */
    if (r->end - r->payload <= r->len)
        return 0;
    size_t comma = r->payload + r->len;
    if (r->buf[comma] != ',')
        return fail(r, -EPROTO, "missing ',' after %zu-byte payload", r->len);
    out->data = r->buf + r->payload;
    out->len = r->len;
    r->start = r->pos = comma + 1;
    r->state = NS_BETWEEN;
    return 1;
}

const char *hub_ns_reader_errstr(const hub_ns_reader *r)
{
    if (r->state != NS_FAILED)
        return NULL;
    if (r->errstr)
        return r->errstr;
    return r->err == -EMSGSIZE ? "frame length exceeds max_frame_size" : "netstring framing error";
}

size_t hub_ns_reader_pending(const hub_ns_reader *r) { return r->end - r->start; }

void hub_ns_reader_shrink(hub_ns_reader *r)
{
    if (r->start != r->end)
        return;
    hub_free(r->buf);
    r->buf = NULL;
    r->cap = r->start = r->end = r->pos = r->payload = 0;
}

char *hub_ns_reader_take_buf(hub_ns_reader *r, size_t *cap)
{
    char *b = r->buf;
    if (!b || r->start != r->end)
        return NULL;
    *cap = r->cap;
    r->buf = NULL;
    r->cap = r->start = r->end = r->pos = r->payload = 0;
    return b;
}

int hub_ns_reader_give_buf(hub_ns_reader *r, char *buf, size_t cap)
{
    if (r->buf)
        return -EBUSY;
    r->buf = buf;
    r->cap = cap;
    r->start = r->end = r->pos = r->payload = 0;
    return 0;
}

size_t hub_ns_encode_header(char *hdr, size_t len)
{
    char tmp[HUB_NS_HDR_MAX];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + len % 10);
        len /= 10;
    } while (len && n < sizeof(tmp));
    for (size_t i = 0; i < n; i++)
        hdr[i] = tmp[n - 1 - i];
    hdr[n] = ':';
    return n + 1;
}

size_t hub_ns_encoded_len(size_t len) { return count_digits(len) + 1 + len + 1; }
