/* kafkabench: a plain librdkafka producer, the baseline the hub's publishing from Lua is
 * measured against (tests/bench/kafka/kafka_bench.py). It produces COUNT messages of SIZE
 * bytes to TOPIC with the properties given (NAME=VALUE, as the hub's g. properties), serving
 * delivery reports with rd_kafka_poll as a well-behaved application does (QUEUE_FULL: poll and
 * try again), and prints one line: "count delivered failed seconds msgs_per_s cpu_us_per_msg":
 * the time from the first produce to the last delivery report, and the process's CPU time
 * (all threads) over that time per message. Before the clock starts, one message is produced
 * and its report awaited, so the producer is connected and knows the topic, as the hub's
 * producer is when its rounds start (the hub's benchmark runs a warm-up round first); the
 * making and destroying of the producer are not counted either.
 *
 *   kafkabench BOOTSTRAP TOPIC COUNT SIZE [NAME=VALUE]...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

static long delivered, failed;

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (m->err)
        failed++;
    else
        delivered++;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru); /* every thread's, librdkafka's included, as for the hub */
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: kafkabench BOOTSTRAP TOPIC COUNT SIZE [NAME=VALUE]...\n");
        return 2;
    }
    long count = atol(argv[3]), size = atol(argv[4]);
    if (count < 1 || size < 0 || size > 1 << 20) {
        fprintf(stderr, "kafkabench: COUNT >= 1, SIZE 0..1048576\n");
        return 2;
    }
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", argv[1], errstr, sizeof(errstr))) {
        fprintf(stderr, "kafkabench: %s\n", errstr);
        return 2;
    }
    for (int i = 5; i < argc; i++) {
        char name[256];
        snprintf(name, sizeof(name), "%s", argv[i]);
        char *eq = strchr(name, '=');
        if (!eq) {
            fprintf(stderr, "kafkabench: %s: expected NAME=VALUE\n", argv[i]);
            return 2;
        }
        *eq = '\0';
        if (rd_kafka_conf_set(conf, name, eq + 1, errstr, sizeof(errstr))) {
            fprintf(stderr, "kafkabench: %s\n", errstr);
            return 2;
        }
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        fprintf(stderr, "kafkabench: %s\n", errstr);
        return 1;
    }
    char *payload = malloc((size_t)size + 1);
    if (!payload)
        return 1;
    memset(payload, 'x', (size_t)size);
    /* warm-up: connected, metadata known */
    if (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(argv[2]), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                          RD_KAFKA_V_VALUE(payload, (size_t)size), RD_KAFKA_V_KEY("w", 1),
                          RD_KAFKA_V_END)) {
        fprintf(stderr, "kafkabench: warm-up produce failed\n");
        return 1;
    }
    for (int i = 0; i < 300 && delivered + failed < 1; i++)
        rd_kafka_poll(rk, 100);
    if (delivered != 1) {
        fprintf(stderr, "kafkabench: the warm-up message was not delivered\n");
        return 1;
    }
    delivered = 0;
    double t0 = now_s(), c0 = cpu_s();
    for (long i = 0; i < count; i++) {
        char key[24];
        int kl = snprintf(key, sizeof(key), "k%ld", i);
        for (;;) {
            rd_kafka_resp_err_t e = rd_kafka_producev(
                rk, RD_KAFKA_V_TOPIC(argv[2]), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                RD_KAFKA_V_VALUE(payload, (size_t)size), RD_KAFKA_V_KEY(key, (size_t)kl),
                RD_KAFKA_V_END);
            if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                rd_kafka_poll(rk, 10);
                continue;
            }
            if (e) {
                fprintf(stderr, "kafkabench: produce: %s\n", rd_kafka_err2str(e));
                failed++;
            }
            break;
        }
        rd_kafka_poll(rk, 0);
    }
    while (delivered + failed < count)
        rd_kafka_poll(rk, 100);
    double dt = now_s() - t0, cpu = cpu_s() - c0;
    rd_kafka_destroy(rk);
    printf("%ld %ld %ld %.6f %.1f %.3f\n", count, delivered, failed, dt, (double)count / dt,
           cpu / (double)count * 1e6);
    free(payload);
    return failed ? 1 : 0;
}
