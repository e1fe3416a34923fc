"""The user paths of issue 18 on a hugetlbfs RAM on the userfaultfd backend
(2 MiB pages, each one page-table entry, made present and write-protected
whole): np.save, tofile and file.write of a BigArray with nothing loaded,
readinto over a clean loaded page tracked as dirty and written out, discard.
The huge page pool is grown around each test, under the machine-wide lock
the Rust tests take (bigfile_testkit::hugepages), and restored after; the
tests skip only where it cannot be grown (not root)."""

import fcntl
import os

import numpy as np
import pytest

from bigfile import WRITEOUT_MARKSTORED, WRITEOUT_STORE
from bigfile.bigarray import BigArray
from bigfile.file_file import BigFile_File

from conftest import DataFile, run_py

HUGE = 2 << 20
BLOCKS = 6
BUDGET = 3
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
# The machine's one lock file (bigfile_testkit::hugepages::pool_lock_path).
POOL_LOCK = "/tmp/bigfile-ram-tests-nr_hugepages.lock"


@pytest.fixture
def hugepages():
    """The pool of default-size huge pages grown for the test (room for the
    budget and the spares reclaim keeps ahead), restored after, all under
    the lock every test process resizing it takes. The lock file records
    the size to restore while the pool is changed: a holder that died
    without restoring it left it there (bigfile_testkit::hugepages)."""
    if os.geteuid() != 0:
        pytest.skip(f"not root: cannot change {NR_HUGEPAGES}")
    want = 2 * BUDGET + 2
    with open(POOL_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        old = lock.read().strip()
        if not old:
            with open(NR_HUGEPAGES) as f:
                old = f.read().strip()
        record(lock, old)
        try:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(want))
            with open(NR_HUGEPAGES) as f:
                got = int(f.read())
            assert got == want, f"asked the kernel for {want} huge pages, got {got}"
            yield
        finally:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(old)
            record(lock, "")


def record(lock, old):
    """Record `old` in the pool's lock file ("": nothing to restore)."""
    lock.seek(0)
    lock.truncate()
    lock.write(old)
    lock.flush()


def expected(blocks):
    return b"".join(bytes([b & 0xFF]) * HUGE for b in blocks)


class NativeFile:
    """A BigFile_File (native I/O) over a file whose block n is all bytes n."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "native.bin"
        self.path.write_bytes(expected(range(BLOCKS)))
        self.file = BigFile_File(str(self.path), HUGE)

    def stored(self, blk):
        with open(self.path, "rb") as f:
            f.seek(blk * HUGE)
            return f.read(HUGE)


class PyFile:
    """A Python BigFile (its loadblk needs the GIL, taken by a worker while
    the system call waits)."""

    def __init__(self, tmp_path):
        self.file = DataFile(HUGE)

    def stored(self, blk):
        return self.file.data.get(blk, bytes([blk]) * HUGE)


@pytest.fixture(params=["python", "native"])
def bf(request, tmp_path, hugepages):
    return {"python": PyFile, "native": NativeFile}[request.param](tmp_path)


def fileh(bf):
    fh = bf.file.fileh_open(ram="hugetlbfs", budget=BUDGET * HUGE, fault_backend="userfaultfd")
    st = fh.ram_stats()
    assert st["fault_backend"] == "userfaultfd", st["fault_backend_fallback"]
    return fh


def test_numpy_save_tofile_and_write_with_nothing_loaded(bf, tmp_path):
    fh = fileh(bf)
    a = BigArray((BLOCKS * HUGE // 8,), np.uint64, fh)
    v = a[:]
    want = np.frombuffer(expected(range(BLOCKS)), np.uint64)
    np.save(tmp_path / "out", v)
    assert np.array_equal(np.load(tmp_path / "out.npy"), want)
    # More blocks than the budget: the kernel's reads reclaimed.
    assert fh.stats()["reclaims"] > 0
    assert fh.ram_stats()["resident_bytes"] <= (BUDGET + 1) * HUGE
    for how in ("tofile", "write"):
        out = tmp_path / f"{how}.bin"
        if how == "tofile":
            v.tofile(out)
        else:
            with open(out, "wb") as f:
                assert f.write(memoryview(v).cast("B")) == BLOCKS * HUGE
        assert out.read_bytes() == expected(range(BLOCKS)), how
    assert fh.dirty_blocks() == []


def test_readinto_a_clean_loaded_page_is_tracked_written_out_and_discarded(bf, tmp_path):
    fh = fileh(bf)
    vma = fh.mmap(0, 3)
    m = memoryview(vma)
    assert m[HUGE + 5] == 1  # block 1 loaded, clean
    assert fh.dirty_blocks() == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"\xab" * 64)
    with open(src, "rb") as f:
        # Across blocks 1 (loaded, clean) and 2 (not loaded).
        assert f.readinto(m[2 * HUGE - 32 : 2 * HUGE + 32]) == 64
    assert fh.dirty_blocks() == [1, 2]
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert bf.stored(1)[-32:] == b"\xab" * 32 and bf.stored(1)[:-32] == b"\x01" * (HUGE - 32)
    assert bf.stored(2)[:32] == b"\xab" * 32
    assert fh.dirty_blocks() == []
    # Clean again: the next kernel write is tracked anew; discard drops it.
    r, w = os.pipe()
    os.write(w, b"\x55" * 10)
    os.close(w)
    assert os.readv(r, [m[HUGE + 100 : HUGE + 110]]) == 10
    os.close(r)
    assert fh.dirty_blocks() == [1]
    fh.dirty_discard()
    assert fh.dirty_blocks() == []
    assert bytes(m[HUGE + 100 : HUGE + 110]) == b"\x01" * 10
    assert bytes(m[2 * HUGE - 32 : 2 * HUGE + 32]) == b"\xab" * 64


def test_without_minor_faults_on_hugetlbfs_auto_falls_back_to_signals(hugepages):
    """A kernel whose userfaultfd lacks minor faults on hugetlbfs (the
    feature hidden, in a fresh interpreter with BIGFILE_FAULTS=auto): a
    hugetlbfs RAM is on signals with the reason; "userfaultfd" is an error;
    a memfd RAM of the same process is still on userfaultfd."""
    r = run_py(
        f"""
        from bigfile import RAM
        from conftest import DataFile
        ram = RAM("hugetlbfs", budget={BUDGET * HUGE})
        print("hugetlbfs auto:", ram.fault_backend, "|", ram.fault_backend_fallback)
        st = ram.stats()
        print("stats:", st["fault_backend"], "|", st["fault_backend_fallback"])
        try:
            RAM("hugetlbfs", fault_backend="userfaultfd")
            print("hugetlbfs asked for: userfaultfd")
        except RuntimeError as e:
            print("hugetlbfs asked for: error |", e)
        fh = DataFile({HUGE}).fileh_open(ram=ram)
        m = memoryview(fh.mmap(0, 2))
        print("hugetlbfs read:", "ok" if m[{HUGE} + 3] == 1 else "wrong data")
        try:
            memfd = RAM("memfd,pagesize=2M")
            print("memfd auto:", memfd.fault_backend, "|", memfd.fault_backend_fallback)
        except RuntimeError as e:
            print("memfd auto: error |", e)
        """,
        env={
            "BIGFILE_FAULTS": "auto",
            "BIGFILE_UFFD_HIDE_FEATURES": "minor_hugetlbfs",
            "PYTHONPATH": os.path.dirname(__file__),
        },
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    why = "UFFD_FEATURE_MINOR_HUGETLBFS"
    assert "hugetlbfs auto: signals |" in out and "hugetlbfs read: ok" in out, out
    assert "hugetlbfs asked for: error |" in out, out
    # Refused for the missing feature only (the process has userfaultfd:
    # root, which growing the pool needed): the reason in the property, the
    # stats and the error.
    assert out.count(why) == 3, out
    assert "memfd auto: userfaultfd | None" in out, out
