// Bench (b), C++ leaf: the loop of loop.cpp, in the same binary kind (one
// that can unwind), calling a leaf function: it calls nothing and cannot
// throw, so nothing unwinds through its frame and omegi gives it a
// uretprobe instead of a probe on its `ret`.
// Usage: leaf_cpp CALLS. Prints `calls=N loop_ns=T cpu_ns=C`.
#include <sys/resource.h>
#include <time.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

static long long now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

__attribute__((noinline)) int work(int x) {
    int v[2] = {x, x + 1};
    __asm__ volatile("" : : "r"(v) : "memory");
    return v[0] * 3 + v[1];
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 200000;
    volatile int sink = 0;
    int caught = 0;
    long long start = now_ns();
    for (long i = 0; i < calls; i++) {
        try {
            sink += work((int)i);
        } catch (const std::exception &) {
            caught++;
        }
    }
    long long loop_ns = now_ns() - start;
    rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    long long cpu_ns = (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000000LL +
                       (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1000LL;
    std::printf("calls=%ld loop_ns=%lld cpu_ns=%lld caught=%d\n", calls, loop_ns, cpu_ns, caught);
    return 0;
}
