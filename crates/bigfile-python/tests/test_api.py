"""The wendelin.bigfile-compatible API and what goes beyond it."""

import gc
import os
import subprocess
import weakref

import numpy as np
import pytest
from conftest import PS, DataFile, run_py

import bigfile
from bigfile import RAM, VMA, WRITEOUT_MARKSTORED, WRITEOUT_STORE, BigFile, BigFileH, ram_reclaim


def test_constants():
    assert WRITEOUT_STORE == 1
    assert WRITEOUT_MARKSTORED == 2
    assert set(bigfile.__all__) >= {"BigFile", "WRITEOUT_STORE", "WRITEOUT_MARKSTORED", "ram_reclaim"}


def test_subclass_new_and_blksize_readonly(f):
    assert f.blksize == PS
    assert isinstance(f, BigFile)
    with pytest.raises(AttributeError):
        f.blksize = 2 * PS
    assert f.blksize == PS


def test_subclass_with_init_only():
    class G(BigFile):
        def __init__(self, blksize, fill):
            self.fill = fill

        def loadblk(self, blk, buf):
            buf[:] = bytes([self.fill]) * len(buf)

    g = G(PS, 9)
    vma = g.fileh_open().mmap(0, 1)
    assert memoryview(vma)[100] == 9


def test_mmap_reads_load_blocks(f):
    fh = f.fileh_open()
    assert isinstance(fh, BigFileH)
    vma = fh.mmap(2, 3)
    assert isinstance(vma, VMA)
    assert len(vma) == 3 * PS
    assert vma.filerange() == (2, 3)
    assert vma.pagesize() == PS
    assert vma.addr_stop - vma.addr_start == 3 * PS
    assert vma.fileh is fh
    m = memoryview(vma)
    assert (m[0], m[PS], m[2 * PS + 7]) == (2, 3, 4)
    assert f.loads == [2, 3, 4]
    assert m[1] == 2
    assert f.loads == [2, 3, 4], "a loaded page is not loaded again"
    assert not fh.isdirty()


def test_loadblk_buf_is_writable_memoryview_of_blksize():
    seen = []

    class G(BigFile):
        def loadblk(self, blk, buf):
            seen.append((type(buf), len(buf), buf.readonly, buf.format))

    vma = G(PS).fileh_open().mmap(0, 1)
    memoryview(vma)[0]
    assert seen == [(memoryview, PS, False, "B")]


def test_storeblk_buf_is_readonly(f):
    seen = []

    class G(DataFile):
        def storeblk(self, blk, buf):
            seen.append((len(buf), buf.readonly, bytes(buf[:3])))
            with pytest.raises(TypeError):
                buf[0] = 1

    g = G()
    fh = g.fileh_open()
    vma = fh.mmap(0, 1)
    memoryview(vma)[:3] = b"abc"
    fh.dirty_writeout(WRITEOUT_STORE)
    assert seen == [(PS, True, b"abc")]


def test_numpy_view_without_copy(f):
    fh = f.fileh_open()
    vma = fh.mmap(0, 4)
    a = np.ndarray((4 * PS,), np.uint8, buffer=vma)
    assert a.__array_interface__["data"][0] == vma.addr_start
    assert a[PS] == 1
    a[PS + 1] = 200
    assert memoryview(vma)[PS + 1] == 200
    b = np.ndarray((2, PS // 4), np.uint32, buffer=vma, offset=2 * PS)
    assert b[0, 0] == 0x02020202
    assert fh.dirty_blocks() == [1]


def test_writeout_store_and_markstored(f):
    fh = f.fileh_open()
    vma = fh.mmap(0, 4)
    m = memoryview(vma)
    m[3 * PS] = 33
    m[0] = 11
    assert fh.isdirty()
    assert fh.dirty_blocks() == [0, 3]
    fh.dirty_writeout(WRITEOUT_STORE)
    assert f.stores == [0, 3], "ascending block order"
    assert fh.isdirty(), "STORE alone leaves pages dirty"
    fh.dirty_writeout(WRITEOUT_MARKSTORED)
    assert not fh.isdirty()
    assert f.data[0][0] == 11 and f.data[3][0] == 33
    m[5] = 55
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert f.stores == [0, 3, 0]
    assert f.data[0][5] == 55 and not fh.isdirty()


def test_discard(f):
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 2))
    m[0] = 99
    m[PS] = 98
    fh.dirty_discard()
    assert not fh.isdirty()
    assert m[0] == 0 and m[PS] == 1
    assert f.stores == []


def test_invalidate_page(f):
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 2))
    assert m[PS] == 1
    f.data[1] = b"\x07" * PS
    assert m[PS] == 1, "still the loaded page"
    fh.invalidate_page(1)
    assert m[PS] == 7
    assert f.loads == [1, 1]


def test_two_handles_are_independent(f):
    m1 = memoryview(f.fileh_open().mmap(0, 1))
    m2 = memoryview(f.fileh_open().mmap(0, 1))
    m1[0] = 5
    assert m2[0] == 0


def test_ram_reclaim_returns_count(f):
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 3))
    m[0], m[PS], m[2 * PS]
    m[0] = 1  # dirty: never reclaimed
    n = ram_reclaim()
    assert isinstance(n, int) and n >= 2
    assert m[PS] == 1 and m[0] == 1
    assert f.loads.count(1) == 2


def test_weakrefs(f):
    fh = f.fileh_open()
    vma = fh.mmap(0, 1)
    for obj in (f, fh, vma):
        r = weakref.ref(obj)
        assert r() is obj
    del obj
    r = weakref.ref(vma)
    del vma
    gc.collect()
    assert r() is None


def test_context_managers_and_close(f):
    with f.fileh_open() as fh:
        with fh.mmap(0, 2) as vma:
            memoryview(vma)[0]
            with pytest.raises(RuntimeError, match="live mapping"):
                fh.close()
        assert vma.closed
        with pytest.raises(ValueError, match="unmapped"):
            memoryview(vma)
    assert fh.closed
    with pytest.raises(ValueError, match="closed"):
        fh.mmap(0, 1)
    fh.close()


def test_unmap_refused_while_exported(f):
    vma = f.fileh_open().mmap(0, 1)
    m = memoryview(vma)
    with pytest.raises(BufferError):
        vma.close()
    m.release()
    vma.unmap()
    assert vma.closed


def test_stats(f):
    fh = f.fileh_open()
    m = memoryview(fh.mmap(0, 2))
    m[0]
    m[PS] = 1
    s = fh.stats()
    assert s["loads"] == 2 and s["dirty_pages"] == 1 and s["resident_pages"] == 2
    fh.dirty_writeout(WRITEOUT_STORE)
    assert fh.stats()["stores"] == 1
    rs = fh.ram_stats()
    assert rs["budget"] > 0 and rs["resident_bytes"] >= 2 * PS


def test_prefault(f):
    fh = f.fileh_open()
    vma = fh.mmap(0, 4)
    vma.prefault(0, 2 * PS)
    assert f.loads == [0, 1]
    assert vma.mapped_pages() == [0, 1]
    vma.prefault(3 * PS, 3 * PS + 1, write=True)
    assert fh.dirty_blocks() == [3]


@pytest.mark.parametrize("advice", ["sequential", "normal"])
def test_a_scan_drops_behind_advised_or_detected(f, advice):
    fh = f.fileh_open(ram="memfd", budget=4 * PS)
    other = fh.mmap(10, 2)
    assert bytes(memoryview(other)[::PS]) == b"\x0a\x0b"
    before = fh.stats()["streams"]  # the other mapping's two blocks: one
    assert before == 1
    vma = fh.mmap(0, 8)
    assert vma.advice == "normal"
    vma.advise(advice)
    assert vma.advice == advice and other.advice == "normal"
    m = memoryview(vma)
    for blk in range(8):
        assert m[blk * PS + 5] == blk
    # The scan kept its first block and the one it ended on; the other
    # mapping's blocks stayed cached (with "random" they would be gone).
    assert [b for b in range(12) if fh.page_state(b)] == [0, 7, 10, 11]
    # Under "normal" the scan was detected as a stream (sequential advice
    # needs no detection).
    streams = before + (advice == "normal")
    assert fh.stats()["streams"] == streams
    assert fh.ram_stats()["streams"] == streams
    vma.advise("random")
    assert vma.advice == "random"
    for blk in range(8):
        assert m[blk * PS + 5] == blk
    assert [b for b in range(12) if fh.page_state(b)] == [4, 5, 6, 7]
    assert fh.stats()["streams"] == streams, "random: none detected"
    with pytest.raises(ValueError, match="unknown advice 'backwards'"):
        vma.advise("backwards")
    del m
    vma.close()
    with pytest.raises(ValueError):
        vma.advise("normal")


def test_prefault_raises_loadblk_exception():
    class G(BigFile):
        def loadblk(self, blk, buf):
            raise ZeroDivisionError("no block %d" % blk)

    fh = G(PS).fileh_open()
    fh.set_load_policy(1)
    vma = fh.mmap(0, 1)
    with pytest.raises(ZeroDivisionError, match="no block 0"):
        vma.prefault()


def test_prefault_raises_loadblk_exception_after_retries():
    """With the default policy (3 attempts), each failed attempt's exception
    is let go of before the next (with the GIL released by virtmem): under
    the GIL, or the interpreter aborts ("PyThreadState_Get: ... GIL is
    released"). In a child, which such an abort kills."""
    r = run_py("""
        import mmap
        from bigfile import BigFile
        class G(BigFile):
            def loadblk(self, blk, buf):
                raise ZeroDivisionError("no block %d" % blk)
        vma = G(mmap.PAGESIZE).fileh_open().mmap(0, 1)
        try:
            vma.prefault()
        except ZeroDivisionError as e:
            print("raised:", e)
        print("stats:", vma.fileh.stats()["load_errors"])
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "raised: no block 0" in r.stdout and "stats: 3" in r.stdout, r.stdout


def test_prefault_then_readinto(f, tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"y" * PS)
    vma = f.fileh_open().mmap(0, 1)
    vma.prefault(write=True)
    with open(p, "rb", buffering=0) as fd:
        assert fd.readinto(memoryview(vma)) == PS
    assert memoryview(vma)[0] == ord("y")


def test_ram_spec_and_budget(f):
    fh = f.fileh_open(ram="memfd", budget=2 * PS)
    m = memoryview(fh.mmap(0, 8))
    total = sum(m[i * PS] for i in range(8))
    assert total == sum(range(8))
    rs = fh.ram_stats()
    assert rs["budget"] == 2 * PS
    assert rs["resident_bytes"] <= 2 * PS


def test_rams_made_without_a_budget_follow_the_memory(f):
    """A RAM made without a budget got all the memory its backend has: a
    RAM made only to choose a backend (as the README's kernel-I/O example
    does) let a scan fill the machine with shared memory the kernel cannot
    drop. It follows the memory the process may use, as the default RAM
    does: a quarter of it at most."""
    with open("/proc/meminfo") as m:
        total = int(next(l for l in m if l.startswith("MemTotal:")).split()[1]) * 1024
    budgets = {
        "default": f.fileh_open().ram_stats()["budget"],
        "RAM(spec)": RAM("memfd,pagesize=%d" % PS).budget,
        "ram=spec": f.fileh_open(ram="memfd").ram_stats()["budget"],
        "fault_backend=": f.fileh_open(fault_backend="signals").ram_stats()["budget"],
    }
    for how, b in budgets.items():
        assert 0 < b <= total // 4, (how, b, total)
    # An explicit budget is kept as given.
    assert RAM("memfd,pagesize=%d" % PS, budget=total).budget == total - total % PS


def test_ram_object(f):
    ram = RAM("memfd,pagesize=%d" % PS, budget=3 * PS)
    assert ram.pagesize == PS and ram.budget == 3 * PS
    ram.budget = 4 * PS
    assert ram.budget == 4 * PS
    fh = f.fileh_open(ram=ram)
    m = memoryview(fh.mmap(0, 2))
    m[0], m[PS]
    assert ram.stats()["loads"] == 2
    assert ram.reclaim() == 2
    assert "memfd" in repr(ram)


def test_ram_budget_exhausted_by_dirty_pages_prefault(f):
    fh = f.fileh_open(budget=PS)
    vma = fh.mmap(0, 2)
    vma.prefault(0, PS, write=True)
    with pytest.raises(MemoryError, match="budget"):
        vma.prefault(PS, 2 * PS)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A tmpfs of 4 OS pages (needs root to mount; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "tiny"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % (4 * PS), "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_ram_memory_exhausted_prefault(f, tiny_tmpfs):
    # The budget is far from full: the RAM's filesystem is, with dirty pages
    # that cannot be reclaimed.
    fh = f.fileh_open(ram="shmfs:%s,pagesize=%d" % (tiny_tmpfs, PS), budget=1 << 30)
    vma = fh.mmap(0, 8)
    vma.prefault(0, 4 * PS, write=True)
    with pytest.raises(MemoryError, match="RAM (exhausted|handle full)") as e:
        vma.prefault(4 * PS, 5 * PS)
    assert "budget" not in str(e.value)
    fh.dirty_discard()
    vma.prefault(4 * PS, 5 * PS)
    assert memoryview(vma)[4 * PS] == 4


def test_2mib_blocks():
    g = DataFile(2 << 20)
    fh = g.fileh_open()
    a = np.ndarray((2, 2 << 20), np.uint8, buffer=fh.mmap(0, 2))
    assert a[1, 12345] == 1
    a[0, :] = 3
    fh.dirty_writeout(WRITEOUT_STORE | WRITEOUT_MARKSTORED)
    assert g.data[0] == b"\x03" * (2 << 20)
