// The rooms scenario with no server and no client code: what the least possible pair
// pays, on this machine, for N connections in rooms of N/ROOMS, each sending a frame
// every INTERVAL_US. bench/probes.sh builds and runs it.
//
//   rooms N ROOMS INTERVAL_US SECONDS [FRAME_BYTES]
//
// A "client" process on core 0 holds N connected sockets (TCP_NODELAY); socket i sends
// a frame of FRAME_BYTES (120) carrying its intended send time at i's turn in an evenly
// spread schedule (N / INTERVAL_US frames a second in all), and reads everything through
// epoll, recording each frame's latency (read time − intended send time) in 10 µs
// buckets. A "server" process on core 1 reads each frame and writes it, one write() per
// socket, to every socket of the sender's room (socket i is in room i % ROOMS), the
// sender's own included: no framing, no parsing, no store, no batching. Prints both
// processes' CPU time (user + system) per delivery and the latency percentiles. As in
// the benchmarks, the kernel's receive processing of each frame runs inside the writer's
// system call (loopback), and both processes share the machine's two cores.
#include "probe.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUCKET_US 10
#define BUCKETS 200000 // 2 s

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

// Take bytes from `*p` (`*r` of them) into `slot`, which holds `*have` bytes of a frame
// of `frame` bytes: 1 when the frame is whole (then `*have` is 0 again).
static int take_frame(char *slot, int *have, int frame, char **p, ssize_t *r) {
    int take = frame - *have < *r ? frame - *have : (int)*r;
    memcpy(slot + *have, *p, take);
    *have += take, *p += take, *r -= take;
    if (*have < frame) return 0;
    *have = 0;
    return 1;
}

// What the client hands back to the parent through shared memory.
struct result {
    double cpu_s;
    long sent, delivered, late_sends;
    double send_lag_max_ms;
    long hist[BUCKETS + 1];
};

static double pct(const long *hist, long total, double p) {
    long want = (long)(total * p), seen = 0;
    for (int b = 0; b <= BUCKETS; b++) {
        seen += hist[b];
        if (seen > want) return (b + 1) * BUCKET_US / 1000.0;
    }
    return BUCKETS * BUCKET_US / 1000.0;
}

static void client(int n, int interval_us, int secs, int frame, struct sockaddr_in *addr,
                   struct result *out) {
    pin(0);
    int ep = epoll_create1(0), one = 1;
    int *fds = malloc(sizeof(int) * n);
    int *have = calloc(n, sizeof(int)); // bytes of a partial frame per socket
    char *part = malloc((size_t)n * frame);
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)addr, sizeof *addr) < 0)
            die("connect");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    usleep(500000); // the server accepts them all
    char *msg = calloc(1, frame);
    static char buf[65536];
    struct epoll_event ev[256];
    // Socket i sends at t0 + i * step + k * interval.
    int64_t step = (int64_t)interval_us * 1000 / n, t0 = now_ns() + 100000000;
    int64_t end = t0 + (int64_t)secs * 1000000000, drain_end = end + 2000000000;
    long next = 0; // the next send, counted over the whole schedule
    double c0 = cpu_s();
    for (;;) {
        int64_t now = now_ns();
        int64_t due = t0 + next * step;
        while (due <= now && due < end) {
            int i = (int)(next % n);
            memcpy(msg, &due, sizeof due);
            if (write(fds[i], msg, frame) != frame) die("client write");
            out->sent++;
            double lag = (now - due) / 1e6;
            if (lag > 1) out->late_sends++;
            if (lag > out->send_lag_max_ms) out->send_lag_max_ms = lag;
            next++;
            due = t0 + next * step;
        }
        if (now > drain_end) break;
        // Sleeps until the next send is due (nanosecond timeout: no spinning).
        int64_t wait = due >= end ? 10000000 : due > now ? due - now : 0;
        struct timespec ts = {.tv_sec = wait / 1000000000, .tv_nsec = wait % 1000000000};
        int k = epoll_pwait2(ep, ev, 256, &ts, NULL);
        for (int e = 0; e < k; e++) {
            int i = (int)ev[e].data.u32;
            ssize_t r, got;
            while ((got = r = read(fds[i], buf, sizeof buf)) > 0) {
                int64_t t = now_ns();
                char *p = buf;
                while (r > 0) {
                    char *slot = part + (size_t)i * frame;
                    if (take_frame(slot, &have[i], frame, &p, &r)) {
                        int64_t sent;
                        memcpy(&sent, slot, sizeof sent);
                        long b = (t - sent) / 1000 / BUCKET_US;
                        out->hist[b < 0 ? 0 : b > BUCKETS ? BUCKETS : b]++;
                        out->delivered++;
                    }
                }
                if ((size_t)got < sizeof buf) break; // read it all: no second read for EAGAIN
            }
        }
    }
    out->cpu_s = cpu_s() - c0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: rooms N ROOMS INTERVAL_US SECONDS [FRAME_BYTES]\n");
        return 2;
    }
    int n = atoi(argv[1]), rooms = atoi(argv[2]), interval_us = atoi(argv[3]);
    int secs = atoi(argv[4]), frame = argc > 5 ? atoi(argv[5]) : 120, one = 1;
    if (frame < 8) frame = 8;
    struct result *res = mmap(0, sizeof *res, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (res == MAP_FAILED) die("mmap");
    memset(res, 0, sizeof *res);
    struct sockaddr_in addr;
    int l = listen_loopback(&addr);
    if (l < 0) die("listen");
    pid_t kid = fork();
    if (kid == 0) {
        client(n, interval_us, secs, frame, &addr, res);
        exit(0);
    }
    pin(1);
    // The server: socket i (in accept order, which is the client's connect order) is in
    // room i % rooms.
    int *fds = malloc(sizeof(int) * n);
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        fds[i] = accept(l, 0, 0);
        if (fds[i] < 0) die("accept");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
    }
    int *have = calloc(n, sizeof(int));
    char *part = malloc((size_t)n * frame);
    static char buf[65536];
    struct epoll_event ev[256];
    long deliveries = 0;
    double c0 = cpu_s();
    int status = 0;
    // The client ends 2 s after its last send. A server still behind then finds its sockets
    // closed: that is a result (the pair is over this host's capacity), not a failure.
    signal(SIGPIPE, SIG_IGN);
    long unwritten = 0;
    while (waitpid(kid, &status, WNOHANG) == 0) {
        int k = epoll_wait(ep, ev, 256, 10);
        for (int e = 0; e < k; e++) {
            int i = (int)ev[e].data.u32;
            ssize_t r, got;
            while ((got = r = read(fds[i], buf, sizeof buf)) > 0) {
                char *p = buf;
                while (r > 0) {
                    char *slot = part + (size_t)i * frame;
                    if (take_frame(slot, &have[i], frame, &p, &r)) {
                        for (int m = i % rooms; m < n; m += rooms) {
                            if (write(fds[m], slot, frame) == frame) {
                                deliveries++;
                            } else if (errno == EPIPE || errno == ECONNRESET) {
                                unwritten++;
                            } else {
                                die("server write");
                            }
                        }
                    }
                }
                if ((size_t)got < sizeof buf) break;
            }
        }
    }
    double server_cpu = cpu_s() - c0;
    long total = res->delivered;
    printf("rooms, %d sockets in %d rooms, a frame each every %d us for %d s, one write() per "
           "delivery, no server or client code: %ld sent, %ld delivered of %ld written; server "
           "%.2f us of CPU a delivery, client %.2f; latency p50 %.2f ms, p99 %.2f, p99.9 %.2f; "
           "sends over 1 ms late %ld, send lag max %.2f ms\n",
           n, rooms, interval_us, secs, res->sent, total, deliveries,
           server_cpu * 1e6 / (total ? total : 1), res->cpu_s * 1e6 / (total ? total : 1),
           pct(res->hist, total, 0.5), pct(res->hist, total, 0.99), pct(res->hist, total, 0.999),
           res->late_sends, res->send_lag_max_ms);
    if (unwritten > 0)
        printf("  the client left (2 s after its last send) before the server caught up: %ld frames "
               "unwritten; the pair is over this host's capacity\n",
               unwritten);
    return 0;
}
