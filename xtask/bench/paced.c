/* Bench: calls one small user function at a set rate, for the highest
 * loss-free rate and the agent's CPU and memory at a given load.
 * Usage: paced CALLS_PER_SECOND THREADS SECONDS.
 * Prints `calls=N loop_ns=T cpu_ns=C` (calls made, wall time, own CPU). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

__attribute__((noinline)) int work(int x) {
    int v[2] = {x, x + 1};
    __asm__ volatile("" : : "r"(v) : "memory");
    return v[0] * 3 + v[1];
}

static double rate_per_thread;
static long long duration_ns;
static long calls_made[64];
static volatile int sink;

static void *worker(void *arg) {
    long index = (long)arg;
    long long start = now_ns();
    long done = 0;
    int local = 0;
    for (;;) {
        long long elapsed = now_ns() - start;
        if (elapsed >= duration_ns) break;
        long target = (long)(rate_per_thread * (double)elapsed / 1e9);
        if (done >= target) {
            struct timespec pause = {0, 100000};
            nanosleep(&pause, NULL);
            continue;
        }
        /* Catch up in small batches, checking the clock in between. */
        long batch = target - done;
        if (batch > 256) batch = 256;
        for (long i = 0; i < batch; i++) local += work((int)(done + i));
        done += batch;
    }
    sink += local;
    calls_made[index] = done;
    return NULL;
}

int main(int argc, char **argv) {
    double rate = argc > 1 ? atof(argv[1]) : 100000;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    double seconds = argc > 3 ? atof(argv[3]) : 3;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    rate_per_thread = rate / threads;
    duration_ns = (long long)(seconds * 1e9);
    pthread_t ids[64];
    long long start = now_ns();
    for (long t = 0; t < threads; t++) pthread_create(&ids[t], NULL, worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    long long loop_ns = now_ns() - start;
    long calls = 0;
    for (int t = 0; t < threads; t++) calls += calls_made[t];
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    long long cpu_ns = (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000000LL +
                       (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1000LL;
    printf("calls=%ld loop_ns=%lld cpu_ns=%lld\n", calls, loop_ns, cpu_ns);
    return 0;
}
