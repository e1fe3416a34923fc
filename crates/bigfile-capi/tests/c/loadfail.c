/* A failing loadblk: retried per the load policy; a load that succeeds on a
 * retry is served; one that keeps failing is an error from prefault, and
 * SIGBUS after a diagnostic for a thread touching the page (in a child). */
#include "common.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>

static atomic_int attempts;

static int failing_loadblk(void *user, uint64_t blk, void *buf, size_t len) {
    (void)user, (void)buf, (void)len;
    int n = atomic_fetch_add(&attempts, 1) + 1;
    fprintf(stderr, "loadblk attempt %d\n", n);
    char msg[64];
    snprintf(msg, sizeof msg, "medium error at block %llu", (unsigned long long)blk);
    return bigfile_block_error(msg);
}

static bigfile_fileh *failing_fh;

/* A mapping of 8 blocks of a file whose loadblk always fails. */
static bigfile_vma *failing_mapping(void) {
    bigfile_file *file = bigfile_file_new(BLK, failing_loadblk, NULL, NULL, NULL);
    CHECK(file != NULL);
    CHECK(bigfile_file_set_name(file, "failing-disk") == 0);
    failing_fh = bigfile_fileh_open(file, NULL);
    CHECK(failing_fh != NULL);
    CHECK(bigfile_fileh_set_load_policy(failing_fh, 3, 0) == 0);
    bigfile_vma *vma = bigfile_fileh_mmap(failing_fh, 0, 8);
    CHECK(vma != NULL);
    bigfile_file_free(file);
    return vma;
}

/* The child: touch block 5, which cannot be loaded. */
static void child(int err_fd) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    dup2(err_fd, STDERR_FILENO);
    volatile unsigned char *p = bigfile_vma_addr(failing_mapping());
    unsigned char b = p[5 * BLK];
    printf("child survived reading %u\n", b);
    _exit(0);
}

int main(void) {
    start("loadfail");
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        child(fds[1]);
    }
    close(fds[1]);
    char err[8192];
    size_t n = 0;
    ssize_t r;
    while (n < sizeof err - 1 && (r = read(fds[0], err + n, sizeof err - 1 - n)) > 0)
        n += (size_t)r;
    err[n] = 0;
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    printf("child's stderr:\n%s", err);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS);
    const char *a3 = strstr(err, "loadblk attempt 3");
    const char *diag = strstr(err, "loadblk of block 5 of failing-disk failed after 3 attempt(s): "
                                   "medium error at block 5");
    CHECK(a3 != NULL && diag != NULL && a3 < diag);
    CHECK(strstr(err, "loadblk attempt 4") == NULL);

    /* The same failure from prefault is an error, and the process lives. */
    bigfile_vma *vma = failing_mapping();
    CHECK_FAILS(bigfile_vma_prefault(vma, 5 * BLK, 1, BIGFILE_ACCESS_READ) == -1, BIGFILE_ERROR_LOAD,
                "loadblk of block 5 of failing-disk failed after 3 attempt(s): medium error at block 5");
    CHECK(atomic_load(&attempts) == 3);
    CHECK(bigfile_vma_unmap(vma) == 0);
    CHECK(bigfile_fileh_close(failing_fh) == 0);

    /* A load failing twice, then succeeding, is served. */
    struct mapped m = map_memfile(8, 0);
    CHECK(bigfile_fileh_set_load_policy(m.fh, 3, 100) == 0);
    atomic_store(&m.mf->fail_load_blk, 2);
    atomic_store(&m.mf->fail_load_times, 2);
    CHECK(m.p[2 * BLK + 7] == initial_byte(2, 7));
    bigfile_stats s = fileh_stats(m.fh);
    CHECK(s.loads == 1 && s.load_errors == 2);
    unmap_memfile(&m);
    printf("loadfail: ok\n");
    return 0;
}
