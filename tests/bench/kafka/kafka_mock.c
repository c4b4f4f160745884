/* kafka_mock: librdkafka's mock cluster (a real Kafka-protocol broker on loopback TCP) in a
 * process of its own, for the Kafka tests and the benchmark. It creates the topics named on
 * the command line, prints the bootstrap address ("127.0.0.1:PORT", one line, flushed), and
 * runs until SIGTERM or SIGINT. Kill it (SIGKILL) to make the broker vanish mid-stream.
 *
 *   kafka_mock [-b BROKERS] [TOPIC[:PARTITIONS]]...     (BROKERS 1..8, default 1; 1 partition)
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

int main(int argc, char **argv)
{
    int nbrokers = 1, first = 1;
    if (argc > 2 && !strcmp(argv[1], "-b")) {
        nbrokers = atoi(argv[2]);
        first = 3;
    }
    if (nbrokers < 1 || nbrokers > 8) {
        fprintf(stderr, "usage: kafka_mock [-b BROKERS] [TOPIC[:PARTITIONS]]...\n");
        return 2;
    }
    /* Blocked before librdkafka starts its threads, so that sigwait below gets them. */
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
    int sig = 0;
    sigwait(&set, &sig);
    rd_kafka_mock_cluster_destroy(mc);
    rd_kafka_destroy(rk);
    return 0;
}
