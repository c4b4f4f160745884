/* libFuzzer target: the SIP module's datagram check (libosip2's parser and the headers a
 * transaction needs). Whatever the bytes, no crash, no leak, and a message it accepts has
 * what the module then reads without checking. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <osipparser2/osip_parser.h>

#include "transports/sip_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready)
        ready = tr_sip_parser_init() == 0;
    /* The module hands the parser a NUL-terminated copy, as its receive buffer is. */
    char *buf = malloc(size + 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    struct osip_message *m;
    const char *why;
    if (tr_sip_parse(buf, size, &m, &why) == 0) {
        if (!m->call_id->number || !m->cseq->method || !m->from || !m->to)
            abort();
        if (MSG_IS_REQUEST(m) && (!m->sip_method || !m->req_uri))
            abort();
        osip_message_free(m);
    }
    free(buf);
    return 0;
}
