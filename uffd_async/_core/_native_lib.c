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
 * ua_replay copies runs of pages with UFFDIO_COPY from a worker thread, without the
 * GIL, while the event loop serves the demand faults. Each run names its destination,
 * its source, its page size and mode, and its resolver's populated bitmap (one byte a
 * page: populated pages are skipped, and copied ones are marked).
 *
 * The one hazard is a Remove (MADV_DONTNEED) read by the server between two copies: the
 * kernel lets the discard go on once its event is read, so a copy issued after that read
 * could put snapshot bytes where the discard leaves zeros, at a place the resolver
 * already knows is gone. So each copy and each read of the uffd's records hold the same
 * gate (ctl->lock): the loop reads through ua_gated_read, which stops the replay (at its
 * next run) when a record is not a page fault. A copy is then either wholly before the
 * read (and the discard that follows drops it) or never issued. A reader waiting for the
 * gate goes first (ctl->want): the replay waits out at most one copy.
 *
 * Returns UA_REPLAY_DONE (every run gone through), UA_REPLAY_STOPPED (ctl->stop was set:
 * by the loop, or by an event read), UA_REPLAY_EAGAIN (an event is unread: the loop reads
 * it and plans again) or UA_REPLAY_ERROR (ctl->error: ESRCH, the process is gone, ...).
 * ctl->runs_done counts the runs gone through; a run stopped part-way is not counted.
 */
#include <sched.h>

enum { UA_REPLAY_DONE = 0, UA_REPLAY_STOPPED = 1, UA_REPLAY_EAGAIN = 2, UA_REPLAY_ERROR = 3 };

struct ua_replay_run {
    uint64_t dst;       /* address of the run's first page in the process */
    uint64_t src;       /* address of its bytes here */
    uint64_t pages;     /* pages in the run */
    uint64_t page_size; /* a power of two */
    uint64_t mode;      /* UFFDIO_COPY mode bits (COPY_MODE_WP) */
    uint8_t *populated; /* the run's first page's byte in its resolver's bitmap */
};

struct ua_replay_ctl {
    int32_t stop;          /* set: stop before the next copy */
    int32_t lock;          /* held around each copy and each gated read */
    int32_t want;          /* readers waiting for the gate */
    int32_t event;         /* the first non-fault record a gated read saw (its event) */
    uint64_t runs_done;    /* runs gone through */
    uint64_t bytes_copied; /* bytes this replay copied */
    uint64_t eexist;       /* pages found there already (a demand fault got there first) */
    int64_t error;         /* errno of UA_REPLAY_ERROR */
};

static void gate_lock(int32_t *lock)
{
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void gate_unlock(int32_t *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

/* Copy pages [i, j) of run r, holding the gate; returns a UA_REPLAY_* or -1: go on. */
static int replay_copy(int uffd, const struct ua_replay_run *r, uint64_t i, uint64_t j,
                       struct ua_replay_ctl *ctl, uint64_t *next)
{
    while (__atomic_load_n(&ctl->want, __ATOMIC_ACQUIRE))
        sched_yield(); /* a read waits: it goes first */
    gate_lock(&ctl->lock);
    if (__atomic_load_n(&ctl->stop, __ATOMIC_ACQUIRE)) {
        gate_unlock(&ctl->lock);
        return UA_REPLAY_STOPPED;
    }
    struct uffdio_copy copy = {
        .dst = r->dst + i * r->page_size,
        .src = r->src + i * r->page_size,
        .len = (j - i) * r->page_size,
        .mode = r->mode,
    };
    int rc = ioctl(uffd, UFFDIO_COPY, &copy);
    if (rc != 0 && errno == ENOMEM && copy.copy <= 0) /* hugetlbfs: see ua_resolve_batch */
        rc = ioctl(uffd, UFFDIO_COPY, &copy);
    int err = rc != 0 ? errno : 0;
    uint64_t done = rc == 0 ? j - i : copy.copy > 0 ? (uint64_t)copy.copy / r->page_size : 0;
    if (done) {
        memset(r->populated + i, 1, done);
        ctl->bytes_copied += done * r->page_size;
    }
    gate_unlock(&ctl->lock);
    *next = i + done;
    if (rc == 0 || done) /* stopped part-way (EAGAIN with a count): go on */
        return -1;
    if (err == EEXIST) { /* a demand fault got there first: skip that page */
        r->populated[i] = 1;
        ctl->eexist++;
        *next = i + 1;
        return -1;
    }
    if (err == ENOENT) { /* the range went away: skip it */
        *next = j;
        return -1;
    }
    if (err == EAGAIN)
        return UA_REPLAY_EAGAIN;
    ctl->error = err;
    return UA_REPLAY_ERROR;
}

int ua_replay(int uffd, const struct ua_replay_run *runs, uint64_t n, struct ua_replay_ctl *ctl)
{
    for (uint64_t k = ctl->runs_done; k < n; k++) {
        const struct ua_replay_run *r = &runs[k];
        uint64_t i = 0; /* stop is checked under the gate, before each copy */
        while (i < r->pages) {
            if (r->populated[i]) {
                i++;
                continue;
            }
            uint64_t j = i + 1;
            while (j < r->pages && !r->populated[j])
                j++;
            int status = replay_copy(uffd, r, i, j, ctl, &i);
            if (status >= 0)
                return status;
        }
        ctl->runs_done = k + 1;
    }
    return UA_REPLAY_DONE;
}

/* read() from the uffd holding the replay's gate; a record that is not a page fault
 * (remove, remap, unmap, fork) stops the replay before its next copy. Returns the
 * bytes read, or -errno. */
int64_t ua_gated_read(int fd, void *buf, uint64_t len, struct ua_replay_ctl *ctl)
{
    __atomic_add_fetch(&ctl->want, 1, __ATOMIC_ACQ_REL);
    gate_lock(&ctl->lock);
    __atomic_sub_fetch(&ctl->want, 1, __ATOMIC_ACQ_REL);
    ssize_t got = read(fd, buf, (size_t)len);
    int err = errno;
    if (got > 0) {
        const struct uffd_msg *msgs = buf;
        for (size_t i = 0; i < (size_t)got / sizeof *msgs; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) {
                if (!ctl->event)
                    ctl->event = msgs[i].event;
                __atomic_store_n(&ctl->stop, 1, __ATOMIC_RELEASE);
            }
        }
    }
    gate_unlock(&ctl->lock);
    return got < 0 ? -(int64_t)err : (int64_t)got;
}
