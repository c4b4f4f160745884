/* Client connections: lifecycle, inbound frames, the write queue, and reaping. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hub/alloc.h"
#include "hub/hub_int.h"
#include "hub/log.h"

#define CLOG(l, c, fmt, ...)                                                                       \
    hub_log(l, "client id=%llu addr=%s:%u%s%s: " fmt, (unsigned long long)(c)->id, (c)->info.addr, \
            (c)->info.port, (c)->tag ? " tag=" : "", (c)->tag ? (c)->tag->name : "", __VA_ARGS__)

/* A close reason is kept up to this many bytes. */
#define HUB_CLOSE_REASON_MAX 95

/* Bytes a payload of len takes on the wire (netstring or raw). */
static size_t frame_len(const hub *h, size_t len)
{
    return h->cfg.netstring_format ? hub_ns_encoded_len(len) : len;
}

int hub__frame_too_big(const hub *h, size_t len) { return frame_len(h, len) > h->cfg.max_outbuf; }

/* The payload as it goes on the wire, into out (frame_len(h, len) bytes). */
static void frame_encode(const hub *h, char *out, const char *data, size_t len)
{
    if (h->cfg.netstring_format) {
        size_t hl = hub_ns_encode_header(out, len);
        memcpy(out + hl, data, len);
        out[hl + len] = ',';
    } else {
        memcpy(out, data, len);
    }
}

static hub_fblock *fblock_new(size_t cap)
{
    hub_fblock *b = hub_malloc(sizeof(*b) + cap);
    if (!b)
        return NULL;
    b->refcnt = 1;
    b->cap = cap;
    b->used = 0;
    return b;
}

static void fblock_unref(hub_fblock *b)
{
    if (b && --b->refcnt == 0)
        hub_free(b);
}

/* Room for total bytes at the end of *cur (a block held by one reference), replacing it by a
 * new block when full. The block, or NULL. */
static hub_fblock *fblock_room(hub_fblock **cur, size_t total)
{
    hub_fblock *b = *cur;
    if (b && b->cap - b->used >= total)
        return b;
    if (!(b = fblock_new(HUB_FBLOCK)))
        return NULL;
    fblock_unref(*cur);
    *cur = b;
    return b;
}

int hub__frame_new(hub *h, const char *data, size_t len, hub_frame *out)
{
    size_t total = frame_len(h, len);
    hub_fblock *b;
    if (total > HUB_FBLOCK_BIG)
        b = fblock_new(total); /* its own block: the reference is the caller's */
    else if ((b = fblock_room(&h->fcur, total)))
        b->refcnt++;
    if (!b)
        return -ENOMEM;
    out->blk = b;
    out->data = b->data + b->used;
    out->len = total;
    b->used += total;
    frame_encode(h, out->data, data, len);
    return 0;
}

void hub__frame_unref(hub_frame *f)
{
    fblock_unref(f->blk);
    f->blk = NULL;
}

void hub__frames_free(hub *h)
{
    fblock_unref(h->fcur);
    h->fcur = NULL;
}

/* JSON string escaping, cut short (never mid-escape) when dst is full. */
static size_t json_escape(char *dst, size_t cap, const char *src, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 7 < cap; i++) {
        unsigned char ch = (unsigned char)src[i];
        if (ch == '"' || ch == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)ch;
        } else if (ch < 0x20) {
            o += (size_t)snprintf(dst + o, cap - o, "\\u%04x", ch);
        } else {
            dst[o++] = (char)ch;
        }
    }
    if (cap)
        dst[o < cap ? o : cap - 1] = '\0';
    return o;
}

/* The JSON body of an error frame into body; its length, or 0 if it does not fit. */
static size_t error_body(char *body, size_t cap, const char *code, const char *reason)
{
    char esc[512];
    json_escape(esc, sizeof(esc), reason, strlen(reason));
    int n = snprintf(body, cap, "{\"error\":\"%s\",\"reason\":\"%s\"}", code, esc);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

void hub__write_error_frame(hub *h, int fd, const char *code, const char *reason)
{
    char body[640], out[640 + HUB_NS_HDR_MAX];
    if (!h->cfg.netstring_format)
        return;
    size_t n = error_body(body, sizeof(body), code, reason);
    if (!n)
        return;
    frame_encode(h, out, body, n);
    /* Best effort: the socket is non-blocking and about to be closed. */
    ssize_t w = send(fd, out, frame_len(h, n), MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w;
}

/* Free conidx values are a binary min-heap, so the lowest free slot is reused first, as
 * Kamailio's scan of its client array does. */
static int slot_take(hub *h)
{
    int *a = h->free_slots, n = --h->nfree, top = a[0], x = a[n], i = 0;
    for (int child = 1; child < n; child = 2 * i + 1) {
        if (child + 1 < n && a[child + 1] < a[child])
            child++;
        if (x <= a[child])
            break;
        a[i] = a[child];
        i = child;
    }
    if (n > 0)
        a[i] = x;
    return top;
}

static void slot_release(hub *h, int slot)
{
    int *a = h->free_slots, i = h->nfree++;
    for (; i > 0 && a[(i - 1) / 2] > slot; i = (i - 1) / 2)
        a[i] = a[(i - 1) / 2];
    a[i] = slot;
}

hub_client *hub__client_by_id(hub *h, uint64_t id) { return hub_idmap_get(&h->ids, id); }

/* ---- write queue ---- */

/* Index of the i-th queued frame; the ring's capacity is a power of two. */
#define WQ_AT(c, i) (((c)->wq_head + (i)) & ((c)->wq_cap - 1))

static void pending_add(hub_client *c)
{
    hub *h = c->h;
    if (c->flags & (HUB_CLIENT_PENDING | HUB_CLIENT_WRITE_WAIT | HUB_CLIENT_REAP))
        return;
    c->flags |= HUB_CLIENT_PENDING;
    c->pend_next = h->pending;
    h->pending = c;
    if (!ev_is_active(&h->idle_w))
        ev_idle_start(h->loop, &h->idle_w);
}

/* Append f to the ring, growing it if full. The queue takes a reference of its own to f's
 * block. 0 or -ENOMEM. */
static int wq_push(hub_client *c, const hub_frame *f)
{
    if (c->wq_count == c->wq_cap) {
        /* A drained queue keeps its ring (freeing it on every drain cost 2% more instructions
         * per delivery), so an idle client that was sent frames holds one: it starts small. */
        uint32_t ncap = c->wq_cap ? c->wq_cap * 2 : 4;
        hub_frame *n = hub_malloc(ncap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        for (uint32_t i = 0; i < c->wq_count; i++)
            n[i] = c->wq[WQ_AT(c, i)];
        hub_free(c->wq);
        c->wq = n;
        c->wq_cap = ncap;
        c->wq_head = 0;
    }
    /* A run of frames in one block counts the block once. */
    if (!c->wq_count || c->wq[WQ_AT(c, c->wq_count - 1)].blk != f->blk) {
        c->wq_pinned += f->blk->cap;
        HUB_STAT_ADD(c->h, outq_blocks, f->blk->cap);
    }
    c->wq[WQ_AT(c, c->wq_count)] = *f;
    c->wq_count++;
    c->wq_bytes += f->len;
    HUB_STAT_ADD(c->h, outq_bytes, f->len);
    f->blk->refcnt++;
    return 0;
}

/* Take the head frame off the ring (its reference passes to the caller). */
static hub_frame wq_pop(hub_client *c)
{
    hub_frame f = c->wq[c->wq_head];
    c->wq_head = WQ_AT(c, 1);
    c->wq_count--;
    c->wq_bytes -= f.len;
    HUB_STAT_ADD(c->h, outq_bytes, -f.len);
    if (!c->wq_count || c->wq[c->wq_head].blk != f.blk) {
        c->wq_pinned -= f.blk->cap; /* the end of its block's run */
        HUB_STAT_ADD(c->h, outq_blocks, -f.blk->cap);
    }
    if (!c->wq_count && c->pblk) {
        /* Caught up: its own block goes (f may still hold it), so no idle client keeps one. */
        fblock_unref(c->pblk);
        c->pblk = NULL;
    }
    return f;
}

/* Queue f, or a copy of it in c's own block when sharing f's block would hold too much (see
 * wq_pinned). 0 or -ENOMEM. */
static int wq_push_shared(hub_client *c, const hub_frame *f)
{
    int tail_same = c->wq_count && c->wq[WQ_AT(c, c->wq_count - 1)].blk == f->blk;
    if (tail_same || f->blk->cap <= f->len ||
        c->wq_pinned + f->blk->cap <= 2 * (c->wq_bytes + f->len) + 4 * HUB_FBLOCK)
        return wq_push(c, f);
    hub_fblock *b = fblock_room(&c->pblk, f->len);
    if (!b)
        return -ENOMEM;
    hub_frame copy = {b, b->data + b->used, f->len};
    memcpy(copy.data, f->data, f->len);
    b->used += f->len;
    return wq_push(c, &copy);
}

int hub__client_enqueue(hub_client *c, const hub_frame *f)
{
    hub *h = c->h;
    if (c->flags & HUB_CLIENT_CLOSING)
        return -EPIPE;
    if (c->wq_bytes + f->len > h->cfg.max_outbuf) {
        if (h->cfg.outbuf_policy == HUB_OUTBUF_DROP) {
            HUB_STAT_ADD(h, dropped_frames, 1);
            CLOG(HUB_LOG_DEBUG, c, "write queue full (%zu bytes queued), frame dropped",
                 c->wq_bytes);
            return -ENOBUFS;
        }
        HUB_STAT_ADD(h, slow_closes, 1);
        char why[128];
        snprintf(why, sizeof(why), "slow consumer: write queue over max_outbuf (%zu bytes)",
                 h->cfg.max_outbuf);
        hub__client_abort(c, why);
        return -ENOBUFS;
    }
    if (wq_push_shared(c, f) < 0)
        return -ENOMEM;
    pending_add(c);
    if (c->wq_bytes > h->cfg.max_outbuf / 2 && !(c->flags & HUB_CLIENT_CONGESTED)) {
        c->flags |= HUB_CLIENT_CONGESTED;
        c->congested_since = ev_now(h->loop);
        c->cong_next = h->congested;
        h->congested = c;
        hub__hold_update(h);
    }
    return 0;
}

/* ---- holding reads for congested readers (HUB_STALL) ---- */

static void held_resume(hub *h)
{
    hub_client *list = h->held;
    h->held = NULL;
    while (list) {
        hub_client *c = list;
        list = c->held_next;
        c->flags &= ~HUB_CLIENT_HELD;
        if ((c->flags & HUB_CLIENT_READING) &&
            !(c->flags & (HUB_CLIENT_PAUSED | HUB_CLIENT_CLOSING | HUB_CLIENT_HALF_CLOSED)))
            ev_io_start(h->loop, &c->rio);
    }
}

static void hold_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    hub__hold_update(w->data);
}

void hub__hold_init(hub *h)
{
    ev_init(&h->hold_w, hold_cb);
    h->hold_w.data = h;
}

void hub__hold_update(hub *h)
{
    ev_tstamp now = ev_now(h->loop), next = 0;
    int hold = 0;
    for (hub_client **pp = &h->congested; *pp;) {
        hub_client *c = *pp;
        /* Below a quarter of max_outbuf (hysteresis), or closing: no longer congested. */
        if ((c->flags & HUB_CLIENT_CLOSING) || c->wq_bytes <= h->cfg.max_outbuf / 4) {
            c->flags &= ~HUB_CLIENT_CONGESTED;
            *pp = c->cong_next;
            continue;
        }
        ev_tstamp until = c->last_write + HUB_STALL;
        if (until > c->congested_since + HUB_HOLD_MAX)
            until = c->congested_since + HUB_HOLD_MAX;
        if (until > now) {
            hold = 1;
            if (!next || until < next)
                next = until;
        }
        pp = &c->cong_next;
    }
    if (hold && !h->hold_reads)
        HUB_STAT_ADD(h, read_holds, 1);
    h->hold_reads = hold;
    ev_timer_stop(h->loop, &h->hold_w);
    if (hold) {
        ev_timer_set(&h->hold_w, next - now + 1e-3, 0.);
        ev_timer_start(h->loop, &h->hold_w);
    } else if (h->held) {
        held_resume(h);
    }
}

static void wq_clear(hub_client *c)
{
    while (c->wq_count) {
        hub_frame f = wq_pop(c);
        hub__frame_unref(&f);
    }
    fblock_unref(c->pblk);
    c->pblk = NULL;
    hub_free(c->wq);
    c->wq = NULL;
    c->wq_cap = c->wq_count = c->wq_head = 0;
    c->wq_bytes = c->wq_off = 0;
}

/* Write as much of the queue as the socket takes, up to budget bytes.
 * Returns 1 when the queue is empty, 0 when more remains, -EAGAIN when the socket is full,
 * or another negative errno on a write error. */
static int client_write(hub_client *c, size_t budget)
{
    size_t done = 0;
    while (c->wq_count && done < budget) {
        struct iovec iov[HUB_IOV_MAX];
        int n = 0;
        size_t want = 0;
        for (uint32_t i = 0; i < c->wq_count && want < budget; i++) {
            hub_frame *f = &c->wq[WQ_AT(c, i)];
            size_t off = i == 0 ? c->wq_off : 0;
            want += f->len - off;
            /* Frames next to each other in a block: one span. */
            if (n && (char *)iov[n - 1].iov_base + iov[n - 1].iov_len == f->data) {
                iov[n - 1].iov_len += f->len;
                continue;
            }
            if (n == HUB_IOV_MAX) {
                want -= f->len - off;
                break;
            }
            iov[n].iov_base = f->data + off;
            iov[n].iov_len = f->len - off;
            n++;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? -EAGAIN : -errno;
        }
        done += (size_t)w;
        if (w > 0)
            c->last_write = ev_now(c->h->loop);
        size_t left = (size_t)w, frames = 0;
        while (left) {
            size_t rest = c->wq[c->wq_head].len - c->wq_off;
            if (left < rest) {
                c->wq_off += left;
                break;
            }
            left -= rest;
            c->wq_off = 0;
            hub_frame f = wq_pop(c);
            frames++;
            hub__frame_unref(&f);
        }
        c->bytes_out += (size_t)w;
        c->frames_out += frames;
        HUB_STAT_ADD(c->h, bytes_out, w);
        HUB_STAT_ADD(c->h, frames_out, frames);
        if ((size_t)w < want)
            return -EAGAIN;
    }
    return c->wq_count ? 0 : 1;
}

static void to_reaper(hub_client *c);
static void client_unroute(hub_client *c);

/* Keep why c closes, for E_EVAPI_CONNECTION_CLOSED (the first reason given wins). Without
 * memory for it the event says "closed". */
static void note_reason(hub_client *c, const char *reason)
{
    if (!c->close_reason)
        c->close_reason = hub_strndup(reason, strnlen(reason, HUB_CLOSE_REASON_MAX));
}

/* After a write attempt: a write error ends the connection, and a closing connection whose
 * queue has drained is handed to the reaper. */
static void after_write(hub_client *c, int r)
{
    if (r < 0 && r != -EAGAIN) {
        /* The socket failed: nothing more can drain, so the queue goes with it. */
        if (!(c->flags & HUB_CLIENT_CLOSING)) {
            CLOG(HUB_LOG_INFO, c, "%s, closing", strerror(-r));
            note_reason(c, strerror(-r));
        }
        c->flags |= HUB_CLIENT_CLOSING;
        client_unroute(c);
        wq_clear(c);
        to_reaper(c);
    } else if (r == 1 && (c->flags & HUB_CLIENT_DRAINING)) {
        to_reaper(c);
    }
}

static void write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    hub_client *c = w->data;
    (void)revents;
    int r = client_write(c, HUB_WRITE_BUDGET);
    if ((c->flags & HUB_CLIENT_CONGESTED) && c->wq_bytes <= c->h->cfg.max_outbuf / 4)
        hub__hold_update(c->h);
    if (r == -EAGAIN || r == 0)
        return; /* 0: budget spent, the watcher fires again */
    ev_io_stop(loop, w);
    c->flags &= ~HUB_CLIENT_WRITE_WAIT;
    after_write(c, r);
}

void hub__flush_pending(hub *h)
{
    hub_client *list = h->pending, *again = NULL;
    h->read_since_flush = 0;
    h->pending = NULL;
    for (int bound = 0; list && bound < 1 << 30; bound++) {
        hub_client *c = list;
        list = c->pend_next;
        c->flags &= ~HUB_CLIENT_PENDING;
        if (c->flags & HUB_CLIENT_REAP)
            continue;
        int r = client_write(c, HUB_WRITE_BUDGET);
        if (r == 0) {
            c->flags |= HUB_CLIENT_PENDING;
            c->pend_next = again;
            again = c;
        } else if (r == -EAGAIN) {
            c->flags |= HUB_CLIENT_WRITE_WAIT;
            ev_io_start(h->loop, &c->wio);
        } else {
            after_write(c, r);
        }
    }
    /* Closing a client above may have queued others (an error frame, a drain): keep them. */
    if (again) {
        hub_client *tail = again;
        while (tail->pend_next)
            tail = tail->pend_next;
        tail->pend_next = h->pending;
        h->pending = again;
    }
    if (!h->pending && ev_is_active(&h->idle_w))
        ev_idle_stop(h->loop, &h->idle_w);
}

/* ---- timeouts ---- */

/* One timer per client, as ev.pod's "be smart about timeouts": a complete frame only stores
 * ev_now() (no timer call per frame or per byte); the callback works out the earliest
 * deadline from the stored times and re-arms itself for it with ev_timer_again. */

static ev_tstamp ms(int v) { return v / 1000.0; }

/* Make c's timer fire no later than at. */
static void timer_due(hub_client *c, ev_tstamp at)
{
    struct ev_loop *loop = c->h->loop;
    ev_tstamp now = ev_now(loop);
    if (ev_is_active(&c->tmo) && now + ev_timer_remaining(loop, &c->tmo) <= at)
        return;
    c->tmo.repeat = at - now > 1e-3 ? at - now : 1e-3;
    ev_timer_again(loop, &c->tmo);
}

static void timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    hub_client *c = w->data;
    hub *h = c->h;
    ev_tstamp now = ev_now(loop) + 1e-3, due = 0, t; /* 1 ms: rounding never re-arms for 0 */
    char why[96];
    (void)revents;
    if (c->flags & HUB_CLIENT_HALF_CLOSED) {
        CLOG(HUB_LOG_WARN, c, "its events did not run within shutdown_timeout (%d ms)",
             h->cfg.shutdown_timeout);
        hub__client_close(c, NULL, "closed by peer");
        return;
    }
    if (c->flags & HUB_CLIENT_PAUSED) {
        /* Its worker is behind, not the peer: both clocks start again. */
        c->last_frame = ev_now(loop);
        if (c->frame_start)
            c->frame_start = ev_now(loop);
    }
    if (c->frame_start && h->cfg.frame_timeout) {
        if ((t = c->frame_start + ms(h->cfg.frame_timeout)) <= now) {
            snprintf(why, sizeof(why), "frame not completed within frame_timeout (%d ms)",
                     h->cfg.frame_timeout);
            HUB_STAT_ADD(h, timeout_closes, 1);
            hub__client_close(c, "timeout", why);
            return;
        }
        due = t;
    }
    if (h->cfg.idle_timeout) {
        if ((t = c->last_frame + ms(h->cfg.idle_timeout)) <= now) {
            snprintf(why, sizeof(why), "no frame received within idle_timeout (%d ms)",
                     h->cfg.idle_timeout);
            HUB_STAT_ADD(h, timeout_closes, 1);
            hub__client_close(c, "timeout", why);
            return;
        }
        if (!due || t < due)
            due = t;
    }
    if (!due) {
        ev_timer_stop(loop, w);
        return;
    }
    w->repeat = due - ev_now(loop);
    ev_timer_again(loop, w);
}

/* After bytes were handed to the reader (frames_before: c->frames_in before them): a complete
 * frame restarts the idle clock, and the frame clock runs while one is incomplete. O(1) per
 * read whatever the bytes, and a timer call only when a frame begins. */
static void note_progress(hub_client *c, uint64_t frames_before)
{
    hub *h = c->h;
    ev_tstamp now = ev_now(h->loop);
    int moved = c->frames_in != frames_before;
    if (c->flags & (HUB_CLIENT_CLOSING | HUB_CLIENT_HALF_CLOSED))
        return;
    if (moved)
        c->last_frame = now;
    if (!h->cfg.frame_timeout || !h->cfg.netstring_format ||
        hub_ns_reader_pending(&c->reader) == 0) {
        c->frame_start = 0;
        return;
    }
    if (c->frame_start && !moved)
        return; /* the same frame, still under way */
    c->frame_start = now;
    timer_due(c, now + ms(h->cfg.frame_timeout));
}

/* ---- inbound ---- */

/* Hand frames to the script until the reader needs more bytes. Returns <0 when the client
 * was closed, or -EAGAIN when its worker's queue is full (the frame stays buffered). */
static int client_process(hub_client *c)
{
    hub *h = c->h;
    hub_slice s;
    int r;
    while (!(c->flags & HUB_CLIENT_CLOSING)) {
        if (hub__event_admit(h, c) < 0)
            return -EAGAIN;
        r = hub_ns_reader_next(&c->reader, &s);
        if (r == 0)
            return 0;
        if (r < 0) {
            HUB_STAT_ADD(h, decode_errors, 1);
            hub__client_close(c, "protocol", hub_ns_reader_errstr(&c->reader));
            return r;
        }
        c->frames_in++;
        HUB_STAT_ADD(h, frames_in, 1);
        if (hub__event_message(h, c, s.data, s.len) < 0)
            return -EPIPE; /* not taken: the connection is closed, with its reason */
    }
    return -EPIPE;
}

/* The peer sent EOF. Without workers its frames have run already. With workers they may still
 * be queued, and what they send must reach it (as nc -N, socat one-shots expect): reading
 * stops, and the close begins once its worker has run them (hub__client_caught_up), or after
 * shutdown_timeout. */
static void peer_eof(hub_client *c)
{
    hub *h = c->h;
    if (c->worker < 0 || !h->cfg.shutdown_timeout ||
        hub__worker_queue_item(h, c->worker, HUB_EV_EOF, c->id, NULL, 0) < 0) {
        hub__client_close(c, NULL, "closed by peer");
        return;
    }
    CLOG(HUB_LOG_DEBUG, c, "%s", "closed by peer; closing once its worker has run its events");
    c->flags |= HUB_CLIENT_HALF_CLOSED;
    c->flags &= ~HUB_CLIENT_READING;
    ev_io_stop(h->loop, &c->rio);
    c->tmo.repeat = ms(h->cfg.shutdown_timeout);
    ev_timer_again(h->loop, &c->tmo);
}

void hub__client_caught_up(hub *h, uint64_t id)
{
    hub_client *c = hub__client_by_id(h, id);
    if (c && (c->flags & HUB_CLIENT_HALF_CLOSED))
        hub__client_close(c, NULL, "closed by peer"); /* a no-op if already closing */
}

/* Reads ask for room in proportion to what the peer sends: HUB_READ_MIN at first, doubled
 * after each read that fills it, up to HUB_READ_CHUNK, and halved when reads come in far
 * smaller. So a client trickling bytes holds a buffer the size of what it sent (a few KiB),
 * not HUB_READ_CHUNK. */
static void read_size_adapt(hub_client *c, size_t n)
{
    if (n >= c->read_want && c->read_want < HUB_READ_CHUNK)
        c->read_want *= 2;
    else if (n < c->read_want / 4 && c->read_want > HUB_READ_MIN)
        c->read_want /= 2;
}

/* The read_buffers gauges after c's reader went from holding a buffer of before bytes (0:
 * none) to what it holds now. */
static void rbuf_count(hub *h, hub_client *c, size_t before)
{
    size_t now = hub_ns_reader_capacity(&c->reader);
    if (now == before)
        return;
    HUB_STAT_ADD(h, rbufs, (now > 0) - (before > 0));
    HUB_STAT_ADD(h, rbuf_bytes, now - before);
}

/* An empty reader's buffer goes to the pool (or is freed): idle connections hold none. */
static void rpool_put(hub *h, hub_client *c)
{
    size_t cap;
    char *b = hub_ns_reader_take_buf(&c->reader, &cap);
    if (!b)
        return;
    HUB_STAT_ADD(h, rbufs, -1);
    HUB_STAT_ADD(h, rbuf_bytes, -cap);
    if (h->nrpool < HUB_RPOOL_MAX && cap <= HUB_RPOOL_CAP) {
        h->rpool[h->nrpool] = b;
        h->rpool_cap[h->nrpool++] = cap;
    } else {
        hub_free(b);
    }
}

/* Up to HUB_READS_PER_EVENT reads, each handed to the script. */
static void read_some(hub_client *c)
{
    hub *h = c->h;
    if (h->nrpool && hub_ns_reader_give_buf(&c->reader, h->rpool[h->nrpool - 1],
                                            h->rpool_cap[h->nrpool - 1]) == 0)
        h->nrpool--;
    for (int i = 0; i < HUB_READS_PER_EVENT; i++) {
        char *p;
        size_t avail;
        if (hub_ns_reader_space(&c->reader, c->read_want, &p, &avail) < 0) {
            hub__client_close(c, "internal", "out of memory");
            return;
        }
        ssize_t n = read(c->fd, p, avail);
        if (n == 0) {
            peer_eof(c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                hub__client_close(c, NULL, strerror(errno));
            return;
        }
        c->bytes_in += (size_t)n;
        HUB_STAT_ADD(h, bytes_in, n);
        read_size_adapt(c, (size_t)n);
        if (!h->cfg.netstring_format) {
            /* Raw mode, as Kamailio: each read is one message. */
            c->frames_in++;
            HUB_STAT_ADD(h, frames_in, 1);
            if (hub__event_message(h, c, p, (size_t)n) < 0 || (c->flags & HUB_CLIENT_CLOSING))
                return;
            if (hub__event_admit(h, c) < 0)
                return;
            continue;
        }
        hub_ns_reader_commit(&c->reader, (size_t)n);
        if (client_process(c) < 0)
            return;
        if ((size_t)n < avail)
            return;
    }
}

static void read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    hub_client *c = w->data;
    hub *h = c->h;
    uint64_t frames = c->frames_in, bytes = c->bytes_in;
    size_t held = hub_ns_reader_capacity(&c->reader);
    (void)revents;
    if (h->hold_reads) {
        /* A congested reader is catching up: this one waits (hub__hold_update resumes it). */
        ev_io_stop(loop, w);
        c->flags |= HUB_CLIENT_HELD;
        c->held_next = h->held;
        h->held = c;
        return;
    }
    read_some(c);
    rbuf_count(h, c, held);
    h->read_since_flush += c->bytes_in - bytes;
    if (!(c->flags & HUB_CLIENT_CLOSING)) {
        note_progress(c, frames);
        rpool_put(h, c);
    }
    /* Many publishers readable at once: write what their frames queued before reading on. */
    if (h->read_since_flush >= HUB_FLUSH_EVERY && h->pending)
        hub__flush_pending(h);
}

void hub__client_start_reading(hub_client *c)
{
    if ((c->flags & (HUB_CLIENT_CLOSING | HUB_CLIENT_READING | HUB_CLIENT_HALF_CLOSED)) ||
        c->h->stopping)
        return;
    c->flags |= HUB_CLIENT_READING;
    if (!(c->flags & HUB_CLIENT_PAUSED))
        ev_io_start(c->h->loop, &c->rio);
}

void hub__client_resume(hub_client *c)
{
    if (!(c->flags & HUB_CLIENT_PAUSED) || (c->flags & HUB_CLIENT_CLOSING))
        return;
    uint64_t frames = c->frames_in;
    c->flags &= ~HUB_CLIENT_PAUSED;
    int r = client_process(c);
    note_progress(c, frames);
    if (r < 0)
        return;
    rpool_put(c->h, c); /* its frames have run: if none is left partial, it holds no buffer */
    if ((c->flags & HUB_CLIENT_READING) && !c->h->stopping)
        ev_io_start(c->h->loop, &c->rio);
}

/* ---- lifecycle ---- */

/* An idle client holds this struct and nothing else of the hub's (no read buffer, no write
 * queue, no close reason): README, "under 1 KiB per idle connection" with libev's, the id
 * map's and the script's share. */
_Static_assert(sizeof(hub_client) <= 560, "an idle client's struct grew");

void hub__client_accepted(hub *h, int fd, const struct sockaddr *sa)
{
    hub_client *c = hub_calloc(1, sizeof(*c));
    int one = 1;
    if (!c)
        goto fail;
    hub_ns_reader_init(&c->reader, h->cfg.max_frame_size);
    c->h = h;
    c->fd = fd;
    c->id = h->next_id++;
    if (hub_idmap_put(&h->ids, c->id, c) < 0)
        goto fail;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    if (h->cfg.sndbuf) {
        /* Bounds what a client that stopped reading holds in the kernel (and what the hub
         * spends copying into it): the auto-tuned default grows to 4 MiB a socket. */
        int sb = (int)h->cfg.sndbuf;
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sb, sizeof(sb));
    }
    c->info.id = c->id;
    c->last_write = ev_now(h->loop);
    c->info.conidx = slot_take(h);
    h->slots[c->info.conidx] = c;
    hub_addr_str(sa, c->info.addr, sizeof(c->info.addr), &c->info.port);
    c->worker = h->nworkers ? (int)(c->id % (uint64_t)h->nworkers) : -1;
    ev_io_init(&c->rio, read_cb, fd, EV_READ);
    ev_io_init(&c->wio, write_cb, fd, EV_WRITE);
    ev_init(&c->tmo, timeout_cb);
    c->rio.data = c->wio.data = c->tmo.data = c;
    c->read_want = HUB_READ_MIN;
    c->last_frame = ev_now(h->loop);
    if (h->cfg.idle_timeout)
        timer_due(c, c->last_frame + ms(h->cfg.idle_timeout));
    c->next = h->clients;
    if (h->clients)
        h->clients->prev = c;
    h->clients = c;
    atomic_fetch_add(&h->nclients, 1);
    HUB_STAT_ADD(h, accepted, 1);
    CLOG(HUB_LOG_INFO, c, "connected (conidx=%d)", c->info.conidx);
    hub__raise_conn_event(h, "E_EVAPI_CONNECTION_NEW", &c->info, NULL, NULL);
    hub__event_connect(h, c);
    return;
fail:
    hub_log(HUB_LOG_ERR, "out of memory accepting a client");
    hub_free(c); /* its reader holds nothing yet */
    close(fd);
}

/* Append an error frame after what is queued, so no frame is cut. */
static void queue_error_frame(hub_client *c, const char *code, const char *reason)
{
    hub *h = c->h;
    char body[640];
    if (!h->cfg.netstring_format)
        return;
    size_t n = error_body(body, sizeof(body), code, reason);
    if (!n)
        return;
    hub_frame f;
    if (hub__frame_new(h, body, n, &f) < 0)
        return;
    wq_push(c, &f);
    hub__frame_unref(&f);
}

static void reaper_add(hub_client *c)
{
    if (c->flags & HUB_CLIENT_ON_LIST)
        return;
    c->flags |= HUB_CLIENT_ON_LIST;
    c->close_next = c->h->closing;
    c->h->closing = c;
}

static void to_reaper(hub_client *c)
{
    hub *h = c->h;
    if (c->flags & HUB_CLIENT_DRAINING) {
        c->flags &= ~HUB_CLIENT_DRAINING;
        h->ndraining--;
    }
    if (c->flags & HUB_CLIENT_REAP)
        return;
    c->flags |= HUB_CLIENT_REAP;
    ev_io_stop(h->loop, &c->wio);
    reaper_add(c);
}

/* No more reads, and no relay reaches c from now on. */
static void client_unroute(hub_client *c)
{
    hub *h = c->h;
    ev_io_stop(h->loop, &c->rio);
    ev_timer_stop(h->loop, &c->tmo); /* draining has its own deadline */
    if (c->tag && !c->close_tag)     /* for E_EVAPI_CONNECTION_CLOSED, raised by the reaper */
        c->close_tag = hub_strndup(c->tag->name, c->tag->len);
    hub__tag_set(h, c, NULL, 0);
    hub__tag_intent(h, c->id, NULL, 0, 1);
}

/* Stop reading and routing to c at once; what is queued still goes out (up to
 * shutdown_timeout), then the reaper closes it. */
static void begin_close(hub_client *c)
{
    hub *h = c->h;
    c->flags |= HUB_CLIENT_CLOSING;
    client_unroute(c);
    if (!c->wq_count) {
        to_reaper(c);
        return;
    }
    c->flags |= HUB_CLIENT_DRAINING;
    c->drain_deadline = ev_now(h->loop) + h->cfg.shutdown_timeout / 1000.0;
    h->ndraining++;
    if (!ev_is_active(&h->drain_w))
        ev_timer_again(h->loop, &h->drain_w);
    pending_add(c);
    /* The reaper runs the close event now; it frees the client once drained. */
    reaper_add(c);
}

void hub__client_close(hub_client *c, const char *code, const char *reason)
{
    if (c->flags & HUB_CLIENT_CLOSING)
        return;
    note_reason(c, reason);
    if (code) {
        CLOG(HUB_LOG_WARN, c, "%s error: %s, closing", code, reason);
        queue_error_frame(c, code, reason);
    } else {
        CLOG(HUB_LOG_INFO, c, "%s, closing", reason);
    }
    begin_close(c);
}

void hub__client_abort(hub_client *c, const char *reason)
{
    if (c->flags & HUB_CLIENT_CLOSING)
        return;
    note_reason(c, reason);
    CLOG(HUB_LOG_WARN, c, "%s, closing", reason);
    /* Drop the queue but finish a frame already begun: the peer never sees half a frame. */
    uint32_t keep = c->wq_off ? 1 : 0;
    while (c->wq_count > keep) {
        /* from the tail: the run accounting of wq_pop works from the head, so undo it here */
        hub_frame f = c->wq[WQ_AT(c, c->wq_count - 1)];
        c->wq_count--;
        c->wq_bytes -= f.len;
        HUB_STAT_ADD(c->h, outq_bytes, -f.len);
        if (!c->wq_count || c->wq[WQ_AT(c, c->wq_count - 1)].blk != f.blk) {
            c->wq_pinned -= f.blk->cap;
            HUB_STAT_ADD(c->h, outq_blocks, -f.blk->cap);
        }
        hub__frame_unref(&f);
    }
    queue_error_frame(c, "slow_consumer", reason);
    begin_close(c);
}

void hub__drain_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    hub *h = w->data;
    ev_tstamp now = ev_now(loop);
    (void)revents;
    for (hub_client *c = h->clients; c && h->ndraining; c = c->next) {
        if ((c->flags & HUB_CLIENT_DRAINING) && c->drain_deadline <= now) {
            CLOG(HUB_LOG_WARN, c, "closing with %zu bytes unsent: the peer stopped reading",
                 c->wq_bytes);
            to_reaper(c);
        }
    }
    if (!h->ndraining)
        ev_timer_stop(loop, w);
}

static void unlink_from(hub_client **head, hub_client *c, size_t next_off)
{
    for (hub_client **pp = head; *pp; pp = (hub_client **)((char *)*pp + next_off)) {
        if (*pp == c) {
            *pp = *(hub_client **)((char *)c + next_off);
            return;
        }
    }
}

static void client_destroy(hub *h, hub_client *c)
{
    if (c->flags & HUB_CLIENT_CONGESTED)
        unlink_from(&h->congested, c, offsetof(hub_client, cong_next));
    if (c->flags & HUB_CLIENT_HELD)
        unlink_from(&h->held, c, offsetof(hub_client, held_next));
    if (c->flags & HUB_CLIENT_PENDING) {
        /* Rare: closed by a script after it was queued for writing this iteration. */
        hub_client **pp = &h->pending;
        while (*pp && *pp != c)
            pp = &(*pp)->pend_next;
        if (*pp)
            *pp = c->pend_next;
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        h->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    hub_idmap_del(&h->ids, c->id);
    h->slots[c->info.conidx] = NULL;
    slot_release(h, c->info.conidx);
    atomic_fetch_sub(&h->nclients, 1);
    ev_timer_stop(h->loop, &c->tmo);
    wq_clear(c);
    size_t held = hub_ns_reader_capacity(&c->reader);
    hub_ns_reader_deinit(&c->reader);
    rbuf_count(h, c, held);
    hub_free(c->close_reason);
    hub_free(c->close_tag);
    close(c->fd);
    hub_free(c);
}

void hub__reap_closing(hub *h)
{
    /* Closing a client may run a script that closes others: take the list and loop. */
    for (int round = 0; h->closing && round < 1 << 20; round++) {
        hub_client *c = h->closing;
        h->closing = c->close_next;
        c->flags &= ~HUB_CLIENT_ON_LIST;
        if (!(c->flags & HUB_CLIENT_CLOSE_RAISED)) {
            /* Here, never inside the close: a subscriber of evapi:TAG is multicast to, and a
             * multicast must not run inside another one over the same tag. */
            c->flags |= HUB_CLIENT_CLOSE_RAISED;
            hub__raise_conn_event(h, "E_EVAPI_CONNECTION_CLOSED", &c->info, c->close_tag,
                                  c->close_reason ? c->close_reason : "closed");
        }
        if ((c->flags & HUB_CLIENT_CONNECTED) && !(c->flags & HUB_CLIENT_CLOSE_EVENT)) {
            c->flags |= HUB_CLIENT_CLOSE_EVENT;
            HUB_STAT_ADD(h, closed, 1);
            hub__event_close(h, c);
        }
        if (c->flags & HUB_CLIENT_REAP)
            client_destroy(h, c);
    }
}

void hub__client_free_all(hub *h)
{
    for (int bound = 0; h->clients && bound < 1 << 30; bound++) {
        hub_client *c = h->clients;
        ev_io_stop(h->loop, &c->rio);
        ev_io_stop(h->loop, &c->wio);
        c->tag = NULL; /* tags are freed wholesale */
        if (c->flags & HUB_CLIENT_DRAINING)
            h->ndraining--;
        client_destroy(h, c);
    }
    h->closing = NULL;
    h->pending = NULL;
    while (h->nrpool)
        hub_free(h->rpool[--h->nrpool]);
    hub__frames_free(h);
}
