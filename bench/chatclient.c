/*
 * tcplab bench chat client: connection storms and fan-out against line-based broadcast servers
 * (tcplab-multi, the Twisted docs' chat, ncat --broker / --chat).
 *
 *   chatclient storm  HOST PORT N CONCURRENCY [options]
 *   chatclient fanout HOST PORT LISTENERS LINES [options]
 *
 * storm: N short connections, at most CONCURRENCY at a time. Each connects (non-blocking), sends
 * one line "storm-<id> ...", waits until that line has come back, and closes. With --echo the
 * server echoes a sender's own line, so a connection waits for its own echo (server lines and
 * others' lines are skipped). Without it (servers that relay only to the others) a witness
 * connection, open for the whole run, sees every line, and a connection is done when the witness
 * has its line. The witness is connected in both modes, so every server relays to the same number
 * of clients and every line's delivery is checked. --nowitness (with --echo, for plain echo servers,
 * where no line goes anywhere but back) leaves the witness out. The time of a connection is from connect() to
 * done: connect + send + the server relaying the line back.
 *
 * fanout: LISTENERS connections read as fast as they can; one sender sends LINES lines of --size
 * bytes, "~F<10 digits> ..." with a sequence number, never more than --window lines ahead of the
 * slowest listener (so it cannot outrun the server forever). It sends in batches: once the slowest
 * listener is within half a window, it writes lines up to a full window in one send() (dribbling a
 * few lines whenever a few were delivered makes small segments that stall in Nagle/delayed-ACK
 * waits on servers without TCP_NODELAY, ncat among them, and measures those timers instead). Each listener checks that it gets
 * every sequence number once and in order. A sync phase first makes sure every listener has
 * joined (the sender repeats "~S" lines until each listener saw one). --stuck adds one
 * connection that joins, sees the sync line, then never reads again.
 *
 * Options: --echo, --crlf (lines end in \r\n), --names (each connection first sends a unique name
 * line, as the Twisted docs' chat asks), --size BYTES, --window LINES, --stuck, --timeout S
 * (per storm connection), --stall S (fan-out: give up after this long without progress),
 * --deadline S (whole run).
 *
 * Prints one JSON line on stdout; exit 0 even when the server misbehaved (the "error" field says
 * what happened), 2 for bad arguments.
 */
#define _GNU_SOURCE
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

#define LINEBUF 16384
#define READBUF (256 * 1024)
#define MAX_CONNS 100000

static struct {
    int echo, crlf, names, stuck, nowitness;
    size_t size;
    long window;
    double timeout, stall, deadline;
} opt = {0, 0, 0, 0, 0, 64, 1000, 10.0, 5.0, 120.0};

static struct sockaddr_in addr;
static char error[512];      /* what ended the run early, if anything */
static char firstError[512]; /* storm: the first connection that failed, and why */
static unsigned char readbuf[READBUF];

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

static const char *eol(void) { return opt.crlf ? "\r\n" : "\n"; }

static void setError(const char *fmt, const char *detail) {
    if (!error[0]) snprintf(error, sizeof error, fmt, detail);
}

/* JSON string with quotes and control characters escaped. */
static void printJsonString(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            putchar('\\');
            putchar(c);
        } else if (c < 0x20 || c >= 0x7f) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
    putchar('"');
}

/* ---- line assembly ------------------------------------------------------------------------- */

struct lines {
    char *buf;
    size_t len;
    int skipping; /* inside a line longer than LINEBUF: drop it up to its end */
};

typedef void (*lineFn)(void *ctx, const char *line, size_t len);

static int linesInit(struct lines *l) {
    l->buf = malloc(LINEBUF);
    l->len = 0;
    l->skipping = 0;
    return l->buf ? 0 : -1;
}

/* Call fn for every complete line (without its \n, and without a \r before it). */
static void feed(struct lines *l, const unsigned char *data, size_t n, lineFn fn, void *ctx) {
    while (n) {
        const unsigned char *nl = memchr(data, '\n', n);
        size_t take = nl ? (size_t)(nl - data) : n;
        if (!l->skipping) {
            if (l->len + take > LINEBUF) {
                l->skipping = 1;
                l->len = 0;
            } else if (nl && l->len == 0) {
                size_t len = take;
                if (len && data[len - 1] == '\r') len--;
                fn(ctx, (const char *)data, len);
            } else {
                memcpy(l->buf + l->len, data, take);
                l->len += take;
                if (nl) {
                    size_t len = l->len;
                    if (len && l->buf[len - 1] == '\r') len--;
                    fn(ctx, l->buf, len);
                    l->len = 0;
                }
            }
        }
        if (!nl) return;
        l->skipping = 0;
        data += take + 1;
        n -= take + 1;
    }
}

/* The number after `marker` in a line, or -1. */
static long long numberAfter(const char *line, size_t len, const char *marker) {
    size_t m = strlen(marker);
    const char *p = memmem(line, len, marker, m);
    if (!p) return -1;
    p += m;
    const char *end = line + len;
    if (p >= end || *p < '0' || *p > '9') return -1;
    long long v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
    return v;
}

/* ---- sockets -------------------------------------------------------------------------------- */

static int nonblocking(int fd) { return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* A blocking connect, then non-blocking with TCP_NODELAY; -1 with error set. */
static int connectNow(const char *what) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        setError("socket: %s", strerror(errno));
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        char detail[256];
        snprintf(detail, sizeof detail, "%s: %s", what, strerror(errno));
        setError("connect failed (%s)", detail);
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    nonblocking(fd);
    return fd;
}

/* Send all of buf on a connection that is expected to take it at once (short lines); 0 or -1. */
static int sendAllBlocking(int fd, const char *buf, size_t len) {
    uint64_t limit = now() + (uint64_t)(opt.timeout * 1e9);
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (now() > limit) return -1;
            usleep(1000);
        } else {
            return -1;
        }
    }
    return 0;
}

static int epollAdd(int ep, int fd, uint32_t events, void *ptr) {
    struct epoll_event ev = {.events = events, .data.ptr = ptr};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int epollMod(int ep, int fd, uint32_t events, void *ptr) {
    struct epoll_event ev = {.events = events, .data.ptr = ptr};
    return epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static int cmpU64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double percentileUs(uint64_t *sorted, size_t n, double p) {
    if (!n) return 0;
    size_t rank = (size_t)(p / 100.0 * n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1] / 1000.0;
}

/* ---- storm ---------------------------------------------------------------------------------- */

enum { FREE, CONNECTING, OPEN };

struct sconn {
    int fd, id, state;
    uint64_t started;
    size_t outlen, sent, linelen;
    char out[160];
    struct lines in;
    int matched;
    long relayed; /* other connections' lines this one received */
};

struct witness {
    int fd;
    struct lines in;
};

static struct sconn *slots;
static int *slotOf; /* storm id -> slot index, -1 when not open */
static unsigned char *witnessed;
static long nStorm, witnessedCount, witnessDuplicates;
static uint64_t *latencies;
static long nLatencies;
static long long relayedTotal;
static long okCount, connectErrors, closedErrors, resetErrors, timeoutErrors, otherErrors;
static int active;
static uint64_t lastDone;

static void finish(int ep, struct sconn *c, int ok) {
    (void)ep;
    if (ok) {
        uint64_t t = now();
        latencies[nLatencies++] = t - c->started;
        okCount++;
        relayedTotal += c->relayed;
        lastDone = t;
    }
    close(c->fd); /* closing removes it from epoll */
    slotOf[c->id] = -1;
    c->state = FREE;
    c->fd = -1;
    active--;
}

static void fail(int ep, struct sconn *c, long *counter, const char *what, const char *detail) {
    char msg[256];
    snprintf(msg, sizeof msg, "connection %d: %s%s%s", c->id, what, detail ? ": " : "", detail ? detail : "");
    if (!firstError[0]) snprintf(firstError, sizeof firstError, "%s", msg);
    (*counter)++;
    finish(ep, c, 0);
}

static void witnessLine(void *ctx, const char *line, size_t len) {
    (void)ctx;
    long long id = numberAfter(line, len, "storm-");
    if (id < 0 || id >= nStorm) return;
    if (witnessed[id]) {
        witnessDuplicates++;
        return;
    }
    witnessed[id] = 1;
    witnessedCount++;
}

static void ownLine(void *ctx, const char *line, size_t len) {
    struct sconn *c = ctx;
    if (len == c->linelen && memcmp(line, c->out + c->outlen - c->linelen - (opt.crlf ? 2 : 1), len) == 0)
        c->matched = 1;
    else if (memmem(line, len, "storm-", 6))
        c->relayed++;
}

static int startStorm(int ep, struct sconn *c, int id) {
    c->id = id;
    c->matched = 0;
    c->relayed = 0;
    c->in.len = 0;
    c->in.skipping = 0;
    c->started = now();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    active++;
    if (c->fd < 0) {
        c->state = OPEN;
        slotOf[id] = (int)(c - slots);
        fail(ep, c, &otherErrors, "socket", strerror(errno));
        return 0;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    size_t n = 0;
    if (opt.names) n += (size_t)snprintf(c->out + n, sizeof c->out - n, "s%d%s", id, eol());
    int at = (int)n;
    n += (size_t)snprintf(c->out + n, sizeof c->out - n, "storm-%d hello from a short connection", id);
    c->linelen = n - (size_t)at;
    n += (size_t)snprintf(c->out + n, sizeof c->out - n, "%s", eol());
    c->outlen = n;
    c->sent = 0;
    slotOf[id] = (int)(c - slots);
    c->state = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(ep, c, &connectErrors, "connect", strerror(errno));
        return 0;
    }
    if (epollAdd(ep, c->fd, EPOLLOUT | EPOLLIN, c) < 0) {
        fail(ep, c, &otherErrors, "epoll_ctl", strerror(errno));
        return 0;
    }
    return 0;
}

static void flushStorm(int ep, struct sconn *c) {
    while (c->sent < c->outlen) {
        ssize_t n = send(c->fd, c->out + c->sent, c->outlen - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            epollMod(ep, c->fd, EPOLLIN | EPOLLOUT, c);
            return;
        } else {
            fail(ep, c, errno == ECONNRESET ? &resetErrors : &otherErrors, "send", strerror(errno));
            return;
        }
    }
    epollMod(ep, c->fd, EPOLLIN, c);
}

static void readStorm(int ep, struct sconn *c) {
    for (;;) {
        ssize_t got = recv(c->fd, readbuf, READBUF, 0);
        if (got > 0) {
            feed(&c->in, readbuf, (size_t)got, ownLine, c);
            if (opt.echo && c->matched) {
                finish(ep, c, 1);
                return;
            }
            continue;
        }
        if (got == 0) {
            fail(ep, c, &closedErrors, "closed by the server before its line came back", NULL);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return;
        fail(ep, c, errno == ECONNRESET ? &resetErrors : &otherErrors, "recv", strerror(errno));
        return;
    }
}

static int readWitness(struct witness *w) {
    for (;;) {
        ssize_t got = recv(w->fd, readbuf, READBUF, 0);
        if (got > 0) {
            feed(&w->in, readbuf, (size_t)got, witnessLine, NULL);
            continue;
        }
        if (got == 0) {
            setError("%s", "the server closed the witness connection");
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return 0;
        setError("witness recv: %s", strerror(errno));
        return -1;
    }
}

static int storm(long n, int concurrency) {
    nStorm = n;
    slots = calloc((size_t)concurrency, sizeof *slots);
    slotOf = malloc((size_t)n * sizeof *slotOf);
    witnessed = calloc((size_t)n, 1);
    latencies = malloc((size_t)n * sizeof *latencies);
    if (!slots || !slotOf || !witnessed || !latencies) {
        perror("chatclient");
        return 1;
    }
    for (long i = 0; i < n; i++) slotOf[i] = -1;
    for (int i = 0; i < concurrency; i++) {
        if (linesInit(&slots[i].in) < 0) return 1;
        slots[i].fd = -1;
    }
    int ep = epoll_create1(0);
    struct witness w;
    linesInit(&w.in);
    w.fd = opt.nowitness ? -1 : connectNow("witness");
    int witnessOk = opt.nowitness || w.fd >= 0;
    if (w.fd >= 0 && opt.names) {
        char name[32];
        snprintf(name, sizeof name, "witness%s", eol());
        if (sendAllBlocking(w.fd, name, strlen(name)) < 0) setError("%s", "witness: could not send its name");
    }
    if (w.fd >= 0) epollAdd(ep, w.fd, EPOLLIN, &w);
    if (w.fd >= 0) usleep(200000); /* let the server register the witness before the storm */

    uint64_t begin = now();
    uint64_t deadline = begin + (uint64_t)(opt.deadline * 1e9);
    uint64_t timeoutNs = (uint64_t)(opt.timeout * 1e9);
    uint64_t lastScan = begin;
    double cpuFrom = cpuSeconds();
    long next = 0;
    struct epoll_event events[512];
    int timedOut = 0;
    while (witnessOk) {
        while (active < concurrency && next < n) {
            struct sconn *c = NULL;
            for (int i = 0; i < concurrency; i++)
                if (slots[i].state == FREE) {
                    c = &slots[i];
                    break;
                }
            if (!c) break;
            startStorm(ep, c, (int)next++);
        }
        if (next >= n && active == 0) break;
        uint64_t t = now();
        if (t > deadline) {
            timedOut = 1;
            break;
        }
        int k = epoll_wait(ep, events, 512, 10);
        if (k < 0 && errno != EINTR) {
            setError("epoll_wait: %s", strerror(errno));
            break;
        }
        for (int i = 0; i < k; i++) {
            if (events[i].data.ptr == &w) {
                if (readWitness(&w) < 0) {
                    witnessOk = 0;
                    break;
                }
                if (!opt.echo) {
                    /* Close every open connection whose line the witness has seen. */
                    for (int s = 0; s < concurrency; s++)
                        if (slots[s].state == OPEN && witnessed[slots[s].id]) finish(ep, &slots[s], 1);
                }
                continue;
            }
            struct sconn *c = events[i].data.ptr;
            if (c->state == FREE) continue; /* finished earlier in this batch */
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    fail(ep, c, &connectErrors, "connect", strerror(err));
                    continue;
                }
                if (!(events[i].events & EPOLLOUT)) continue;
                c->state = OPEN;
                flushStorm(ep, c);
                if (c->state == FREE) continue;
            } else if (events[i].events & EPOLLOUT) {
                flushStorm(ep, c);
                if (c->state == FREE) continue;
            }
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readStorm(ep, c);
        }
        t = now();
        if (t - lastScan > 50000000u) {
            lastScan = t;
            for (int s = 0; s < concurrency; s++) {
                struct sconn *c = &slots[s];
                if (c->state == FREE) continue;
                if (!opt.echo && c->state == OPEN && witnessed[c->id]) {
                    finish(ep, c, 1);
                } else if (t - c->started > timeoutNs) {
                    fail(ep, c, &timeoutErrors, c->state == CONNECTING ? "connect timed out" : "no line back in time",
                         NULL);
                }
            }
        }
    }
    uint64_t end = lastDone ? lastDone : now();
    double cpu = cpuSeconds() - cpuFrom;
    /* Give the witness a moment to see the last lines (it checks every line was relayed). */
    uint64_t settle = now() + 3000000000u;
    while (w.fd >= 0 && witnessOk && witnessedCount < okCount && now() < settle) {
        int k = epoll_wait(ep, events, 512, 20);
        for (int i = 0; i < k; i++)
            if (events[i].data.ptr == &w && readWitness(&w) < 0) witnessOk = 0;
    }
    for (int s = 0; s < concurrency; s++)
        if (slots[s].state != FREE) close(slots[s].fd);
    if (w.fd >= 0) close(w.fd);

    double seconds = (double)(end - begin) / 1e9;
    qsort(latencies, (size_t)nLatencies, sizeof *latencies, cmpU64);
    double mean = 0;
    for (long i = 0; i < nLatencies; i++) mean += latencies[i] / 1000.0;
    if (nLatencies) mean /= (double)nLatencies;
    long errors = connectErrors + closedErrors + resetErrors + timeoutErrors + otherErrors;
    long notStarted = n - next;
    if (timedOut) setError("%s", "the run went past --deadline");
    printf("{\"mode\": \"storm\", \"witness\": %s, \"connections\": %ld, \"concurrency\": %d, \"completed\": %ld, \"errors\": %ld, "
           "\"connect_errors\": %ld, \"closed_errors\": %ld, \"reset_errors\": %ld, \"timeout_errors\": %ld, "
           "\"other_errors\": %ld, \"not_started\": %ld, \"witnessed\": %ld, \"witness_duplicates\": %ld, "
           "\"seconds\": %.6f, \"conns_per_s\": %.3f, \"mean_ms\": %.3f, \"p50_ms\": %.3f, \"p90_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"client_cpu\": %.4f, \"relayed_per_conn\": %.2f, "
           "\"first_error\": ",
           opt.nowitness ? "false" : "true", n, concurrency, okCount, errors, connectErrors, closedErrors, resetErrors, timeoutErrors, otherErrors,
           notStarted, witnessedCount, witnessDuplicates, seconds, seconds > 0 ? okCount / seconds : 0.0,
           mean / 1000, percentileUs(latencies, (size_t)nLatencies, 50) / 1000,
           percentileUs(latencies, (size_t)nLatencies, 90) / 1000,
           percentileUs(latencies, (size_t)nLatencies, 99) / 1000,
           percentileUs(latencies, (size_t)nLatencies, 100) / 1000, seconds > 0 ? cpu / seconds : 0.0,
           okCount ? (double)relayedTotal / okCount : 0.0);
    if (firstError[0])
        printJsonString(firstError, strlen(firstError));
    else
        printf("null");
    printf(", \"error\": ");
    if (error[0])
        printJsonString(error, strlen(error));
    else
        printf("null");
    printf("}\n");
    return 0;
}

/* ---- fan-out -------------------------------------------------------------------------------- */

struct listener {
    int fd, synced;
    long next;     /* the sequence number expected next */
    long received; /* data lines received */
    long gaps, reordered;
    struct lines in;
};

struct stuckConn {
    int fd, synced;
    struct lines in;
};

static long fanLines;

static void listenerLine(void *ctx, const char *line, size_t len) {
    struct listener *l = ctx;
    long long seq = numberAfter(line, len, "~F");
    if (seq < 0) {
        if (memmem(line, len, "~S", 2)) l->synced = 1;
        return;
    }
    l->received++;
    if (seq == l->next) {
        l->next++;
    } else if (seq > l->next) {
        l->gaps += seq - l->next;
        l->next = seq + 1;
    } else {
        l->reordered++;
    }
}

static void ignoreLine(void *ctx, const char *line, size_t len) {
    (void)ctx;
    (void)line;
    (void)len;
}

static void stuckLine(void *ctx, const char *line, size_t len) {
    struct stuckConn *s = ctx;
    if (memmem(line, len, "~S", 2)) s->synced = 1;
}

/* Read what is there; -1 if the server closed the connection (message in error). */
static int readLines(int fd, struct lines *in, lineFn fn, void *ctx, const char *who) {
    for (;;) {
        ssize_t got = recv(fd, readbuf, READBUF, 0);
        if (got > 0) {
            feed(in, readbuf, (size_t)got, fn, ctx);
            continue;
        }
        if (got == 0) {
            setError("the server closed the %s connection", who);
            return -1;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return 0;
        char detail[200];
        snprintf(detail, sizeof detail, "%s: %s", who, strerror(errno));
        setError("recv failed (%s)", detail);
        return -1;
    }
}

static size_t formatLine(char *p, long seq) {
    /* "~F0000000042 " then filler up to --size bytes with the line end. */
    size_t end = strlen(eol());
    int head = sprintf(p, "~F%010ld ", seq);
    size_t body = opt.size - end;
    for (size_t i = (size_t)head; i < body; i++) p[i] = (char)('a' + (seq + (long)i) % 26);
    memcpy(p + body, eol(), end);
    return opt.size;
}

static int fanout(int nListeners, long nLines) {
    fanLines = nLines;
    struct listener *ls = calloc((size_t)nListeners, sizeof *ls);
    if (!ls) return 1;
    int ep = epoll_create1(0);
    struct stuckConn stuck = {.fd = -1};
    char name[64];
    if (opt.stuck) {
        linesInit(&stuck.in);
        stuck.fd = connectNow("stuck reader");
        if (stuck.fd >= 0 && opt.names) {
            snprintf(name, sizeof name, "stuck%s", eol());
            sendAllBlocking(stuck.fd, name, strlen(name));
        }
    }
    int opened = 0;
    for (int i = 0; i < nListeners && !error[0]; i++) {
        if (linesInit(&ls[i].in) < 0) return 1;
        ls[i].fd = connectNow("listener");
        if (ls[i].fd < 0) break;
        opened++;
        if (opt.names) {
            snprintf(name, sizeof name, "l%d%s", i, eol());
            if (sendAllBlocking(ls[i].fd, name, strlen(name)) < 0) setError("%s", "a listener could not send its name");
        }
        epollAdd(ep, ls[i].fd, EPOLLIN, &ls[i]);
    }
    struct lines senderIn;
    linesInit(&senderIn);
    int sender = error[0] ? -1 : connectNow("sender");
    if (sender >= 0 && opt.names) {
        snprintf(name, sizeof name, "sender%s", eol());
        sendAllBlocking(sender, name, strlen(name));
    }
    static int senderTag;
    if (sender >= 0) epollAdd(ep, sender, EPOLLIN, &senderTag);

    struct epoll_event events[512];
    /* Sync: repeat a "~S" line until every listener (and the stuck reader) has seen one. */
    uint64_t syncUntil = now() + 10000000000u, lastSync = 0;
    int syncs = 0;
    while (!error[0]) {
        int all = 1;
        for (int i = 0; i < opened; i++) all &= ls[i].synced;
        if (stuck.fd >= 0) all &= stuck.synced;
        if (all) break;
        uint64_t t = now();
        if (t > syncUntil) {
            setError("%s", "not every listener saw the sync lines within 10 s (did they all join?)");
            break;
        }
        if (t - lastSync > 100000000u) {
            lastSync = t;
            char line[64];
            int len = snprintf(line, sizeof line, "~S%d sync%s", syncs++, eol());
            if (sendAllBlocking(sender, line, (size_t)len) < 0) setError("%s", "the sender could not send");
        }
        if (stuck.fd >= 0 && !stuck.synced && readLines(stuck.fd, &stuck.in, stuckLine, &stuck, "stuck reader") < 0)
            break;
        int k = epoll_wait(ep, events, 512, 10);
        for (int i = 0; i < k && !error[0]; i++) {
            if (events[i].data.ptr == &senderTag) {
                readLines(sender, &senderIn, ignoreLine, NULL, "sender");
                continue;
            }
            struct listener *l = events[i].data.ptr;
            readLines(l->fd, &l->in, listenerLine, l, "listener");
        }
    }

    /* Data. */
    size_t chunkCap = 256 * 1024;
    char *chunk = malloc(chunkCap + opt.size);
    size_t chunkLen = 0, chunkSent = 0;
    long seq = 0;
    uint64_t begin = now(), lastProgress = begin, lastDelivery = begin, sendDone = 0;
    uint64_t deadline = begin + (uint64_t)(opt.deadline * 1e9);
    uint64_t stallNs = (uint64_t)(opt.stall * 1e9);
    double cpuFrom = cpuSeconds();
    long long echoBytes = 0;
    int wantsOut = 0, stalled = 0, timedOut = 0;
    long minNext = 0;
    while (!error[0]) {
        minNext = nLines;
        for (int i = 0; i < opened; i++)
            if (ls[i].next < minNext) minNext = ls[i].next;
        if (minNext >= nLines && seq >= nLines) break;
        /* Refill the sender's chunk: never more than --window lines ahead of the slowest listener. */
        if (chunkSent == chunkLen && seq - minNext <= opt.window / 2) {
            chunkLen = chunkSent = 0;
            while (seq < nLines && seq - minNext < opt.window && chunkLen + opt.size <= chunkCap)
                chunkLen += formatLine(chunk + chunkLen, seq++);
            if (seq >= nLines && !sendDone && chunkLen == 0) sendDone = now();
        }
        while (chunkSent < chunkLen) {
            ssize_t n = send(sender, chunk + chunkSent, chunkLen - chunkSent, MSG_NOSIGNAL);
            if (n > 0) {
                chunkSent += (size_t)n;
                lastProgress = now();
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && errno == EAGAIN) {
                break;
            } else {
                setError("the sender's send failed: %s", strerror(errno));
                break;
            }
        }
        int want = chunkSent < chunkLen;
        if (want != wantsOut) {
            wantsOut = want;
            epollMod(ep, sender, EPOLLIN | (want ? EPOLLOUT : 0), &senderTag);
        }
        uint64_t t = now();
        if (t > deadline) {
            timedOut = 1;
            break;
        }
        if (t - lastProgress > stallNs) {
            stalled = 1;
            break;
        }
        int k = epoll_wait(ep, events, 512, 10);
        for (int i = 0; i < k && !error[0]; i++) {
            if (events[i].data.ptr == &senderTag) {
                if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                    for (;;) { /* the sender's own echoes and server lines: drain and count */
                        ssize_t got = recv(sender, readbuf, READBUF, 0);
                        if (got > 0) {
                            echoBytes += got;
                            continue;
                        }
                        if (got == 0) setError("%s", "the server closed the sender's connection");
                        else if (errno != EAGAIN && errno != EINTR)
                            setError("the sender's recv failed: %s", strerror(errno));
                        break;
                    }
                }
                continue;
            }
            struct listener *l = events[i].data.ptr;
            long before = l->received;
            if (readLines(l->fd, &l->in, listenerLine, l, "listener") < 0) break;
            if (l->received != before) lastProgress = lastDelivery = now();
        }
    }
    uint64_t end = now();
    double cpu = cpuSeconds() - cpuFrom;
    if (!sendDone) sendDone = end;

    long long delivered = 0, gaps = 0, reordered = 0;
    long minRecv = -1, maxRecv = 0;
    int inOrder = opened == nListeners;
    for (int i = 0; i < opened; i++) {
        delivered += ls[i].received;
        gaps += ls[i].gaps;
        reordered += ls[i].reordered;
        if (minRecv < 0 || ls[i].received < minRecv) minRecv = ls[i].received;
        if (ls[i].received > maxRecv) maxRecv = ls[i].received;
        if (ls[i].received != nLines || ls[i].next != nLines || ls[i].gaps || ls[i].reordered) inOrder = 0;
    }
    if (stalled) {
        char detail[160];
        snprintf(detail, sizeof detail, "%.1f s with no line delivered and none sent", opt.stall);
        setError("stalled: %s", detail);
    }
    if (timedOut) setError("%s", "the run went past --deadline");

    /* The stuck reader: read what is waiting for it now, to see whether the server closed it. */
    long long stuckBytes = 0;
    int stuckClosed = 0;
    char stuckLast[200] = "";
    if (stuck.fd >= 0) {
        char tail[4096];
        size_t tailLen = 0;
        uint64_t until = now() + 2000000000u;
        nonblocking(stuck.fd);
        while (now() < until) {
            ssize_t got = recv(stuck.fd, readbuf, READBUF, 0);
            if (got > 0) {
                stuckBytes += got;
                size_t keep = (size_t)got < sizeof tail ? (size_t)got : sizeof tail;
                if (tailLen + keep > sizeof tail) {
                    memmove(tail, tail + (tailLen + keep - sizeof tail), sizeof tail - keep);
                    tailLen = sizeof tail - keep;
                }
                memcpy(tail + tailLen, readbuf + got - keep, keep);
                tailLen += keep;
                continue;
            }
            if (got == 0 || (got < 0 && errno == ECONNRESET)) {
                stuckClosed = 1;
                break;
            }
            if (got < 0 && errno == EAGAIN) break;
            if (got < 0 && errno != EINTR) break;
        }
        /* The last complete line it was sent. */
        if (tailLen) {
            size_t e = tailLen;
            while (e && (tail[e - 1] == '\n' || tail[e - 1] == '\r')) e--;
            size_t s = e;
            while (s && tail[s - 1] != '\n') s--;
            size_t n = e - s < sizeof stuckLast - 1 ? e - s : sizeof stuckLast - 1;
            memcpy(stuckLast, tail + s, n);
            stuckLast[n] = 0;
        }
        close(stuck.fd);
    }
    for (int i = 0; i < opened; i++) close(ls[i].fd);
    if (sender >= 0) close(sender);

    double seconds = (double)(lastDelivery - begin) / 1e9;
    double sendSeconds = (double)(sendDone - begin) / 1e9;
    printf("{\"mode\": \"fanout\", \"listeners\": %d, \"lines\": %ld, \"size\": %zu, \"window\": %ld, "
           "\"sent\": %ld, \"delivered\": %lld, \"expected\": %lld, \"gaps\": %lld, \"reordered\": %lld, "
           "\"min_received\": %ld, \"max_received\": %ld, \"in_order\": %s, \"seconds\": %.6f, "
           "\"send_seconds\": %.6f, \"lines_per_s\": %.3f, \"mb_per_s\": %.3f, \"echo_bytes\": %lld, "
           "\"sync_lines\": %d, \"client_cpu\": %.4f, ",
           opened, nLines, opt.size, opt.window, seq, delivered, (long long)nListeners * nLines, gaps, reordered,
           minRecv < 0 ? 0 : minRecv, maxRecv, inOrder && !stalled ? "true" : "false", seconds, sendSeconds,
           seconds > 0 ? delivered / seconds : 0.0, seconds > 0 ? delivered * (double)opt.size / seconds / 1e6 : 0.0,
           echoBytes, syncs, seconds > 0 ? cpu / seconds : 0.0);
    if (opt.stuck) {
        printf("\"stuck\": {\"closed\": %s, \"bytes_waiting\": %lld, \"last_line\": ", stuckClosed ? "true" : "false",
               stuckBytes);
        printJsonString(stuckLast, strlen(stuckLast));
        printf("}, ");
    }
    printf("\"error\": ");
    if (error[0])
        printJsonString(error, strlen(error));
    else
        printf("null");
    printf("}\n");
    return 0;
}

/* ---- main ----------------------------------------------------------------------------------- */

static int usage(void) {
    fprintf(stderr,
            "usage: chatclient storm HOST PORT N CONCURRENCY [options]\n"
            "       chatclient fanout HOST PORT LISTENERS LINES [options]\n"
            "options: --echo --nowitness --crlf --names --stuck --size BYTES --window LINES --timeout S --stall S "
            "--deadline S\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 6) return usage();
    const char *mode = argv[1];
    int port = atoi(argv[3]);
    long a = atol(argv[4]), b = atol(argv[5]);
    for (int i = 6; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(o, "--echo")) opt.echo = 1;
        else if (!strcmp(o, "--nowitness")) opt.nowitness = 1;
        else if (!strcmp(o, "--crlf")) opt.crlf = 1;
        else if (!strcmp(o, "--names")) opt.names = 1;
        else if (!strcmp(o, "--stuck")) opt.stuck = 1;
        else if (v && !strcmp(o, "--size")) opt.size = (size_t)atol(argv[++i]);
        else if (v && !strcmp(o, "--window")) opt.window = atol(argv[++i]);
        else if (v && !strcmp(o, "--timeout")) opt.timeout = atof(argv[++i]);
        else if (v && !strcmp(o, "--stall")) opt.stall = atof(argv[++i]);
        else if (v && !strcmp(o, "--deadline")) opt.deadline = atof(argv[++i]);
        else return usage();
    }
    if (port <= 0 || port > 65535 || a < 1 || b < 1 || a > 10000000 || opt.size < 24 || opt.size > 8192 ||
        opt.window < 1 || opt.timeout <= 0 || opt.stall <= 0 || opt.deadline <= 0)
        return usage();
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) {
        fprintf(stderr, "chatclient: HOST must be an IPv4 address, not %s\n", argv[2]);
        return 2;
    }
    if (!strcmp(mode, "storm")) {
        if (b > MAX_CONNS) return usage();
        return storm(a, (int)b);
    }
    if (!strcmp(mode, "fanout")) {
        if (a > MAX_CONNS) return usage();
        return fanout((int)a, b);
    }
    return usage();
}
