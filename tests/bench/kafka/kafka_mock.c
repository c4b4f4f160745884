/* kafka_mock: librdkafka's mock cluster (a real Kafka-protocol broker on loopback TCP) in a
 * process of its own, for the Kafka tests and the benchmark. It creates the topics named on
 * the command line, prints the bootstrap address ("127.0.0.1:PORT", one line, flushed), and
 * runs until SIGTERM or SIGINT. Kill it (SIGKILL) to make the broker vanish mid-stream. With -c,
 * lines on standard input inject faults, each answered "ok" (or "error: ...") on standard
 * output, and the end of standard input ends it too:
 *   down ID | up ID            a broker (1..BROKERS) stops or resumes answering
 *   err APIKEY CODE [COUNT]    the next COUNT (1) requests of APIKEY (0 Produce, 22
 *                              InitProducerId, ...) fail with Kafka error CODE
 *
 *   kafka_mock [-c] [-b BROKERS] [TOPIC[:PARTITIONS]]...  (BROKERS 1..8, default 1; 1 partition)
 */
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

/* One fault-injection line; answers on stdout. */
static void command(rd_kafka_mock_cluster_t *mc, const char *line)
{
    int a = 0, b = 0, c = 1;
    rd_kafka_resp_err_t e = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (sscanf(line, "down %d", &a) == 1) {
        e = rd_kafka_mock_broker_set_down(mc, a);
    } else if (sscanf(line, "up %d", &a) == 1) {
        e = rd_kafka_mock_broker_set_up(mc, a);
    } else if (sscanf(line, "err %d %d %d", &a, &b, &c) >= 2 && c >= 1 && c <= 1000) {
        rd_kafka_resp_err_t errs[1000];
        for (int i = 0; i < c; i++)
            errs[i] = (rd_kafka_resp_err_t)b;
        rd_kafka_mock_push_request_errors_array(mc, (int16_t)a, (size_t)c, errs);
    } else {
        printf("error: unknown command\n");
        fflush(stdout);
        return;
    }
    if (e)
        printf("error: %s\n", rd_kafka_err2str(e));
    else
        printf("ok\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    int nbrokers = 1, first = 1, control = 0;
    if (argc > first && !strcmp(argv[first], "-c")) {
        control = 1;
        first++;
    }
    if (argc > first + 1 && !strcmp(argv[first], "-b")) {
        nbrokers = atoi(argv[first + 1]);
        first += 2;
    }
    if (nbrokers < 1 || nbrokers > 8) {
        fprintf(stderr, "usage: kafka_mock [-c] [-b BROKERS] [TOPIC[:PARTITIONS]]...\n");
        return 2;
    }
    /* Blocked before librdkafka starts its threads, so that the signalfd below gets them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* The cluster needs a handle for its bookkeeping; this one never connects anywhere. */
    rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        fprintf(stderr, "kafka_mock: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        return 1;
    }
    rd_kafka_mock_cluster_t *mc = rd_kafka_mock_cluster_new(rk, nbrokers);
    if (!mc) {
        fprintf(stderr, "kafka_mock: cannot create the mock cluster\n");
        rd_kafka_destroy(rk);
        return 1;
    }
    for (int i = first; i < argc; i++) {
        char name[256];
        int parts = 1;
        snprintf(name, sizeof(name), "%s", argv[i]);
        char *colon = strchr(name, ':');
        if (colon) {
            *colon = '\0';
            parts = atoi(colon + 1);
        }
        if (parts < 1 ||
            rd_kafka_mock_topic_create(mc, name, parts, nbrokers < 3 ? nbrokers : 3) != 0) {
            fprintf(stderr, "kafka_mock: cannot create topic %s\n", argv[i]);
            rd_kafka_mock_cluster_destroy(mc);
            rd_kafka_destroy(rk);
            return 1;
        }
    }
    printf("%s\n", rd_kafka_mock_cluster_bootstraps(mc));
    fflush(stdout);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    char line[256];
    size_t have = 0;
    for (;;) {
        struct pollfd p[2] = {{.fd = sfd, .events = POLLIN},
                              {.fd = control ? 0 : -1, .events = POLLIN}};
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[0].revents)
            break; /* SIGTERM or SIGINT */
        if (!p[1].revents)
            continue;
        ssize_t n = read(0, line + have, sizeof(line) - 1 - have);
        if (n <= 0)
            break; /* stdin closed: the test that started us is gone */
        have += (size_t)n;
        line[have] = '\0';
        char *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = '\0';
            command(mc, line);
            memmove(line, nl + 1, have - (size_t)(nl + 1 - line) + 1);
            have -= (size_t)(nl + 1 - line);
        }
        if (have == sizeof(line) - 1)
            have = 0; /* an over-long line: dropped */
    }
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(rk);
    return 0;
}
