/* Fault backends per RAM (bigfile_ram_new_on, bigfile_ram_fault_backend,
 * bigfile_ram_fault_backend_fallback), and a loader that takes the host
 * lock through bigfile_host_lock_wait. On the userfaultfd backend read(2)
 * into a page not loaded is served by a worker, whose loader takes the
 * host lock; when the thread in read(2) holds that lock, the watched wait
 * fails the call with EFAULT after 5 s instead of hanging (the watchdog's
 * alarm would end the program). */
#include "common.h"

#include <errno.h>
#include <fcntl.h>

static pthread_mutex_t runtime = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local int holding;

static void runtime_unlock(void) {
    holding = 0;
    pthread_mutex_unlock(&runtime);
}

/* bigfile_host_acquire_fn */
static void runtime_acquire(void *user) {
    pthread_mutex_lock(user);
    holding = 1;
}

static void *release_hook(void *user) {
    (void)user;
    if (!holding)
        return NULL;
    runtime_unlock();
    return (void *)&holding;
}

static void retake_hook(void *user, void *token) {
    (void)token;
    runtime_acquire(user);
}

/* A loader running runtime code: it takes the runtime's lock, watched. */
static int runtime_loadblk(void *user, uint64_t blk, void *buf, size_t len) {
    CHECK(bigfile_host_lock_wait(runtime_acquire, &runtime) == 0);
    CHECK(holding);
    int rc = memfile_loadblk(user, blk, buf, len);
    runtime_unlock();
    return rc;
}

/* read(2) of 100 bytes of /dev/zero into `dst`: 0, or the errno. */
static int read_zeros(void *dst) {
    int z = open("/dev/zero", O_RDONLY | O_CLOEXEC);
    CHECK(z >= 0);
    ssize_t n = read(z, dst, 100);
    int err = n < 0 ? errno : 0;
    close(z);
    CHECK(n == 100 || n < 0);
    return err;
}

int main(void) {
    start("backend");
    CHECK(bigfile_set_host_lock(release_hook, retake_hook, &runtime) == 0);
    CHECK_FAILS(bigfile_host_lock_wait(NULL, NULL) == -1, BIGFILE_ERROR_INVALID, "acquire is NULL");
    CHECK_FAILS(bigfile_ram_new_on(RAM_SPEC, 0, 7) == NULL, BIGFILE_ERROR_INVALID,
                "fault_backend 7");

    struct memfile *mf = memfile_new(4);
    bigfile_file *file = bigfile_file_new(BLK, runtime_loadblk, NULL, memfile_release, mf);
    CHECK(file != NULL);
    char why[512];

    /* Signals, asked for: the reason says so; read(2) into a page not
     * loaded fails with EFAULT. */
    bigfile_ram *sig = bigfile_ram_new_on(RAM_SPEC, 0, BIGFILE_FAULTS_SIGNALS);
    CHECK(sig != NULL && bigfile_ram_fault_backend(sig) == BIGFILE_FAULTS_SIGNALS);
    int64_t n = bigfile_ram_fault_backend_fallback(sig, why, sizeof why);
    CHECK(n > 0 && (size_t)n == strlen(why) && strstr(why, "signals asked for") != NULL);
    char small[4];
    CHECK(bigfile_ram_fault_backend_fallback(sig, small, sizeof small) == n && strlen(small) == 3);
    CHECK(bigfile_ram_fault_backend_fallback(sig, NULL, 0) == n);
    CHECK_FAILS(bigfile_ram_fault_backend_fallback(sig, NULL, 1) == -1, BIGFILE_ERROR_INVALID, "NULL");
    bigfile_fileh *fh = bigfile_fileh_open(file, sig);
    bigfile_vma *vma = bigfile_fileh_mmap(fh, 0, 2);
    CHECK(fh != NULL && vma != NULL);
    CHECK(read_zeros(bigfile_vma_addr(vma)) == EFAULT);
    CHECK(bigfile_vma_unmap(vma) == 0 && bigfile_fileh_close(fh) == 0);
    bigfile_ram_free(sig);

    /* Userfaultfd, asked for: an error saying why where the process cannot
     * have it (not allowed where it must be there). */
    bigfile_ram *uffd = bigfile_ram_new_on(RAM_SPEC, 0, BIGFILE_FAULTS_USERFAULTFD);
    if (uffd == NULL) {
        CHECK(getenv("BIGFILE_REQUIRE_UFFD") == NULL);
        CHECK_FAILS(1, BIGFILE_ERROR_OS, "userfaultfd");
        printf("backend: no userfaultfd here (%s)\n", last_error_text());
    } else {
        CHECK(bigfile_ram_fault_backend(uffd) == BIGFILE_FAULTS_USERFAULTFD);
        CHECK(bigfile_ram_fault_backend_fallback(uffd, why, sizeof why) == 0 && why[0] == 0);
        fh = bigfile_fileh_open(file, uffd);
        vma = bigfile_fileh_mmap(fh, 0, 2);
        CHECK(fh != NULL && vma != NULL);
        unsigned char *base = bigfile_vma_addr(vma);
        /* Not holding the lock: the worker's loader takes it, the call
         * works. */
        CHECK(read_zeros(base) == 0);
        CHECK(base[0] == 0 && base[4096] == initial_byte(0, 4096));
        /* Holding it: the loader waits for it, watched; the call fails. */
        runtime_acquire(&runtime);
        CHECK(read_zeros(base + BLK) == EFAULT);
        runtime_unlock();
        /* The loader got the lock then: the page is there for the next
         * access. */
        CHECK(base[BLK + 4096] == initial_byte(1, 4096));
        CHECK(bigfile_vma_unmap(vma) == 0 && bigfile_fileh_close(fh) == 0);
        bigfile_ram_free(uffd);
    }
    bigfile_file_free(file);
    /* Released once the given-up worker, which loaded block 1 after, lets
     * go of the handle too. */
    while (atomic_load(&mf->releases) == 0)
        usleep(1000);
    CHECK(atomic_load(&mf->releases) == 1);
    memfile_free(mf);
    printf("backend: ok\n");
    return 0;
}
