/* Scenario 8 (live snapshots): writer threads that never stop, and measure
 * their own stalls.
 *
 * T pthreads, started here and driven through ctypes (which releases the GIL
 * for every call), write to a region continuously, with no sleep: each write
 * stores 64 bytes (one cache line, eight 64-bit words) at a random 64-byte
 * aligned offset of a random page, as a program's scattered stores do. A
 * write-protected page blocks its writer inside that store until the handler
 * unprotects it.
 *
 * Each writer reads CLOCK_MONOTONIC once per write (vDSO, ~20 ns) and counts
 * its writes. A write that took longer than `stall_ns` since the previous one
 * ended (a fault, or the thread descheduled) is a stall: its end time and
 * length go into the writer's own ring of records, which lw_stalls() reads
 * back for a time window. Python's time.monotonic_ns() is the same clock.
 * With more writers than CPUs the scheduler preempts them for whole time
 * slices (milliseconds) with no snapshot at all, so each stall also records
 * whether the thread was switched out involuntarily meanwhile (getrusage's
 * ru_nivcsw, read only when a stall happened): the others are waits, in a
 * fault (and then for a CPU once woken) or in a pause.
 *
 * Pausing: lw_pause() sets a flag the writers check between writes and waits
 * until every writer has stopped. A "measured" pause (stop-copy-resume)
 * counts as a stall of each writer, from the end of its last write to the
 * moment lw_release() marked (the copy finished) plus its own wake-up from
 * lw_resume() to the end of its next write: what happens between the two
 * marks (the harness checking the copy) is not the method's cost. Any other
 * pause is setup (refilling the region) and counts as nothing.
 *
 * Words the writers store carry the tag 0x5A in their top byte; lw_fill()'s
 * pattern carries 0xA5, so a writer's store is never mistaken for the pattern.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define LINE 64
#define RING (1u << 18) /* stall records per writer (6 MiB each) */
#define WRITER_TAG 0x5AULL
#define PATTERN_TAG 0xA5ULL

struct stall {
    int64_t end_ns;
    int64_t length_ns;
    int64_t preempted; /* the thread was switched out involuntarily meanwhile */
};

struct lw;

struct writer {
    pthread_t thread;
    struct lw *lw;
    uint32_t id;
    uint64_t rng;
    long involuntary; /* ru_nivcsw at the last stall */
    uint64_t head __attribute__((aligned(64))); /* stall records written (monotonic) */
    uint64_t writes __attribute__((aligned(64)));
    struct stall *ring;
};

struct lw {
    pthread_mutex_t lock;
    pthread_cond_t changed; /* pause, resume, stop, a writer stopped */
    uintptr_t base;
    uint64_t pages, page_size;
    int64_t stall_ns;
    uint32_t threads;
    /* Shared state, under lock (pause is also read without it, between writes). */
    int pause;
    int stop;
    int measured;
    uint32_t paused;
    int64_t release_ns, resume_ns;
    uint32_t *set; /* pages the writers choose from; NULL: all */
    uint64_t set_count;
    struct writer *writers;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t lw_now(void)
{
    return now_ns();
}

static uint64_t next_random(uint64_t *state) /* xorshift64* */
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* A stall: was the thread preempted (an involuntary context switch since the last stall:
 * a preemption always makes the write it interrupts a stall), or did it only wait (in a
 * fault, or paused), then for a CPU once woken? */
static void record(struct writer *w, int64_t end, int64_t length)
{
    struct rusage usage;
    int64_t preempted = 1;
    if (getrusage(RUSAGE_THREAD, &usage) == 0) {
        preempted = usage.ru_nivcsw != w->involuntary;
        w->involuntary = usage.ru_nivcsw;
    }
    uint64_t head = w->head; /* only this thread writes it */
    w->ring[head % RING] = (struct stall){.end_ns = end, .length_ns = length,
                                          .preempted = preempted};
    __atomic_store_n(&w->head, head + 1, __ATOMIC_RELEASE);
}

/* Stop here until resumed; returns 0 to go on, -1 to end. `*t0` becomes where the next
 * write's time counts from; a measured pause's stall is recorded by the caller. */
static int wait_paused(struct writer *w, int64_t *t0, int64_t *credited)
{
    struct lw *lw = w->lw;
    pthread_mutex_lock(&lw->lock);
    lw->paused++;
    pthread_cond_broadcast(&lw->changed);
    while (lw->pause && !lw->stop)
        pthread_cond_wait(&lw->changed, &lw->lock);
    lw->paused--;
    int stop = lw->stop, measured = lw->measured;
    int64_t release = lw->release_ns, resume = lw->resume_ns;
    pthread_mutex_unlock(&lw->lock);
    if (stop)
        return -1;
    if (measured) { /* from its last write to the release, then from the resume on */
        *credited = (release > *t0 ? release - *t0 : 0);
        *t0 = resume;
    } else {
        *credited = 0;
        *t0 = now_ns();
    }
    return 0;
}

static void *write_forever(void *arg)
{
    struct writer *w = arg;
    struct lw *lw = w->lw;
    uint64_t lines = lw->page_size / LINE, writes = 0;
    uint64_t value = (WRITER_TAG << 56) | ((uint64_t)w->id << 48);
    pthread_mutex_lock(&lw->lock);
    const uint32_t *set = lw->set;
    uint64_t choices = set ? lw->set_count : lw->pages;
    pthread_mutex_unlock(&lw->lock);
    int64_t t0 = now_ns(), credited = 0;
    for (;;) {
        if (__atomic_load_n(&lw->pause, __ATOMIC_ACQUIRE)) {
            if (wait_paused(w, &t0, &credited) < 0)
                break;
            pthread_mutex_lock(&lw->lock); /* the set changes only while paused */
            set = lw->set;
            choices = set ? lw->set_count : lw->pages;
            pthread_mutex_unlock(&lw->lock);
        }
        uint64_t r = next_random(&w->rng);
        uint64_t page = set ? set[r % choices] : r % choices;
        uint64_t line = (r >> 40) % lines;
        volatile uint64_t *at = (volatile uint64_t *)(lw->base + page * lw->page_size + line * LINE);
        value++;
        for (int i = 0; i < LINE / 8; i++)
            at[i] = value;
        int64_t t1 = now_ns();
        __atomic_store_n(&w->writes, ++writes, __ATOMIC_RELAXED);
        int64_t took = t1 - t0 + credited;
        if (took > lw->stall_ns)
            record(w, t1, took);
        credited = 0;
        t0 = t1;
    }
    return NULL;
}

/* Start `threads` writers on [base, base + pages * page_size), running at once. */
struct lw *lw_start(uint64_t base, uint64_t pages, uint64_t page_size, uint32_t threads,
                    int64_t stall_ns, uint64_t seed)
{
    if (!pages || page_size < LINE || page_size % LINE || !threads) {
        errno = EINVAL;
        return NULL;
    }
    struct lw *lw = calloc(1, sizeof *lw);
    if (!lw)
        return NULL;
    pthread_mutex_init(&lw->lock, NULL);
    pthread_cond_init(&lw->changed, NULL);
    lw->base = (uintptr_t)base;
    lw->pages = pages;
    lw->page_size = page_size;
    lw->stall_ns = stall_ns;
    lw->writers = calloc(threads, sizeof *lw->writers);
    if (!lw->writers) {
        free(lw);
        return NULL;
    }
    for (uint32_t i = 0; i < threads; i++) {
        struct writer *w = &lw->writers[i];
        w->lw = lw;
        w->id = i;
        w->rng = (seed + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)(i + 1) * 0xBF58476D1CE4E5B9ULL;
        w->ring = malloc(RING * sizeof *w->ring);
        int err = w->ring ? pthread_create(&w->thread, NULL, write_forever, w) : ENOMEM;
        if (err) {
            free(w->ring);
            pthread_mutex_lock(&lw->lock);
            lw->stop = 1;
            pthread_cond_broadcast(&lw->changed);
            pthread_mutex_unlock(&lw->lock);
            for (uint32_t j = 0; j < i; j++) {
                pthread_join(lw->writers[j].thread, NULL);
                free(lw->writers[j].ring);
            }
            free(lw->writers);
            free(lw);
            errno = err;
            return NULL;
        }
        lw->threads = i + 1;
    }
    return lw;
}

/* Stop the writers between writes and wait until every one has: a writer blocked in
 * a fault must be served meanwhile, so call this from a thread, never the loop's. */
void lw_pause(struct lw *lw, int measured)
{
    pthread_mutex_lock(&lw->lock);
    lw->measured = measured;
    lw->release_ns = 0;
    __atomic_store_n(&lw->pause, 1, __ATOMIC_RELEASE);
    while (lw->paused < lw->threads)
        pthread_cond_wait(&lw->changed, &lw->lock);
    pthread_mutex_unlock(&lw->lock);
}

/* A measured pause: what the writers' stall counts up to (then again from the resume). */
int64_t lw_release(struct lw *lw)
{
    int64_t now = now_ns();
    pthread_mutex_lock(&lw->lock);
    lw->release_ns = now;
    pthread_mutex_unlock(&lw->lock);
    return now;
}

/* Let the writers go on; returns when it did (CLOCK_MONOTONIC). Never blocks long. */
int64_t lw_resume(struct lw *lw)
{
    pthread_mutex_lock(&lw->lock);
    int64_t now = now_ns();
    lw->resume_ns = now;
    if (!lw->release_ns)
        lw->release_ns = now;
    __atomic_store_n(&lw->pause, 0, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&lw->changed);
    pthread_mutex_unlock(&lw->lock);
    return now;
}

/* Restrict the writers to `count` pages (NULL: all); only while they are paused. */
int lw_set_pages(struct lw *lw, const uint32_t *pages, uint64_t count)
{
    uint32_t *copy = NULL;
    if (pages && count) {
        for (uint64_t i = 0; i < count; i++)
            if (pages[i] >= lw->pages)
                return EINVAL;
        copy = malloc(count * sizeof *copy);
        if (!copy)
            return ENOMEM;
        memcpy(copy, pages, count * sizeof *copy);
    }
    pthread_mutex_lock(&lw->lock);
    if (lw->paused < lw->threads) {
        pthread_mutex_unlock(&lw->lock);
        free(copy);
        return EBUSY;
    }
    free(lw->set);
    lw->set = copy;
    lw->set_count = copy ? count : 0;
    pthread_mutex_unlock(&lw->lock);
    return 0;
}

/* Writes completed by all writers so far. */
uint64_t lw_writes(struct lw *lw)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < lw->threads; i++)
        total += __atomic_load_n(&lw->writers[i].writes, __ATOMIC_RELAXED);
    return total;
}

/* The lengths (ns) of the stalls that overlap [from_ns, to_ns], up to `cap` of them
 * into `out`, negated for a stall in which the thread was preempted; returns how many
 * there were (more than `cap`: only `cap` copied). `*overrun` is set when a ring had
 * already dropped records of the window. */
uint64_t lw_stalls(struct lw *lw, int64_t from_ns, int64_t to_ns, int64_t *out, uint64_t cap,
                   int32_t *overrun)
{
    uint64_t found = 0;
    *overrun = 0;
    for (uint32_t i = 0; i < lw->threads; i++) {
        struct writer *w = &lw->writers[i];
        uint64_t head = __atomic_load_n(&w->head, __ATOMIC_ACQUIRE);
        uint64_t oldest = head > RING / 2 ? head - RING / 2 : 0; /* the writer goes on */
        uint64_t n = head;
        while (n > oldest) {
            struct stall s = w->ring[(n - 1) % RING];
            n--;
            if (s.end_ns < from_ns)
                break;
            if (s.end_ns - s.length_ns > to_ns)
                continue;
            if (found < cap)
                out[found] = s.preempted ? -s.length_ns : s.length_ns;
            found++;
        }
        if (n == oldest && oldest > 0)
            *overrun = 1;
    }
    return found;
}

/* CPU time the writers have used so far (ns), all threads together. */
int64_t lw_cpu_ns(struct lw *lw)
{
    int64_t total = 0;
    for (uint32_t i = 0; i < lw->threads; i++) {
        clockid_t clock;
        struct timespec ts;
        if (pthread_getcpuclockid(lw->writers[i].thread, &clock) == 0 &&
            clock_gettime(clock, &ts) == 0)
            total += (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    }
    return total;
}

/* Stop and join every writer (none may be blocked in a fault nobody serves). */
void lw_stop(struct lw *lw)
{
    pthread_mutex_lock(&lw->lock);
    lw->stop = 1;
    __atomic_store_n(&lw->pause, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&lw->changed);
    pthread_mutex_unlock(&lw->lock);
    for (uint32_t i = 0; i < lw->threads; i++) {
        pthread_join(lw->writers[i].thread, NULL);
        free(lw->writers[i].ring);
    }
    free(lw->set);
    free(lw->writers);
    pthread_cond_destroy(&lw->changed);
    pthread_mutex_destroy(&lw->lock);
    free(lw);
}

/* -- the pattern ------------------------------------------------------------------ */

static inline uint64_t pattern_word(uint64_t page, uint64_t word, uint64_t generation)
{
    return (PATTERN_TAG << 56) | ((generation & 0xFFFF) << 40) |
           ((page * 512 + word) & 0xFFFFFFFFFFULL);
}

/* Fill pages (all of [0, pages), or the `count` listed in `only`) with generation's
 * pattern; `base` is page 0's address. */
void lw_fill(uint64_t base, uint64_t pages, uint64_t page_size, uint64_t generation,
             const uint32_t *only, uint64_t count)
{
    uint64_t words = page_size / 8, n = only ? count : pages;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t page = only ? only[i] : i;
        uint64_t *p = (uint64_t *)(uintptr_t)(base + page * page_size);
        for (uint64_t k = 0; k < words; k++)
            p[k] = pattern_word(page, k, generation);
    }
}

/* The first of `pages` pages at `base` that does not hold generation's pattern, or -1.
 * The k-th page there is page `indexes[k]` of the region (k without `indexes`). */
int64_t lw_verify(uint64_t base, uint64_t pages, uint64_t page_size, uint64_t generation,
                  const uint32_t *indexes)
{
    uint64_t words = page_size / 8;
    for (uint64_t k = 0; k < pages; k++) {
        const uint64_t *p = (const uint64_t *)(uintptr_t)(base + k * page_size);
        uint64_t page = indexes ? indexes[k] : k;
        for (uint64_t i = 0; i < words; i++)
            if (p[i] != pattern_word(page, i, generation))
                return (int64_t)k;
    }
    return -1;
}

/* The first page where [a, a + length) and [b, b + length) differ, or -1. */
int64_t lw_compare(uint64_t a, uint64_t b, uint64_t length, uint64_t page_size)
{
    for (uint64_t at = 0; at < length; at += page_size)
        if (memcmp((const void *)(uintptr_t)(a + at), (const void *)(uintptr_t)(b + at),
                   page_size))
            return (int64_t)(at / page_size);
    return -1;
}
