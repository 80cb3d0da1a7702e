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
