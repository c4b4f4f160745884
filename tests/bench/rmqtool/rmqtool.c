/* rmqtool: a plain rabbitmq-c client for evhub's RabbitMQ tests and benchmark.
 *   rmqtool declare URL QUEUE [EXCHANGE KEY]   declare QUEUE (and bind it to EXCHANGE/KEY)
 *   rmqtool purge URL QUEUE                    empty QUEUE
 *   rmqtool consume URL QUEUE COUNT IDLE_MS    print one JSON line a message until COUNT
 *                                              arrived or none came for IDLE_MS
 *   rmqtool bench URL QUEUE N SIZE WINDOW      publish N SIZE-byte messages with confirms
 *                                              (at most WINDOW unconfirmed), print the rate
 * URL as amqp_parse_url: amqp://user:pass@host:port/vhost. Exit 0, or 1 with a reason. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_tcp_socket.h>

static void die(const char *what, amqp_rpc_reply_t r)
{
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
        fprintf(stderr, "rmqtool: %s: %s\n", what, amqp_error_string2(r.library_error));
    else
        fprintf(stderr, "rmqtool: %s: server error (method 0x%08x)\n", what, r.reply.id);
    exit(1);
}

static amqp_connection_state_t connect_url(const char *url_in)
{
    struct amqp_connection_info ci;
    char *url = strdup(url_in);
    if (!url || amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
        fprintf(stderr, "rmqtool: bad URL %s\n", url_in);
        exit(1);
    }
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c);
    struct timeval tv = {5, 0};
    if (!s || amqp_socket_open_noblock(s, ci.host, ci.port, &tv) != AMQP_STATUS_OK) {
        fprintf(stderr, "rmqtool: cannot connect to %s:%d\n", ci.host, ci.port);
        exit(1);
    }
    die("login",
        amqp_login(c, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password));
    amqp_channel_open(c, 1);
    die("channel.open", amqp_get_rpc_reply(c));
    free(url);
    return c;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void json_str(const void *p, size_t n)
{
    const unsigned char *s = p;
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            printf("\\%c", s[i]);
        else if (s[i] < 0x20 || s[i] >= 0x7f)
            printf("\\u%04x", s[i]);
        else
            putchar(s[i]);
    }
    putchar('"');
}

static void print_msg(const amqp_envelope_t *e)
{
    const amqp_basic_properties_t *p = &e->message.properties;
    printf("{\"len\":%zu,\"routing_key\":", e->message.body.len);
    json_str(e->routing_key.bytes, e->routing_key.len);
    printf(",\"exchange\":");
    json_str(e->exchange.bytes, e->exchange.len);
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        printf(",\"message_id\":");
        json_str(p->message_id.bytes, p->message_id.len);
    }
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
        printf(",\"content_type\":");
        json_str(p->content_type.bytes, p->content_type.len);
    }
    if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
        printf(",\"delivery_mode\":%d", p->delivery_mode);
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        printf(",\"headers\":{");
        for (int i = 0; i < p->headers.num_entries; i++) {
            const amqp_table_entry_t *h = &p->headers.entries[i];
            printf("%s", i ? "," : "");
            json_str(h->key.bytes, h->key.len);
            putchar(':');
            switch (h->value.kind) {
            case AMQP_FIELD_KIND_UTF8:
            case AMQP_FIELD_KIND_BYTES:
                json_str(h->value.value.bytes.bytes, h->value.value.bytes.len);
                break;
            case AMQP_FIELD_KIND_I64:
                printf("%lld", (long long)h->value.value.i64);
                break;
            case AMQP_FIELD_KIND_F64:
                printf("%.17g", h->value.value.f64);
                break;
            case AMQP_FIELD_KIND_BOOLEAN:
                printf("%s", h->value.value.boolean ? "true" : "false");
                break;
            default:
                printf("\"kind %d\"", h->value.kind);
            }
        }
        putchar('}');
    }
    /* the body itself when short; else a checksum of it */
    if (e->message.body.len <= 4096) {
        printf(",\"body\":");
        json_str(e->message.body.bytes, e->message.body.len);
    } else {
        unsigned long sum = 0;
        const unsigned char *b = e->message.body.bytes;
        for (size_t i = 0; i < e->message.body.len; i++)
            sum = sum * 31 + b[i];
        printf(",\"sum\":%lu", sum);
    }
    printf("}\n");
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "declare")) {
        amqp_connection_state_t c = connect_url(argv[2]);
        amqp_queue_declare(c, 1, amqp_cstring_bytes(argv[3]), 0, 1, 0, 0,
                           amqp_empty_table); /* durable */
        die("queue.declare", amqp_get_rpc_reply(c));
        if (argc >= 6) {
            amqp_queue_bind(c, 1, amqp_cstring_bytes(argv[3]), amqp_cstring_bytes(argv[4]),
                            amqp_cstring_bytes(argv[5]), amqp_empty_table);
            die("queue.bind", amqp_get_rpc_reply(c));
        }
        amqp_connection_close(c, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c);
        return 0;
    }
    if (argc == 4 && !strcmp(argv[1], "purge")) {
        amqp_connection_state_t c = connect_url(argv[2]);
        amqp_queue_purge(c, 1, amqp_cstring_bytes(argv[3]));
        die("queue.purge", amqp_get_rpc_reply(c));
        amqp_connection_close(c, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c);
        return 0;
    }
    if (argc == 6 && !strcmp(argv[1], "consume")) {
        amqp_connection_state_t c = connect_url(argv[2]);
        long count = atol(argv[4]), idle = atol(argv[5]), got = 0;
        amqp_basic_consume(c, 1, amqp_cstring_bytes(argv[3]), amqp_empty_bytes, 0, 1, 0,
                           amqp_empty_table);
        die("basic.consume", amqp_get_rpc_reply(c));
        while (got < count) {
            amqp_envelope_t e;
            struct timeval tv = {idle / 1000, (idle % 1000) * 1000};
            amqp_maybe_release_buffers(c);
            amqp_rpc_reply_t r = amqp_consume_message(c, &e, &tv, 0);
            if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                r.library_error == AMQP_STATUS_TIMEOUT)
                break;
            die("consume", r);
            print_msg(&e);
            amqp_destroy_envelope(&e);
            got++;
        }
        fflush(stdout);
        fprintf(stderr, "rmqtool: consumed %ld\n", got);
        amqp_connection_close(c, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c);
        return 0;
    }
    if (argc == 7 && !strcmp(argv[1], "bench")) {
        amqp_connection_state_t c = connect_url(argv[2]);
        long n = atol(argv[4]), size = atol(argv[5]), window = atol(argv[6]);
        char *body = malloc((size_t)size + 1);
        memset(body, 'x', (size_t)size);
        amqp_confirm_select(c, 1);
        die("confirm.select", amqp_get_rpc_reply(c));
        /* Each message carries what evhub's carry (delivery_mode, message_id); acks are
         * counted exactly, batched (multiple) or single, in any order. */
        char *done = calloc((size_t)n + 2, 1);
        long sent = 0, acked = 0, low = 1;
        double t0 = now_s();
        amqp_bytes_t b = {(size_t)size, body};
        while (acked < n) {
            while (sent < n && sent - acked < window) {
                amqp_basic_properties_t p;
                char mid[24];
                memset(&p, 0, sizeof(p));
                snprintf(mid, sizeof(mid), "%ld", sent + 1);
                p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
                p.delivery_mode = 1;
                p.message_id = amqp_cstring_bytes(mid);
                if (amqp_basic_publish(c, 1, amqp_empty_bytes, amqp_cstring_bytes(argv[3]), 0, 0,
                                       &p, b) != AMQP_STATUS_OK) {
                    fprintf(stderr, "rmqtool: publish failed\n");
                    return 1;
                }
                sent++;
            }
            amqp_frame_t f;
            int rc = amqp_simple_wait_frame(c, &f);
            if (rc != AMQP_STATUS_OK) {
                fprintf(stderr, "rmqtool: %s\n", amqp_error_string2(rc));
                return 1;
            }
            if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
                amqp_basic_ack_t *a = f.payload.method.decoded;
                long tag = (long)a->delivery_tag;
                for (long t = a->multiple ? low : tag; t <= tag && t <= n; t++) {
                    if (!done[t]) {
                        done[t] = 1;
                        acked++;
                    }
                }
                while (low <= n && done[low])
                    low++;
            }
            amqp_maybe_release_buffers(c);
        }
        free(done);
        double dt = now_s() - t0;
        printf("{\"messages\":%ld,\"seconds\":%.3f,\"rate\":%.0f}\n", n, dt, n / dt);
        amqp_connection_close(c, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c);
        free(body);
        return 0;
    }
    fprintf(stderr, "usage: rmqtool declare URL QUEUE [EXCHANGE KEY] | purge URL QUEUE | consume "
                    "URL QUEUE COUNT "
                    "IDLE_MS | bench URL QUEUE N SIZE WINDOW\n");
    return 1;
}
