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
        if (f->kind == UA_COPY) {
            uint64_t count = 1;
            if (f->populated) /* readahead: the run of unpopulated pages behind it */
                while (count <= f->readahead && index + count < f->pages &&
                       !f->populated[index + count])
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
