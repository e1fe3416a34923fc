/* A RAM budget of 4 pages under a mapping of 64: reading everything stays
 * within the budget by reclaiming clean pages; changes are committed in
 * batches that fit; a budget full of dirty pages is an error from prefault. */
#include "common.h"

#define NBLK 64
#define BUDGET 4

static void check_all(const unsigned char *p, struct memfile *mf, const bigfile_ram *ram) {
    for (uint64_t b = 0; b < NBLK; b++) {
        for (size_t off = 0; off < BLK; off += 4096)
            CHECK(p[b * BLK + off] == stored_byte(mf, b, off));
        CHECK(ram_stats(ram).stats.resident_pages <= BUDGET);
    }
}

int main(void) {
    start("budget");
    struct mapped m = map_memfile(NBLK, BUDGET * BLK);
    struct memfile *mf = m.mf;
    bigfile_ram *ram = m.ram;
    bigfile_fileh *fh = m.fh;
    bigfile_vma *vma = m.vma;
    unsigned char *p = m.p;

    check_all(p, mf, ram);
    bigfile_ram_usage rs = ram_stats(ram);
    CHECK(rs.stats.loads == NBLK && rs.stats.reclaims >= NBLK - BUDGET);
    CHECK(rs.resident_bytes <= rs.budget && rs.budget == BUDGET * BLK);

    /* Change every block, committing every BUDGET - 1 blocks. */
    for (uint64_t b = 0; b < NBLK; b++) {
        memset(p + b * BLK + 64, (int)(0x80 | b), 128);
        if (b % (BUDGET - 1) == BUDGET - 2 || b == NBLK - 1)
            CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE |
                                                       BIGFILE_WRITEOUT_MARKSTORED) == 0);
    }
    CHECK(atomic_load(&mf->stores) == NBLK);
    check_all(p, mf, ram);
    for (uint64_t b = 0; b < NBLK; b++)
        CHECK(stored_byte(mf, b, 64) == (0x80 | b) && stored_byte(mf, b, 191) == (0x80 | b));

    /* A budget full of dirty pages: the next load cannot be served. */
    for (uint64_t b = 0; b < BUDGET; b++)
        p[b * BLK] = 1;
    CHECK(fileh_stats(fh).dirty_pages == BUDGET);
    CHECK_FAILS(bigfile_vma_prefault(vma, 10 * BLK, 1, BIGFILE_ACCESS_READ) == -1,
                BIGFILE_ERROR_NOMEM, "budget");
    CHECK(bigfile_fileh_dirty_discard(fh) == 0);
    CHECK(bigfile_vma_prefault(vma, 10 * BLK, 1, BIGFILE_ACCESS_READ) == 0);
    check_all(p, mf, ram);

    unmap_memfile(&m);
    printf("budget: ok\n");
    return 0;
}
