/* Bench (a) and (d): a loop calling one small user function.
 * Built -O2 -fno-omit-frame-pointer (prologue `push %rbp`), and for (d) with
 * -fcf-protection as well (prologue `endbr64; push %rbp`).
 * Usage: loop CALLS. Prints `calls=N loop_ns=T cpu_ns=C`; then, if
 * BENCH_LINGER_MS is set, waits that long before exiting (so that the
 * tracer's statistics can be read while its probes are still in place). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Small, but with a stack frame (an array whose address escapes), so that
 * -fno-omit-frame-pointer gives it the usual `push %rbp` prologue. */
__attribute__((noinline)) int work(int x) {
    int v[2] = {x, x + 1};
    __asm__ volatile("" : : "r"(v) : "memory");
    return v[0] * 3 + v[1];
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 200000;
    volatile int sink = 0;
    long long start = now_ns();
    for (long i = 0; i < calls; i++) sink += work((int)i);
    long long loop_ns = now_ns() - start;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    long long cpu_ns = (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000000LL +
                       (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1000LL;
    printf("calls=%ld loop_ns=%lld cpu_ns=%lld\n", calls, loop_ns, cpu_ns);
    fflush(stdout);
    const char *linger = getenv("BENCH_LINGER_MS");
    if (linger) usleep((useconds_t)atoi(linger) * 1000);
    return 0;
}
