/* The normal paths: load on first access, dirty on write, writeout,
 * discard, invalidation, prefault, advice, load policy, stats, reclaim,
 * the default RAM, and ownership (release once, when nothing uses the file). */
#include "common.h"

int main(void) {
    start("basic");
    struct memfile *mf = memfile_new(32);
    bigfile_file *file = memfile_bigfile(mf);
    CHECK(bigfile_file_set_name(file, "basic-file") == 0);
    bigfile_ram *ram = bigfile_ram_new(RAM_SPEC, 16 * BLK);
    CHECK(ram != NULL);
    CHECK(bigfile_last_error() == NULL && bigfile_last_error_kind() == BIGFILE_ERROR_NONE);
    bigfile_ram_usage rs = ram_stats(ram);
    CHECK(rs.budget == 16 * BLK && rs.resident_bytes == 0);

    bigfile_fileh *fh = bigfile_fileh_open(file, ram);
    CHECK(fh != NULL);
    bigfile_vma *vma = bigfile_fileh_mmap(fh, 4, 8); /* blocks 4..12 */
    CHECK(vma != NULL);
    unsigned char *p = bigfile_vma_addr(vma);
    CHECK(p != NULL && bigfile_vma_len(vma) == 8 * BLK);

    /* A read loads the block; a second read of it does not. */
    CHECK(p[BLK + 100] == initial_byte(5, 100));
    CHECK(p[BLK + 200] == initial_byte(5, 200));
    CHECK(atomic_load(&mf->loads) == 1);
    bigfile_stats s = fileh_stats(fh);
    CHECK(s.loads == 1 && s.resident_pages == 1 && s.dirty_pages == 0);

    /* A write dirties; writeout stores, then marks clean. */
    memcpy(p + 2 * BLK, "hello", 5); /* block 6 */
    CHECK(fileh_stats(fh).dirty_pages == 1);
    CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE) == 0);
    CHECK(atomic_load(&mf->stores) == 1 && memcmp(mf->data + 6 * BLK, "hello", 5) == 0);
    CHECK(fileh_stats(fh).dirty_pages == 1); /* STORE alone keeps pages dirty */
    CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) == 0);
    CHECK(fileh_stats(fh).dirty_pages == 0 && atomic_load(&mf->stores) == 2);

    /* Discard drops changes: the stored data comes back. */
    memcpy(p + 2 * BLK, "HELLO", 5);
    p[3 * BLK] = 0xAB; /* block 7 */
    CHECK(fileh_stats(fh).dirty_pages == 2);
    CHECK(bigfile_fileh_dirty_discard(fh) == 0);
    CHECK(fileh_stats(fh).dirty_pages == 0);
    CHECK(memcmp(p + 2 * BLK, "hello", 5) == 0);
    CHECK(p[3 * BLK] == initial_byte(7, 0));

    /* Invalidation: the file changed underneath; the next access reloads. */
    pthread_mutex_lock(&mf->lock);
    mf->data[6 * BLK] = 'j';
    pthread_mutex_unlock(&mf->lock);
    CHECK(p[2 * BLK] == 'h');
    CHECK(bigfile_fileh_invalidate_page(fh, 6) == 0);
    CHECK(p[2 * BLK] == 'j');

    /* Prefault: loaded (and dirtied for a write) without touching memory. */
    int loads = atomic_load(&mf->loads);
    CHECK(bigfile_vma_prefault(vma, 4 * BLK, 2 * BLK, BIGFILE_ACCESS_READ) == 0);
    CHECK(atomic_load(&mf->loads) == loads + 2);
    CHECK(bigfile_vma_prefault(vma, 7 * BLK + 5, 1, BIGFILE_ACCESS_WRITE) == 0);
    CHECK(fileh_stats(fh).dirty_pages == 1);
    CHECK(bigfile_vma_prefault(vma, 0, 0, BIGFILE_ACCESS_READ) == 0); /* empty: nothing */
    CHECK(bigfile_fileh_dirty_discard(fh) == 0);

    /* Advice and load policy. */
    CHECK(bigfile_vma_advise(vma, BIGFILE_ADVICE_SEQUENTIAL) == 0);
    CHECK(bigfile_vma_advise(vma, BIGFILE_ADVICE_RANDOM) == 0);
    CHECK(bigfile_vma_advise(vma, BIGFILE_ADVICE_NORMAL) == 0);
    unsigned attempts = 0;
    uint64_t backoff = 0;
    CHECK(bigfile_fileh_load_policy(fh, &attempts, &backoff) == 0);
    CHECK(attempts == 3 && backoff == 1000);
    CHECK(bigfile_fileh_set_load_policy(fh, 5, 0) == 0);
    CHECK(bigfile_fileh_load_policy(fh, &attempts, NULL) == 0 && attempts == 5);

    /* Two mappings of one handle are one memory. */
    bigfile_vma *vma2 = bigfile_fileh_mmap(fh, 6, 1);
    CHECK(vma2 != NULL);
    unsigned char *q = bigfile_vma_addr(vma2);
    q[10] = 'Z';
    CHECK(p[2 * BLK + 10] == 'Z');
    CHECK(bigfile_vma_unmap(vma2) == 0);
    CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) == 0);
    CHECK(stored_byte(mf, 6, 10) == 'Z');

    /* Reclaim drops the clean pages, and they load again. */
    rs = ram_stats(ram);
    CHECK(rs.stats.resident_pages > 0 && rs.resident_bytes == rs.stats.resident_pages * BLK);
    CHECK(bigfile_ram_reclaim(ram) == (int64_t)rs.stats.resident_pages);
    CHECK(ram_stats(ram).stats.resident_pages == 0);
    CHECK(p[2 * BLK + 10] == 'Z');
    CHECK(bigfile_ram_set_budget(ram, 2 * BLK) == 0 && ram_stats(ram).budget == 2 * BLK);

    /* A second handle on the default RAM sees the stored data, not the
     * first handle's changes. */
    p[2 * BLK + 11] = 'Y';
    bigfile_fileh *fh2 = bigfile_fileh_open(file, NULL);
    CHECK(fh2 != NULL);
    bigfile_vma *v2 = bigfile_fileh_mmap(fh2, 0, 8);
    CHECK(v2 != NULL);
    unsigned char *r = bigfile_vma_addr(v2);
    CHECK(r[6 * BLK + 10] == 'Z' && r[6 * BLK + 11] == initial_byte(6, 11));
    CHECK(bigfile_ram_reclaim(NULL) >= 1); /* the default RAMs */
    CHECK(r[6 * BLK + 10] == 'Z');

    /* Ownership: the file and the RAM may be freed before the handles;
     * release runs once, when the last handle is gone. */
    bigfile_file_free(file);
    CHECK(bigfile_last_error() == NULL);
    bigfile_ram_free(ram);
    CHECK(atomic_load(&mf->releases) == 0);
    CHECK(bigfile_vma_unmap(v2) == 0);
    CHECK(bigfile_fileh_close(fh2) == 0);
    CHECK(atomic_load(&mf->releases) == 0);
    CHECK(bigfile_vma_unmap(vma) == 0);
    CHECK(bigfile_fileh_close(fh) == 0);
    CHECK(atomic_load(&mf->releases) == 1);

    /* A file no handle uses is released by free itself. */
    file = memfile_bigfile(mf);
    bigfile_file_free(file);
    CHECK(atomic_load(&mf->releases) == 2);
    memfile_free(mf);
    printf("basic: ok\n");
    return 0;
}
