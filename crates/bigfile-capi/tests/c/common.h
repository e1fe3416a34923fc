/* What the C API's test programs share: checks that stop the program with
 * the last error, a watchdog, and `memfile`, a file of blocks kept in memory
 * whose callbacks count calls and fail on request. */
#ifndef BIGFILE_TEST_COMMON_H
#define BIGFILE_TEST_COMMON_H

/* POSIX and GNU interfaces (barriers, pipes, fork) under -std=c11. */
#define _GNU_SOURCE

#include <bigfile.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* 64 KiB blocks on a memfd RAM of 64 KiB pages. */
#define BLK ((size_t)64 * 1024)
#define RAM_SPEC "memfd,pagesize=64K"

static inline const char *last_error_text(void) {
    const char *e = bigfile_last_error();
    return e ? e : "(none)";
}

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n  last error: %s\n", __FILE__, \
                    __LINE__, #cond, last_error_text());                             \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

/* `failed` is true, and the last error is of `kind` and contains `text`. */
#define CHECK_FAILS(failed, kind, text)                                \
    do {                                                               \
        CHECK(failed);                                                 \
        CHECK(bigfile_last_error_kind() == (kind));                    \
        CHECK(strstr(last_error_text(), (text)) != NULL);              \
    } while (0)

/* Every program ends in 120 s, even if something hangs (SIGALRM kills it). */
static inline void start(const char *name) {
    alarm(120);
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("%s: start\n", name);
}

/* The byte at `off` of block `blk` before anything is stored there. */
static inline unsigned char initial_byte(uint64_t blk, size_t off) {
    return (unsigned char)(blk * 7 + off / 4096 + 1);
}

struct memfile {
    pthread_mutex_t lock;
    size_t nblk;
    unsigned char *data;   /* nblk * BLK bytes: what was stored */
    unsigned char *stored; /* per block: 1 once stored */
    atomic_int loads, stores, releases;
    atomic_llong fail_load_blk;  /* block whose load fails; -1: none */
    atomic_int fail_load_times;  /* how many loads of it fail; -1: all */
    atomic_llong fail_store_blk; /* block whose store fails; -1: none */
};

static inline int memfile_loadblk(void *user, uint64_t blk, void *buf, size_t len) {
    struct memfile *f = user;
    if (len != BLK || blk >= f->nblk)
        return bigfile_block_error("loadblk: bad block or length");
    if ((long long)blk == atomic_load(&f->fail_load_blk) && atomic_load(&f->fail_load_times) != 0) {
        if (atomic_load(&f->fail_load_times) > 0)
            atomic_fetch_sub(&f->fail_load_times, 1);
        return bigfile_block_error("injected load failure");
    }
    pthread_mutex_lock(&f->lock);
    if (f->stored[blk]) {
        memcpy(buf, f->data + blk * BLK, len);
    } else {
        unsigned char *b = buf;
        for (size_t i = 0; i < len; i++)
            b[i] = initial_byte(blk, i);
    }
    pthread_mutex_unlock(&f->lock);
    atomic_fetch_add(&f->loads, 1);
    return 0;
}

static inline int memfile_storeblk(void *user, uint64_t blk, const void *buf, size_t len) {
    struct memfile *f = user;
    if (len != BLK || blk >= f->nblk)
        return bigfile_block_error("storeblk: bad block or length");
    if ((long long)blk == atomic_load(&f->fail_store_blk))
        return bigfile_block_error("disk full (injected)");
    pthread_mutex_lock(&f->lock);
    memcpy(f->data + blk * BLK, buf, len);
    f->stored[blk] = 1;
    pthread_mutex_unlock(&f->lock);
    atomic_fetch_add(&f->stores, 1);
    return 0;
}

static inline void memfile_release(void *user) {
    struct memfile *f = user;
    atomic_fetch_add(&f->releases, 1);
}

static inline struct memfile *memfile_new(size_t nblk) {
    struct memfile *f = calloc(1, sizeof *f);
    CHECK(f != NULL);
    pthread_mutex_init(&f->lock, NULL);
    f->nblk = nblk;
    f->data = calloc(nblk, BLK);
    f->stored = calloc(nblk, 1);
    CHECK(f->data != NULL && f->stored != NULL);
    atomic_init(&f->fail_load_blk, -1);
    atomic_init(&f->fail_store_blk, -1);
    return f;
}

/* Free `f` (after its release callback ran). */
static inline void memfile_free(struct memfile *f) {
    free(f->data);
    free(f->stored);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

/* The bigfile over `f`, with every callback. */
static inline bigfile_file *memfile_bigfile(struct memfile *f) {
    bigfile_file *file =
        bigfile_file_new(BLK, memfile_loadblk, memfile_storeblk, memfile_release, f);
    CHECK(file != NULL);
    return file;
}

/* The block `blk` holds in the store, byte `off`. */
static inline unsigned char stored_byte(struct memfile *f, uint64_t blk, size_t off) {
    pthread_mutex_lock(&f->lock);
    unsigned char b = f->stored[blk] ? f->data[blk * BLK + off] : initial_byte(blk, off);
    pthread_mutex_unlock(&f->lock);
    return b;
}

/* A memfile of `nblk` blocks mapped whole: its file, a RAM of `budget`
 * bytes (0: none, the default RAM), a file handle and a mapping at `p`. */
struct mapped {
    struct memfile *mf;
    bigfile_file *file;
    bigfile_ram *ram;
    bigfile_fileh *fh;
    bigfile_vma *vma;
    unsigned char *p;
};

static inline struct mapped map_memfile(size_t nblk, uint64_t budget) {
    struct mapped m;
    m.mf = memfile_new(nblk);
    m.file = memfile_bigfile(m.mf);
    m.ram = budget ? bigfile_ram_new(RAM_SPEC, budget) : NULL;
    CHECK(budget == 0 || m.ram != NULL);
    m.fh = bigfile_fileh_open(m.file, m.ram);
    CHECK(m.fh != NULL);
    m.vma = bigfile_fileh_mmap(m.fh, 0, nblk);
    CHECK(m.vma != NULL);
    m.p = bigfile_vma_addr(m.vma);
    return m;
}

/* Unmap, close and free all of `m`: the file is released once, at the end. */
static inline void unmap_memfile(struct mapped *m) {
    CHECK(bigfile_vma_unmap(m->vma) == 0);
    CHECK(bigfile_fileh_close(m->fh) == 0);
    if (m->ram)
        bigfile_ram_free(m->ram);
    CHECK(bigfile_last_error() == NULL && atomic_load(&m->mf->releases) == 0);
    bigfile_file_free(m->file);
    CHECK(bigfile_last_error() == NULL && atomic_load(&m->mf->releases) == 1);
    memfile_free(m->mf);
}

static inline bigfile_stats fileh_stats(const bigfile_fileh *fh) {
    bigfile_stats s;
    CHECK(bigfile_fileh_stats(fh, &s) == 0);
    return s;
}

static inline bigfile_ram_usage ram_stats(const bigfile_ram *ram) {
    bigfile_ram_usage s;
    CHECK(bigfile_ram_stats(ram, &s) == 0);
    return s;
}

#endif
