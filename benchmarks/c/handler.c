/* A reference userfaultfd fault handler in C: the baseline the benchmarks
 * compare Python against.
 *
 * It is written the way the Rust and Go userfaultfd crates and Firecracker's
 * example page-fault handlers do it: one handler thread, poll() on the uffd,
 * read() a batch of up to 64 uffd_msg, and one ioctl per fault:
 *
 *   MISSING fault -> UFFDIO_COPY from the source buffer (the page at the same
 *                    offset), optionally with readahead: the fault page plus
 *                    up to N following pages not copied yet, in one ioctl;
 *   WP fault      -> UFFDIO_WRITEPROTECT without MODE_WP (unprotect), either
 *                    waking, or with MODE_DONTWAKE followed by UFFDIO_WAKE.
 *
 * Kernel facts it relies on (<linux/userfaultfd.h>, ioctl_userfaultfd(2)):
 * - EEXIST from COPY means the page is already there but the faulting thread
 *   was NOT woken: send UFFDIO_WAKE for it.
 * - uffdio_copy.copy is signed: bytes copied, or a negative errno. EAGAIN with
 *   a positive count is partial progress, continued from there.
 * - A fault message can arrive for a page a readahead copy already filled (the
 *   thread faulted before the copy, and the copy woke it): waking it again is
 *   harmless, so such a message is answered with UFFDIO_WAKE.
 * - Each fault is delivered once; a handler that gives up leaves threads
 *   asleep. So on any error this handler records it, unblocks the workload
 *   (unregister + wake) and exits; the harness then fails the run.
 *
 * 'Slow' mode sleeps slow_us before each fetch (each UFFDIO_COPY), serially,
 * as the anchors' examples would while waiting on a network or disk.
 *
 * The API is called through ctypes (benchmarks/_c.py): bench_handler_start()
 * spawns the thread and returns a handle; bench_handler_stop() stops it with
 * a bounded wait and returns its counters.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BENCH_MISSING 0
#define BENCH_WP 1
#define BENCH_BATCH 64

struct bench_handler_config {
    int32_t uffd;
    int32_t mode;            /* BENCH_MISSING or BENCH_WP */
    uint64_t base;           /* the registered region */
    uint64_t length;
    uint64_t source;         /* page i of the region gets page i of the source */
    uint64_t page_size;
    uint8_t *pages;          /* one byte per page, set when the handler resolves it */
    uint32_t readahead;      /* MISSING: extra pages copied with each fault */
    uint32_t slow_us;        /* sleep before each fetch (0: memory speed) */
    uint32_t wake_separately; /* WP: unprotect with DONTWAKE, then UFFDIO_WAKE */
    uint32_t reserved;
};

struct bench_handler_stats {
    uint64_t faults;   /* page-fault messages read */
    uint64_t resolved; /* pages populated (MISSING) or unprotected (WP) */
    uint64_t ioctls;   /* COPY, WRITEPROTECT and WAKE ioctls issued */
    uint64_t wakes;    /* UFFDIO_WAKE for pages that were already there */
    int32_t error;     /* 0, or the errno that stopped the handler */
    char failed[44];   /* what failed, when error != 0 */
};

struct bench_handler {
    struct bench_handler_config cfg;
    struct bench_handler_stats stats;
    uint64_t npages;
    int stopfd;
    pthread_t thread;
};

static int fail(struct bench_handler *h, int err, const char *what)
{
    h->stats.error = err;
    snprintf(h->stats.failed, sizeof h->stats.failed, "%s", what);
    return -1;
}

static void sleep_us(uint32_t us)
{
    struct timespec left = {.tv_sec = us / 1000000, .tv_nsec = (long)(us % 1000000) * 1000};
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &left, &left) == EINTR)
        ;
}

static int wake(struct bench_handler *h, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    h->stats.ioctls++;
    if (ioctl(h->cfg.uffd, UFFDIO_WAKE, &range) != 0)
        return fail(h, errno, "UFFDIO_WAKE");
    return 0;
}

/* Fill `run` pages from `index` with one UFFDIO_COPY (which wakes the range). */
static int copy_run(struct bench_handler *h, uint64_t index, uint64_t run)
{
    const uint64_t ps = h->cfg.page_size;
    uint64_t done = 0, total = run * ps;
    while (done < total) {
        struct uffdio_copy copy = {
            .dst = h->cfg.base + index * ps + done,
            .src = h->cfg.source + index * ps + done,
            .len = total - done,
            .mode = 0,
        };
        h->stats.ioctls++;
        if (ioctl(h->cfg.uffd, UFFDIO_COPY, &copy) == 0) {
            done = total;
            break;
        }
        if (errno == EAGAIN && copy.copy > 0) {
            done += (uint64_t)copy.copy;
            continue;
        }
        if (errno == EEXIST) {
            /* Someone else filled it; the kernel woke no one. Only the
             * fault page is known to be there now. */
            h->cfg.pages[index] = 1;
            return wake(h, h->cfg.base + index * ps, ps);
        }
        return fail(h, errno, "UFFDIO_COPY");
    }
    memset(h->cfg.pages + index, 1, run);
    h->stats.resolved += run;
    return 0;
}

static int resolve_missing(struct bench_handler *h, uint64_t index)
{
    if (h->cfg.pages[index]) {
        h->stats.wakes++;
        return wake(h, h->cfg.base + index * h->cfg.page_size, h->cfg.page_size);
    }
    uint64_t run = 1;
    while (run <= h->cfg.readahead && index + run < h->npages && !h->cfg.pages[index + run])
        run++;
    if (h->cfg.slow_us)
        sleep_us(h->cfg.slow_us);
    return copy_run(h, index, run);
}

static int resolve_wp(struct bench_handler *h, uint64_t index)
{
    const uint64_t ps = h->cfg.page_size;
    struct uffdio_writeprotect wp = {
        .range = {.start = h->cfg.base + index * ps, .len = ps},
        .mode = h->cfg.wake_separately ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0,
    };
    h->stats.ioctls++;
    if (ioctl(h->cfg.uffd, UFFDIO_WRITEPROTECT, &wp) != 0)
        return fail(h, errno, "UFFDIO_WRITEPROTECT");
    if (h->cfg.wake_separately && wake(h, wp.range.start, ps) != 0)
        return -1;
    h->cfg.pages[index] = 1;
    h->stats.resolved++;
    return 0;
}

static int handle(struct bench_handler *h, const struct uffd_msg *msg)
{
    if (msg->event != UFFD_EVENT_PAGEFAULT)
        return fail(h, EPROTO, "an event other than a page fault");
    h->stats.faults++;
    uint64_t address = msg->arg.pagefault.address & ~(h->cfg.page_size - 1);
    if (address < h->cfg.base || address - h->cfg.base >= h->cfg.length)
        return fail(h, EFAULT, "a fault outside the region");
    uint64_t index = (address - h->cfg.base) / h->cfg.page_size;
    int is_wp = (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
    if (h->cfg.mode == BENCH_WP) {
        if (!is_wp)
            return fail(h, EPROTO, "a MISSING fault in WP mode");
        return resolve_wp(h, index);
    }
    if (is_wp)
        return fail(h, EPROTO, "a WP fault in MISSING mode");
    return resolve_missing(h, index);
}

/* Read and handle every pending message; 0 when none is left (EAGAIN). */
static int drain(struct bench_handler *h)
{
    struct uffd_msg msgs[BENCH_BATCH];
    for (;;) {
        ssize_t n = read(h->cfg.uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN)
                return 0;
            if (errno == EINTR)
                continue;
            return fail(h, errno, "read() from the uffd");
        }
        if (n == 0 || n % (ssize_t)sizeof msgs[0])
            return fail(h, EIO, "a short read() from the uffd");
        for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++)
            if (handle(h, &msgs[i]) != 0)
                return -1;
    }
}

/* On an error the handler gives up, so it first unblocks the workload, as a
 * dying handler must: UFFDIO_UNREGISTER wakes MISSING waiters, UFFDIO_WAKE the
 * WP ones; they then fault the ordinary way and the run fails verification. */
static void *give_up(struct bench_handler *h)
{
    struct uffdio_range range = {.start = h->cfg.base, .len = h->cfg.length};
    ioctl(h->cfg.uffd, UFFDIO_UNREGISTER, &range);
    ioctl(h->cfg.uffd, UFFDIO_WAKE, &range);
    return NULL;
}

static void *serve(void *arg)
{
    struct bench_handler *h = arg;
    struct pollfd fds[2] = {
        {.fd = h->cfg.uffd, .events = POLLIN},
        {.fd = h->stopfd, .events = POLLIN},
    };
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail(h, errno, "poll()");
            return give_up(h);
        }
        if (fds[0].revents & (POLLERR | POLLNVAL)) {
            fail(h, EIO, "poll() reported an error on the uffd");
            return give_up(h);
        }
        /* Drain before honouring stop, so every message is counted. */
        if (drain(h) != 0)
            return give_up(h);
        if (fds[1].revents)
            return NULL;
    }
}

struct bench_handler *bench_handler_start(const struct bench_handler_config *cfg)
{
    if (cfg->page_size == 0 || cfg->length % cfg->page_size || !cfg->pages) {
        errno = EINVAL;
        return NULL;
    }
    struct bench_handler *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->cfg = *cfg;
    h->npages = cfg->length / cfg->page_size;
    h->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (h->stopfd < 0) {
        free(h);
        return NULL;
    }
    int err = pthread_create(&h->thread, NULL, serve, h);
    if (err) {
        close(h->stopfd);
        free(h);
        errno = err;
        return NULL;
    }
    return h;
}

/* Stop the handler and copy its counters into *out. Returns 0, or ETIMEDOUT
 * when the thread did not end within timeout_ms (the handle is then leaked:
 * the thread may still use it). */
int bench_handler_stop(struct bench_handler *h, uint32_t timeout_ms, struct bench_handler_stats *out)
{
    uint64_t one = 1;
    if (write(h->stopfd, &one, sizeof one) != (ssize_t)sizeof one)
        return errno;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    int err = pthread_timedjoin_np(h->thread, NULL, &deadline);
    if (err)
        return err;
    *out = h->stats;
    close(h->stopfd);
    free(h);
    return 0;
}
