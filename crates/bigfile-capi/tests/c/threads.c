/* Several threads on one mapping: concurrent faults on the same pages load
 * each block once; then, under a budget smaller than the mapping, owners
 * write and commit their blocks while others read them and a chaos thread
 * maps, unmaps, prefaults, reclaims and reads stats. Nothing is lost. */
#include "common.h"

#include <sched.h>

#define NBLK 64
#define NTHR 4
#define ROUNDS 100
#define VERSION_OFF 8 /* where a block keeps its version (uint64) */

static struct mapped m;
static bigfile_fileh *fh;
static unsigned char *base;
static pthread_barrier_t barrier;
static atomic_int writers_left = NTHR;

static uint64_t version(uint64_t blk) {
    uint64_t v;
    memcpy(&v, base + blk * BLK + VERSION_OFF, sizeof v);
    return v;
}

/* A version in a block never written is the initial bytes. */
static uint64_t initial_version(uint64_t blk) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = initial_byte(blk, VERSION_OFF + i);
    uint64_t v;
    memcpy(&v, b, sizeof v);
    return v;
}

static void *reader(void *arg) {
    (void)arg;
    pthread_barrier_wait(&barrier);
    for (uint64_t b = 0; b < NBLK; b++)
        for (size_t off = 0; off < BLK; off += 8192)
            CHECK(base[b * BLK + off] == initial_byte(b, off));
    return NULL;
}

/* Commit, waiting out another thread's writeout in progress. */
static void commit(void) {
    while (bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) != 0) {
        CHECK(bigfile_last_error_kind() == BIGFILE_ERROR_STATE);
        sched_yield();
    }
}

static void *owner(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg;
    pthread_barrier_wait(&barrier);
    for (uint64_t round = 1; round <= ROUNDS; round++) {
        for (uint64_t b = t; b < NBLK; b += NTHR) {
            CHECK(round == 1 ? version(b) == initial_version(b) : version(b) == round - 1);
            memcpy(base + b * BLK + VERSION_OFF, &round, sizeof round);
            commit();
            /* Someone else's block: some version of it, its other bytes intact. */
            uint64_t other = (b + 1 + round) % NBLK;
            uint64_t v = version(other);
            CHECK(v == initial_version(other) || v <= ROUNDS);
            CHECK(base[other * BLK + 4096] == initial_byte(other, 4096));
        }
    }
    atomic_fetch_sub(&writers_left, 1);
    return NULL;
}

static void *chaos(void *arg) {
    (void)arg;
    pthread_barrier_wait(&barrier);
    uint64_t i = 0;
    while (atomic_load(&writers_left) > 0) {
        i++;
        bigfile_vma *v = bigfile_fileh_mmap(fh, i % NBLK, 2);
        CHECK(v != NULL);
        const unsigned char *q = bigfile_vma_addr(v);
        CHECK(q[4096] == initial_byte(i % NBLK, 4096));
        CHECK(bigfile_vma_unmap(v) == 0);
        CHECK(bigfile_vma_prefault(m.vma, (i * 7 % NBLK) * BLK, BLK, BIGFILE_ACCESS_READ) == 0);
        CHECK(bigfile_ram_reclaim(m.ram) >= 0);
        bigfile_stats s = fileh_stats(fh);
        CHECK(s.dirty_pages <= NTHR);
    }
    return NULL;
}

int main(void) {
    start("threads");
    m = map_memfile(NBLK, NBLK * BLK);
    fh = m.fh;
    base = m.p;
    pthread_t th[NTHR + 1];

    /* Every thread reads every block at the same time: one load each. */
    pthread_barrier_init(&barrier, NULL, NTHR);
    for (int t = 0; t < NTHR; t++)
        CHECK(pthread_create(&th[t], NULL, reader, NULL) == 0);
    for (int t = 0; t < NTHR; t++)
        pthread_join(th[t], NULL);
    pthread_barrier_destroy(&barrier);
    CHECK(atomic_load(&m.mf->loads) == NBLK);
    CHECK(fileh_stats(fh).loads == NBLK);

    /* Owners, readers and chaos under a budget of a quarter of the mapping. */
    CHECK(bigfile_ram_set_budget(m.ram, NBLK / 4 * BLK) == 0);
    pthread_barrier_init(&barrier, NULL, NTHR + 1);
    for (int t = 0; t < NTHR; t++)
        CHECK(pthread_create(&th[t], NULL, owner, (void *)(uintptr_t)t) == 0);
    CHECK(pthread_create(&th[NTHR], NULL, chaos, NULL) == 0);
    for (int t = 0; t <= NTHR; t++)
        pthread_join(th[t], NULL);
    pthread_barrier_destroy(&barrier);

    CHECK(fileh_stats(fh).dirty_pages == 0);
    CHECK(atomic_load(&m.mf->stores) >= NBLK);
    for (uint64_t b = 0; b < NBLK; b++) {
        uint64_t v;
        pthread_mutex_lock(&m.mf->lock);
        memcpy(&v, m.mf->data + b * BLK + VERSION_OFF, sizeof v);
        pthread_mutex_unlock(&m.mf->lock);
        CHECK(v == ROUNDS && version(b) == ROUNDS);
    }
    bigfile_ram_usage rs = ram_stats(m.ram);
    CHECK(rs.stats.reclaims > 0 && rs.stats.resident_pages <= NBLK / 4);

    unmap_memfile(&m);
    printf("threads: ok\n");
    return 0;
}
