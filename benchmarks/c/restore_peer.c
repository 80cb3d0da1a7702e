/* Scenario 6's restored process: hands its memory over as Firecracker 1.12
 * does, then touches a boot-like working set and says how long that took.
 *
 *   restore_peer SOCKET SNAPSHOT SET PAGES WAIT
 *
 * It maps PAGES anonymous 4 KiB pages, opens a userfaultfd the way
 * Firecracker's UffdBuilder does (non-blocking, close-on-exec, EVENT_REMOVE),
 * registers the mapping MISSING, connects to SOCKET and sends one message:
 *   [{"base_host_virt_addr":A,"size":S,"offset":0,"page_size":4096,"page_size_kib":4096}]
 * (1.12's serde_json output, page_size_kib holding bytes as that release
 * does) with the uffd as the only SCM_RIGHTS fd, and keeps the connection
 * open until it exits, as 1.12 does. The clock starts when sendmsg returns.
 * With WAIT=1 it then blocks until one byte arrives on stdin (the handler's
 * "go": REAP-style and eager handlers copy first and only then let it run).
 *
 * SET is the working set to touch: native-endian uint32 pairs (first page,
 * pages), in touch order; each run is read in address order, one 8-byte load
 * per page. The load must return the snapshot's first word of that page (the
 * pattern of benchmarks/c/workload.c's bench_fill_pattern, computed here), so
 * a page copied from the wrong place fails the run at once. The clock stops
 * after the last page. Then, untimed, every touched page is compared whole
 * with SNAPSHOT (mapped read-only).
 *
 * Output, one line on stdout: "ready_ns first_ns pages": handshake sent to
 * working set touched, handshake sent to the first page read, pages touched.
 * Any failure: a message on stderr and exit status 1 (setup) or 3 (a wrong
 * page). alarm(120): a page that never comes ends this process, not the run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL

static void die(const char *what)
{
    fprintf(stderr, "restore_peer: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The first word bench_fill_pattern writes into page i. */
static uint64_t first_word(uint64_t i)
{
    uint64_t x = ((i + 1) * 0x9E3779B97F4A7C15ULL) ^ 0xD1B54A32D192ED03ULL;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static void *map_file(const char *path, uint64_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) != 0)
        die("fstat");
    *size = (uint64_t)st.st_size;
    void *at = *size ? mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    if (at == MAP_FAILED)
        die("mmap");
    close(fd);
    return at;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: restore_peer SOCKET SNAPSHOT SET PAGES WAIT\n");
        return 2;
    }
    alarm(120);
    uint64_t pages = strtoull(argv[4], NULL, 10);
    int wait_go = atoi(argv[5]);
    uint64_t snapshot_size, set_bytes;
    const uint8_t *snapshot = map_file(argv[2], &snapshot_size);
    const uint32_t *set = map_file(argv[3], &set_bytes);
    uint64_t runs = set_bytes / (2 * sizeof *set);
    if (pages == 0 || snapshot_size < pages * PAGE) {
        fprintf(stderr, "restore_peer: the snapshot holds fewer than %llu pages\n",
                (unsigned long long)pages);
        return 1;
    }
    for (uint64_t r = 0; r < runs; r++) {
        if ((uint64_t)set[2 * r] + set[2 * r + 1] > pages) {
            fprintf(stderr, "restore_peer: run %llu is past the end\n", (unsigned long long)r);
            return 1;
        }
    }

    int uffd = (int)syscall(SYS_userfaultfd, O_NONBLOCK | O_CLOEXEC);
    if (uffd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    if (ioctl(uffd, UFFDIO_API, &api) != 0)
        die("UFFDIO_API");
    uint64_t size = pages * PAGE;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        die("mmap");
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = size},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
        die("UFFDIO_REGISTER");

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof addr.sun_path) {
        fprintf(stderr, "restore_peer: socket path too long\n");
        return 1;
    }
    strcpy(addr.sun_path, argv[1]);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0)
        die("connect");
    char json[256];
    int length = snprintf(json, sizeof json,
                          "[{\"base_host_virt_addr\":%llu,\"size\":%llu,\"offset\":0,"
                          "\"page_size\":%llu,\"page_size_kib\":%llu}]",
                          (unsigned long long)(uintptr_t)base, (unsigned long long)size, PAGE,
                          PAGE);
    struct iovec iov = {.iov_base = json, .iov_len = (size_t)length};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &uffd, sizeof uffd);
    if (sendmsg(sock, &msg, 0) != length)
        die("sendmsg");
    int64_t start = now_ns();

    if (wait_go) {
        char go;
        ssize_t got;
        do
            got = read(0, &go, 1);
        while (got < 0 && errno == EINTR);
        if (got != 1) {
            fprintf(stderr, "restore_peer: no go byte on stdin\n");
            return 1;
        }
    }
    int64_t first = 0;
    uint64_t touched = 0;
    for (uint64_t r = 0; r < runs; r++) {
        for (uint64_t i = set[2 * r]; i < (uint64_t)set[2 * r] + set[2 * r + 1]; i++) {
            uint64_t word = *(volatile uint64_t *)(base + i * PAGE);
            if (word != first_word(i)) {
                fprintf(stderr, "restore_peer: page %llu starts with %#llx, not %#llx\n",
                        (unsigned long long)i, (unsigned long long)word,
                        (unsigned long long)first_word(i));
                return 3;
            }
            if (!touched++)
                first = now_ns();
        }
    }
    int64_t ready = now_ns();

    for (uint64_t r = 0; r < runs; r++) {
        uint64_t at = set[2 * r] * PAGE, bytes = set[2 * r + 1] * PAGE;
        if (memcmp(base + at, snapshot + at, bytes) != 0) {
            fprintf(stderr, "restore_peer: a page of run %llu (pages %u..) differs from the "
                    "snapshot\n", (unsigned long long)r, set[2 * r]);
            return 3;
        }
    }
    printf("%lld %lld %llu\n", (long long)(ready - start), (long long)(first - start),
           (unsigned long long)touched);
    fflush(stdout);
    close(sock);
    return 0;
}
