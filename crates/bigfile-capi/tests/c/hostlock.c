/* Host-lock hooks: a runtime whose threads hold a global lock while running
 * (as an interpreter lock), with loadblk and storeblk that need the lock
 * too. Threads touch mappings and write out while holding it. Without the
 * hooks the first fault would wait for the lock its own thread holds (the
 * watchdog ends the program); with them bigfile releases the lock while it
 * serves, and retakes it after. Then one thread maps and unmaps while
 * another tries to close, both holding the lock: neither may wait for the
 * other while the other waits for the lock. */
#include "common.h"

#define NBLK 32
#define NTHR 4
#define ROUNDS 10

static pthread_mutex_t runtime = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local int holding;
static atomic_int releases, retakes;

static void runtime_lock(void) {
    pthread_mutex_lock(&runtime);
    holding = 1;
}

static void runtime_unlock(void) {
    holding = 0;
    pthread_mutex_unlock(&runtime);
}

static void *release_hook(void *user) {
    if (user != &runtime)
        abort();
    if (!holding)
        return NULL;
    runtime_unlock();
    atomic_fetch_add(&releases, 1);
    return (void *)&holding; /* any non-NULL token */
}

static void retake_hook(void *user, void *token) {
    if (user != &runtime || token != (void *)&holding)
        abort();
    runtime_lock();
    atomic_fetch_add(&retakes, 1);
}

/* bigfile_host_acquire_fn */
static void runtime_acquire(void *user) {
    (void)user;
    runtime_lock();
}

/* Callbacks that run runtime code, as a Python loadblk would. They take the
 * lock through bigfile_host_lock_wait: on the userfaultfd backend a system
 * call's fault is served on a worker, and a thread in a system call that
 * holds the lock would otherwise wait for the callback for good. */
static int runtime_loadblk(void *user, uint64_t blk, void *buf, size_t len) {
    CHECK(bigfile_host_lock_wait(runtime_acquire, NULL) == 0);
    int rc = memfile_loadblk(user, blk, buf, len);
    runtime_unlock();
    return rc;
}

static int runtime_storeblk(void *user, uint64_t blk, const void *buf, size_t len) {
    CHECK(bigfile_host_lock_wait(runtime_acquire, NULL) == 0);
    int rc = memfile_storeblk(user, blk, buf, len);
    runtime_unlock();
    return rc;
}

static bigfile_fileh *fh;
static unsigned char *base;

static void *worker(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg;
    for (int round = 1; round <= ROUNDS; round++) {
        runtime_lock();
        for (uint64_t b = 0; b < NBLK; b++)
            CHECK(base[b * BLK + 4096] == initial_byte(b, 4096));
        for (uint64_t b = t; b < NBLK; b += NTHR)
            base[b * BLK] = (unsigned char)round;
        int rc = bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED);
        CHECK(rc == 0 || bigfile_last_error_kind() == BIGFILE_ERROR_STATE);
        CHECK(holding);
        runtime_unlock();
    }
    return NULL;
}

#define RACES 1000

static void *mapper(void *arg) {
    (void)arg;
    for (int i = 0; i < RACES; i++) {
        runtime_lock();
        bigfile_vma *v = bigfile_fileh_mmap(fh, 1, 1);
        CHECK(v != NULL && bigfile_vma_unmap(v) == 0);
        runtime_unlock();
    }
    return NULL;
}

/* Refused every time: a mapping of the handle is live throughout. */
static void *closer(void *arg) {
    (void)arg;
    for (int i = 0; i < RACES; i++) {
        runtime_lock();
        CHECK_FAILS(bigfile_fileh_close(fh) == -1, BIGFILE_ERROR_STATE, "live mapping");
        runtime_unlock();
    }
    return NULL;
}

int main(void) {
    start("hostlock");
    CHECK(bigfile_set_host_lock(release_hook, retake_hook, &runtime) == 0);
    CHECK_FAILS(bigfile_set_host_lock(release_hook, retake_hook, &runtime) == -1,
                BIGFILE_ERROR_STATE, "already installed");

    struct memfile *mf = memfile_new(NBLK);
    bigfile_file *file = bigfile_file_new(BLK, runtime_loadblk, runtime_storeblk, memfile_release, mf);
    CHECK(file != NULL);
    bigfile_ram *ram = bigfile_ram_new(RAM_SPEC, NBLK * BLK);
    CHECK(ram != NULL);
    fh = bigfile_fileh_open(file, ram);
    bigfile_vma *vma = bigfile_fileh_mmap(fh, 0, NBLK);
    CHECK(fh != NULL && vma != NULL);
    base = bigfile_vma_addr(vma);

    /* Not holding the lock: the hooks leave it alone. */
    CHECK(base[0] == initial_byte(0, 0));
    CHECK(atomic_load(&releases) == 0);

    pthread_t th[NTHR];
    for (int t = 0; t < NTHR; t++)
        CHECK(pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t) == 0);
    for (int t = 0; t < NTHR; t++)
        pthread_join(th[t], NULL);

    CHECK(pthread_create(&th[0], NULL, mapper, NULL) == 0);
    CHECK(pthread_create(&th[1], NULL, closer, NULL) == 0);
    pthread_join(th[0], NULL);
    pthread_join(th[1], NULL);

    runtime_lock();
    CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) == 0);
    CHECK(holding);
    runtime_unlock();
    for (uint64_t b = 0; b < NBLK; b++)
        CHECK(stored_byte(mf, b, 0) == ROUNDS);
    CHECK(atomic_load(&releases) > 0 && atomic_load(&releases) == atomic_load(&retakes));
    printf("hostlock: %d releases\n", atomic_load(&releases));

    CHECK(bigfile_vma_unmap(vma) == 0);
    CHECK(bigfile_fileh_close(fh) == 0);
    bigfile_ram_free(ram);
    bigfile_file_free(file);
    memfile_free(mf);
    printf("hostlock: ok\n");
    return 0;
}
