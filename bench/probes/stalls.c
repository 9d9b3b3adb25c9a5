// Stalls the machine imposes: a busy loop pinned to CPU reads the clock and reports every
// gap over 2 ms (the vCPU not running: the host's doing, or an interrupt's).
// bench/probes.sh builds and runs it.
//
//   stalls CPU SECONDS
#include "probe.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int cpu = argc > 1 ? atoi(argv[1]) : 1;
    double seconds = argc > 2 ? atof(argv[2]) : 20;
    pin(cpu);
    double t0 = now_s(), last = t0, total = 0, longest = 0;
    int gaps = 0;
    for (;;) {
        double t = now_s();
        double gap = t - last;
        if (gap > 0.002) {
            gaps++;
            total += gap;
            if (gap > longest) longest = gap;
        }
        last = t;
        if (t - t0 > seconds) break;
    }
    printf("core %d, %.0f s busy: %d gaps over 2 ms, %.1f ms in all (%.2f %% of the time), longest %.1f ms\n",
           cpu, seconds, gaps, total * 1e3, total / seconds * 100, longest * 1e3);
    return 0;
}
