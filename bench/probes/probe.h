// What the probes (bench/probes/*.c) share: pinning to a core, the process's CPU time and
// a monotonic clock. Each probe is one file with this header beside it (gcc finds it); it comes first, for _GNU_SOURCE.
#ifndef WSCHAT_PROBE_H
#define WSCHAT_PROBE_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

// Run the calling process on `cpu` only.
static inline void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

// The process's CPU time so far (user + system), in seconds.
static inline double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec / 1e6;
}

// Monotonic seconds.
static inline double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
// A TCP socket listening on a free loopback port, its address in `addr`; -1 on failure.
static inline int listen_loopback(struct sockaddr_in *addr) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    *addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof *addr;
    if (l < 0 || bind(l, (struct sockaddr *)addr, sizeof *addr) < 0 || listen(l, 4096) < 0)
        return -1;
    getsockname(l, (struct sockaddr *)addr, &len);
    return l;
}
#endif
