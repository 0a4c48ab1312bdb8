// Bench (b), C++: the loop of loop.c in a binary that can unwind. With a
// second argument K, the K-th call throws through `work` and main catches it
// (a uretprobe on `work` would then kill the program). With `leaf` instead,
// the loop calls `leaf`, which calls nothing and cannot throw: omegi gives it
// a uretprobe although the binary can unwind.
// Usage: loop_cpp CALLS [THROW_AT|leaf]. Prints `calls=N loop_ns=T cpu_ns=C`.
#include <sys/resource.h>
#include <time.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

static long long now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static long throw_at = -1;

__attribute__((noinline)) int work(int x) {
    int v[2] = {x, x + 1};
    __asm__ volatile("" : : "r"(v) : "memory");
    if (x == throw_at) throw std::runtime_error("bench: planned exception");
    return v[0] * 3 + v[1];
}

__attribute__((noinline)) int leaf(int x) {
    int v[2] = {x, x + 1};
    __asm__ volatile("" : : "r"(v) : "memory");
    return v[0] * 3 + v[1];
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 200000;
    bool use_leaf = argc > 2 && std::strcmp(argv[2], "leaf") == 0;
    throw_at = argc > 2 && !use_leaf ? atol(argv[2]) : -1;
    int (*function)(int) = use_leaf ? leaf : work;
    volatile int sink = 0;
    int caught = 0;
    long long start = now_ns();
    for (long i = 0; i < calls; i++) {
        try {
            sink += function((int)i);
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
