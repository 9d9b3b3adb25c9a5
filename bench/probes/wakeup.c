// What a wake-up costs on this machine, as the kernel accounts it to the process that is
// woken (and to the one that wakes it). bench/probes.sh builds and runs it.
//
//   wakeup N GAP_US
//
// 1. timer: one process sleeps GAP_US N times (each sleep ends with the core woken from
//    idle by its own timer): CPU time per wake-up.
// 2. one-way: a writer on core 0 sleeps GAP_US, then writes a byte to a pipe; a reader on
//    core 1 blocks on the pipe: CPU time per wake-up for each.
// 3. ping-pong on one core: two processes pass a byte back and forth on core 1: CPU time
//    per round trip, when the core never goes idle.
#include "probe.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void nap(int us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, 0);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    int gap = argc > 2 ? atoi(argv[2]) : 1000;
    char c = 'x';

    pin(1);
    double c0 = cpu_s();
    for (int i = 0; i < n; i++) nap(gap);
    printf("timer wake-up after %d us idle: %.1f us of CPU each\n", gap, (cpu_s() - c0) / n * 1e6);

    int p[2];
    if (pipe(p)) return 1;
    fflush(stdout);
    if (fork() == 0) {
        pin(1);
        double c1 = cpu_s();
        for (int i = 0; i < n; i++) read(p[0], &c, 1);
        printf("one-way, reader woken on core 1: %.1f us of CPU per wake-up\n", (cpu_s() - c1) / n * 1e6);
        exit(0);
    }
    pin(0);
    c0 = cpu_s();
    for (int i = 0; i < n; i++) {
        nap(gap);
        write(p[1], &c, 1);
    }
    printf("one-way, writer on core 0 (its own timer wake-up included): %.1f us of CPU per write\n",
           (cpu_s() - c0) / n * 1e6);
    wait(0);

    int a[2], b[2];
    if (pipe(a) || pipe(b)) return 1;
    int rounds = n * 10;
    fflush(stdout);
    if (fork() == 0) {
        pin(1);
        for (int i = 0; i < rounds; i++) {
            read(a[0], &c, 1);
            write(b[1], &c, 1);
        }
        exit(0);
    }
    pin(1);
    c0 = cpu_s();
    for (int i = 0; i < rounds; i++) {
        write(a[1], &c, 1);
        read(b[0], &c, 1);
    }
    printf("ping-pong on one core: %.1f us of CPU per round trip (one side)\n", (cpu_s() - c0) / rounds * 1e6);
    wait(0);
    return 0;
}
