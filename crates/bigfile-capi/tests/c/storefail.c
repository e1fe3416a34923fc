/* Writeout with a failing storeblk: the error names the block and the
 * callback's message, every page stays dirty, nothing is lost, and a later
 * writeout stores everything. A read-only file (no storeblk) fails alike. */
#include "common.h"

static void write_blocks(unsigned char *p, const char *text) {
    for (uint64_t b = 1; b < 8; b += 2)
        memcpy(p + b * BLK + 100, text, strlen(text));
}

static int loadblk_only(void *user, uint64_t blk, void *buf, size_t len) {
    (void)user;
    memset(buf, (int)blk, len);
    return 0;
}

static int store_without_message(void *user, uint64_t blk, const void *buf, size_t len) {
    (void)user, (void)blk, (void)buf, (void)len;
    return -1;
}

int main(void) {
    start("storefail");
    struct memfile *mf = memfile_new(8);
    bigfile_file *file = memfile_bigfile(mf);
    CHECK(bigfile_file_set_name(file, "flaky-disk") == 0);
    bigfile_fileh *fh = bigfile_fileh_open(file, NULL);
    CHECK(fh != NULL);
    bigfile_vma *vma = bigfile_fileh_mmap(fh, 0, 8);
    CHECK(vma != NULL);
    unsigned char *p = bigfile_vma_addr(vma);

    write_blocks(p, "changed"); /* blocks 1, 3, 5, 7 */
    atomic_store(&mf->fail_store_blk, 3);
    CHECK_FAILS(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) == -1,
                BIGFILE_ERROR_STORE, "storeblk of block 3 of flaky-disk failed: disk full (injected)");
    CHECK(strncmp(last_error_text(), "bigfile_fileh_dirty_writeout: ", 30) == 0);
    /* Stored in ascending order up to the failure; all still dirty. */
    CHECK(atomic_load(&mf->stores) == 1 && stored_byte(mf, 1, 100) == 'c');
    CHECK(stored_byte(mf, 5, 100) == initial_byte(5, 100));
    CHECK(fileh_stats(fh).dirty_pages == 4);
    /* The changes are still there, and writes go on. */
    CHECK(memcmp(p + 5 * BLK + 100, "changed", 7) == 0);
    write_blocks(p, "CHANGED");
    /* Reclaim cannot take dirty pages. */
    bigfile_ram_reclaim(NULL);
    CHECK(fileh_stats(fh).dirty_pages == 4 && memcmp(p + 3 * BLK + 100, "CHANGED", 7) == 0);

    /* STORE alone fails the same way; then the disk recovers. */
    CHECK_FAILS(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE) == -1, BIGFILE_ERROR_STORE,
                "block 3");
    atomic_store(&mf->fail_store_blk, -1);
    CHECK(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED) == 0);
    CHECK(fileh_stats(fh).dirty_pages == 0);
    for (uint64_t b = 1; b < 8; b += 2)
        CHECK(memcmp(mf->data + b * BLK + 100, "CHANGED", 7) == 0);

    /* Nothing lost across a fresh handle either. */
    CHECK(bigfile_vma_unmap(vma) == 0);
    CHECK(bigfile_fileh_close(fh) == 0);
    fh = bigfile_fileh_open(file, NULL);
    vma = bigfile_fileh_mmap(fh, 0, 8);
    CHECK(fh != NULL && vma != NULL);
    p = bigfile_vma_addr(vma);
    for (uint64_t b = 1; b < 8; b += 2)
        CHECK(memcmp(p + b * BLK + 100, "CHANGED", 7) == 0);
    CHECK(bigfile_vma_unmap(vma) == 0);
    CHECK(bigfile_fileh_close(fh) == 0);
    bigfile_file_free(file);
    memfile_free(mf);

    /* A storeblk failing without a message, and a file without storeblk. */
    bigfile_file *files[2] = {
        bigfile_file_new(BLK, loadblk_only, store_without_message, NULL, NULL),
        bigfile_file_new(BLK, loadblk_only, NULL, NULL, NULL),
    };
    const char *expect[2] = {"storeblk returned -1 for block 2 (no message given)", "has no storeblk"};
    for (int i = 0; i < 2; i++) {
        CHECK(files[i] != NULL);
        fh = bigfile_fileh_open(files[i], NULL);
        vma = bigfile_fileh_mmap(fh, 0, 4);
        CHECK(fh != NULL && vma != NULL);
        p = bigfile_vma_addr(vma);
        CHECK(p[2 * BLK] == 2);
        p[2 * BLK] = 9;
        CHECK_FAILS(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE) == -1, BIGFILE_ERROR_STORE,
                    expect[i]);
        CHECK(p[2 * BLK] == 9 && fileh_stats(fh).dirty_pages == 1);
        CHECK(bigfile_fileh_dirty_discard(fh) == 0 && p[2 * BLK] == 2);
        CHECK(bigfile_vma_unmap(vma) == 0);
        CHECK(bigfile_fileh_close(fh) == 0);
        bigfile_file_free(files[i]);
    }
    printf("storefail: ok\n");
    return 0;
}
