// What one write() of a small frame to a loopback TCP socket costs on this machine, with
// no server code at all: the least a server pays per delivery when it writes each
// delivery on its own. bench/probes.sh builds and runs it.
//
//   writes N PERIOD_US SECONDS [FRAME_BYTES [FRAMES_PER_WRITE]]
//
// A writer on core 1 holds N connected sockets (TCP_NODELAY) and every PERIOD_US writes
// FRAMES_PER_WRITE frames of FRAME_BYTES (120) to each, in one write() per socket; a
// reader process on core 0 reads them all through epoll. Prints the writer's CPU time
// (user + system, getrusage) per write and per frame. On loopback the receiving side's
// TCP processing runs inside the writer's system call, as it does in the benchmarks.
#include "probe.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void reader(int n, struct sockaddr_in *addr) {
    pin(0);
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)addr, sizeof *addr) < 0) die("connect");
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    }
    static char buf[65536];
    struct epoll_event ev[256];
    for (;;) {
        int k = epoll_wait(ep, ev, 256, -1);
        for (int i = 0; i < k; i++) {
            if (read(ev[i].data.fd, buf, sizeof buf) == 0) exit(0);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: writes N PERIOD_US SECONDS [FRAME_BYTES [FRAMES_PER_WRITE]]\n");
        return 2;
    }
    int n = atoi(argv[1]), period_us = atoi(argv[2]), secs = atoi(argv[3]);
    int frame = argc > 4 ? atoi(argv[4]) : 120, per = argc > 5 ? atoi(argv[5]) : 1;
    int one = 1;
    struct sockaddr_in addr;
    int l = listen_loopback(&addr);
    if (l < 0) die("listen");
    pid_t kid = fork();
    if (kid == 0) reader(n, &addr);
    pin(1);
    int *fds = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) {
        fds[i] = accept(l, 0, 0);
        if (fds[i] < 0) die("accept");
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char *bytes = malloc((size_t)frame * per);
    memset(bytes, 'x', (size_t)frame * per);
    usleep(200000);
    long writes = 0;
    double c0 = cpu_s(), t0 = now_s(), next = t0;
    while (now_s() - t0 < secs) {
        for (int i = 0; i < n; i++, writes++) {
            if (write(fds[i], bytes, (size_t)frame * per) < 0) die("write");
        }
        next += period_us / 1e6;
        double wait = next - now_s();
        if (wait > 0) usleep((useconds_t)(wait * 1e6));
    }
    double cpu = cpu_s() - c0;
    printf("writes to %d sockets every %d us, %d frame(s) of %d bytes a write: %.2f us of CPU a "
           "write, %.2f a frame (%ld writes)\n",
           n, period_us, per, frame, cpu * 1e6 / writes, cpu * 1e6 / writes / per, writes);
    for (int i = 0; i < n; i++) close(fds[i]);
    kill(kid, SIGKILL);
    waitpid(kid, 0, 0);
    return 0;
}
