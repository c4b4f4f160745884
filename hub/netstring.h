/* Streaming netstring codec: bytes in, frames out. Never touches a socket. */
#ifndef HUB_NETSTRING_H
#define HUB_NETSTRING_H

#include <stddef.h>

/* Longest header "<digits>:" for a size_t length, plus the trailing ','. */
#define HUB_NS_HDR_MAX 24
/* Most length digits the reader takes, leading zeros included. Leading zeros do not count
 * toward max_frame's digits; this cap keeps a run of zeros from being read for ever. */
#define HUB_NS_DIGITS_MAX 20

typedef struct hub_slice {
    const char *data;
    size_t len;
} hub_slice;

/* A reader. Its fields are visible only so that it can be embedded (a client holds one, with
 * no allocation of its own and no pointer to follow); they are private to netstring.c.
 * The buffer holds [consumed | pending | free]: buf[0..start) was handed out or skipped,
 * buf[start..end) is pending, buf[end..cap) is free. Parse offsets are absolute into buf and
 * are shifted on compaction, so no byte is ever parsed twice. */
typedef struct hub_ns_reader {
    char *buf;
    size_t cap;
    size_t start;     /* first pending byte: the start of the frame being parsed */
    size_t end;       /* one past the last byte fed */
    size_t pos;       /* next byte of the header to parse (NS_BETWEEN, NS_LENGTH) */
    size_t payload;   /* offset of the payload (NS_PAYLOAD) */
    size_t len;       /* length accumulated so far / the frame's payload length */
    size_t max_frame; /* payload limit */
    char *errstr;     /* the sticky error's reason (allocated when it fails), or NULL */
    unsigned ndigits; /* digits read for the current length, leading zeros included */
    unsigned char state;
    short err; /* the sticky error (a negative errno) */
} hub_ns_reader;

/* Make r a reader that rejects frames longer than max_frame bytes of payload (checked while
 * the length digits are read, so a huge length never overflows). It holds no memory yet. */
void hub_ns_reader_init(hub_ns_reader *r, size_t max_frame);
/* Release what r holds (its buffer, its error); r may be initialised again. */
void hub_ns_reader_deinit(hub_ns_reader *r);
/* An allocated reader, as _init. NULL on OOM. */
hub_ns_reader *hub_ns_reader_new(size_t max_frame);
/* NULL-safe. */
void hub_ns_reader_free(hub_ns_reader *r);

/* Append bytes (copied). Returns 0 or -ENOMEM. Pointers from _next() become invalid. */
int hub_ns_reader_feed(hub_ns_reader *r, const char *buf, size_t len);
/* Zero-copy feeding: *ptr gets room for at least want bytes (the buffer grows if needed),
 * *avail how much there is. Write into it, then _commit(n). Returns 0 or -ENOMEM.
 * Pointers from _next() become invalid. */
int hub_ns_reader_space(hub_ns_reader *r, size_t want, char **ptr, size_t *avail);
/* Mark n bytes written at _space()'s pointer as fed. After a sticky error they are dropped. */
void hub_ns_reader_commit(hub_ns_reader *r, size_t n);

/* 1 and *out set when a frame is complete, 0 if more bytes are needed, -EPROTO on a framing
 * error or -EMSGSIZE when a length exceeds max_frame; an error is sticky (see _errstr).
 * *out points into the reader's buffer: valid until the next _feed/_space/_compact. */
int hub_ns_reader_next(hub_ns_reader *r, hub_slice *out);
/* Human-readable reason of the sticky error, or NULL when not failed. */
const char *hub_ns_reader_errstr(const hub_ns_reader *r);
/* The size of the buffer it holds, 0 when it holds none. */
static inline size_t hub_ns_reader_capacity(const hub_ns_reader *r) { return r->cap; }
/* Bytes held that are not yet handed out as frames. */
size_t hub_ns_reader_pending(const hub_ns_reader *r);
/* Release the buffer when nothing is pending, so idle connections cost little memory.
 * Pointers from _next() become invalid. */
void hub_ns_reader_shrink(hub_ns_reader *r);
/* Like _shrink, but the buffer is handed to the caller (NULL when the reader holds none or
 * bytes are pending), *cap set to its size: a pool of buffers reused between connections. */
char *hub_ns_reader_take_buf(hub_ns_reader *r, size_t *cap);
/* Give a reader that holds no buffer one of cap bytes (from _take_buf); it owns it now.
 * Returns 0, or -EBUSY (the reader has a buffer: the caller keeps buf). */
int hub_ns_reader_give_buf(hub_ns_reader *r, char *buf, size_t cap);

/* Writes "<len>:" into hdr (HUB_NS_HDR_MAX bytes) and returns its length. */
size_t hub_ns_encode_header(char *hdr, size_t len);
/* Encoded size of a payload of len bytes: header + payload + ','. */
size_t hub_ns_encoded_len(size_t len);

#endif
