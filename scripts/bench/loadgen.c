/*
 * pmlb benchmark load generator: closed-loop echo clients on one epoll loop.
 *
 *   loadgen echo HOST PORT CONNS INFLIGHT SIZE WARMUP_S MEASURE_S
 *   loadgen idle HOST PORT CONNS SIZE HOLD_S
 *
 * echo: every connection keeps INFLIGHT messages of SIZE bytes outstanding;
 * an echo server returns bytes in order, so message k is complete when
 * k*SIZE bytes have come back, and its latency is now - its send time.
 * Prints "MEASURE_START" and "MEASURE_END" lines (flushed) around the
 * measured window so the caller can sample the proxy's CPU, then one JSON
 * line with messages/s, latency percentiles and this process's own CPU.
 *
 * idle: opens CONNS connections (at most 512 connecting at once), each sends
 * SIZE bytes once and reads them back; prints the open rate, then "HOLDING",
 * keeps every connection open HOLD_S seconds (the caller samples the
 * proxy's RSS) and prints a JSON line.
 *
 * Written for the benchmark only: plain C, no dependencies, loopback only.
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
#include <signal.h>
#include <unistd.h>

#define MAX_LAT_US 2000000 /* histogram: 1 us buckets up to 2 s, then overflow */

static uint64_t *hist;
static uint64_t overflow;

struct conn {
    int fd;
    int connected;
    uint64_t sent_msgs, recv_bytes, sent_bytes_partial; /* partial: bytes of the current message written */
    uint64_t *stamps;                                   /* ring of send times, INFLIGHT long */
    uint32_t head, tail, inflight_now;
    int want_write;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* LOADGEN_SRC: the source address (another 127.x address gives another
     * ephemeral port range, for more than ~28,000 connections to one port). */
    const char *src = getenv("LOADGEN_SRC");
    if (src && *src) {
        struct sockaddr_in me = {.sin_family = AF_INET};
        inet_pton(AF_INET, src, &me.sin_addr);
        /* Pick the port at connect(), by the whole 4-tuple, not at bind(). */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0) {
            close(fd);
            return -1;
        }
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static double pct(uint64_t total, double p) {
    uint64_t want = (uint64_t)(total * p), seen = 0;
    if (total == 0) return 0;
    for (int i = 0; i < MAX_LAT_US; i++) {
        seen += hist[i];
        if (seen > want) return i;
    }
    return MAX_LAT_US;
}

/* Write until INFLIGHT messages are outstanding; arm EPOLLOUT only while blocked. */
static void pump(int ep, struct conn *c, uint32_t idx, const char *msg, int size, int inflight) {
    int blocked = 0;
    while (c->inflight_now < (uint32_t)inflight || c->sent_bytes_partial) {
        if (!c->sent_bytes_partial) {
            c->stamps[c->head] = now_ns();
            c->head = (c->head + 1) % inflight;
            c->inflight_now++;
        }
        ssize_t w = write(c->fd, msg + c->sent_bytes_partial, size - c->sent_bytes_partial);
        if (w < 0) { blocked = 1; break; }
        c->sent_bytes_partial += w;
        if (c->sent_bytes_partial == (uint64_t)size) c->sent_bytes_partial = 0;
    }
    if (blocked != c->want_write) {
        struct epoll_event ev = {.events = EPOLLIN | (blocked ? EPOLLOUT : 0), .data.u32 = idx};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_write = blocked;
    }
}

static int echo_mode(const char *host, int port, int nconn, int inflight, int size, double warmup, double measure) {
    static char rbuf[1 << 18];
    char *msg = malloc(size);
    memset(msg, 'x', size);
    struct conn *cs = calloc(nconn, sizeof *cs);
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        cs[i].fd = dial(host, port);
        if (cs[i].fd < 0) { perror("connect"); return 1; }
        cs[i].stamps = calloc(inflight, sizeof(uint64_t));
        /* EPOLLOUT first: it says when the non-blocking connect completed. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
        cs[i].want_write = 1;
    }
    struct epoll_event evs[1024];
    double start = now_s(), mstart = start + warmup, mend = mstart + measure;
    int measuring = 0;
    uint64_t done = 0, done_at_start = 0, total_lat = 0;
    double cpu0 = 0, t0 = 0;
    for (;;) {
        double t = now_s();
        if (!measuring && t >= mstart) {
            measuring = 1;
            done_at_start = done;
            cpu0 = cpu_s();
            t0 = t;
            memset(hist, 0, MAX_LAT_US * sizeof *hist);
            overflow = 0;
            printf("MEASURE_START\n");
            fflush(stdout);
        }
        if (measuring && t >= mend) break;
        int n = epoll_wait(ep, evs, 1024, 50);
        for (int k = 0; k < n; k++) {
            uint32_t idx = evs[k].data.u32;
            struct conn *c = &cs[idx];
            if (evs[k].events & (EPOLLERR | EPOLLHUP)) {
                fprintf(stderr, "connection %u failed\n", idx);
                return 1;
            }
            if (evs[k].events & EPOLLIN) {
                for (;;) {
                    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
                    if (r == 0) { fprintf(stderr, "server closed a connection\n"); return 1; }
                    if (r < 0) break;
                    uint64_t before = c->recv_bytes / size;
                    c->recv_bytes += r;
                    uint64_t after = c->recv_bytes / size;
                    uint64_t tn = now_ns();
                    for (uint64_t m = before; m < after; m++) {
                        uint64_t lat = (tn - c->stamps[c->tail]) / 1000;
                        c->tail = (c->tail + 1) % inflight;
                        c->inflight_now--;
                        done++;
                        if (measuring) {
                            if (lat < MAX_LAT_US) hist[lat]++; else overflow++;
                            total_lat++;
                        }
                    }
                    if (r < (ssize_t)sizeof rbuf) break;
                }
            }
            pump(ep, c, idx, msg, size, inflight);
        }
    }
    double elapsed = now_s() - t0, cpu = cpu_s() - cpu0;
    printf("MEASURE_END\n");
    uint64_t msgs = done - done_at_start;
    printf("{\"msgs\": %llu, \"seconds\": %.3f, \"msgs_per_s\": %.1f, \"p50_us\": %.0f, \"p90_us\": %.0f, "
           "\"p99_us\": %.0f, \"overflow\": %llu, \"loadgen_cpu_s\": %.3f, \"loadgen_cpu_pct\": %.1f}\n",
           (unsigned long long)msgs, elapsed, msgs / elapsed, pct(total_lat, 0.50), pct(total_lat, 0.90),
           pct(total_lat, 0.99), (unsigned long long)overflow, cpu, 100.0 * cpu / elapsed);
    fflush(stdout);
    for (int i = 0; i < nconn; i++) close(cs[i].fd);
    return 0;
}

static int idle_mode(const char *host, int port, int nconn, int size, double hold) {
    char *msg = malloc(size), buf[4096];
    memset(msg, 'i', size);
    int *fds = calloc(nconn, sizeof(int));
    int *got = calloc(nconn, sizeof(int));
    int ep = epoll_create1(0);
    struct epoll_event evs[1024];
    int opened = 0, pending = 0, complete = 0;
    double t0 = now_s(), cpu0 = cpu_s();
    while (complete < nconn) {
        while (opened < nconn && pending < 512) {
            int fd = dial(host, port);
            if (fd < 0) { perror("connect"); return 1; }
            fds[opened] = fd;
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = opened};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            opened++;
            pending++;
        }
        int n = epoll_wait(ep, evs, 1024, 1000);
        if (n == 0 && now_s() - t0 > 120) { fprintf(stderr, "idle: stuck at %d/%d\n", complete, nconn); return 1; }
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            if (evs[k].events & (EPOLLERR | EPOLLHUP)) { fprintf(stderr, "idle: connection %d failed\n", i); return 1; }
            if (evs[k].events & EPOLLOUT) {
                if (write(fds[i], msg, size) != size) { fprintf(stderr, "idle: short write\n"); return 1; }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                epoll_ctl(ep, EPOLL_CTL_MOD, fds[i], &ev);
            } else if (evs[k].events & EPOLLIN) {
                ssize_t r = read(fds[i], buf, sizeof buf);
                if (r <= 0) { fprintf(stderr, "idle: connection %d closed\n", i); return 1; }
                got[i] += r;
                if (got[i] >= size) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                    complete++;
                    pending--;
                }
            }
        }
    }
    double t1 = now_s();
    printf("HOLDING %d\n", nconn);
    fflush(stdout);
    double until = now_s() + hold;
    while (now_s() < until) usleep(20000);
    printf("{\"conns\": %d, \"open_seconds\": %.3f, \"accepts_per_s\": %.1f, \"loadgen_cpu_s\": %.3f}\n",
           nconn, t1 - t0, nconn / (t1 - t0), cpu_s() - cpu0);
    fflush(stdout);
    /* Reset rather than FIN: no TIME_WAIT left behind to crowd the next run's ports. */
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (int i = 0; i < nconn; i++) {
        setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(fds[i]);
    }
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    hist = calloc(MAX_LAT_US, sizeof *hist);
    if (argc == 9 && !strcmp(argv[1], "echo"))
        return echo_mode(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]), atof(argv[7]),
                         atof(argv[8]));
    if (argc == 7 && !strcmp(argv[1], "idle"))
        return idle_mode(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atof(argv[6]));
    fprintf(stderr, "usage: loadgen echo HOST PORT CONNS INFLIGHT SIZE WARMUP_S MEASURE_S\n"
                    "       loadgen idle HOST PORT CONNS SIZE HOLD_S\n");
    return 2;
}
