/* Memory accesses that must happen without the GIL.
 *
 * A thread that faults on a registered page sleeps in the kernel until the
 * handler resolves the fault. If that thread holds the GIL, the handler (a
 * Python coroutine in the same interpreter) can never run: deadlock. These
 * functions are called through ctypes, which releases the GIL around the
 * call, so the faulting thread holds nothing the handler needs.
 *
 * This file is a plain C library (no Python.h); setup.py builds it and
 * uffd_async/_native.py loads it with ctypes. It is named _native_lib so the
 * import system never mistakes it for the _native Python module.
 */
#define _GNU_SOURCE /* process_vm_readv */
#include <stddef.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* A write access that leaves the byte as it was. A read-modify-write
 * instruction faults as a write (so a missing page reports
 * UFFD_PAGEFAULT_FLAG_WRITE and a write-protected one traps), while a plain
 * load followed by a store would first fault as a read. */
static inline void write_touch(volatile uint8_t *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("lock orb $0, %0" : "+m"(*p) : : "memory");
#else
    __atomic_fetch_or((uint8_t *)p, 0, __ATOMIC_RELAXED);
#endif
}

/* Touch every page that [addr, addr + len) overlaps, `step` being the page
 * size: first the byte at addr itself, then the first byte of each following
 * page. Returns the sum of the bytes read, so the loads are not optimised
 * away. */
uint64_t ua_touch(uintptr_t addr, size_t len, size_t step, int write)
{
    uint64_t sum = 0;
    uintptr_t end = addr + len;
    if (step == 0 || len == 0 || end < addr)
        return 0;
    for (uintptr_t p = addr; p < end; p = (p & ~(uintptr_t)(step - 1)) + step) {
        volatile uint8_t *q = (volatile uint8_t *)p;
        if (write)
            write_touch(q);
        else
            sum += *q;
        if ((p & ~(uintptr_t)(step - 1)) + step < p)
            break; /* wrapped around the top of the address space */
    }
    return sum;
}

/* FNV-1a over [addr, addr + len): checks contents without Python. */
uint64_t ua_fnv1a(uintptr_t addr, size_t len)
{
    const volatile uint8_t *p = (const volatile uint8_t *)addr;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Fork; the child touches [addr, addr + len) page by page, hashes it, writes
 * the 8-byte hash to `out_fd` and exits without returning to Python (the
 * child of a threaded interpreter must not run Python code). The parent
 * gets the child's pid, or -1.
 *
 * With UFFD_FEATURE_EVENT_FORK the fork blocks in the kernel until the
 * handler reads the FORK event. glibc's fork() holds malloc's locks across
 * that wait, so a handler in this process that allocates (any Python code)
 * would deadlock: the raw clone syscall takes no userspace locks. */
pid_t ua_fork_touch(uintptr_t addr, size_t len, size_t step, int for_write, int out_fd)
{
    pid_t pid = (pid_t)syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);
    if (pid != 0)
        return pid;
    ua_touch(addr, len, step, for_write);
    uint64_t h = ua_fnv1a(addr, len);
    ssize_t n = write(out_fd, &h, sizeof h);
    _exit(n == (ssize_t)sizeof h ? 0 : 1);
}

/* The fault server's fast path: resolve a batch of page-fault records with one
 * ioctl each, without Python in the loop.
 *
 * Only what needs no decision is done here: a fault inside the served range,
 * answered by COPY from a source in memory, ZEROPAGE, or unprotect. Anything
 * else is left for Python (handled[i] stays 0): a record that is not a page
 * fault (then nothing in the batch is handled, so non-cooperative events are
 * applied before any fault behind them), a fault outside the range, and any
 * ioctl error but EEXIST (EAGAIN, ESRCH...), which Python retries or reports.
 * A COPY that fails with ENOMEM is retried once (hugetlbfs: see the COPY below).
 * EEXIST is answered with UFFDIO_WAKE: the kernel does not wake on EEXIST.
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/uio.h>

enum { UA_COPY = 1, UA_ZEROPAGE = 2, UA_UNPROTECT = 3, UA_SAVE = 4 };

struct ua_fast {
    uint64_t base;      /* first page served */
    uint64_t pages;     /* pages served from base */
    uint64_t source;    /* UA_COPY: address of the source's first page */
    uint64_t page_size; /* a power of two */
    uint64_t mode;      /* mode bits of the ioctl (COPY_MODE_WP, WRITEPROTECT_MODE_DONTWAKE) */
    uint8_t *populated; /* UA_COPY: one byte per page, set once populated; may be NULL */
    int64_t kind;
    uint64_t readahead; /* UA_COPY: also copy up to this many following unpopulated pages */
    /* UA_SAVE (a live snapshot): before unprotecting a page not saved yet (populated[]
     * is the saved bitmap), copy it with process_vm_readv from process `pid` into the
     * image at `image` + slot * page_size, slot = slots[index] (or index without slots;
     * a negative slot: not in this snapshot). `marks`, if set, gets the page's byte set
     * too (a write tracker's bitmap). A page that cannot be read is left to Python.
     * Without slots or marks, up to `readahead` unsaved pages behind it are saved and
     * unprotected with it (they hold the instant too; a writer faulting on one is woken
     * when its own fault is read). */
    uint64_t image;
    const int64_t *slots;
    int64_t pid;
    uint8_t *marks;
    /* UA_COPY: one byte per page, set when the source page holds only zeros (or NULL):
     * those are mapped with UFFDIO_ZEROPAGE, never copied (never with COPY_MODE_WP:
     * the kernel's zero page carries no write-protect bit, so Python leaves zeros off). */
    const uint8_t *zeros;
};

struct ua_fast_counts {
    uint64_t resolved; /* faults resolved by an ioctl */
    uint64_t eexist;   /* faults whose page was already there: woken */
    uint64_t filled;   /* bytes mapped in by COPY (readahead included) and ZEROPAGE */
};

static int wake_range(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &range);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int ua_resolve_batch(int uffd, const struct uffd_msg *msgs, int n, const struct ua_fast *f,
                     uint8_t *handled, struct ua_fast_counts *counts)
{
    uint64_t mask = ~(f->page_size - 1);
    uint64_t to_wake[256];
    int nwake = 0, done = 0;

    for (int i = 0; i < n; i++)
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
            return 0;
    for (int i = 0; i < n; i++) {
        uint64_t page = msgs[i].arg.pagefault.address & mask;
        uint64_t index = (page - f->base) / f->page_size;
        int rc;
        if (page < f->base || index >= f->pages)
            continue;
        int zero = f->kind == UA_COPY && f->zeros && f->zeros[index];
        if (zero) {
            uint64_t count = 1; /* readahead: the run of unpopulated zero pages behind it */
            if (f->populated)
                while (count <= f->readahead && index + count < f->pages &&
                       !f->populated[index + count] && f->zeros[index + count])
                    count++;
            struct uffdio_zeropage zp = {.range = {.start = page, .len = count * f->page_size}};
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
            if (rc != 0 && zp.zeropage >= (int64_t)f->page_size) {
                count = (uint64_t)zp.zeropage / f->page_size; /* the faulting page was mapped */
                rc = 0;
            }
            if (rc == 0) {
                counts->filled += f->page_size * count;
                if (f->populated) /* the whole zero run */
                    memset(f->populated + index, 1, count);
            }
        } else if (f->kind == UA_COPY) {
            uint64_t count = 1;
            if (f->populated) /* readahead: the run of unpopulated data pages behind it */
                while (count <= f->readahead && index + count < f->pages &&
                       !f->populated[index + count] && !(f->zeros && f->zeros[index + count]))
                    count++;
            struct uffdio_copy copy = {
                .dst = page,
                .src = f->source + index * f->page_size,
                .len = count * f->page_size,
                .mode = f->mode,
            };
            rc = ioctl(uffd, UFFDIO_COPY, &copy);
            if (rc != 0 && errno == ENOMEM) {
                /* hugetlbfs, a source page not mapped here yet: the kernel copied it
                 * through a temporary huge page (faulting the source in) and then
                 * found no page for the destination. Once more reads it in place,
                 * with one page (see "Kernel facts" in _uffd.py). */
                rc = ioctl(uffd, UFFDIO_COPY, &copy);
            }
            if (rc != 0 && copy.copy >= (int64_t)f->page_size) {
                /* Stopped part-way (a page behind was there already): the
                 * faulting page, first, was copied; the readahead is optional. */
                count = (uint64_t)copy.copy / f->page_size;
                rc = 0;
            }
            if (rc == 0) {
                counts->filled += count * f->page_size;
                if (f->populated)
                    memset(f->populated + index, 1, count);
            }
        } else if (f->kind == UA_ZEROPAGE) {
            struct uffdio_zeropage zero = {.range = {.start = page, .len = f->page_size}};
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zero);
            if (rc == 0)
                counts->filled += f->page_size;
        } else {
            uint64_t count = 1;
            if (f->kind == UA_SAVE && !f->populated[index]) {
                int64_t slot = f->slots ? f->slots[index] : (int64_t)index;
                if (slot >= 0) {
                    if (!f->slots && !f->marks) /* save ahead: the unsaved pages behind it */
                        while (count <= f->readahead && index + count < f->pages &&
                               !f->populated[index + count])
                            count++;
                    struct iovec local = {
                        .iov_base = (void *)(uintptr_t)(f->image + (uint64_t)slot * f->page_size),
                        .iov_len = count * f->page_size,
                    };
                    struct iovec remote = {.iov_base = (void *)(uintptr_t)page,
                                           .iov_len = count * f->page_size};
                    ssize_t got = process_vm_readv((pid_t)f->pid, &local, 1, &remote, 1, 0);
                    if (got < (ssize_t)f->page_size)
                        continue; /* unmapped meanwhile, say: Python decides */
                    count = (uint64_t)got / f->page_size;
                }
                memset(f->populated + index, 1, count);
            }
            if (f->kind == UA_SAVE && f->marks)
                f->marks[index] = 1;
            struct uffdio_writeprotect wp = {
                .range = {.start = page, .len = count * f->page_size},
                .mode = f->mode,
            };
            rc = ioctl(uffd, UFFDIO_WRITEPROTECT, &wp);
            if (rc == 0 && (f->mode & UFFDIO_WRITEPROTECT_MODE_DONTWAKE)) {
                if (nwake == (int)(sizeof to_wake / sizeof to_wake[0])) {
                    continue; /* no room to remember the wake: Python redoes it */
                }
                to_wake[nwake++] = page;
            }
        }
        if (rc != 0) {
            if (errno != EEXIST || wake_range(uffd, page, f->page_size) != 0)
                continue;
            counts->eexist++;
        } else {
            counts->resolved++;
        }
        if (f->populated)
            f->populated[index] = 1;
        handled[i] = 1;
        done++;
    }
    if (nwake) { /* DONTWAKE: wake each contiguous run once */
        qsort(to_wake, (size_t)nwake, sizeof to_wake[0], cmp_u64);
        uint64_t start = to_wake[0], end = to_wake[0];
        for (int i = 1; i < nwake; i++) {
            if (to_wake[i] == end + f->page_size) {
                end = to_wake[i];
            } else if (to_wake[i] != end) {
                wake_range(uffd, start, end - start + f->page_size);
                start = end = to_wake[i];
            }
        }
        wake_range(uffd, start, end - start + f->page_size);
    }
    return done;
}

/* Which pages of [addr, addr + pages * page_size) hold only zero bytes: out[i] = 1 for
 * those, 0 for the others. Reads each page until its first non-zero 64 bytes, so a data
 * page costs little and a zero page one pass. Returns how many are zero. */
uint64_t ua_zero_pages(uintptr_t addr, uint64_t pages, uint64_t page_size, uint8_t *out)
{
    uint64_t zero = 0;
    size_t words = page_size / sizeof(uint64_t);
    for (uint64_t i = 0; i < pages; i++) {
        const uint64_t *p = (const uint64_t *)(addr + i * page_size);
        uint64_t acc = 0;
        for (size_t w = 0; w + 8 <= words && acc == 0; w += 8)
            acc = p[w] | p[w + 1] | p[w + 2] | p[w + 3] | p[w + 4] | p[w + 5] | p[w + 6] |
                  p[w + 7];
        out[i] = acc == 0;
        zero += out[i];
    }
    return zero;
}

/* A working set replayed off the event loop (uffd_async/_restore/_native_replay.py).
 *
 * ua_replay copies runs of pages with UFFDIO_COPY (UFFDIO_ZEROPAGE for pages known to
 * hold only zeros) from a worker thread, without the GIL. While it runs it is also the
 * uffd's only reader (the event loop lends it the reads): between two copies of at most
 * ctl->slice_pages pages it reads what is pending and answers each page fault at once,
 * in C, with the rest of the fault's working-set run (a process ahead of the replay
 * touches the rest next) or, outside the set, `readahead` pages behind it. A fault in a
 * run ahead of the replay moves the replay past that run (the process is there now: the
 * runs it passed were faulted in), and a second pass picks up whatever was skipped.
 *
 * What it cannot answer goes back to the loop: a record that is not a page fault
 * (remove, remap, unmap, fork), a write-protect or minor fault, a fault outside every
 * part, an ioctl error but EEXIST. That record and every one read behind it are kept in
 * ctl->pending, in order, and the replay stops before its next copy: after a Remove is
 * read the kernel lets the discard go on, so no copy may follow that read (a copy then
 * would leave snapshot bytes where zeros belong), and the faults behind an event must be
 * answered by a resolver that has applied it.
 *
 * Each copy and each read hold ctl->lock (the bitmaps and counts are updated under it),
 * and ua_replay_quiesce takes it too: a close of the uffd waits out the copy in flight, so
 * no copy reaches a reused fd number. ua_replay_pause holds it for a consistent sample.
 *
 * Returns UA_REPLAY_DONE (every run gone through), UA_REPLAY_STOPPED (ctl->stop was set by
 * the loop), UA_REPLAY_EAGAIN (a copy met an unread event the reads did not bring:
 * the loop reads and plans again), UA_REPLAY_ERROR (ctl->error: ESRCH, the process is
 * gone, ...) or UA_REPLAY_HANDBACK (ctl->pending holds records for the loop). done[k] is
 * set for each run gone through.
 */
#include <sched.h>
#include <time.h>

enum {
    UA_REPLAY_DONE = 0,
    UA_REPLAY_STOPPED = 1,
    UA_REPLAY_EAGAIN = 2,
    UA_REPLAY_ERROR = 3,
    UA_REPLAY_HANDBACK = 4,
};

struct ua_replay_run {
    uint64_t dst;          /* address of the run's first page in the process */
    uint64_t src;          /* address of its bytes here */
    uint64_t pages;        /* pages in the run */
    uint64_t page_size;    /* a power of two */
    uint64_t mode;         /* UFFDIO_COPY mode bits (COPY_MODE_WP) */
    uint8_t *populated;    /* the run's first page's byte in its resolver's bitmap */
    const uint8_t *zeros;  /* its byte in the zero map (1: only zeros), or NULL */
    const uint8_t *blocked; /* its byte in the blocked map (1: removed since), or NULL */
};

/* A part of the process's memory whose faults the replay answers: ua_fast's COPY fields
 * (readahead: pages behind a fault outside the set), and for each page the run holding it. */
struct ua_replay_part {
    struct ua_fast fast;
    const int32_t *run_of;  /* per page: the index of the run holding it, or -1 */
    const uint8_t *blocked; /* per page: 1 where it needs the loop's decision, or NULL */
};

struct ua_replay_ctl {
    int32_t stop;          /* set: stop before the next copy */
    int32_t lock;          /* held around each copy and each read */
    int32_t event;         /* the first non-fault record handed back (its event), or 0 */
    int32_t want;          /* pausers waiting for the gate: they go first */
    uint64_t bytes_copied; /* bytes this replay mapped in (its answers' too) */
    uint64_t eexist;       /* pages found there already */
    int64_t error;         /* errno of UA_REPLAY_ERROR */
    uint64_t slice_pages;  /* the most pages one copy maps: a fault waits at most that */
    uint64_t set_runs;     /* runs [0, set_runs) are the working set's, the rest populate */
    int64_t set_done_ns;   /* CLOCK_MONOTONIC when the working set was gone through */
    uint8_t *done;         /* one byte per run: gone through */
    const struct ua_replay_part *parts;
    uint64_t nparts;
    uint64_t faults;       /* faults it answered */
    uint8_t *pending;      /* records handed back to the loop */
    uint64_t pending_len;  /* bytes of them */
    uint64_t pending_cap;  /* room: at least UA_REPLAY_READ records */
    uint64_t jumps;        /* times a fault moved the replay past runs */
    uint64_t zero_bytes;   /* of bytes_copied, those mapped with ZEROPAGE */
};

enum { UA_REPLAY_READ = 64 }; /* records one read asks for */

static void gate_lock(int32_t *lock)
{
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void gate_unlock(int32_t *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Map `pages` pages at dst from src (or zero pages), holding the gate: pages mapped, or
 * -errno when none was. Stops part-way at a page already there (EEXIST) or an unread
 * event (EAGAIN with a count). */
static int64_t map_pages(int uffd, uint64_t dst, uint64_t src, uint64_t pages, uint64_t page_size,
                         uint64_t mode, int zero, struct ua_replay_ctl *ctl)
{
    int64_t done;
    int rc, err;
    if (zero) {
        struct uffdio_zeropage zp = {.range = {.start = dst, .len = pages * page_size}};
        rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
        err = errno;
        done = rc == 0 ? (int64_t)pages : zp.zeropage > 0 ? zp.zeropage / (int64_t)page_size : 0;
    } else {
        struct uffdio_copy copy = {.dst = dst, .src = src, .len = pages * page_size, .mode = mode};
        rc = ioctl(uffd, UFFDIO_COPY, &copy);
        if (rc != 0 && errno == ENOMEM && copy.copy <= 0) /* hugetlbfs: see ua_resolve_batch */
            rc = ioctl(uffd, UFFDIO_COPY, &copy);
        err = errno;
        done = rc == 0 ? (int64_t)pages : copy.copy > 0 ? copy.copy / (int64_t)page_size : 0;
    }
    if (done > 0) {
        ctl->bytes_copied += (uint64_t)done * page_size;
        if (zero)
            ctl->zero_bytes += (uint64_t)done * page_size;
    }
    return done > 0 ? done : -(int64_t)err;
}

/* Where the run of pages from `i` like page i ends (at `limit` at the most): missing, not
 * blocked, and zero pages or data pages as page i is (one ioctl maps one or the other). */
static uint64_t like_run(const uint8_t *populated, const uint8_t *blocked, const uint8_t *zeros,
                         uint64_t i, uint64_t limit)
{
    int zero = zeros && zeros[i];
    uint64_t j = i + 1;
    while (j < limit && !populated[j] && (!blocked || !blocked[j]) && (!zeros || zeros[j] == zero))
        j++;
    return j;
}

/* Answer the fault at `address` in part p: 0, or -1 to hand it back. `*jump` becomes the
 * run after the fault's, when the fault is in a working-set run. */
static int answer(int uffd, const struct ua_replay_part *p, const struct ua_replay_run *runs,
                  uint64_t address, struct ua_replay_ctl *ctl, uint64_t *jump)
{
    const struct ua_fast *f = &p->fast;
    uint64_t page = address & ~(f->page_size - 1);
    uint64_t index = (page - f->base) / f->page_size;
    int32_t run = p->run_of ? p->run_of[index] : -1;
    uint64_t end = index + 1 + f->readahead;
    if (run >= 0) {
        const struct ua_replay_run *r = &runs[run];
        end = (r->dst - f->base) / f->page_size + r->pages;
        if ((uint64_t)run + 1 > *jump)
            *jump = (uint64_t)run + 1;
    }
    if (end > f->pages)
        end = f->pages;
    if (p->blocked && p->blocked[index])
        return -1; /* removed since: zeros, the loop's to map */
    if (f->populated[index]) { /* mapped since it faulted: the copy that mapped it woke it */
        ctl->faults++;
        return 0;
    }
    int zero = f->zeros && f->zeros[index];
    uint64_t count = like_run(f->populated, p->blocked, f->zeros, index, end) - index;
    int64_t done = map_pages(uffd, page, f->source + index * f->page_size, count, f->page_size,
                             f->mode, zero, ctl);
    if (done == -EEXIST) { /* there already (the replay got there first): wake the thread */
        ctl->eexist++;
        done = wake_range(uffd, page, f->page_size) == 0 ? 1 : -1;
        if (done < 0)
            return -1;
    } else if (done < 0) {
        return -1; /* EAGAIN, ENOENT, ESRCH...: the loop knows what each means */
    }
    memset(f->populated + index, 1, (size_t)done);
    ctl->faults++;
    return 0;
}

/* The part holding `address`, or NULL: the parts are sorted by base and do not overlap
 * (a layered snapshot has one a span), so the last one starting at or below it. */
static const struct ua_replay_part *part_of(const struct ua_replay_ctl *ctl, uint64_t address)
{
    uint64_t lo = 0, hi = ctl->nparts; /* parts [0, lo) start at or below address */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (ctl->parts[mid].fast.base <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct ua_fast *f = &ctl->parts[lo - 1].fast;
    if ((address - f->base) / f->page_size < f->pages)
        return &ctl->parts[lo - 1];
    return NULL;
}

/* Read what is pending, holding the gate, and answer the page faults; from the first record
 * it cannot answer on, everything read goes to ctl->pending. Returns UA_REPLAY_HANDBACK
 * then, else -1: go on. */
static int serve_pending(int uffd, const struct ua_replay_run *runs, struct ua_replay_ctl *ctl,
                         uint64_t *jump)
{
    struct uffd_msg msgs[UA_REPLAY_READ];
    for (;;) {
        ssize_t got = read(uffd, msgs, sizeof msgs);
        if (got <= 0)
            return -1; /* EAGAIN: nothing pending (EBADF: the close is the loop's to see) */
        size_t n = (size_t)got / sizeof msgs[0];
        for (size_t i = 0; i < n; i++) {
            const struct uffd_msg *m = &msgs[i];
            const struct ua_replay_part *p = NULL;
            if (m->event == UFFD_EVENT_PAGEFAULT &&
                !(m->arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)))
                p = part_of(ctl, m->arg.pagefault.address);
            if (p && answer(uffd, p, runs, m->arg.pagefault.address, ctl, jump) == 0)
                continue;
            size_t bytes = (n - i) * sizeof msgs[0];
            if (ctl->pending_len + bytes > ctl->pending_cap)
                bytes = 0; /* cannot happen: one read per hand-back, and room for one */
            memcpy(ctl->pending + ctl->pending_len, m, bytes);
            ctl->pending_len += bytes;
            for (size_t k = i; k < n && !ctl->event; k++)
                if (msgs[k].event != UFFD_EVENT_PAGEFAULT)
                    ctl->event = msgs[k].event;
            __atomic_store_n(&ctl->stop, 1, __ATOMIC_RELEASE);
            return UA_REPLAY_HANDBACK;
        }
        if (n < UA_REPLAY_READ)
            return -1;
    }
}

/* Go through run k: its missing pages, a slice at a time, serving between slices. Returns
 * a UA_REPLAY_*, or -1 when the run was gone through, -2 when (following the faults) a
 * fault moved the replay past it (*jump). */
static int replay_run(int uffd, const struct ua_replay_run *runs, uint64_t k,
                      struct ua_replay_ctl *ctl, uint64_t *jump, int follow)
{
    const struct ua_replay_run *r = &runs[k];
    uint64_t i = 0, spins = 0;
    while (i < r->pages) {
        if (r->populated[i] || (r->blocked && r->blocked[i])) {
            i++;
            continue;
        }
        int zero = r->zeros && r->zeros[i];
        uint64_t limit = r->pages - i > ctl->slice_pages ? i + ctl->slice_pages : r->pages;
        uint64_t j = like_run(r->populated, r->blocked, r->zeros, i, limit);
        while (__atomic_load_n(&ctl->want, __ATOMIC_ACQUIRE))
            sched_yield(); /* a pause waits: it goes first */
        gate_lock(&ctl->lock);
        int status = -1;
        if (__atomic_load_n(&ctl->stop, __ATOMIC_ACQUIRE))
            status = UA_REPLAY_STOPPED;
        else
            status = serve_pending(uffd, runs, ctl, jump);
        int past = follow && *jump > k + 1;
        if (status >= 0 || r->populated[i] || past) {
            gate_unlock(&ctl->lock);
            if (status >= 0)
                return status;
            if (past)
                return -2; /* the process is past this run: go where it is */
            continue;      /* an answer just mapped this page */
        }
        int64_t done = map_pages(uffd, r->dst + i * r->page_size, r->src + i * r->page_size,
                                 j - i, r->page_size, r->mode, zero, ctl);
        if (done > 0) /* marked under the gate: a paused replay's counts match its bitmaps */
            memset(r->populated + i, 1, (size_t)done);
        else if (done == -EEXIST)
            r->populated[i] = 1;
        gate_unlock(&ctl->lock);
        if (done > 0) {
            i += (uint64_t)done;
        } else if (done == -EEXIST) { /* a fault's answer got there first: skip that page */
            i++;
            ctl->eexist++;
        } else if (done == -ENOENT) { /* the range went away: skip it */
            i = j;
        } else if (done == -EAGAIN) { /* an event is unread: the next read brings it */
            if (++spins > 1000)
                return UA_REPLAY_EAGAIN;
            sched_yield();
        } else {
            ctl->error = -done;
            return UA_REPLAY_ERROR;
        }
    }
    return -1;
}

int ua_replay(int uffd, const struct ua_replay_run *runs, uint64_t n, struct ua_replay_ctl *ctl)
{
    uint64_t jump = 0;
    /* The working set in order, moving past where the process faults; then what that
     * skipped; then the runs that populate the rest. */
    for (int pass = 0; pass < 3; pass++) {
        uint64_t lo = pass < 2 ? 0 : ctl->set_runs, hi = pass < 2 ? ctl->set_runs : n;
        for (uint64_t k = lo; k < hi; k++) {
            if (ctl->done[k])
                continue;
            int status = replay_run(uffd, runs, k, ctl, &jump, pass == 0);
            if (status >= 0)
                return status;
            if (status == -2) {
                k = jump - 1; /* the loop's k++ takes it there */
                ctl->jumps++;
            }
            else
                ctl->done[k] = 1;
        }
        if (pass == 1 && !ctl->set_done_ns)
            ctl->set_done_ns = now_ns();
    }
    return UA_REPLAY_DONE;
}

/* Hold the replay between two copies (its counts and bitmaps agree then), and let it go. */
void ua_replay_pause(struct ua_replay_ctl *ctl)
{
    __atomic_add_fetch(&ctl->want, 1, __ATOMIC_ACQ_REL);
    gate_lock(&ctl->lock);
    __atomic_sub_fetch(&ctl->want, 1, __ATOMIC_ACQ_REL);
}

void ua_replay_resume(struct ua_replay_ctl *ctl) { gate_unlock(&ctl->lock); }

/* Stop the replay and wait out its copy in flight (the uffd is about to be closed). */
void ua_replay_quiesce(struct ua_replay_ctl *ctl)
{
    __atomic_store_n(&ctl->stop, 1, __ATOMIC_RELEASE);
    ua_replay_pause(ctl);
    gate_unlock(&ctl->lock);
}
