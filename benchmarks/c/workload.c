/* The memory side of the benchmarks: the faulting workload, and filling and
 * checking pages, all in C.
 *
 * The workload runs in pthreads created here and is called through ctypes,
 * which releases the GIL for the whole call: a thread that faults sleeps in
 * the kernel while holding nothing a Python handler needs. Timing is taken
 * here too (CLOCK_MONOTONIC), from the moment the threads are released to the
 * moment the last one has finished, so thread creation and Python are not in
 * the measurement.
 *
 * Each of T threads touches its own contiguous share of the pages, once each,
 * at page stride, in address order:
 *   BENCH_READ  loads one byte (a read fault);
 *   BENCH_TOUCH writes without changing the byte (a locked `or 0`: a write
 *               fault, contents unchanged);
 *   BENCH_MARK  stores a per-page 64-bit marker at the start of the page
 *               (write tracking: each page written once, and checkable).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_READ 0
#define BENCH_TOUCH 1
#define BENCH_MARK 2

uint64_t bench_marker(uint64_t index)
{
    return (index + 1) * 0x9E3779B97F4A7C15ULL;
}

struct start_gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state; /* 0 waiting, 1 go, -1 cancelled */
};

struct worker {
    pthread_t thread;
    struct start_gate *gate;
    uintptr_t base;
    uint64_t first, count, page_size;
    int access;
    uint64_t sum;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    pthread_mutex_lock(&w->gate->lock);
    while (w->gate->state == 0)
        pthread_cond_wait(&w->gate->cond, &w->gate->lock);
    int go = w->gate->state > 0;
    pthread_mutex_unlock(&w->gate->lock);
    if (!go)
        return NULL;
    uint64_t sum = 0;
    for (uint64_t i = w->first; i < w->first + w->count; i++) {
        uintptr_t page = w->base + i * w->page_size;
        switch (w->access) {
        case BENCH_READ:
            sum += *(volatile uint8_t *)page;
            break;
        case BENCH_TOUCH:
            __atomic_fetch_or((uint8_t *)page, 0, __ATOMIC_RELAXED);
            break;
        default:
            *(volatile uint64_t *)page = bench_marker(i);
            break;
        }
    }
    w->sum = sum;
    return NULL;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void open_gate(struct start_gate *gate, int state)
{
    pthread_mutex_lock(&gate->lock);
    gate->state = state;
    pthread_cond_broadcast(&gate->cond);
    pthread_mutex_unlock(&gate->lock);
}

/* Touch `pages` pages at `base` from `threads` threads; returns the elapsed
 * nanoseconds, or a negative errno when threads could not be started. */
int64_t bench_workload_run(uint64_t base, uint64_t pages, uint64_t page_size, uint32_t threads,
                           int32_t access)
{
    if (threads == 0 || page_size == 0 || access < BENCH_READ || access > BENCH_MARK)
        return -EINVAL;
    struct worker *workers = calloc(threads, sizeof *workers);
    if (!workers)
        return -ENOMEM;
    struct start_gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    uint32_t started = 0;
    int err = 0;
    for (; started < threads; started++) {
        struct worker *w = &workers[started];
        w->gate = &gate;
        w->base = (uintptr_t)base;
        w->first = pages * started / threads;
        w->count = pages * (started + 1) / threads - w->first;
        w->page_size = page_size;
        w->access = access;
        err = pthread_create(&w->thread, &attr, work, w);
        if (err)
            break;
    }
    pthread_attr_destroy(&attr);
    int64_t start = now_ns();
    open_gate(&gate, err ? -1 : 1);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(workers[i].thread, NULL);
    int64_t elapsed = now_ns() - start;
    free(workers);
    return err ? -err : elapsed;
}

/* A deterministic, page-distinct pattern (xorshift64 seeded by page index),
 * so a page copied to the wrong place or from the wrong offset is caught. */
void bench_fill_pattern(uint64_t base, uint64_t pages, uint64_t page_size)
{
    for (uint64_t i = 0; i < pages; i++) {
        uint64_t *word = (uint64_t *)(uintptr_t)(base + i * page_size);
        uint64_t x = bench_marker(i) ^ 0xD1B54A32D192ED03ULL;
        for (uint64_t j = 0; j < page_size / sizeof *word; j++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word[j] = x;
        }
    }
}

/* Compare every page of the region with the source; with `marked`, the first
 * 8 bytes of page i must hold bench_marker(i) instead. Returns the index of
 * the first wrong page, or -1 when all are right. */
int64_t bench_verify(uint64_t region, uint64_t source, uint64_t pages, uint64_t page_size,
                     int32_t marked)
{
    for (uint64_t i = 0; i < pages; i++) {
        const uint8_t *got = (const uint8_t *)(uintptr_t)(region + i * page_size);
        const uint8_t *want = (const uint8_t *)(uintptr_t)(source + i * page_size);
        uint64_t skip = 0;
        if (marked) {
            uint64_t head;
            memcpy(&head, got, sizeof head);
            if (head != bench_marker(i))
                return (int64_t)i;
            skip = sizeof head;
        }
        if (memcmp(got + skip, want + skip, page_size - skip) != 0)
            return (int64_t)i;
    }
    return -1;
}
