// The header used from C++ (compiled with -Wall -Wextra -Werror -pedantic):
// declarations, constants and the callback types work as in C.
#include <bigfile.h>

#include <cstdio>
#include <cstring>

namespace {

int fill(void *user, uint64_t blk, void *buf, size_t len) {
    static_cast<void>(user);
    std::memset(buf, static_cast<int>(blk), len);
    return 0;
}

int fail(const char *what) {
    std::fprintf(stderr, "header.cpp: %s failed: %s\n", what,
                 bigfile_last_error() ? bigfile_last_error() : "(no error)");
    return 1;
}

}  // namespace

int main() {
    if (bigfile_file_new(4096, nullptr, nullptr, nullptr, nullptr) != nullptr ||
        bigfile_last_error_kind() != BIGFILE_ERROR_INVALID)
        return fail("a NULL loadblk refused");
    bigfile_file *file = bigfile_file_new(64 << 10, fill, nullptr, nullptr, nullptr);
    bigfile_fileh *fh = file ? bigfile_fileh_open(file, nullptr) : nullptr;
    bigfile_vma *vma = fh ? bigfile_fileh_mmap(fh, 0, 4) : nullptr;
    if (!vma)
        return fail("mapping");
    const unsigned char *p = static_cast<const unsigned char *>(bigfile_vma_addr(vma));
    bigfile_stats s;
    if (p[3 << 16] != 3 || bigfile_fileh_stats(fh, &s) != 0 || s.loads != 1)
        return fail("loading");
    const unsigned flags = BIGFILE_WRITEOUT_STORE | BIGFILE_WRITEOUT_MARKSTORED;
    if (bigfile_fileh_dirty_writeout(fh, flags) != 0 || bigfile_vma_unmap(vma) != 0 ||
        bigfile_fileh_close(fh) != 0)
        return fail("closing");
    bigfile_file_free(file);
    std::printf("header.cpp: ok\n");
    return 0;
}
