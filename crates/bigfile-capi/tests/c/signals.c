/* A handler of the program's own installed over bigfile's: put back below
 * bigfile's (by bigfile_ensure_fault_handler_on_top, and by mapping), it
 * still gets the faults that are not bigfile's. */
#include "common.h"

#include <signal.h>

static volatile sig_atomic_t own_calls;

static void own_handler(int sig, siginfo_t *info, void *ctx) {
    (void)sig, (void)ctx;
    if (info->si_code != SI_TKILL) /* only raise() is expected here */
        abort();
    own_calls++;
}

static void install_own(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = own_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGSEGV, &sa, NULL) == 0);
}

int main(void) {
    start("signals");
    struct mapped m = map_memfile(8, 0);
    const volatile unsigned char *p = m.p;
    CHECK(p[0] == initial_byte(0, 0));
    CHECK(bigfile_ensure_fault_handler_on_top() == 0);

    install_own();
    CHECK(bigfile_ensure_fault_handler_on_top() == 1);
    CHECK(bigfile_ensure_fault_handler_on_top() == 0);
    CHECK(p[BLK] == initial_byte(1, 0));
    raise(SIGSEGV); /* not bigfile's: chained to ours */
    CHECK(own_calls == 1);

    /* Mapping puts bigfile's back on top as well. */
    install_own();
    bigfile_vma *vma2 = bigfile_fileh_mmap(m.fh, 4, 4);
    CHECK(vma2 != NULL);
    CHECK(bigfile_ensure_fault_handler_on_top() == 0);
    CHECK(p[2 * BLK] == initial_byte(2, 0));
    raise(SIGSEGV);
    CHECK(own_calls == 2);

    CHECK(bigfile_vma_unmap(vma2) == 0);
    unmap_memfile(&m);
    printf("signals: ok\n");
    return 0;
}
