/* libFuzzer target for the netstring reader: random bytes fed in pieces, invariants checked. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/netstring.h"

/* Small enough that the fuzzer reaches the limit often, large enough for real frames. */
#define FUZZ_MAX_FRAME 100

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile unsigned sink;

/* Drain every frame; returns the last result. Each frame must respect the limit and lie
 * inside what was fed so far. */
static int drain(hub_ns_reader *r, size_t fed)
{
    hub_slice s;
    int rc = 0;
    for (size_t i = 0; i <= fed; i++) {
        rc = hub_ns_reader_next(r, &s);
        if (rc != 1)
            return rc;
        if (s.len > FUZZ_MAX_FRAME || hub_ns_encoded_len(s.len) > fed)
            abort();
        /* Read every payload byte so ASan proves the slice lies inside the buffer. */
        for (size_t k = 0; k < s.len; k++)
            sink += (unsigned char)s.data[k];
    }
    abort(); /* more frames than bytes: impossible */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    /* The first byte picks the piece size; 0 means one feed. It also picks feed or space. */
    size_t step = data[0] ? data[0] : size;
    int zero_copy = data[0] & 1;
    data++;
    size--;
    hub_ns_reader *r = hub_ns_reader_new(FUZZ_MAX_FRAME);
    if (!r)
        return 0;
    int failed = 0;
    const char *err0 = NULL;
    size_t fed = 0;
    for (size_t off = 0; off < size; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (zero_copy) {
            char *p;
            size_t avail;
            if (hub_ns_reader_space(r, n, &p, &avail) < 0 || avail < n)
                abort();
            memcpy(p, data + off, n);
            hub_ns_reader_commit(r, n);
        } else if (hub_ns_reader_feed(r, (const char *)data + off, n) < 0) {
            abort();
        }
        fed += n;
        int rc = drain(r, fed);
        if (failed && (rc >= 0 || hub_ns_reader_errstr(r) == NULL))
            abort(); /* errors are sticky */
        if (rc < 0 && rc != -EPROTO && rc != -EMSGSIZE)
            abort();
        if (rc < 0 && !failed) {
            failed = 1;
            err0 = hub_ns_reader_errstr(r);
        }
        if (failed && (hub_ns_reader_errstr(r) != err0 || hub_ns_reader_pending(r) != 0))
            abort();
        /* After draining, at most one partial frame is pending. */
        if (!failed && hub_ns_reader_pending(r) > FUZZ_MAX_FRAME + HUB_NS_HDR_MAX)
            abort();
    }
    hub_ns_reader_shrink(r);
    hub_ns_reader_free(r);
    return 0;
}
