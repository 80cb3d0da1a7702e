/* Scenarios 6, 7 and 10's restored process: hands its memory over as Firecracker
 * 1.12 does, then touches a working set and says how long that took.
 *
 *   restore_peer SOCKET SNAPSHOT SET PAGES WAIT [THREADS [CHECK]]
 *
 * It maps PAGES anonymous 4 KiB pages, opens a userfaultfd the way
 * Firecracker's UffdBuilder does (non-blocking, close-on-exec, EVENT_REMOVE),
 * registers the mapping MISSING, connects to SOCKET and sends one message:
 *   [{"base_host_virt_addr":A,"size":S,"offset":0,"page_size":4096,"page_size_kib":4096}]
 * (1.12's serde_json output, page_size_kib holding bytes as that release
 * does) with the uffd as the only SCM_RIGHTS fd, and keeps the connection
 * open until it exits, as 1.12 does. The clock starts as sendmsg is called.
 * With WAIT=1 it then blocks until one byte arrives on stdin (the handler's
 * "go": REAP-style and eager handlers copy first and only then let it run).
 *
 * SET is the working set to touch: native-endian uint32 pairs (first page,
 * pages), in touch order; each run is read in address order, one 8-byte load
 * per page. The load must return the snapshot's first word of that page (the
 * pattern of benchmarks/c/workload.c's bench_fill_pattern, computed here), so
 * a page copied from the wrong place fails the run at once. With CHECK "file"
 * (scenario 10: a real memory image, not the pattern) the word to expect is
 * read from SNAPSHOT instead, for every page of SET, before the handshake;
 * CHECK "pattern" is the default. The clock stops after the last page. Then, untimed, every touched page is compared whole
 * with SNAPSHOT (mapped read-only).
 *
 * THREADS (default 1): with more than one, the runs are dealt round-robin
 * (thread t reads runs t, t + THREADS, ...), each thread reading its own in
 * order. The threads are started before the handshake and released together
 * right after it (or after the go byte); the clock stops when the last one has
 * read its last page, and first_ns is the earliest first page of any of them.
 *
 * Output, one line on stdout: "ready_ns first_ns pages": handshake sent to
 * working set touched, handshake sent to the first page read, pages touched;
 * with CHECK "file", a fourth field: the CLOCK_MONOTONIC instant the clock
 * started (so that many processes restored at once can be timed together).
 * Any failure: a message on stderr and exit status 1 (setup) or 3 (a wrong
 * page). alarm(120): a page that never comes ends this process, not the run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
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

/* One thread's share of the set: runs index, index + step, ... */
struct share {
    const uint32_t *set;
    uint64_t runs, index, step;
    const uint8_t *base;
    const uint64_t *expect; /* CHECK "file": each page's first word; else the pattern */
    pthread_barrier_t *go;
    int64_t first;
    uint64_t touched;
    int bad; /* a load returned a wrong word: which page, what word */
    uint64_t bad_page, bad_word;
};

static void touch_share(struct share *share)
{
    for (uint64_t r = share->index; r < share->runs; r += share->step) {
        uint64_t from = share->set[2 * r], to = from + share->set[2 * r + 1];
        for (uint64_t i = from; i < to; i++) {
            uint64_t word = *(volatile const uint64_t *)(share->base + i * PAGE);
            if (word != (share->expect ? share->expect[i] : first_word(i))) {
                share->bad = 1;
                share->bad_page = i;
                share->bad_word = word;
                return;
            }
            if (!share->touched++)
                share->first = now_ns();
        }
    }
}

static void *share_thread(void *arg)
{
    struct share *share = arg;
    pthread_barrier_wait(share->go);
    touch_share(share);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 8) {
        fprintf(stderr, "usage: restore_peer SOCKET SNAPSHOT SET PAGES WAIT [THREADS [CHECK]]\n");
        return 2;
    }
    alarm(120);
    uint64_t pages = strtoull(argv[4], NULL, 10);
    int wait_go = atoi(argv[5]);
    long threads = argc >= 7 ? atol(argv[6]) : 1;
    int check_file = argc == 8 && strcmp(argv[7], "file") == 0;
    if (argc == 8 && !check_file && strcmp(argv[7], "pattern") != 0) {
        fprintf(stderr, "restore_peer: CHECK must be pattern or file\n");
        return 2;
    }
    if (threads < 1 || threads > 1024) {
        fprintf(stderr, "restore_peer: THREADS must be 1 to 1024\n");
        return 2;
    }
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
    uint64_t *expect = NULL;
    if (check_file) {
        expect = malloc(pages * sizeof *expect);
        if (expect == NULL)
            die("malloc");
        for (uint64_t r = 0; r < runs; r++)
            for (uint64_t i = set[2 * r]; i < (uint64_t)set[2 * r] + set[2 * r + 1]; i++)
                memcpy(&expect[i], snapshot + i * PAGE, sizeof *expect);
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

    /* With THREADS > 1 the readers wait at the barrier from now on, so that
     * creating them is not timed. */
    struct share *shares = calloc((size_t)threads, sizeof *shares);
    pthread_t *tids = calloc((size_t)threads, sizeof *tids);
    pthread_barrier_t go_barrier;
    if (shares == NULL || tids == NULL)
        die("calloc");
    if (threads > 1 && pthread_barrier_init(&go_barrier, NULL, (unsigned)threads + 1) != 0)
        die("pthread_barrier_init");
    for (long t = 0; t < threads; t++) {
        shares[t] = (struct share){.set = set, .runs = runs, .index = (uint64_t)t,
                                   .step = (uint64_t)threads, .base = base, .expect = expect,
                                   .go = &go_barrier};
        if (threads > 1) {
            errno = pthread_create(&tids[t], NULL, share_thread, &shares[t]);
            if (errno != 0)
                die("pthread_create");
        }
    }

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
    /* The clock starts just before sendmsg: taken after it, it could start late, as the
     * server that the message wakes may take this CPU and run a whole copy-first
     * restore before this process runs again (on 2 loaded cores it did: REAP-style
     * and eager then measured ~0 ms). */
    int64_t start = now_ns();
    if (sendmsg(sock, &msg, 0) != length)
        die("sendmsg");

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
    if (threads == 1) {
        touch_share(&shares[0]);
    } else {
        pthread_barrier_wait(&go_barrier);
        for (long t = 0; t < threads; t++)
            pthread_join(tids[t], NULL);
    }
    int64_t ready = now_ns();
    int64_t first = 0;
    uint64_t touched = 0;
    for (long t = 0; t < threads; t++) {
        struct share *share = &shares[t];
        if (share->bad) {
            fprintf(stderr, "restore_peer: page %llu starts with %#llx, not %#llx\n",
                    (unsigned long long)share->bad_page, (unsigned long long)share->bad_word,
                    (unsigned long long)(expect ? expect[share->bad_page]
                                                : first_word(share->bad_page)));
            return 3;
        }
        if (share->touched && (!touched || share->first < first))
            first = share->first;
        touched += share->touched;
    }

    for (uint64_t r = 0; r < runs; r++) {
        uint64_t at = set[2 * r] * PAGE, bytes = set[2 * r + 1] * PAGE;
        if (memcmp(base + at, snapshot + at, bytes) != 0) {
            fprintf(stderr, "restore_peer: a page of run %llu (pages %u..) differs from the "
                    "snapshot\n", (unsigned long long)r, set[2 * r]);
            return 3;
        }
    }
    if (check_file) /* and when the clock started (CLOCK_MONOTONIC: comparable across processes) */
        printf("%lld %lld %llu %lld\n", (long long)(ready - start), (long long)(first - start),
               (unsigned long long)touched, (long long)start);
    else
        printf("%lld %lld %llu\n", (long long)(ready - start), (long long)(first - start),
               (unsigned long long)touched);
    fflush(stdout);
    close(sock);
    return 0;
}
