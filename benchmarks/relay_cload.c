/* A C load generator and echo peer for benchmarks/relay.py, so that the new-connections and
 * latency cases measure the relay and not a Python client or peer on the same two cores.
 *
 *   relay_cload server PORT             epoll echo server on 127.0.0.1:PORT (prints "ready")
 *   relay_cload cps PORT CONC SECONDS   CONC connections at a time: connect, send 1 byte,
 *                                       read it back, close; JSON {"ok","errors","cpu_s"}
 *   relay_cload echo PORT COUNT         100-byte round trips on one connection (200 warm-up);
 *                                       JSON {"median_us","p99_us","cpu_s"}
 *
 * Built by relay.py with `gcc -O2`. Plain TCP only (TLS stays with relay_load.py).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static struct sockaddr_in addr_of(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int server(int port) {
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = addr_of(port);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[256];
    char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                ssize_t off = 0; /* echo: small messages, a blocking retry is fine here */
                while (off < r) {
                    ssize_t w = write(fd, buf + off, r - off);
                    if (w < 0 && errno != EAGAIN) break;
                    if (w > 0) off += w;
                }
            } else if (r == 0 || errno != EAGAIN) {
                close(fd);
            }
        }
    }
}

static int start_conn(int ep, struct sockaddr_in *a) {
    int one = 1;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        close(s);
        return -1;
    }
    /* EPOLLOUT: connected, send the byte; then EPOLLIN: the byte is back */
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (unsigned)s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    return s;
}

static int cps(int port, int conc, double seconds) {
    struct sockaddr_in a = addr_of(port);
    int ep = epoll_create1(0);
    long ok = 0, errors = 0;
    int live = 0;
    double end = now() + seconds;
    for (int i = 0; i < conc; i++)
        if (start_conn(ep, &a) >= 0) live++; else errors++;
    struct epoll_event evs[256];
    while (live > 0) {
        int n = epoll_wait(ep, evs, 256, 1000);
        int stopping = now() >= end;
        for (int i = 0; i < n; i++) {
            int s = (int)evs[i].data.u64;
            if (evs[i].events & EPOLLOUT) {
                if (write(s, "x", 1) == 1) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (unsigned)s};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s, &ev);
                    continue;
                }
                errors++;
            } else {
                char c;
                if (read(s, &c, 1) == 1) ok++; else errors++;
            }
            close(s);
            live--;
            if (!stopping) {
                if (start_conn(ep, &a) >= 0) live++; else errors++;
            }
        }
        if (n == 0 && stopping) break;
    }
    printf("{\"ok\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"cpu_s\": %.3f}\n", ok, errors,
           seconds, cpu());
    return 0;
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static int echo(int port, int count) {
    int one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = addr_of(port);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) {
        perror("connect");
        return 1;
    }
    char msg[100] = {0}, buf[100];
    double *t = malloc(sizeof(double) * count);
    for (int i = 0; i < count + 200; i++) {
        double t0 = now();
        if (write(s, msg, 100) != 100) return 1;
        int got = 0;
        while (got < 100) {
            ssize_t r = read(s, buf + got, 100 - got);
            if (r <= 0) return 1;
            got += r;
        }
        if (i >= 200) t[i - 200] = (now() - t0) * 1e6;
    }
    close(s);
    qsort(t, count, sizeof(double), cmp);
    printf("{\"median_us\": %.1f, \"p99_us\": %.1f, \"cpu_s\": %.3f}\n", t[count / 2],
           t[(int)(count * 0.99)], cpu());
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "cps")) return cps(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    if (argc >= 4 && !strcmp(argv[1], "echo")) return echo(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: relay_cload server PORT | cps PORT CONC SECONDS | echo PORT COUNT\n");
    return 2;
}
