/* Misuse is answered by an error (-1 or NULL, the last error set), never
 * by a crash: NULL, dead handles (freed, closed or unmapped twice), handles
 * of another kind, garbage, closing with live mappings, bad flags, advice,
 * access, block sizes, RAM specs, empty and overflowing ranges. */
#include "common.h"

#define INVALID(call, text) CHECK_FAILS((call), BIGFILE_ERROR_INVALID, text)

static int zero_loadblk(void *user, uint64_t blk, void *buf, size_t len) {
    (void)user, (void)blk;
    memset(buf, 0, len);
    return 0;
}

int main(void) {
    start("misuse");
    bigfile_stats s;
    bigfile_ram_usage rs;
    unsigned attempts;

    /* NULL everywhere. */
    INVALID(bigfile_fileh_open(NULL, NULL) == NULL, "bigfile_fileh_open: bigfile_file is NULL");
    INVALID(bigfile_fileh_mmap(NULL, 0, 1) == NULL, "bigfile_fileh is NULL");
    INVALID(bigfile_fileh_dirty_writeout(NULL, BIGFILE_WRITEOUT_STORE) == -1, "NULL");
    INVALID(bigfile_fileh_dirty_discard(NULL) == -1, "NULL");
    INVALID(bigfile_fileh_invalidate_page(NULL, 0) == -1, "NULL");
    INVALID(bigfile_fileh_set_load_policy(NULL, 1, 0) == -1, "NULL");
    INVALID(bigfile_fileh_load_policy(NULL, &attempts, NULL) == -1, "NULL");
    INVALID(bigfile_fileh_stats(NULL, &s) == -1, "NULL");
    INVALID(bigfile_fileh_close(NULL) == -1, "NULL");
    INVALID(bigfile_vma_addr(NULL) == NULL, "bigfile_vma is NULL");
    INVALID(bigfile_vma_len(NULL) == 0, "NULL");
    INVALID(bigfile_vma_unmap(NULL) == -1, "NULL");
    INVALID(bigfile_vma_prefault(NULL, 0, 1, BIGFILE_ACCESS_READ) == -1, "NULL");
    INVALID(bigfile_vma_advise(NULL, BIGFILE_ADVICE_NORMAL) == -1, "NULL");
    INVALID(bigfile_ram_set_budget(NULL, 1) == -1, "NULL");
    INVALID(bigfile_ram_stats(NULL, &rs) == -1, "NULL");
    INVALID(bigfile_file_set_name(NULL, "x") == -1, "NULL");
    bigfile_file_free(NULL);
    CHECK(bigfile_last_error_kind() == BIGFILE_ERROR_INVALID);
    bigfile_ram_free(NULL);
    CHECK(bigfile_last_error_kind() == BIGFILE_ERROR_INVALID);
    INVALID(bigfile_set_host_lock(NULL, NULL, NULL) == -1, "NULL");

    /* Bad arguments to constructors. */
    INVALID(bigfile_file_new(BLK, NULL, NULL, NULL, NULL) == NULL, "loadblk is NULL");
    INVALID(bigfile_file_new(1000, zero_loadblk, NULL, NULL, NULL) == NULL, "blksize 1000");
    INVALID(bigfile_file_new(0, zero_loadblk, NULL, NULL, NULL) == NULL, "blksize 0");
    INVALID(bigfile_ram_new("nosuchbackend", 0) == NULL, "invalid RAM spec");
    INVALID(bigfile_ram_new("memfd,pagesize=1000", 0) == NULL, "page size");

    bigfile_file *file = bigfile_file_new(BLK, zero_loadblk, NULL, NULL, NULL);
    bigfile_ram *ram = bigfile_ram_new(RAM_SPEC, 0);
    bigfile_ram *ram2m = bigfile_ram_new("memfd,pagesize=2M", 0);
    CHECK(file != NULL && ram != NULL && ram2m != NULL);
    INVALID(bigfile_file_set_name(file, NULL) == -1, "name is NULL");
    INVALID(bigfile_fileh_open(file, ram2m) == NULL, "RAM page size 2097152 differs");
    INVALID(bigfile_ram_stats(ram, NULL) == -1, "out is NULL");
    bigfile_fileh *fh = bigfile_fileh_open(file, ram);
    CHECK(fh != NULL);
    INVALID(bigfile_fileh_stats(fh, NULL) == -1, "out is NULL");

    /* Empty and overflowing ranges. */
    INVALID(bigfile_fileh_mmap(fh, 0, 0) == NULL, "zero-length");
    INVALID(bigfile_fileh_mmap(fh, UINT64_MAX, 2) == NULL, "overflow");
    INVALID(bigfile_fileh_mmap(fh, 0, UINT64_MAX / 2) == NULL, "address space");
    bigfile_vma *vma = bigfile_fileh_mmap(fh, 0, 4);
    CHECK(vma != NULL);
    INVALID(bigfile_vma_prefault(vma, SIZE_MAX, 2, BIGFILE_ACCESS_READ) == -1, "overflows");
    INVALID(bigfile_vma_prefault(vma, 4 * BLK, 1, BIGFILE_ACCESS_READ) == -1, "outside the mapping");
    INVALID(bigfile_vma_prefault(vma, 0, 1, 2) == -1, "access 2");
    INVALID(bigfile_vma_advise(vma, 7) == -1, "advice 7");

    /* Bad flags and policy. */
    INVALID(bigfile_fileh_dirty_writeout(fh, 0) == -1, "invalid writeout flags 0x0");
    INVALID(bigfile_fileh_dirty_writeout(fh, 4) == -1, "invalid writeout flags 0x4");
    INVALID(bigfile_fileh_dirty_writeout(fh, 7) == -1, "invalid writeout flags 0x7");
    INVALID(bigfile_fileh_set_load_policy(fh, 0, 0) == -1, "attempts is 0");

    /* Handles of another kind, and garbage. */
    INVALID(bigfile_fileh_close((bigfile_fileh *)vma) == -1, "is not a live bigfile_fileh");
    INVALID(bigfile_vma_unmap((bigfile_vma *)fh) == -1, "is not a live bigfile_vma");
    INVALID(bigfile_fileh_open((bigfile_file *)ram, NULL) == NULL, "is not a live bigfile_file");
    INVALID(bigfile_fileh_open(file, (bigfile_ram *)file) == NULL, "is not a live bigfile_ram");
    INVALID(bigfile_vma_addr((bigfile_vma *)(uintptr_t)0x1234) == NULL, "is not a live bigfile_vma");
    INVALID(bigfile_fileh_dirty_discard((bigfile_fileh *)&s) == -1, "is not a live bigfile_fileh");

    /* Closing with live mappings is refused; the handle stays usable. */
    unsigned char *p = bigfile_vma_addr(vma);
    p[0] = 1;
    CHECK_FAILS(bigfile_fileh_close(fh) == -1, BIGFILE_ERROR_STATE, "1 live mapping(s)");
    CHECK(p[0] == 1 && fileh_stats(fh).dirty_pages == 1);
    CHECK(bigfile_vma_unmap(vma) == 0);
    INVALID(bigfile_vma_unmap(vma) == -1, "is not a live bigfile_vma");
    INVALID(bigfile_vma_addr(vma) == NULL, "is not a live bigfile_vma");

    /* Closing drops the dirty page; a second close is an error. */
    CHECK(bigfile_fileh_close(fh) == 0);
    CHECK(bigfile_last_error() == NULL);
    INVALID(bigfile_fileh_close(fh) == -1, "is not a live bigfile_fileh");
    INVALID(bigfile_fileh_mmap(fh, 0, 1) == NULL, "is not a live bigfile_fileh");
    INVALID(bigfile_fileh_dirty_writeout(fh, BIGFILE_WRITEOUT_STORE) == -1, "is not a live");

    /* Freed twice. */
    bigfile_file_free(file);
    CHECK(bigfile_last_error() == NULL);
    bigfile_file_free(file);
    CHECK_FAILS(1, BIGFILE_ERROR_INVALID, "bigfile_file_free: ");
    CHECK_FAILS(1, BIGFILE_ERROR_INVALID, "is not a live bigfile_file");
    INVALID(bigfile_fileh_open(file, NULL) == NULL, "is not a live bigfile_file");
    bigfile_ram_free(ram);
    bigfile_ram_free(ram2m);
    CHECK(bigfile_last_error() == NULL);
    bigfile_ram_free(ram);
    CHECK_FAILS(1, BIGFILE_ERROR_INVALID, "is not a live bigfile_ram");
    INVALID(bigfile_ram_reclaim(ram) == -1, "is not a live bigfile_ram");

    /* The block error setter only returns -1 outside a callback. */
    CHECK(bigfile_block_error("not in a callback") == -1);
    CHECK(bigfile_block_error(NULL) == -1);
    printf("misuse: ok\n");
    return 0;
}
