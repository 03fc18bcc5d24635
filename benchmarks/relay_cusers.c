/* The "users per gateway" case of benchmarks/relay.py in C: a lean far end and a TLS client
 * with one epoll loop each, so that thousands of RDP-like sessions load the relay and not a
 * Python generator or peer on the same two cores.
 *
 *   relay_cusers peer PORT
 *       Plain-TCP far end on 127.0.0.1:PORT (prints "ready"). Every accepted session gets one
 *       message every 100 ms, at a fixed random phase (a 100-slot wheel of 1 ms): a 2-byte
 *       length, then the send time (CLOCK_MONOTONIC ns, 8 bytes) and a sequence number (4
 *       bytes), then payload, 200-1400 bytes in all after the length. A partial write keeps
 *       the rest queued (the queued messages keep their stamps, so a relay that reads too
 *       slowly shows as latency); more than 1 MiB queued closes the session ("overflow").
 *       What the client sends is read and dropped. SIGUSR1 prints one JSON line and resets:
 *       {"sent", "late_max_ms" (how late the wheel ran: the peer's own lag), "overflow"}.
 *
 *   relay_cusers users PORT N RATE SECONDS tls|plain
 *       N sessions to 127.0.0.1:PORT, started at RATE a second (TLS handshakes included), each
 *       sending 100 bytes every 500 ms and reading the messages above. After the last session
 *       is started and 2 s of settling, it measures for SECONDS: one-way latency of every
 *       message sent inside the window (same machine, same clock), sequence gaps over the
 *       whole run ("lost"), sessions that could not connect or broke ("failed"), sessions that
 *       got nothing in the last second ("stalled"). One JSON line:
 *       {"sessions","connected","failed","lost","stalled","messages","p50_ms","p99_ms",
 *        "max_ms","cpu_s","connect_s"}.
 *
 * Built by relay.py with `gcc -O2 ... -lssl -lcrypto`. No certificate check (the benchmark's
 * self-signed certificate); TLS 1.2 or 1.3 as the server picks.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 65536
#define STAMP 12 /* u64 ns + u32 seq */
#define MAXMSG 1400

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
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

static void raise_fd_limit(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

/* ---------------------------------------------------------------- the far end (peer) */

struct pconn {
    int used;
    uint32_t seq;
    int slot, next; /* its wheel slot; the next fd in that slot, -1 at the end */
    char *out;
    int outlen, outcap;
};

static struct pconn pc[MAXFD];
static int wheel[100]; /* first fd of each 1 ms slot */
static unsigned char payload[MAXMSG];
static volatile sig_atomic_t report_wanted;
static long sent_count, overflow_count;
static int64_t late_max_ns;

static void on_usr1(int sig) {
    (void)sig;
    report_wanted = 1;
}

/* Closes a session and unlinks it from its slot at once (its fd may be reused right away). */
static void peer_close(int fd) {
    int *link = &wheel[pc[fd].slot];
    while (*link != fd) link = &pc[*link].next;
    *link = pc[fd].next;
    close(fd);
    free(pc[fd].out);
    pc[fd].out = NULL;
    pc[fd].outlen = pc[fd].outcap = 0;
    pc[fd].used = 0;
}

static int queue_rest(int ep, int fd, const unsigned char *p, int n) {
    struct pconn *c = &pc[fd];
    if (c->outlen + n > (1 << 20)) return -1;
    if (c->outlen + n > c->outcap) {
        c->outcap = (c->outlen + n) * 2;
        c->out = realloc(c->out, c->outcap);
    }
    if (c->outlen == 0) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
    return 0;
}

static void peer_flush(int ep, int fd) {
    struct pconn *c = &pc[fd];
    ssize_t w = write(fd, c->out, c->outlen);
    if (w < 0 && errno != EAGAIN) {
        peer_close(fd);
        return;
    }
    if (w > 0) {
        memmove(c->out, c->out + w, c->outlen - w);
        c->outlen -= w;
    }
    if (c->outlen == 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    }
}

static void peer_send(int ep, int fd) {
    unsigned char msg[2 + MAXMSG];
    int size = 200 + rand() % (MAXMSG - 200 + 1);
    uint16_t len = htons(size);
    uint64_t ns = htobe64((uint64_t)now_ns());
    uint32_t seq = htonl(++pc[fd].seq);
    memcpy(msg, &len, 2);
    memcpy(msg + 2, &ns, 8);
    memcpy(msg + 10, &seq, 4);
    memcpy(msg + 2 + STAMP, payload, size - STAMP);
    int total = 2 + size, off = 0;
    if (pc[fd].outlen == 0) {
        ssize_t w = write(fd, msg, total);
        if (w < 0 && errno != EAGAIN) {
            peer_close(fd);
            return;
        }
        off = w > 0 ? (int)w : 0;
    }
    sent_count++;
    if (off < total && queue_rest(ep, fd, msg + off, total - off) < 0) {
        overflow_count++;
        peer_close(fd);
    }
}

/* Sends the messages of one wheel slot (a send that fails closes and unlinks that session). */
static void peer_slot(int ep, int slot) {
    for (int fd = wheel[slot]; fd >= 0;) {
        int next = pc[fd].next;
        peer_send(ep, fd);
        fd = next;
    }
}

static int peer(int port) {
    int one = 1;
    raise_fd_limit();
    signal(SIGUSR1, on_usr1);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < 100; i++) wheel[i] = -1;
    for (int i = 0; i < MAXMSG; i++) payload[i] = (unsigned char)rand();
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = addr_of(port);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[512];
    static char sink[65536];
    int64_t done_ms = now_ns() / 1000000; /* the wheel has run up to this millisecond */
    for (;;) {
        int n = epoll_wait(ep, evs, 512, 1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    int slot = rand() % 100;
                    pc[c] = (struct pconn){.used = 1, .slot = slot, .next = wheel[slot]};
                    wheel[slot] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            if (!pc[fd].used) continue;
            if (evs[i].events & EPOLLOUT) peer_flush(ep, fd);
            if (pc[fd].used && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                ssize_t r;
                while ((r = read(fd, sink, sizeof sink)) > 0) {}
                if (r == 0 || errno != EAGAIN) peer_close(fd);
            }
        }
        int64_t now_ms = now_ns() / 1000000;
        if (now_ms - done_ms > 100) done_ms = now_ms - 100; /* never more than one round */
        for (int64_t t = done_ms + 1; t <= now_ms; t++) {
            int64_t late = (now_ns() / 1000000 - t) * 1000000;
            if (late > late_max_ns) late_max_ns = late;
            peer_slot(ep, (int)(t % 100));
        }
        done_ms = now_ms;
        if (report_wanted) {
            report_wanted = 0;
            printf("{\"sent\": %ld, \"late_max_ms\": %.1f, \"overflow\": %ld}\n", sent_count,
                   late_max_ns / 1e6, overflow_count);
            fflush(stdout);
            sent_count = overflow_count = 0;
            late_max_ns = 0;
        }
    }
}

/* ---------------------------------------------------------------- the users (client) */

enum { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_OPEN, S_DEAD };

struct sess {
    int fd;
    SSL *ssl;
    uint8_t state, up_pending;
    uint16_t rlen;
    uint32_t last_seq;
    int64_t next_up_ns, last_rx_ns;
    unsigned char rbuf[2 * (2 + MAXMSG)];
};

#define BIN_US 10
#define BINS 500000 /* 10 us bins up to 5 s */
static uint32_t hist[BINS + 1];
static long messages, lost, failed;
static int64_t lat_max_ns;
static int64_t window_start, window_end;
static SSL_CTX *ctx;
static const unsigned char up_msg[100];

static void sess_fail(struct sess *s) {
    if (s->state == S_DEAD) return;
    failed++;
    s->state = S_DEAD;
    if (s->ssl) SSL_free(s->ssl);
    s->ssl = NULL;
    close(s->fd);
}

static void on_message(struct sess *s, const unsigned char *body) {
    uint64_t ns;
    uint32_t seq;
    memcpy(&ns, body, 8);
    memcpy(&seq, body + 8, 4);
    ns = be64toh(ns);
    seq = ntohl(seq);
    int64_t now = now_ns();
    s->last_rx_ns = now;
    if (s->last_seq && seq != s->last_seq + 1) lost += (long)seq - s->last_seq - 1;
    s->last_seq = seq;
    if ((int64_t)ns >= window_start && now < window_end) {
        int64_t lat = now - (int64_t)ns;
        long bin = lat / (BIN_US * 1000);
        hist[bin < BINS ? bin : BINS]++;
        if (lat > lat_max_ns) lat_max_ns = lat;
        messages++;
    }
}

/* Reads what is there (until EAGAIN / WANT_READ: epoll is edge-triggered) and parses frames. */
static void sess_read(struct sess *s) {
    for (;;) {
        int room = sizeof s->rbuf - s->rlen, r;
        if (s->ssl) {
            r = SSL_read(s->ssl, s->rbuf + s->rlen, room);
            if (r <= 0) {
                int e = SSL_get_error(s->ssl, r);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
                sess_fail(s);
                return;
            }
        } else {
            r = read(s->fd, s->rbuf + s->rlen, room);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) return;
                sess_fail(s);
                return;
            }
        }
        s->rlen += r;
        int off = 0;
        while (s->rlen - off >= 2) {
            int size = (s->rbuf[off] << 8) | s->rbuf[off + 1];
            if (size < STAMP || size > MAXMSG) {
                sess_fail(s);
                return;
            }
            if (s->rlen - off < 2 + size) break;
            on_message(s, s->rbuf + off + 2);
            off += 2 + size;
        }
        memmove(s->rbuf, s->rbuf + off, s->rlen - off);
        s->rlen -= off;
    }
}

static void sess_send_up(struct sess *s) {
    int w;
    if (s->ssl) {
        w = SSL_write(s->ssl, up_msg, sizeof up_msg);
        if (w <= 0) {
            int e = SSL_get_error(s->ssl, w);
            if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                s->up_pending = 1; /* retried with the same buffer on the next event */
                return;
            }
            sess_fail(s);
            return;
        }
    } else {
        w = write(s->fd, up_msg, sizeof up_msg);
        if (w < 0 && errno == EAGAIN) {
            s->up_pending = 1;
            return;
        }
        if (w != sizeof up_msg) {
            sess_fail(s); /* a partial plain write of 100 bytes: the relay is wedged */
            return;
        }
    }
    s->up_pending = 0;
}

/* Moves a session on after any event: connect done, handshake steps, reads, pending write. */
static void sess_drive(struct sess *s) {
    if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err == EINPROGRESS) return;
        if (err) {
            sess_fail(s);
            return;
        }
        if (!ctx) {
            s->state = S_OPEN;
        } else {
            s->ssl = SSL_new(ctx);
            SSL_set_fd(s->ssl, s->fd);
            SSL_set_tlsext_host_name(s->ssl, "localhost");
            SSL_set_connect_state(s->ssl);
            s->state = S_HANDSHAKE;
        }
    }
    if (s->state == S_HANDSHAKE) {
        int r = SSL_do_handshake(s->ssl);
        if (r != 1) {
            int e = SSL_get_error(s->ssl, r);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) sess_fail(s);
            return;
        }
        s->state = S_OPEN;
    }
    if (s->state == S_OPEN) {
        if (s->up_pending) sess_send_up(s);
        if (s->state == S_OPEN) sess_read(s);
    }
}

static int sess_start(struct sess *s, int ep, struct sockaddr_in *a, int index) {
    int one = 1;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) return -1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s->fd, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        return -1;
    }
    s->state = S_CONNECTING;
    s->next_up_ns = now_ns() + (rand() % 500) * 1000000LL;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.u32 = index};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static double percentile_ms(double q) {
    long want = (long)(messages * q), seen = 0;
    for (long i = 0; i <= BINS; i++) {
        seen += hist[i];
        if (seen > want) return (i + 1) * BIN_US / 1000.0; /* the bin's upper edge */
    }
    return 0;
}

static int users(int port, int n, double rate, double seconds, int tls) {
    raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);
    if (tls) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    }
    struct sess *ss = calloc(n, sizeof *ss);
    struct sockaddr_in a = addr_of(port);
    int ep = epoll_create1(0);
    int64_t t0 = now_ns();
    int64_t ramp_end = t0 + (int64_t)(n / rate * 1e9);
    window_start = ramp_end + 2000000000LL;
    window_end = window_start + (int64_t)(seconds * 1e9);
    int started = 0, connected = 0;
    double connect_s = -1;
    struct epoll_event evs[512];
    for (;;) {
        int64_t now = now_ns();
        if (now >= window_end) break;
        int due = now >= ramp_end ? n : (int)((now - t0) / 1e9 * rate) + 1;
        for (; started < due && started < n; started++) {
            if (sess_start(&ss[started], ep, &a, started) < 0) {
                ss[started].state = S_DEAD;
                failed++;
            }
        }
        int k = epoll_wait(ep, evs, 512, 2);
        for (int i = 0; i < k; i++) {
            struct sess *s = &ss[evs[i].data.u32];
            int before = s->state;
            sess_drive(s);
            if (before != S_OPEN && s->state == S_OPEN) {
                s->last_rx_ns = now_ns();
                if (++connected == n) connect_s = (now_ns() - t0) / 1e9;
            }
        }
        now = now_ns();
        for (int i = 0; i < started; i++) {
            struct sess *s = &ss[i];
            if (s->state == S_OPEN && !s->up_pending && now >= s->next_up_ns) {
                s->next_up_ns += 500000000LL;
                sess_send_up(s);
            }
        }
    }
    long stalled = 0;
    int64_t now = now_ns();
    for (int i = 0; i < n; i++) {
        if (ss[i].state == S_OPEN && now - ss[i].last_rx_ns > 1000000000LL) stalled++;
        if (ss[i].state == S_CONNECTING || ss[i].state == S_HANDSHAKE) failed++;
    }
    printf("{\"sessions\": %d, \"connected\": %d, \"failed\": %ld, \"lost\": %ld, "
           "\"stalled\": %ld, \"messages\": %ld, \"p50_ms\": %.2f, \"p99_ms\": %.2f, "
           "\"max_ms\": %.2f, \"cpu_s\": %.2f, \"connect_s\": %.2f}\n",
           n, connected, failed, lost, stalled, messages, percentile_ms(0.5),
           percentile_ms(0.99), lat_max_ns / 1e6, cpu(), connect_s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "peer")) return peer(atoi(argv[2]));
    if (argc >= 7 && !strcmp(argv[1], "users"))
        return users(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), atof(argv[5]),
                     !strcmp(argv[6], "tls"));
    fprintf(stderr, "usage: relay_cusers peer PORT | users PORT N RATE SECONDS tls|plain\n");
    return 2;
}
