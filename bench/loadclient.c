/*
 * tcplab bench load client: N connections doing echo ping-pong over TCP.
 *
 * Each connection sends one message of SIZE bytes, reads until all SIZE bytes
 * came back (and checks they are the same bytes), records the round-trip time
 * with CLOCK_MONOTONIC, and repeats. One thread, epoll, non-blocking sockets,
 * TCP_NODELAY, so the client costs far less CPU than the Python servers it
 * drives. Requests that start during the warm-up are not recorded.
 *
 * Prints one JSON line on stdout; exit status 0 even when the server failed
 * (the "error" field says what happened), 2 for bad arguments.
 *
 * usage: loadclient HOST PORT CONNECTIONS SIZE WARMUP_S SECONDS [STALL_S]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 10000
#define MAX_SIZE (64 * 1024 * 1024)
#define MAX_SAMPLES (1u << 26)

struct conn {
    int fd;
    size_t sent, received;
    uint64_t started;
    uint64_t seq;
    int wantsOut;
    unsigned char *out, *in;
};

static uint64_t *samples;
static size_t nsamples, capsamples, dropped;
static char error[256];

static uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpuSeconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void record(uint64_t latency) {
    if (nsamples == capsamples) {
        size_t cap = capsamples ? capsamples * 2 : 65536;
        uint64_t *grown;
        if (cap > MAX_SAMPLES || !(grown = realloc(samples, cap * sizeof *samples))) {
            dropped++;
            return;
        }
        samples = grown;
        capsamples = cap;
    }
    samples[nsamples++] = latency;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile, in microseconds. */
static double percentile(double p) {
    if (!nsamples) return 0;
    size_t rank = (size_t)(p / 100.0 * nsamples + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > nsamples) rank = nsamples;
    return samples[rank - 1] / 1000.0;
}

static void fill(struct conn *c, size_t size, int id) {
    /* A distinct header per request, so a stale or misrouted echo cannot match. */
    for (size_t i = 0; i < size; i++) c->out[i] = (unsigned char)(i * 31 + id * 7 + c->seq);
    if (size >= 16) {
        memcpy(c->out, &c->seq, 8);
        uint64_t who = (uint64_t)id;
        memcpy(c->out + 8, &who, 8);
    }
}

static int setInterest(int ep, struct conn *c, int wantsOut) {
    if (c->wantsOut == wantsOut) return 0;
    struct epoll_event ev = {.events = EPOLLIN | (wantsOut ? EPOLLOUT : 0), .data.ptr = c};
    c->wantsOut = wantsOut;
    return epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Write what is left of the current message; -1 on a socket error. */
static int flush(int ep, struct conn *c, size_t size) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->out + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return setInterest(ep, c, 1);
        } else {
            snprintf(error, sizeof error, "send failed: %s", strerror(errno));
            return -1;
        }
    }
    return setInterest(ep, c, 0);
}

static int startRequest(int ep, struct conn *c, size_t size, int id) {
    c->seq++;
    fill(c, size, id);
    c->sent = c->received = 0;
    c->started = now();
    return flush(ep, c, size);
}

static int usage(void) {
    fprintf(stderr, "usage: loadclient HOST PORT CONNECTIONS SIZE WARMUP_S SECONDS [STALL_S]\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 7 || argc > 8) return usage();
    const char *host = argv[1];
    int port = atoi(argv[2]);
    int nconn = atoi(argv[3]);
    long lsize = atol(argv[4]);
    double warmup = atof(argv[5]), seconds = atof(argv[6]);
    double stall = argc == 8 ? atof(argv[7]) : 5.0;
    if (port <= 0 || port > 65535 || nconn < 1 || nconn > MAX_CONNECTIONS || lsize < 1 || lsize > MAX_SIZE ||
        warmup < 0 || seconds <= 0 || stall <= 0)
        return usage();
    size_t size = (size_t)lsize;

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "loadclient: HOST must be an IPv4 address, not %s\n", host);
        return 2;
    }

    int ep = epoll_create1(0);
    struct conn *conns = calloc((size_t)nconn, sizeof *conns);
    if (ep < 0 || !conns) {
        perror("loadclient");
        return 1;
    }
    int opened = 0;
    for (int i = 0; i < nconn && !error[0]; i++) {
        struct conn *c = &conns[i];
        c->out = malloc(size);
        c->in = malloc(size);
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (!c->out || !c->in || c->fd < 0) {
            snprintf(error, sizeof error, "cannot set up connection %d: %s", i, strerror(errno));
            break;
        }
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            snprintf(error, sizeof error, "connect to %s:%d failed: %s", host, port, strerror(errno));
            close(c->fd);
            break;
        }
        opened++;
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            snprintf(error, sizeof error, "epoll_ctl: %s", strerror(errno));
    }

    uint64_t begin = now();
    uint64_t measureFrom = begin + (uint64_t)(warmup * 1e9);
    uint64_t end = measureFrom + (uint64_t)(seconds * 1e9);
    uint64_t stallNs = (uint64_t)(stall * 1e9);
    uint64_t lastProgress = begin;
    uint64_t completed = 0, bytes = 0, all = 0;
    double cpuFrom = -1, cpuTo = 0;

    for (int i = 0; i < opened && !error[0]; i++)
        if (startRequest(ep, &conns[i], size, i) < 0) break;

    struct epoll_event events[256];
    while (!error[0]) {
        uint64_t t = now();
        if (cpuFrom < 0 && t >= measureFrom) cpuFrom = cpuSeconds();
        if (t >= end) break;
        if (t - lastProgress > stallNs) {
            snprintf(error, sizeof error, "no echo came back for %.1f s", stall);
            break;
        }
        int n = epoll_wait(ep, events, 256, 50);
        if (n < 0 && errno != EINTR) {
            snprintf(error, sizeof error, "epoll_wait: %s", strerror(errno));
            break;
        }
        for (int k = 0; k < n && !error[0]; k++) {
            struct conn *c = events[k].data.ptr;
            int id = (int)(c - conns);
            if (events[k].events & EPOLLOUT && flush(ep, c, size) < 0) break;
            if (!(events[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                ssize_t got = recv(c->fd, c->in + c->received, size - c->received, 0);
                if (got == 0) {
                    snprintf(error, sizeof error, "server closed connection %d", id);
                    break;
                }
                if (got < 0) {
                    if (errno == EINTR) continue;
                    if (errno != EAGAIN && errno != EWOULDBLOCK)
                        snprintf(error, sizeof error, "recv failed: %s", strerror(errno));
                    break;
                }
                c->received += (size_t)got;
                if (c->received < size) continue;
                if (c->sent < size || memcmp(c->in, c->out, size) != 0) {
                    snprintf(error, sizeof error, "connection %d got back different bytes than it sent", id);
                    break;
                }
                uint64_t done = now();
                lastProgress = done;
                all++;
                if (c->started >= measureFrom && done <= end) {
                    record(done - c->started);
                    completed++;
                    bytes += size;
                }
                if (startRequest(ep, c, size, id) < 0) break;
                break; /* one request in flight per connection: nothing more to read now */
            }
        }
    }
    cpuTo = cpuSeconds();
    double measured = (double)((now() < end ? now() : end) - measureFrom) / 1e9;
    if (measured < 0) measured = 0;
    if (cpuFrom < 0) cpuFrom = cpuTo;

    qsort(samples, nsamples, sizeof *samples, cmp);
    double mean = 0;
    for (size_t i = 0; i < nsamples; i++) mean += samples[i] / 1000.0;
    if (nsamples) mean /= nsamples;

    printf("{\"client\": \"c\", \"connections\": %d, \"size\": %zu, \"seconds\": %.6f, \"requests\": %llu, "
           "\"bytes\": %llu, \"all_requests\": %llu, \"rps\": %.3f, \"mean_us\": %.3f, \"p50_us\": %.3f, \"p90_us\": %.3f, "
           "\"p99_us\": %.3f, \"p999_us\": %.3f, \"max_us\": %.3f, \"client_cpu\": %.4f, \"dropped_samples\": %zu, ",
           opened, size, measured, (unsigned long long)completed, (unsigned long long)bytes, (unsigned long long)all,
           measured > 0 ? completed / measured : 0.0, mean, percentile(50), percentile(90), percentile(99),
           percentile(99.9), percentile(100), measured > 0 ? (cpuTo - cpuFrom) / measured : 0.0, dropped);
    if (error[0]) {
        printf("\"error\": \"");
        for (const char *p = error; *p; p++) {
            if (*p == '"' || *p == '\\') putchar('\\');
            putchar(*p);
        }
        printf("\"}\n");
    } else {
        printf("\"error\": null}\n");
    }
    for (int i = 0; i < opened; i++) close(conns[i].fd);
    return 0;
}
