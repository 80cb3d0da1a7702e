/* Scenario 6's floor: the time to UFFDIO_COPY a working set into a registered region
 * with no process running, no fault to read, no event loop: one ioctl per run.
 *
 *   int64_t bench_floor_copy(const char *snapshot, const uint32_t *runs, uint64_t count,
 *                            uint64_t pages);
 *
 * It maps SNAPSHOT read-only and shared, with MAP_POPULATE (its page-table entries are
 * in place before the clock starts, as they are in a server that has served this
 * snapshot before), maps PAGES anonymous 4 KiB pages, opens a userfaultfd and registers
 * the region MISSING. The clock then covers exactly the copies: for each of the COUNT
 * (first page, pages) pairs in RUNS, one UFFDIO_COPY from the snapshot into the region
 * (a short copy is continued where it stopped). Untimed, every copied page is compared
 * with the snapshot. Returns the nanoseconds the copies took, or -errno (a page that
 * differs: -EIO; a run past PAGES or the snapshot: -EINVAL).
 *
 * Kernel facts this file relies on:
 * - UFFDIO_COPY into a registered MISSING range nobody faulted on needs no wake, and
 *   with no event pending it does not fail with EAGAIN; it may copy less than asked
 *   (copy.copy holds the bytes done), and fails with EEXIST only for a page that is
 *   already there (none is: each run is copied once, and runs do not overlap).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int copy_run(int uffd, uint8_t *base, const uint8_t *source, uint64_t first,
                    uint64_t pages)
{
    uint64_t done = 0, want = pages * PAGE;
    while (done < want) {
        struct uffdio_copy copy = {
            .dst = (uintptr_t)(base + first * PAGE + done),
            .src = (uintptr_t)(source + first * PAGE + done),
            .len = want - done,
            .mode = 0,
        };
        if (ioctl(uffd, UFFDIO_COPY, &copy) == 0) {
            done = want;
        } else if (copy.copy > 0) {
            done += (uint64_t)copy.copy;
        } else if (errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

int64_t bench_floor_copy(const char *snapshot, const uint32_t *runs, uint64_t count,
                         uint64_t pages)
{
    int64_t result = -EINVAL;
    uint64_t size = pages * PAGE;
    int fd = open(snapshot, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < size) {
        close(fd);
        return -EINVAL;
    }
    for (uint64_t r = 0; r < count; r++)
        if ((uint64_t)runs[2 * r] + runs[2 * r + 1] > pages) {
            close(fd);
            return -EINVAL;
        }
    const uint8_t *source = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (source == MAP_FAILED)
        return -errno;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        result = -errno;
        munmap((void *)source, size);
        return result;
    }
    int uffd = (int)syscall(SYS_userfaultfd, O_NONBLOCK | O_CLOEXEC);
    struct uffdio_api api = {.api = UFFD_API};
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = size},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) != 0 ||
        ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
        result = -errno;
        goto out;
    }
    int64_t start = now_ns();
    for (uint64_t r = 0; r < count; r++) {
        int err = copy_run(uffd, base, source, runs[2 * r], runs[2 * r + 1]);
        if (err) {
            result = err;
            goto out;
        }
    }
    result = now_ns() - start;
    for (uint64_t r = 0; r < count; r++) {
        uint64_t at = runs[2 * r] * PAGE, bytes = runs[2 * r + 1] * PAGE;
        if (memcmp(base + at, source + at, bytes) != 0) {
            result = -EIO;
            break;
        }
    }
out:
    if (uffd >= 0)
        close(uffd);
    munmap(base, size);
    munmap((void *)source, size);
    return result;
}
